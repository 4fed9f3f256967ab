"""Tokenizers for the models: a built-in byte-level tokenizer (the tiny preset, no files needed) and any Hugging Face
tokenizer from a local folder (real checkpoints), behind one small interface, plus the Qwen-style chat template.

Interface (both classes): ``encode(text) -> list[int]`` (special-token strings inside the text become their ids),
``decode(ids, skip_special=False) -> str``, ``vocab_size``, ``special(name) -> int``, ``eos_id`` (``<|im_end|>``),
``pad_id``, ``special_tokens`` (the names, in order).

The special tokens are Qwen2-VL's names, so a Qwen2.5 tokenizer folder already has all but ``<|pad|>`` (for which
its own pad token, ``<|endoftext|>``, is used).
"""
from __future__ import annotations

import functools
import os
import re
import warnings

from ..utils import optional_import

__all__ = ["SPECIAL_TOKENS", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "chat_template", "IMAGE_MARKER"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|pad|>")
IMAGE_MARKER = "<image>"


def _check_ids(ids, vocab_size: int, who: str) -> list:
    try:
        import torch

        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
                raise TypeError(f"{who}: ids must be a 1-D integer tensor or a list of ints, got a tensor of shape "
                                f"{tuple(ids.shape)} and dtype {ids.dtype}")
            ids = ids.tolist()
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        pass
    ids = list(ids)
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool):
            raise TypeError(f"{who}: ids[{i}] must be an int, got {type(t).__name__} {t!r}")
        if not 0 <= t < vocab_size:
            raise ValueError(f"{who}: ids[{i}] = {t} is outside the vocabulary [0, {vocab_size})")
    return ids


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then the special tokens of ``SPECIAL_TOKENS`` in order
    (256 ``<|endoftext|>`` ... 262 ``<|pad|>``); ``vocab_size`` = 263.  Lossless: ``decode(encode(s)) == s``."""

    def __init__(self):
        self.special_tokens = SPECIAL_TOKENS
        self._special_ids = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._special_names = {v: k for k, v in self._special_ids.items()}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.eos_id = self._special_ids["<|im_end|>"]
        self.pad_id = self._special_ids["<|pad|>"]

    def special(self, name: str) -> int:
        if name not in self._special_ids:
            raise KeyError(f"ByteTokenizer: unknown special token {name!r}, expected one of {list(SPECIAL_TOKENS)}")
        return self._special_ids[name]

    def encode(self, text: str) -> list:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: text must be a str, got {type(text).__name__}")
        out = []
        for part in self._split.split(text):
            if part in self._special_ids:
                out.append(self._special_ids[part])
            elif part:
                out.extend(part.encode("utf-8"))
        return out

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = _check_ids(ids, self.vocab_size, "ByteTokenizer.decode")
        parts, run = [], bytearray()
        for t in ids:
            if t < 256:
                run.append(t)
                continue
            if run:  # bytes of a character split by a special token decode to U+FFFD, as in HF byte-level BPE
                parts.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            if not skip_special:
                parts.append(self._special_names[t])
        if run:
            parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder (``AutoTokenizer.from_pretrained(folder, local_files_only=True)``)
    behind the same interface.  Special tokens missing from it are added (with a warning naming them); ``<|pad|>``
    maps to the tokenizer's own pad token when it has one.  ``vocab_size`` is ``len(tokenizer)`` (added tokens
    included; a model's embedding table may be larger).  ``added_tokens`` / ``added_token_ids``: a conventions
    profile's own tokens (the released Cheers' five), added in order when the folder has none of them, their ids
    checked (see ``_add_profile_tokens``); ``special(name)`` then knows them too."""

    def __init__(self, folder, added_tokens=(), added_token_ids=None):
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"HFTokenizer: expected a folder holding a Hugging Face tokenizer "
                                    f"(tokenizer.json / tokenizer_config.json), got {folder!r} which is not a folder")
        AutoTokenizer = optional_import("transformers", "AutoTokenizer")

        try:
            # trust_remote_code=False: a released Cheers folder's config.json names remote code (auto_map), and
            # transformers would otherwise stop to ask whether to run it; the tokenizer itself needs none
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises several types (OSError, ValueError, ...) for a bad folder
            raise ValueError(f"HFTokenizer: could not load a tokenizer from {folder!r}: {type(e).__name__}: {e}") from e
        self.tokenizer = tok
        self.folder = folder
        self.special_tokens = SPECIAL_TOKENS
        vocab = tok.get_vocab()
        pad_alias = tok.pad_token if (tok.pad_token is not None and "<|pad|>" not in vocab) else None
        missing = [s for s in SPECIAL_TOKENS if s not in vocab and not (s == "<|pad|>" and pad_alias)]
        if missing:
            # keep the tokenizer's own additional specials (transformers 5 replaces them by default)
            kw = {"replace_extra_special_tokens": False} if _accepts_replace(tok) else {}
            tok.add_special_tokens({"additional_special_tokens": missing}, **kw)
            warnings.warn(f"HFTokenizer: the tokenizer in {folder!r} lacked the special tokens {missing}; added them "
                          f"as ids {tok.convert_tokens_to_ids(missing)} (a model's embeddings must cover them)",
                          stacklevel=2)
        self._special_ids = {s: tok.convert_tokens_to_ids(pad_alias if (s == "<|pad|>" and pad_alias) else s)
                             for s in SPECIAL_TOKENS}
        added_tokens = tuple(added_tokens)
        if added_tokens:
            self._add_profile_tokens(tok, folder, added_tokens, added_token_ids)
        self.special_tokens = SPECIAL_TOKENS + tuple(t for t in added_tokens if t not in SPECIAL_TOKENS)
        # every special must also be split out of plain text by encode(): check once here, not per call
        for s, i in self._special_ids.items():
            got = tok.encode(pad_alias if (s == "<|pad|>" and pad_alias) else s, add_special_tokens=False)
            if got != [i]:
                raise ValueError(f"HFTokenizer: the tokenizer in {folder!r} does not encode the special token {s!r} "
                                 f"as its single id {i} (got {got}); it must be a special (added) token")
        self.vocab_size = len(tok)
        self.added_tokens = added_tokens
        self.eos_id = self._special_ids["<|im_end|>"]
        self.pad_id = self._special_ids["<|pad|>"]

    def _add_profile_tokens(self, tok, folder, names, want_ids) -> None:
        """A conventions profile's tokens (the released Cheers: <image> <image_gen> <im_start> <im_end> <no_mean>):
        added one by one in this order, as special tokens, when the tokenizer has none of them (what the released
        processor does to a Qwen2.5 tokenizer); with all present, kept.  Their ids must then be `want_ids`."""
        vocab = tok.get_vocab()
        present = [t for t in names if t in vocab]
        if not present:
            for t in names:
                tok.add_tokens([t], special_tokens=True)
        elif len(present) != len(names):
            raise ValueError(f"HFTokenizer: the tokenizer in {folder!r} has {present} but not "
                             f"{[t for t in names if t not in vocab]}: expected all of {list(names)} or none (then "
                             f"they are added in that order)")
        ids = [tok.convert_tokens_to_ids(t) for t in names]
        if want_ids is not None and ids != list(want_ids):
            raise ValueError(f"HFTokenizer: the tokens {list(names)} of the tokenizer in {folder!r} have ids {ids}, "
                             f"expected {list(want_ids)} (the released model's; a Qwen2.5 tokenizer of "
                             f"{want_ids[0]} ids gets exactly these when they are added)")
        self._special_ids.update(zip(names, ids))

    def special(self, name: str) -> int:
        if name not in self._special_ids:
            raise KeyError(f"HFTokenizer: unknown special token {name!r}, expected one of {list(self._special_ids)}")
        return self._special_ids[name]

    def encode(self, text: str) -> list:
        if not isinstance(text, str):
            raise TypeError(f"HFTokenizer.encode: text must be a str, got {type(text).__name__}")
        if not text:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = _check_ids(ids, self.vocab_size, "HFTokenizer.decode")
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.folder!r}, vocab_size={self.vocab_size})"


def _accepts_replace(tok) -> bool:
    import inspect

    try:
        return "replace_extra_special_tokens" in inspect.signature(tok.add_special_tokens).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def load_tokenizer(name_or_folder, profile=None):
    """``"byte"`` -> :class:`ByteTokenizer`; ``"world"`` -> the synthetic world's BPE that ships in the package
    (:mod:`umm_ops.data.world_tokenizer`); ``"world+clear"`` -> the same with CLEAR's format markers
    (``CLEAR_TOKENS``) added as ids 512..516; a folder -> :class:`HFTokenizer`.  ``profile`` (a conventions profile or
    its name, umm_ops.model.profile): its tokens are added / checked (the "cheers" profile needs a Hugging Face
    tokenizer folder: Qwen2.5's)."""
    if profile is not None:
        from ..model.profile import get_profile

        profile = get_profile(profile)
    need = tuple(profile.added_tokens) if profile is not None else ()
    if isinstance(name_or_folder, (ByteTokenizer, HFTokenizer)):
        have = getattr(name_or_folder, "added_tokens", ())
        if need and tuple(have) != need:
            raise ValueError(f"load_tokenizer: profile {profile.name!r} needs a tokenizer holding {list(need)} "
                             f"(load it with load_tokenizer(folder, profile={profile.name!r})), got "
                             f"{name_or_folder!r} with {list(have)}")
        return name_or_folder
    if need and os.fspath(name_or_folder) in ("byte", "world"):
        raise ValueError(f"load_tokenizer: profile {profile.name!r} needs a Hugging Face tokenizer folder (Qwen2.5, "
                         f"to which {list(need)} are added), got {os.fspath(name_or_folder)!r}")
    if need:
        if not os.path.isdir(name_or_folder):
            raise ValueError(f"load_tokenizer: expected an existing Hugging Face tokenizer folder for profile "
                             f"{profile.name!r}, got {os.fspath(name_or_folder)!r}")
        return HFTokenizer(name_or_folder, need, profile.added_token_ids)
    if not isinstance(name_or_folder, (str, os.PathLike)):
        raise TypeError(f"load_tokenizer: expected 'byte', 'world' or a tokenizer folder path, got "
                        f"{type(name_or_folder).__name__}")
    if os.fspath(name_or_folder) == "byte":
        return ByteTokenizer()
    if os.fspath(name_or_folder) == "world":
        from .world_tokenizer import SHIPPED_TOKENIZER

        return _shipped_world_tokenizer(os.fspath(SHIPPED_TOKENIZER))
    if os.fspath(name_or_folder) == "world+clear":
        from .world_tokenizer import SHIPPED_TOKENIZER

        return _shipped_world_tokenizer(os.fspath(SHIPPED_TOKENIZER), CLEAR_TOKENS)
    if os.path.isdir(name_or_folder):
        return HFTokenizer(name_or_folder)
    raise ValueError(f"load_tokenizer: expected 'byte', 'world' or an existing folder holding a Hugging Face "
                     f"tokenizer, got {os.fspath(name_or_folder)!r} "
                     f"({'a file, not a folder' if os.path.exists(name_or_folder) else 'no such folder'})")


# CLEAR's format markers, added after the shipped world tokenizer's 512 ids by the tokenizer name "world+clear"
# (the clear-sft recipe switches a world model to it, growing its embeddings; umm_ops.data.clear_data)
CLEAR_TOKENS = ("<think>", "</think>", "<image_restore>", "<answer>", "</answer>")


@functools.lru_cache(maxsize=4)
def _shipped_world_tokenizer(folder: str, added=()):
    """One HFTokenizer per process for the shipped world tokenizer (read-only; loading it takes ~0.1 s); ``added``:
    tokens appended as specials (ids from 512 on, in order)."""
    if not added:
        return HFTokenizer(folder)
    from .world_tokenizer import WORLD_VOCAB_SIZE

    return HFTokenizer(folder, added, list(range(WORLD_VOCAB_SIZE, WORLD_VOCAB_SIZE + len(added))))


def _content_text(content, where: str) -> str:
    """A message's content as text: a str, or a list of parts (str, {"type": "text", "text": ...},
    {"type": "image", ...} or an image tensor), images written as ``<image>``."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"chat_template: {where} content must be a str or a list of parts, got "
                        f"{type(content).__name__}")
    out = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            out.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif isinstance(part, dict) and part.get("type") == "image":
            out.append(IMAGE_MARKER)
        elif _is_tensor(part):
            out.append(IMAGE_MARKER)
        else:
            raise TypeError(f"chat_template: {where} content part {j} must be a str, a tensor image, "
                            f"{{'type': 'text', 'text': str}} or {{'type': 'image', ...}}, got {part!r:.80}")
    return "".join(out)


def _is_tensor(x) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def chat_template(messages, add_generation_prompt: bool = False, system: str | None = None) -> str:
    """Qwen-style chat text: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
    ``<|im_start|>assistant\\n`` when ``add_generation_prompt``.  Messages are dicts with ``role`` and ``content``
    (a str or a list of parts; an image part is written as the marker ``<image>``).  ``system``: a default system
    turn written first when the first message is not a system message (Qwen2.5's template, and the released
    Cheers': "You are a helpful assistant."; a conventions profile's ``system_prompt``)."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"chat_template: messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                        f"{type(messages).__name__}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"chat_template: system must be None or a str, got {type(system).__name__}")
    out = []
    if system is not None and not (messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"):
        out.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat_template: message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if not isinstance(m["role"], str) or not m["role"]:
            raise ValueError(f"chat_template: message {i} role must be a non-empty str, got {m['role']!r}")
        out.append(f"<|im_start|>{m['role']}\n{_content_text(m['content'], f'message {i}')}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
