"""Checkpoints of CheersModel: our own format, part loaders, and the released Cheers checkpoint's names.

Our format (``save_pretrained`` / ``from_pretrained``): a folder with ``config.json`` (``{"model_type":
"umm_ops-cheers", "config": CheersConfig.to_dict()}``), safetensors shards ``model-0000i-of-0000n.safetensors``
and ``model.safetensors.index.json`` (Hugging Face layout).  The folder is written next to its destination under a
temporary name and moved into place with ``os.replace``: a crash never leaves a half-written checkpoint under the
final name.  A tied ``llm.lm_head.weight`` is stored once (as the embedding).  Only safetensors are ever read: no
pickle.

Parts: ``load_parts(model, llm=..., vit=..., vae=...)`` fills the LLM from a Hugging Face Qwen2 folder, the ViT from
a SigLIP / SigLIP2 vision folder (both through ``umm_ops.model.hf``) and the VAE from a diffusers
AutoencoderKLFlux2 folder (the trainable decoder copy is re-initialised from the loaded decoder).

Released Cheers (AI9Stars/Cheers, ``Training/cheers_config``): ``convert_cheers_state_dict`` maps its names
(read from its model.safetensors.index.json) to ours:

    lm_head.weight                                   -> dropped when tied (else llm.lm_head.weight)
    model.language_model.*                           -> llm.model.*
    model.vision_representation.head.*               -> dropped (the SigLIP pooling head, unused by Cheers)
    model.vision_representation.*                    -> vit.vision_model.*
    model.und_projector.*                            -> und_projector.*
    model.{time_embed,gen_projector,hi_gate,hi_projector}.* -> head.{...}.*
    model.vae_model.{encoder,decoder}.* (BFL/LDM names: down.i.block.j, mid.attn_1.q, ...)
                                                     -> vae.frozen.* (diffusers names, via diffusers'
                                                        convert_ldm_vae_checkpoint; encoder.quant_conv and
                                                        decoder.post_quant_conv are top-level in diffusers)
    model.vae_model.bn.*                             -> vae.frozen.bn.*
    model.vae_decoder_projector.decoder.*            -> vae.decoder_copy.{decoder,post_quant_conv}.*
    model.vae_decoder_projector.bn.*                 -> vae.decoder_copy.bn.*

``to_cheers_state_dict`` is the inverse (export to the released layout).

Imports: this module sits below ``cheers.py`` (which imports it at top level for ``CheersModel.save_pretrained`` /
``from_pretrained``) and never imports it at module level.  The two functions that build a model
(``from_pretrained``, ``from_cheers_checkpoint``) take the class to build (``model_class``;
``CheersModel.from_pretrained`` passes itself); without one they resolve ``umm_ops.model.CheersModel`` when called.
"""
from __future__ import annotations

import json
import os
import re

import torch

from ..utils import atomic_folder, optional_import
from .config import CheersConfig, preset
from .hf import _INDEX as INDEX, load_safetensors, save_safetensors

__all__ = ["save_pretrained", "from_pretrained", "read_pretrained_config", "load_state", "read_safetensors_folder",
           "load_parts", "convert_cheers_state_dict",
           "to_cheers_state_dict", "from_cheers_checkpoint", "cheers_config_from_released"]

MODEL_TYPE = "umm_ops-cheers"


# ----------------------------------------------------------------------------------- safetensors folders
def _state_for_saving(model) -> dict:
    sd = model.state_dict()
    if model.llm.config.tie_word_embeddings:
        sd.pop("llm.lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def write_safetensors_folder(state: dict, folder: str, max_shard_bytes: int = 2 << 30) -> list[str]:
    """Write `state` as Hugging Face-layout safetensors into `folder`: model.safetensors, or shards + index above
    `max_shard_bytes` (umm_ops.model.hf.save_safetensors: tied storage refused, each file renamed into place)."""
    return save_safetensors(state, folder, max_shard_size=max_shard_bytes)


def read_safetensors_folder(folder: str, device="cpu") -> dict:
    """All tensors of a folder holding model.safetensors or a sharded model.safetensors.index.json (safetensors
    only, never pickle; umm_ops.model.hf.load_safetensors)."""
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "no such folder"
        raise FileNotFoundError(f"{os.fspath(folder)!r}: {what} (expected a folder of safetensors weights)")
    return load_safetensors(folder, device)


# ----------------------------------------------------------------------------------- our format
def save_pretrained(model, folder, max_shard_bytes: int = 2 << 30) -> str:
    """Write config.json + sharded safetensors + index to `folder`, atomically.  Returns the folder."""
    with atomic_folder(folder) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"model_type": MODEL_TYPE, "config": model.config.to_dict()}, f, indent=2)
        write_safetensors_folder(_state_for_saving(model), tmp, max_shard_bytes)
    return os.fspath(folder)


def load_state(model, state: dict, strict: bool = True, who: str = "checkpoint", assign: bool = False) -> None:
    """Copy `state` into `model` (the tied lm_head may be absent), with a clear error naming what does not match.
    assign: the model's tensors become `state`'s (a model built on the meta device; strict then also refuses a
    missing tied lm_head's partner and any tensor left on meta)."""
    own = model.state_dict()
    tied = model.llm.config.tie_word_embeddings
    expected = set(own) - ({"llm.lm_head.weight"} if tied else set())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(f"{who}: {len(missing)} missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{who}: shape mismatch (name, checkpoint, model): {bad[:8]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False, assign=assign)
    if assign:
        if tied:
            model.llm.tie_weights()
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise ValueError(f"{who}: {len(left)} tensors were not in the checkpoint and stay unset: {left[:8]}")


def _model_class(model_class):
    """`model_class`, or CheersModel (resolved at call time: cheers.py imports this module at its top)."""
    if model_class is not None:
        return model_class
    import importlib

    return importlib.import_module(__package__).CheersModel


def read_pretrained_config(folder) -> CheersConfig:
    """The CheersConfig of a folder written by save_pretrained (its config.json), with clear errors."""
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder}: no config.json (expected a folder written by save_pretrained)")
    with open(cfg_path) as f:
        meta = json.load(f)
    if meta.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{cfg_path}: model_type {meta.get('model_type')!r}, expected {MODEL_TYPE!r} "
                         f"(for the released Cheers checkpoint use from_cheers_checkpoint)")
    return CheersConfig.from_dict(meta["config"])


def from_pretrained(folder, device=None, dtype=None, tokenizer=None, model_class=None):
    """Build a CheersModel (or `model_class`) from a folder written by save_pretrained (in eval mode, as Hugging Face
    does)."""
    folder = os.fspath(folder)
    model = _model_class(model_class)(read_pretrained_config(folder), tokenizer=tokenizer)
    load_state(model, read_safetensors_folder(folder), who=folder)
    model.eval()
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model


# ----------------------------------------------------------------------------------- parts
@torch.no_grad()
def load_parts(model, llm=None, vit=None, vae=None):
    """Fill parts of `model` from pretrained folders: llm (HF Qwen2), vit (HF SigLIP/SigLIP2 vision), vae (diffusers
    AutoencoderKLFlux2; also re-initialises the trainable decoder copy and its statistics from it)."""
    from . import hf

    if llm is not None:
        part = hf.load_llm(llm)
        _copy_part(model.llm, part.state_dict(), f"LLM {llm}")
    if vit is not None:
        part = hf.load_siglip(vit)
        _copy_part(model.vit, part.state_dict(), f"ViT {vit}")
    if vae is not None:
        AutoencoderKLFlux2 = optional_import("diffusers", "AutoencoderKLFlux2")

        folder = os.fspath(vae)
        if not os.path.isdir(folder):
            what = "is a file, not a folder" if os.path.exists(folder) else "no such folder"
            raise FileNotFoundError(f"VAE {folder!r}: {what} (expected a diffusers AutoencoderKLFlux2 folder)")
        names = sorted(os.listdir(folder))
        if not any(n.endswith(".safetensors") for n in names):
            raise ValueError(f"VAE {folder!r}: no safetensors weights (the folder holds {names[:8]}): only "
                             f"safetensors are read, pickle checkpoints (.bin / .pt) are never loaded")
        # use_safetensors=True: diffusers reads the safetensors file and never falls back to a pickle
        part = AutoencoderKLFlux2.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        _copy_part(model.vae.frozen, part.state_dict(), f"VAE {vae}")
        dc = model.vae.decoder_copy
        dc.decoder.load_state_dict(model.vae.frozen.decoder.state_dict())
        if dc.post_quant_conv is not None:
            dc.post_quant_conv.load_state_dict(model.vae.frozen.post_quant_conv.state_dict())
        dc.bn.load_state_dict(model.vae.frozen.bn.state_dict())
    return model


def _copy_part(module, state, who):
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{who}: the loaded part lacks {missing[:8]} (is its config the one of this model?)")
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(f"{who}: shapes differ from this model's config (name, loaded, model): {bad[:8]}")
    module.load_state_dict({k: state[k] for k in own})


# ----------------------------------------------------------------------------------- released Cheers names
_HEAD_PARTS = ("time_embed", "gen_projector", "hi_gate", "hi_projector")


def _vae_block_types(n):
    return {"down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n}


def convert_cheers_state_dict(state: dict, num_vae_blocks: int = 4, tie_word_embeddings: bool = True) -> dict:
    """Released Cheers names -> ours (see the module docstring).  Raises on a name it does not know."""
    convert_ldm_vae_checkpoint = optional_import("diffusers.loaders.single_file_utils", "convert_ldm_vae_checkpoint")

    out, vae, dec_copy, unknown = {}, {}, {}, []
    for k, v in state.items():
        if k == "lm_head.weight":
            if not tie_word_embeddings:
                out["llm.lm_head.weight"] = v
        elif k.startswith("model.language_model."):
            out["llm.model." + k[len("model.language_model."):]] = v
        elif k.startswith("model.vision_representation.head."):
            continue
        elif k.startswith("model.vision_representation."):
            out["vit.vision_model." + k[len("model.vision_representation."):]] = v
        elif k.startswith("model.und_projector."):
            out[k[len("model."):]] = v
        elif k.split(".")[1] in _HEAD_PARTS and k.startswith("model."):
            out["head." + k[len("model."):]] = v
        elif k.startswith("model.vae_model.bn."):
            out["vae.frozen.bn." + k[len("model.vae_model.bn."):]] = v
        elif k.startswith("model.vae_model.encoder.quant_conv."):
            vae["quant_conv." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.vae_model.decoder.post_quant_conv."):
            vae["post_quant_conv." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.vae_model."):
            vae[k[len("model.vae_model."):]] = v
        elif k.startswith("model.vae_decoder_projector.bn."):
            out["vae.decoder_copy.bn." + k[len("model.vae_decoder_projector.bn."):]] = v
        elif k.startswith("model.vae_decoder_projector.decoder.post_quant_conv."):
            out["vae.decoder_copy.post_quant_conv." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.vae_decoder_projector.decoder."):
            dec_copy[k[len("model.vae_decoder_projector."):]] = v
        else:
            unknown.append(k)
    if unknown:
        raise ValueError(f"convert_cheers_state_dict: {len(unknown)} names not in the released Cheers layout: "
                         f"{unknown[:8]}")
    types = _vae_block_types(num_vae_blocks)
    if vae:
        conv = convert_ldm_vae_checkpoint(vae, types)
        _check_all_used(vae, conv, "model.vae_model")
        out.update({"vae.frozen." + k: v for k, v in conv.items()})
    if dec_copy:
        conv = convert_ldm_vae_checkpoint(dec_copy, types)
        _check_all_used(dec_copy, conv, "model.vae_decoder_projector")
        out.update({"vae.decoder_copy." + k: v for k, v in conv.items()})
    return out


def _check_all_used(src, conv, who):
    if len(conv) != len(src):
        raise ValueError(f"{who}: {len(src)} VAE tensors but {len(conv)} converted (names outside the FLUX/LDM "
                         f"autoencoder layout?)")


def _diffusers_to_ldm_vae(name: str, n_blocks: int) -> str:
    """One diffusers VAE name (encoder./decoder. ...) -> its LDM/BFL name."""
    s = name
    m = re.match(r"(encoder)\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.*)", s)
    if m:
        _, i, kind, j, rest = m.groups()
        if kind == "downsamplers":
            return f"encoder.down.{i}.downsample.{rest}"
        return f"encoder.down.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"(decoder)\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", s)
    if m:
        _, i, kind, j, rest = m.groups()
        b = n_blocks - 1 - int(i)
        if kind == "upsamplers":
            return f"decoder.up.{b}.upsample.{rest}"
        return f"decoder.up.{b}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", s)
    if m:
        part, j, rest = m.groups()
        return f"{part}.mid.block_{int(j) + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", s)
    if m:
        part, rest = m.groups()
        rest = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[
            rest.rsplit(".", 1)[0]] + "." + rest.rsplit(".", 1)[1]
        return f"{part}.mid.attn_1.{rest}"
    return s.replace("conv_norm_out", "norm_out")


def to_cheers_state_dict(model) -> dict:
    """Our state dict in the released Cheers layout (inverse of convert_cheers_state_dict); a model with parts that
    are not in Cheers (the head's conv stage or latent_embed, latent_to_llm) is refused."""
    extra = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in model.state_dict()
                    if k.startswith(("head.conv_stage.", "head.context_norm.", "head.latent_embed.", "latent_to_llm"))})
    if extra:
        raise ValueError(f"to_cheers_state_dict: the released Cheers layout has no {extra}: export a model whose "
                         f"head is Cheers' (HeadConfig.conv_widths = (), latent_input = False, and no latent_to_llm)")
    n = len(model.config.vae.block_out_channels)
    out = {}
    for k, v in model.state_dict().items():
        if k == "llm.lm_head.weight":
            out["lm_head.weight"] = v
        elif k.startswith("llm.model."):
            out["model.language_model." + k[len("llm.model."):]] = v
        elif k.startswith("vit.vision_model."):
            out["model.vision_representation." + k[len("vit.vision_model."):]] = v
        elif k.startswith("und_projector."):
            out["model." + k] = v
        elif k.startswith("head."):
            out["model." + k[len("head."):]] = v
        elif k.startswith("vae.frozen.bn."):
            out["model.vae_model.bn." + k[len("vae.frozen.bn."):]] = v
        elif k.startswith("vae.frozen.quant_conv."):
            out["model.vae_model.encoder.quant_conv." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("vae.frozen.post_quant_conv."):
            out["model.vae_model.decoder.post_quant_conv." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("vae.frozen."):
            out["model.vae_model." + _diffusers_to_ldm_vae(k[len("vae.frozen."):], n)] = _attn_conv(k, v)
        elif k.startswith("vae.decoder_copy.bn."):
            out["model.vae_decoder_projector.bn." + k[len("vae.decoder_copy.bn."):]] = v
        elif k.startswith("vae.decoder_copy.post_quant_conv."):
            out["model.vae_decoder_projector.decoder.post_quant_conv." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("vae.decoder_copy."):
            out["model.vae_decoder_projector." + _diffusers_to_ldm_vae(k[len("vae.decoder_copy."):], n)] = \
                _attn_conv(k, v)
        else:
            raise AssertionError(f"to_cheers_state_dict: no released name for {k}")
    return out


def _attn_conv(name, v):
    """diffusers' mid-block attention Linear weights are 1x1 convs in the LDM/BFL layout."""
    if ".attentions." in name and name.endswith("weight") and v.dim() == 2:
        return v[:, :, None, None]
    return v


_RELEASED_VAE_DEFAULTS = dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=32)
# configuration_umm.py VAEEncoderConfig / VAEDecoderConfig defaults (the released config.json sets only resolution)


def cheers_config_from_released(d: dict, image_size: int | None = None) -> CheersConfig:
    """A CheersConfig from the released Cheers config.json: the LLM (text_config), the ViT
    (vision_representation_config) and the VAE geometry (vae_encoder_config / vae_decoder_config: ch, ch_mult,
    num_res_blocks, z_channels, with configuration_umm.py's defaults); the released conventions profile "cheers";
    image_size (the default generation size = the released processor's dummy-image resolution): `image_size`, else
    the ViT's.  The head depth (7 + 3 blocks) is the released code's, fixed there."""
    if not isinstance(d, dict):
        raise TypeError(f"cheers_config_from_released: expected the released config.json as a dict, got "
                        f"{type(d).__name__}")
    cfg = preset("cheers-1.5b")
    text = d.get("text_config", {})
    llm = dict(cfg.llm)
    llm.update({k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                     "num_key_value_heads", "tie_word_embeddings", "max_position_embeddings",
                                     "num_hidden_layers", "rope_theta", "rms_norm_eps") if k in text})
    vis = d.get("vision_representation_config", {})
    vit = dict(cfg.vit)
    vit.update({k: vis[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                    "patch_size", "image_size", "num_channels", "layer_norm_eps") if k in vis})
    geo = {}
    for part in ("vae_encoder_config", "vae_decoder_config"):
        sub = d.get(part, {}) or {}
        geo[part] = {k: (list(sub[k]) if k == "ch_mult" else sub[k]) if k in sub else v
                     for k, v in _RELEASED_VAE_DEFAULTS.items()}
    enc, dec = geo["vae_encoder_config"], geo["vae_decoder_config"]
    if enc != dec:
        raise ValueError(f"cheers_config_from_released: vae_encoder_config {enc} and vae_decoder_config {dec} "
                         f"differ; this model has one autoencoder geometry (diffusers AutoencoderKLFlux2)")
    if dec["ch"] != 4 * dec["z_channels"]:
        raise ValueError(f"cheers_config_from_released: the released head outputs vae_decoder_config.ch = "
                         f"{dec['ch']} channels per token but the 2x2-packed latent has 4 * z_channels = "
                         f"{4 * dec['z_channels']}; the released model needs ch == 4 * z_channels")
    cfg.llm, cfg.vit = llm, vit
    cfg.vae = type(cfg.vae)(latent_channels=int(enc["z_channels"]),
                            block_out_channels=tuple(int(enc["ch"]) * int(m) for m in enc["ch_mult"]),
                            layers_per_block=int(enc["num_res_blocks"]), norm_num_groups=32)
    cfg.profile = "cheers"
    cfg.image_size = int(image_size if image_size is not None else vit["image_size"])
    return cfg.validate()


def _released_image_size(folder):
    """The released processor's resolution (preprocessor_config.json scale_resolution), if the folder has one."""
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        v = json.load(f).get("scale_resolution")
    return int(v) if v is not None else None


def from_cheers_checkpoint(source=None, config=None, tokenizer=None, device=None, model_class=None,
                           state_dict: dict | None = None, profile: str = "cheers", dtype=None):
    """A CheersModel (or `model_class`) from the released Cheers weights, with the released conventions (profile
    "cheers": chat template, tokens, null prompt, dummy image, sampler grid, pixel range; ``profile="umm"`` for
    this project's).  The weights, in the released names, come from one of:

    * ``source`` a folder: config.json + model.safetensors or shards with model.safetensors.index.json; the
      tokenizer defaults to the folder's own (Qwen2.5 + the five Cheers tokens, added if absent and their ids
      checked) and the generation size to its preprocessor_config.json's scale_resolution;
    * ``source`` a single .safetensors file: config.json beside it, or ``config``;
    * ``state_dict``: an in-memory dict (``config`` and ``tokenizer`` needed).

    config: a CheersConfig, or the released config.json as a dict / a path to it (default: the folder's).
    tokenizer: a Hugging Face tokenizer folder (or HFTokenizer).
    dtype: e.g. torch.bfloat16 (the released checkpoint's): the model is built on the meta device and takes the
    checkpoint's tensors cast to `dtype` (one copy of the weights in memory; a caller's state_dict already in that
    dtype is then shared with the model, not copied).  Without it the weights are copied into a float32 model."""
    if (source is None) == (state_dict is None):
        raise ValueError("from_cheers_checkpoint: pass exactly one of source (a folder or a .safetensors file) and "
                         f"state_dict, got source={source!r} and {'a' if state_dict is not None else 'no'} "
                         f"state_dict")
    folder = None
    if source is not None:
        source = os.fspath(source)
        if os.path.isdir(source):
            folder = source
        elif os.path.isfile(source):
            if not source.endswith(".safetensors"):
                raise ValueError(f"from_cheers_checkpoint: {source!r} is a file but not a .safetensors file (only "
                                 f"safetensors are read, never pickle)")
            if config is None and os.path.isfile(os.path.join(os.path.dirname(source) or ".", "config.json")):
                config = os.path.join(os.path.dirname(source) or ".", "config.json")
        else:
            raise FileNotFoundError(f"from_cheers_checkpoint: {source!r}: no such file or folder (expected a released "
                                    f"Cheers folder or a .safetensors file)")
    if config is None:
        if folder is None:
            raise ValueError("from_cheers_checkpoint: no config: pass config (a CheersConfig, the released "
                             "config.json dict or its path) with a single file or a state_dict")
        config = os.path.join(folder, "config.json")
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"from_cheers_checkpoint: no released config.json at {path!r}")
        with open(path) as f:
            config = json.load(f)
    if isinstance(config, dict):
        config = cheers_config_from_released(config, _released_image_size(folder) if folder else None)
    elif isinstance(config, CheersConfig):
        config = CheersConfig.from_dict(config.to_dict())       # a copy: the caller's is not changed
    else:
        raise TypeError(f"from_cheers_checkpoint: config must be a CheersConfig, the released config.json dict or "
                        f"its path, got {type(config).__name__}")
    config.profile = profile
    if tokenizer is None and folder is not None and os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        tokenizer = folder
    if isinstance(tokenizer, (str, os.PathLike)):
        config.tokenizer = os.path.abspath(os.fspath(tokenizer))
        tokenizer = None
    elif tokenizer is not None and hasattr(tokenizer, "folder"):
        config.tokenizer = os.path.abspath(tokenizer.folder)
    config.validate()
    # with a dtype the model is built on the meta device and takes the checkpoint's tensors (cast to `dtype`, no
    # copy when they already are: a bf16 checkpoint read through mmap) instead of a float32 copy of its own: the
    # released 2.6B-parameter checkpoint then loads in bf16 with one copy of the weights in memory
    on_meta = dtype is not None
    if on_meta:
        with torch.device("meta"):
            model = _model_class(model_class)(config, tokenizer=tokenizer)
    else:
        model = _model_class(model_class)(config, tokenizer=tokenizer)
    if state_dict is None:
        if folder is not None:
            state_dict = read_safetensors_folder(folder)
        else:
            load_file = optional_import("safetensors.torch", "load_file")
            state_dict = load_file(source)
    elif not isinstance(state_dict, dict):
        raise TypeError(f"from_cheers_checkpoint: state_dict must be a dict of tensors in the released names, got "
                        f"{type(state_dict).__name__}")
    state = convert_cheers_state_dict(state_dict, len(config.vae.block_out_channels),
                                      config.llm.get("tie_word_embeddings", True))
    del state_dict
    who = os.fspath(source) if source is not None else "state_dict"
    if on_meta:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        load_state(model, state, who=who, assign=True)
        del state
        model.llm.tie_weights()
    else:
        load_state(model, state, who=who)
    model.eval()
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model
