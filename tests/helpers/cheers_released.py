"""Shared by scripts/record_cheers_fixtures.py (which runs the released Cheers code) and tests/test_cheers_profile.py
(which runs ours): a Qwen2.5-shaped tokenizer folder and a deterministic tiny model state in the released names.

The tokenizer: byte-level BPE without merges (every UTF-8 byte is one token, id = byte value), padded with unused
filler entries to Qwen2.5's 151643 regular ids, then Qwen2.5's 22 added tokens at their real ids 151643..151664 and
the released chat template (AI9Stars/Cheers Training/cheers_config/tokenizer_config.json).  Text ids differ from the
real Qwen2.5 tokenizer's (no merges); every special id, the template and the Cheers token additions are the real ones.

The weights: every tensor of the released tiny model (names and shapes recorded by the recorder from the released
code, stored in the fixture) filled from one seeded generator in name order, so the fixture holds no weights.
"""
from __future__ import annotations

import json
import math
import os

import torch

QWEN_ADDED = [  # (content, special) at ids 151643.. in order (Cheers Training/cheers_config/tokenizer_config.json)
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False)]
QWEN_REGULAR = 151643
RELEASED_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
    "assistant\n' }}{% endif %}")


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_qwen_like_tokenizer(folder) -> str:
    """Write the Qwen2.5-shaped tokenizer folder (tokenizer.json + tokenizer_config.json) into `folder`."""
    os.makedirs(folder, exist_ok=True)
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for i in range(256, QWEN_REGULAR):
        vocab[f"<unused_{i}>"] = i
    added = [dict(id=QWEN_REGULAR + i, content=c, single_word=False, lstrip=False, rstrip=False, normalized=False,
                  special=s) for i, (c, s) in enumerate(QWEN_ADDED)]
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                            "use_regex": True},
          "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                             "use_regex": True},
          "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                    "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": vocab, "merges": []}}
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tj, f, ensure_ascii=False)
    cfg = {"add_bos_token": False, "add_prefix_space": False, "bos_token": None,
           "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                     "single_word", "special")} for a in added},
           "additional_special_tokens": [c for c, s in QWEN_ADDED[1:14]],
           "chat_template": RELEASED_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
           "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
           "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return os.fspath(folder)


def tiny_released_state(names_shapes, seed: int = 0) -> dict:
    """A state dict in the released names: every tensor drawn from one generator (sorted name order).  Weights
    ~ N(0, 1/fan_in) so activations stay O(1); biases and norm shifts small; norm scales near 1; BatchNorm running
    statistics positive variances; the SigLIP position ids are the buffer's arange."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(names_shapes):
        shape = tuple(names_shapes[name])
        if name.endswith("running_var"):
            t = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("running_mean"):
            t = 0.3 * torch.randn(shape, generator=g)
        elif name.endswith("num_batches_tracked"):
            t = torch.zeros(shape, dtype=torch.long)
        elif len(shape) == 1 and (name.endswith("norm.weight") or "norm" in name.rsplit(".", 2)[-2]
                                  or name.endswith("layernorm.weight") or ".norm" in name):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g) if name.endswith("weight") else \
                0.05 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            t = 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            if name.endswith("embed_tokens.weight") or name.endswith("position_embedding.weight"):
                t = 0.5 * torch.randn(shape, generator=g)
        out[name] = t.contiguous()
    return out


FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "cheers_released")


def tiny_cheers_model(tokdir):
    """The parity tests' tiny released-Cheers model (tests/fixtures/cheers_released.json's config and names, the
    seeded weights above) through ``from_cheers_checkpoint``: a CheersModel under the "cheers" profile, eval mode.
    `tokdir`: a folder from :func:`write_qwen_like_tokenizer`."""
    from umm_ops.model.checkpoint import from_cheers_checkpoint

    with open(FIXTURE + ".json") as f:
        meta = json.load(f)
    state = tiny_released_state(meta["names"], meta["seed"])
    return from_cheers_checkpoint(state_dict=state, config=meta["config"], tokenizer=tokdir).eval()
