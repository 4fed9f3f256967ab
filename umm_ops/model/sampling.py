"""Next-token sampling and batched text generation with a KV cache (span attention's cache case).

``sample_next(logits, temperature, top_k, top_p, generator)``: greedy at temperature 0, else temperature /
top-k / nucleus sampling in float32.  ``generate(model, prompts, max_new_tokens, ...)``: batched decoding of
ragged prompts (packed, no padding), finished sequences dropped from the batch, stop ids and stop strings,
reproducible with a seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .llm import positions_in_document

__all__ = ["sample_next", "stop_index", "generate", "Generation"]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, V) -> (B,) int64.

    temperature 0: argmax (top_k / top_p unused).  Otherwise softmax(logits / temperature) restricted to the
    ``top_k`` largest logits and then to the smallest set of tokens whose probability reaches ``top_p``
    (the most likely token always stays), sampled with ``generator`` (torch.multinomial)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating (B, V) tensor, got "
                         f"{(tuple(logits.shape), logits.dtype) if isinstance(logits, torch.Tensor) else logits!r}")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one vocabulary entry, got shape {tuple(logits.shape)}")
    temperature = float(temperature)
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    x = logits.float() / temperature
    if top_k is not None and top_k < x.shape[1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and float(top_p) < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens ranked before it already reach top_p
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= float(top_p)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def stop_index(text: str, stop_strings) -> int:
    """Index of the earliest occurrence of any of ``stop_strings`` in ``text``, or -1."""
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else -1


@dataclass
class Generation:
    """One generated continuation: the new token ids (a stop id is not included), the decoded text cut before
    a stop string (None without a tokenizer), and why it ended: "stop" or "length"."""

    tokens: list
    text: str | None
    finish_reason: str


def _prompt_list(prompts, tokenizer) -> list:
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and
                                    all(isinstance(p, str) for p in prompts)):
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer (anything with encode(str) -> ids and decode(ids))")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = [list(tokenizer.encode(p)) for p in prompts]
    elif isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.dtype.is_floating_point:
            raise ValueError(f"prompt ids must be an integer (B, L) or (L,) tensor, got "
                             f"{tuple(prompts.shape)} {prompts.dtype}")
        out = prompts.tolist()
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        out = [list(prompts)]
    elif isinstance(prompts, (list, tuple)) and prompts:
        out = [list(p.tolist() if isinstance(p, torch.Tensor) else p) for p in prompts]
    else:
        raise ValueError(f"prompts must be text (with a tokenizer), a (B, L) tensor or a list of id lists, got "
                         f"{type(prompts).__name__} {prompts!r:.80}")
    for i, p in enumerate(out):
        if not p:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise ValueError(f"prompt {i} must hold int token ids, got {p!r:.80}")
    return out


def _stops(stop, model):
    if stop is None:
        cfg = getattr(model, "config", None)
        stop = getattr(cfg, "eos_token_id", None)
    if stop is None:
        return set(), []
    if isinstance(stop, (int, str)):
        stop = [stop]
    ids, strings = set(), []
    for s in stop:
        if isinstance(s, bool) or not isinstance(s, (int, str)):
            raise ValueError(f"stop entries must be token ids (int) or strings, got {s!r}")
        if isinstance(s, int):
            ids.add(s)
        elif s:
            strings.append(s)
    return ids, strings


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop=None, seed: int | None = None, tokenizer=None) -> list:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns one :class:`Generation` per prompt.

    Args:
        model: a Qwen2LM (anything with ``embed``, ``forward_packed``, ``logits``, ``new_cache``).
        prompts: token ids - a (B, L) / (L,) tensor or a list of id lists (ragged lengths are fine: the prompts
            are packed, never padded) - or text / a list of texts with ``tokenizer``.
        temperature, top_k, top_p: see :func:`sample_next` (temperature 0 = greedy).
        stop: a token id, a string, or a list of both; default ``model.config.eos_token_id``.  A sequence ends
            when it samples a stop id (not included in its tokens) or when its decoded text contains a stop
            string (needs ``tokenizer``; the text is cut before it).
        seed: seeds a private generator (same seed, same prompts -> same output); None uses the global RNG.
        tokenizer: ``encode(str) -> ids`` and ``decode(ids) -> str`` (e.g. a Hugging Face tokenizer).
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    ids_list = _prompt_list(prompts, tokenizer)
    stop_ids, stop_strs = _stops(stop, model)
    if stop_strs and tokenizer is None:
        raise ValueError(f"stop strings {stop_strs} need a tokenizer to decode the generated tokens")
    # validate the sampling arguments before any model work
    sample_next(torch.zeros(1, 1), temperature, top_k, top_p)
    B = len(ids_list)
    out = [[] for _ in range(B)]
    reason = ["length"] * B
    param = next(model.parameters())
    device = param.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))

    if max_new_tokens > 0:
        cache = model.new_cache()
        layout = cache.layout_for([[(len(p), "causal")] for p in ids_list], device=device)
        flat = torch.tensor([t for p in ids_list for t in p], dtype=torch.long, device=device)
        h = model.forward_packed(model.embed(flat), positions_in_document(layout), layout, cache)
        ends = torch.tensor(list(_cumsum(len(p) for p in ids_list)), device=device) - 1
        logits = model.logits(h.index_select(0, ends))                         # (B, V): last prompt token
        active = list(range(B))
        for _ in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            keep = []
            for j, (b, t) in enumerate(zip(active, nxt.tolist())):
                if t in stop_ids:
                    reason[b] = "stop"
                    continue
                out[b].append(t)
                if stop_strs and stop_index(tokenizer.decode(out[b]), stop_strs) >= 0:
                    reason[b] = "stop"
                    continue
                if len(out[b]) < max_new_tokens:
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(active):                                      # drop finished sequences
                cache.select(keep)
                nxt = nxt[torch.tensor(keep, device=nxt.device)]
                active = [active[j] for j in keep]
            layout = cache.layout_for([[(1, "causal")]] * len(active))
            h = model.forward_packed(model.embed(nxt), positions_in_document(layout), layout, cache)
            logits = model.logits(h)

    results = []
    for b in range(B):
        text = None
        if tokenizer is not None:
            text = tokenizer.decode(out[b])
            if stop_strs:
                i = stop_index(text, stop_strs)
                if i >= 0:
                    text = text[:i]
        results.append(Generation(tokens=out[b], text=text, finish_reason=reason[b]))
    return results


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s
