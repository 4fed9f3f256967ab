"""Hugging Face folders in and out: Qwen2 LLMs and SigLIP vision towers (config.json + safetensors).

Only safetensors are read (never pickle: ``pytorch_model.bin`` / ``*.pt`` folders are refused with a message).
Weights are copied shard by shard into a model built on the meta device, so peak memory is the model plus one
tensor.  Loading is strict: a missing weight raises naming the missing keys, an unknown one naming the unknown
keys (``strict=False`` ignores unknown keys; missing keys always raise).
"""
from __future__ import annotations

import functools
import json
import os
import re

import torch

from ..utils import atomic_write, optional_import
from .llm import Qwen2Config, Qwen2LM
from .vit import SiglipViT, SiglipVisionConfig

__all__ = ["load_llm", "load_siglip", "save_hf_llm", "save_hf_siglip", "read_config", "load_safetensors",
           "safetensors_files", "save_safetensors"]

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


# ----------------------------------------------------------------------------------------------------- reading
def read_config(folder) -> dict:
    """The ``config.json`` of a model folder as a dict."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder!r} does not exist or is not a directory")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder!r} has no config.json (expected a Hugging Face model folder)")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def safetensors_files(folder) -> list[str]:
    """The safetensors files holding a folder's weights: ``model.safetensors``, or the shards named by
    ``model.safetensors.index.json``, or else the folder's only ``*.safetensors`` file."""
    folder = os.fspath(folder)
    index = os.path.join(folder, _INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: expected a non-empty 'weight_map' {{tensor name: shard file}}")
        shards = sorted(set(weight_map.values()))
        for s in shards:
            if not isinstance(s, str) or os.path.basename(s) != s or not s.endswith(".safetensors"):
                raise ValueError(f"{index}: shard {s!r} must be a .safetensors file name inside the folder")
            if not os.path.isfile(os.path.join(folder, s)):
                raise FileNotFoundError(f"{index} names shard {s!r}, which is not in {folder!r}")
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, _SINGLE)
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if len(found) == 1:
        return [os.path.join(folder, found[0])]
    pickles = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickles:
        raise ValueError(f"{folder!r} holds {pickles} but no safetensors: pickle checkpoints are never loaded "
                         f"(convert them to safetensors with a trusted tool first)")
    if found:
        raise ValueError(f"{folder!r} holds several .safetensors files {found} but no {_INDEX} saying which "
                         f"tensors each holds")
    raise FileNotFoundError(f"{folder!r} holds no {_SINGLE} or {_INDEX}")


def load_safetensors(folder, device="cpu") -> dict:
    """Every tensor of a folder's safetensors files, {name: tensor} (for small models and tests; the model
    loaders below stream instead)."""
    load_file = optional_import("safetensors.torch", "load_file")

    out = {}
    for path in safetensors_files(folder):
        out.update(load_file(path, device=str(device)))
    return out


def _iter_tensors(folder):
    safe_open = optional_import("safetensors", "safe_open")

    for path in safetensors_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, (lambda f=f, name=name: f.get_tensor(name))


def _fill(model: torch.nn.Module, folder, rename, what: str, strict: bool):
    """Copy the folder's tensors into `model` (built on meta, then to_empty): rename(name) -> parameter name or
    None (skip)."""
    params = dict(model.named_parameters(remove_duplicate=True))
    params.update(dict(model.named_buffers(remove_duplicate=True)))
    missing, unexpected, loaded = set(params), [], set()
    with torch.no_grad():
        for name, get in _iter_tensors(folder):
            target = rename(name)
            if target is None:
                continue
            if target not in params:
                unexpected.append(name)
                continue
            t = get()
            p = params[target]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{what}: tensor {name!r} has shape {tuple(t.shape)}, the model expects "
                                 f"{tuple(p.shape)} for {target!r} (does config.json match the weights?)")
            if target in loaded:
                raise ValueError(f"{what}: two tensors of the checkpoint map to {target!r} (one is {name!r})")
            p.copy_(t)
            loaded.add(target)
            missing.discard(target)
    if missing:
        ms = sorted(missing)
        raise ValueError(f"{what}: {len(ms)} weights missing from {os.fspath(folder)!r}: "
                         f"{ms[:20]}{' ...' if len(ms) > 20 else ''}")
    if unexpected and strict:
        raise ValueError(f"{what}: {len(unexpected)} unknown tensors in {os.fspath(folder)!r}: "
                         f"{sorted(unexpected)[:20]}{' ...' if len(unexpected) > 20 else ''} "
                         f"(strict=False ignores them)")


def _build(cls, config, dtype, device):
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty gives each module its own storage
    return model.to(dtype) if dtype is not None else model


# ----------------------------------------------------------------------------------------------------- loaders
def load_llm(folder, dtype: torch.dtype | None = torch.float32, device="cpu", strict: bool = True) -> Qwen2LM:
    """A Qwen2LM from a Hugging Face Qwen2 folder (config.json + model.safetensors or a sharded
    model.safetensors.index.json).  ``dtype`` float32 by default (pass torch.bfloat16 for real checkpoints on a
    GPU).  With tied embeddings a stored ``lm_head.weight`` is ignored (transformers does the same)."""
    cfg = Qwen2Config.from_hf(read_config(folder))
    model = _build(Qwen2LM, cfg, dtype, device)

    def rename(name):
        if name.endswith("rotary_emb.inv_freq"):          # older checkpoints store the RoPE buffer
            return None
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            return None
        return name

    _fill(model, folder, rename, "load_llm", strict)
    return model.eval()


def load_siglip(folder, dtype: torch.dtype | None = torch.float32, device="cpu", strict: bool = True) -> SiglipViT:
    """A SiglipViT from a SigLIP folder: a vision-only checkpoint (tensor names with or without the
    ``vision_model.`` prefix) or a full SigLIP / fixed-resolution SigLIP2 checkpoint (its text tower,
    ``logit_scale`` / ``logit_bias`` and the attention-pooling ``head`` are skipped)."""
    cfg = SiglipVisionConfig.from_hf(read_config(folder))
    model = _build(SiglipViT, cfg, dtype, device)

    def rename(name):
        if name.startswith(("text_model.", "logit_scale", "logit_bias")):
            return None
        if not name.startswith("vision_model."):
            name = "vision_model." + name                   # transformers 5 saves SiglipVisionModel unprefixed
        if name.startswith("vision_model.head."):
            return None
        return name

    _fill(model, folder, rename, "load_siglip", strict)
    return model.eval()


# ----------------------------------------------------------------------------------------------------- writing
def _parse_size(size) -> int:
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be > 0, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be an int (bytes) or a string like '5GB' / '500MB', got {size!r}")
    unit = m.group(2).upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return max(1, int(float(m.group(1)) * mult))


def save_safetensors(state: dict, folder, config: dict | None = None, max_shard_size="5GB") -> list[str]:
    """Write ``state`` ({name: tensor}) as ``model.safetensors`` or, above ``max_shard_size``, as
    ``model-0000i-of-0000n.safetensors`` shards + ``model.safetensors.index.json`` (Hugging Face's layout), plus
    ``config.json`` when given.  Each file is written to a temporary name and renamed, the index last; weight files
    of an earlier save that the new one does not use are removed.  Returns the weight files written."""
    save_file = optional_import("safetensors.torch", "save_file")

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    limit = _parse_size(max_shard_size)
    seen = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_safetensors: {name!r} is a {type(t).__name__}, not a tensor")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.device.type != "meta" \
            else None
        if key is not None and key in seen:
            raise ValueError(f"save_safetensors: {name!r} shares its storage with {seen[key]!r}; store tied "
                             f"weights once")
        if key is not None:
            seen[key] = name
    shards, cur, cur_size = [], {}, 0
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger storage: safetensors stores whole tensors only
        size = t.numel() * t.element_size()
        if cur and cur_size + size > limit:
            shards.append(cur)
            cur, cur_size = {}, 0
        cur[name] = t
        cur_size += size
    shards.append(cur)
    if len(shards) == 1:
        files = [_SINGLE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(files, shards):
        path = os.path.join(folder, fname)
        atomic_write(path, write=functools.partial(save_file, shard, metadata={"format": "pt"}))
    if config is not None:
        atomic_write(os.path.join(folder, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")
    index = os.path.join(folder, _INDEX)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        index_obj = {"metadata": {"total_size": total}, "weight_map": {n: f for f, s in zip(files, shards) for n in s}}
        atomic_write(index, json.dumps(index_obj, indent=2, sort_keys=True) + "\n")
    for old in os.listdir(folder):  # stale weight files of an earlier save
        if old in files:
            continue
        if (old == _INDEX and len(shards) == 1) or old == _SINGLE or _SHARD_RE.match(old):
            os.remove(os.path.join(folder, old))
    return [os.path.join(folder, f) for f in files]


def save_hf_llm(model: Qwen2LM, folder, max_shard_size="5GB") -> None:
    """Save a Qwen2LM as a Hugging Face Qwen2 folder (config.json + safetensors) that ``load_llm`` and
    transformers' ``Qwen2ForCausalLM.from_pretrained`` both load.  Tied embeddings are stored once
    (``lm_head.weight`` omitted, as transformers does)."""
    if not isinstance(model, Qwen2LM):
        raise TypeError(f"save_hf_llm expects a Qwen2LM, got {type(model).__name__}")
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    save_safetensors(state, folder, cfg, max_shard_size)


def save_hf_siglip(model: SiglipViT, folder, max_shard_size="5GB") -> None:
    """Save a SiglipViT as a SigLIP vision folder (``vision_model.``-prefixed names, as SigLIP checkpoints)."""
    if not isinstance(model, SiglipViT):
        raise TypeError(f"save_hf_siglip expects a SiglipViT, got {type(model).__name__}")
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    save_safetensors(dict(model.state_dict()), folder, cfg, max_shard_size)
