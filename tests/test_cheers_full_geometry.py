"""The released Cheers geometry at full size (2.6B parameters), without memory: every released tensor maps to ours.

tests/fixtures/cheers_released_full_shapes.json (``scripts/check_cheers_full_size.py shapes``) holds the released
config.json and the name and shape of every tensor of the RELEASED class built at it (AI9Stars/Cheers da1cb77, on
the meta device; the names are checked there against the real checkpoint's model.safetensors.index.json).  Here our
model is built from that config.json on the meta device and the released names go through our converter: nothing
missing, nothing unexpected, every shape equal, and only the tied lm_head copy and the SigLIP pooling head (never
called by Cheers) dropped.  The forward at full size is checked by the one-off script itself
(docs/results/cheers_full_size.json).
"""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from cheers_released import write_qwen_like_tokenizer  # noqa: E402

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cheers_released_full_shapes.json")


@pytest.fixture(scope="module")
def rec():
    with open(FIX) as f:
        return json.load(f)


def _meta_model(rec, tokdir):
    from umm_ops.model.cheers import CheersModel
    from umm_ops.model.checkpoint import cheers_config_from_released

    cfg = cheers_config_from_released(rec["config"], rec["scale_resolution"])
    cfg.profile = "cheers"
    cfg.tokenizer = str(tokdir)
    with torch.device("meta"):
        return CheersModel(cfg)


def test_every_released_tensor_maps_with_its_shape(rec, tmp_path):
    from umm_ops.model.checkpoint import convert_cheers_state_dict, load_state

    tokdir = write_qwen_like_tokenizer(tmp_path / "tok")
    model = _meta_model(rec, tokdir)
    cfg = model.config
    # the released geometry: Qwen2.5-1.5B, the SigLIP-2 so400m-shaped ViT at 512 px, the FLUX.2-shaped VAE
    assert (cfg.llm["hidden_size"], cfg.llm["num_hidden_layers"], cfg.llm["num_attention_heads"],
            cfg.llm["num_key_value_heads"], cfg.llm["intermediate_size"]) == (1536, 28, 12, 2, 8960)
    assert cfg.image_size == 512 and cfg.vae.latent_channels == 32 and cfg.vae.packed_channels == 128
    assert cfg.vae.block_out_channels == (128, 256, 512, 512)
    shapes = rec["shapes"]
    state = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in shapes.items()}
    conv = convert_cheers_state_dict(state, len(cfg.vae.block_out_channels), True)
    own = model.state_dict()
    assert set(conv) == set(own) - {"llm.lm_head.weight"}
    bad = [(k, tuple(conv[k].shape), tuple(own[k].shape)) for k in conv if conv[k].shape != own[k].shape]
    assert not bad, bad[:5]
    load_state(model, conv, who="released full-size names")       # strict: raises on any mismatch
    dropped = sorted(k for k in shapes if k == "lm_head.weight" or k.startswith("model.vision_representation.head."))
    assert len(dropped) == 12 and len(conv) == len(shapes) - len(dropped) == 1309     # one to one otherwise
    n_ours = sum(p.numel() for p in model.parameters())
    n_rel = sum(torch.Size(s).numel() for k, s in shapes.items() if k not in dropped and "running_" not in k
                and not k.endswith("num_batches_tracked"))
    assert n_ours == n_rel == 2_556_099_383
    # a released name missing from the checkpoint is named
    del state["model.language_model.layers.27.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match=r"1 missing keys \['llm.model.layers.27.mlp.down_proj.weight'\]"):
        load_state(_meta_model(rec, tokdir), convert_cheers_state_dict(state, 4, True))

