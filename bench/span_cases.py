"""Span-attention benchmark cases (issue 3): packed mixed causal / bidirectional / noise layouts against peers.

Layouts (deterministic sizes from a fixed seed, documents packed until the token budget; the remainder, if any,
becomes one last document of its own, like padding):
  bagel          documents of text (causal, 16-300) + ViT span (full) + clean latent span (full) + noisy latent
                 span (noise, 256-1024 tokens; the clean latent has the noisy one's size, as in editing)
  cheers         text (causal) + one bidirectional image block of 256 tokens + text
  causal-varlen  pure causal documents of ragged lengths (document-causal / varlen mask)
  all-full       one full (bidirectional) segment per document
Quick mode scales the bagel / varlen / all-full span lengths down 4x so a whole document set fits ~1024 tokens.

Peers, per case (inputs are packed (L, H, D), as a model's projections produce them; the peers take
heads-first views, B = 1 packed batch):
  umm_ops         umm_ops.span_attention, automatic backend
  sdpa_dense      F.scaled_dot_product_attention, kv heads repeated, dense boolean mask from umm_ops.span_mask
                  (built once, outside the timed region)
  flex_cached     torch.compile'd flex_attention with a BlockMask from create_block_mask built once, outside the
                  timed region (GQA through enable_gqa=True where flex_attention has it, else kv heads repeated)
  flex_with_mask  the same with create_block_mask inside the timed region (what a user with changing packing pays)

Case.bytes: ideal traffic, q, k, v read + out written (fwd); + q, k, v, out, dout read and dq, dk, dv written
(bwd); lse ignored.  SpanCase.allowed_pairs: number of allowed (query, key) pairs (sum of span_mask); bench/run.py
turns it into achieved TFLOP/s = 4 * pairs * Dh * Hq / time (fwd), x 3.5 for fwd+bwd (fwd 1 + bwd 2.5).
"""
from __future__ import annotations

import inspect
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import umm_ops
from cases import Case, _esize, _with_backward

SEED = 1234


@dataclass
class SpanCase(Case):
    allowed_pairs: int = 0
    heads_q: int = 0
    heads_kv: int = 0
    head_dim: int = 0
    tokens: int = 0

    @property
    def id(self) -> str:
        return f"{self.op}-{self.direction}-{self.tokens}tok-{str(self.dtype).replace('torch.', '')}"

    @property
    def extra_info(self) -> dict:
        """Copied into pytest-benchmark's extra_info by bench/conftest.py (read by bench/run.py)."""
        return {"allowed_pairs": self.allowed_pairs, "heads_q": self.heads_q, "heads_kv": self.heads_kv,
                "head_dim": self.head_dim, "tokens": self.tokens,
                "flops": 4 * self.allowed_pairs * self.head_dim * self.heads_q
                * (3.5 if self.direction == "fwd+bwd" else 1.0)}


# ------------------------------------------------------------------------------------- layouts
def _pack(rng: random.Random, make_doc, target: int, pad_mode: str):
    """Documents from make_doc(rng) packed into `target` tokens; the remainder is one more document."""
    docs, total, misses = [], 0, 0
    while misses < 20:  # a document that does not fit is redrawn (up to 20 times) before padding the rest
        doc = make_doc(rng)
        n = sum(length for length, _ in doc)
        if total + n > target:
            misses += 1
            continue
        docs.append(doc)
        total += n
    if total < target:
        docs.append([(target - total, pad_mode)])
    return docs


def bagel_docs(target: int, scale: int, seed: int = SEED):
    def doc(rng):
        lat = rng.randint(256, 1024) // scale
        return [(rng.randint(16, 300) // max(1, scale // 2), "causal"), (rng.randint(256, 729) // scale, "full"),
                (lat, "full"), (lat, "noise")]
    return _pack(random.Random(seed), doc, target, "causal")


def cheers_docs(target: int, seed: int = SEED + 1):
    def doc(rng):
        return [(rng.randint(16, 300), "causal"), (256, "full"), (rng.randint(16, 300), "causal")]
    return _pack(random.Random(seed), doc, target, "causal")


def causal_varlen_docs(target: int, scale: int, seed: int = SEED + 2):
    return _pack(random.Random(seed), lambda rng: [(rng.randint(64, 2048) // scale, "causal")], target, "causal")


def all_full_docs(target: int, scale: int, seed: int = SEED + 3):
    return _pack(random.Random(seed), lambda rng: [(rng.randint(256, 1024) // scale, "full")], target, "full")


# ------------------------------------------------------------------------------------- peers
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    _FLEX_GQA = "enable_gqa" in inspect.signature(flex_attention).parameters
except ImportError:  # pragma: no cover - old torch
    flex_attention = create_block_mask = None
    _FLEX_GQA = False

_FLEX_COMPILED = None


def _flex():
    """One compiled flex_attention shared by all cases (dynamo caches per code object: a recompile per shape
    and per requires_grad, not per case; the limit is raised so the sweep never falls back to eager flex)."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


_PREP: dict = {}  # kind -> (key, object): only the latest case's dense mask / BlockMask is kept alive


def _prepared(kind: str, key, build):
    cur = _PREP.get(kind)
    if cur is None or cur[0] is not key:
        _PREP.pop(kind, None)  # free the previous case's mask before building the next
        _PREP[kind] = (key, build())
    return _PREP[kind][1]


def _heads_first(t):  # (L, H, D) -> (1, H, L, D) view
    return t.transpose(0, 1).unsqueeze(0)


def _from_heads_first(o):  # (1, H, L, D) -> (L, H, D) view
    return o.squeeze(0).transpose(0, 1)


def _make_impls(layout, device, hq, hkv, with_flex: bool):
    rep = hq // hkv
    Lq, Lk = layout.total_q, layout.total_k

    def umm(q, k, v):
        return umm_ops.span_attention(q, k, v, layout)

    def dense_mask():
        return umm_ops.span_mask(layout)

    def sdpa_dense(q, k, v):
        mask = _prepared("dense", layout, dense_mask)  # built on the first (warm-up) call
        kk = _heads_first(k).repeat_interleave(rep, dim=1)
        vv = _heads_first(v).repeat_interleave(rep, dim=1)
        return _from_heads_first(F.scaled_dot_product_attention(_heads_first(q), kk, vv, attn_mask=mask))

    impls = {"umm_ops": umm, "sdpa_dense": sdpa_dense}
    if not with_flex:
        return impls

    def block_mask():
        return create_block_mask(layout.mask_mod(), 1, None, Lq, Lk, device=device)

    def flex(q, k, v, bm):
        qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
        if _FLEX_GQA:
            return _from_heads_first(_flex()(qh, kh, vh, block_mask=bm, enable_gqa=True))
        kh, vh = kh.repeat_interleave(rep, dim=1), vh.repeat_interleave(rep, dim=1)
        return _from_heads_first(_flex()(qh, kh, vh, block_mask=bm))

    def flex_cached(q, k, v):
        return flex(q, k, v, _prepared("block", layout, block_mask))

    def flex_with_mask(q, k, v):
        return flex(q, k, v, block_mask())

    impls["flex_cached"] = flex_cached
    impls["flex_with_mask"] = flex_with_mask
    return impls


def _umm_has_fast_kernel(device: str) -> bool:
    b = umm_ops.backends()
    names = b["kernels"].get("span_attention_fwd", [])
    if device == "cpu":
        return "cpu" in names
    return any(n in names and b.get(n, {}).get("runnable") for n in ("cuda", "triton"))


# ------------------------------------------------------------------------------------- cases
def make_span_cases(device: str, quick: bool) -> list[Case]:
    on_gpu = device == "cuda"
    if on_gpu:
        dtype, D = torch.bfloat16, 128
        totals = [4096] if quick else [8192, 32768]
        scale = 1
    else:
        dtype, D = torch.float32, 64
        totals = [1024] if quick else [4096]  # 4096: the CPU target size (BAGEL-like, H=8, D=64, fp32)
        scale = 4 if quick else 1
    es = _esize(dtype)
    cases: list[Case] = []
    for total in totals:
        layouts = {
            "bagel": bagel_docs(total, scale),
            "cheers": cheers_docs(total),
            "causal-varlen": causal_varlen_docs(total, scale),
            "all-full": all_full_docs(total, scale),
        }
        for name, docs in layouts.items():
            if on_gpu:
                hq, hkv = (12, 2) if name == "cheers" else (16, 2)  # Qwen2.5-1.5B (Cheers) / 16 q heads, 2 kv
            else:
                hq, hkv = (4, 2) if quick else (8, 2)
            layout = umm_ops.SpanLayout.from_segments(docs, device=device)
            Lq, Lk = layout.total_q, layout.total_k
            pairs = int(umm_ops.span_mask(layout).sum())
            Q, K = Lq * hq * D * es, Lk * hkv * D * es
            for direction in ("fwd", "fwd+bwd"):
                bwd = direction == "fwd+bwd"
                # flex_attention has no backward on the CPU in this torch ("FlexAttention does not support
                # backward on CPU"): CPU fwd+bwd cases compare umm_ops with SDPA only.
                with_flex = flex_attention is not None and (on_gpu or not bwd)
                impls = _make_impls(layout, device, hq, hkv, with_flex)
                if on_gpu and not _umm_has_fast_kernel(device) and Lq * Lk * hq > 2**32:
                    impls.pop("umm_ops")  # no GPU kernel yet: the dense reference would need > 16 GB of scores
                if on_gpu and Lq * Lk > 2**28:
                    impls.pop("sdpa_dense")  # > 16k tokens: the dense L x L mask / bias alone is gigabytes
                if bwd:
                    impls = {k: _with_backward(f, 3) for k, f in impls.items()}

                def make(Lq=Lq, Lk=Lk, hq=hq, hkv=hkv, bwd=bwd):
                    r = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
                    q, k, v = r(Lq, hq, D), r(Lk, hkv, D), r(Lk, hkv, D)
                    return tuple(t.requires_grad_(True) for t in (q, k, v)) if bwd else (q, k, v)

                nbytes = (2 * Q + 2 * K) if not bwd else (6 * Q + 6 * K)
                shape = f"{len(docs)} docs, L={Lk}, Hq={hq}/Hkv={hkv}, D={D}, {100 * pairs / (Lq * Lk):.1f}% dense"
                cases.append(SpanCase(f"span_attention[{name}]", direction, len(docs), dtype, device, shape, nbytes,
                                      make, impls, allowed_pairs=pairs, heads_q=hq, heads_kv=hkv, head_dim=D,
                                      tokens=Lk))
    return cases
