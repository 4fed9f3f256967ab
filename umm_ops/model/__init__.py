"""The Cheers-style unified multimodal model on umm_ops' fused ops (issue 5).

    from umm_ops.model import CheersModel, preset
    model = CheersModel("tiny")                       # or CheersModel(preset("cheers-1.5b"))
    loss = model(packed_batch)["loss"]    # packed_batch: umm_ops.data.packing.pack(samples, model.pack_spec())[0]
    model.generate_text(["Hello"]); model.generate_image(["a red square"], height=64, width=64, steps=8)

Parts: config (CheersConfig, presets), vae (CheersVAE), head (FlowHead), cheers (CheersModel), losses,
generate, checkpoint (save_pretrained / from_pretrained / from_cheers_checkpoint / load_parts), profile (the
conventions profiles: "umm", this project's, and "cheers", the released checkpoint's); llm (Qwen2LM), vit
(SiglipViT), sampling, hf (Hugging Face folders).
"""
from .config import CheersConfig, HeadConfig, PRESETS, VAEConfig, preset

__all__ = ["CheersConfig", "VAEConfig", "HeadConfig", "PRESETS", "preset", "CheersModel", "CheersVAE", "FlowHead",
           "save_pretrained", "from_pretrained", "from_cheers_checkpoint", "load_parts", "load_llm", "load_siglip",
           "Qwen2LM", "Qwen2Config", "SiglipViT", "SiglipVisionConfig", "Profile", "get_profile"]

_LAZY = {
    "CheersModel": ".cheers", "CheersVAE": ".vae", "FlowHead": ".head",
    "save_pretrained": ".checkpoint", "from_pretrained": ".checkpoint", "from_cheers_checkpoint": ".checkpoint",
    "load_parts": ".checkpoint", "load_llm": ".hf", "load_siglip": ".hf",
    "Qwen2LM": ".llm", "Qwen2Config": ".llm", "SiglipViT": ".vit", "SiglipVisionConfig": ".vit",
    "Profile": ".profile", "get_profile": ".profile",
}


def __getattr__(name):
    # lazy: importing umm_ops.model does not import diffusers / transformers until a part is used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'umm_ops.model' has no attribute {name!r}")
