"""Span attention, the plain-PyTorch oracle: a dense mask and softmax attention (docs/span-attention-contract.md).

* ``span_attention_reference(q, k, v, layout, softmax_scale=None) -> (out, lse)``: the public reference,
  computed in the dtype of its inputs (float64 for the oracle, the low-precision dtype to measure PyTorch's own
  error in that dtype), differentiable by torch autograd.
* ``span_attention_fwd`` / ``span_attention_bwd``: the kernel contract (exact signatures of the C++ ops
  ``torch.ops.umm_ops.kernel_span_attention_fwd/bwd``), computing in float32 for 16-bit inputs (float64 for
  float64), lse float32 (float64 for float64 inputs).

A query with no allowed key (impossible under the semantics, guarded anyway) gets out = 0, lse = -inf and zero
gradients: the masked scores are replaced by a finite value BEFORE the softmax and the probabilities of empty
rows are zeroed with ``where`` (so neither the forward nor the backward ever sees NaN).
"""
from __future__ import annotations

import math

import torch

from ..attention.layout import SpanLayout, span_mask
from ._common import _acc, _autograd_on

__all__ = ["span_attention_reference", "span_attention_fwd", "span_attention_bwd"]


def span_attention_reference(q, k, v, layout: SpanLayout, softmax_scale: float | None = None):
    """out (Lq, Hq, D) in q's dtype and lse (Hq, Lq) in q's dtype; GQA: query head h uses kv head h // (Hq/Hkv)."""
    Lq, Hq, Dh = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the kv heads ({Hkv})")
    scale = 1.0 / math.sqrt(Dh) if softmax_scale is None else float(softmax_scale)
    mask = span_mask(layout).to(q.device)                     # (Lq, Lk)
    g = Hq // Hkv
    kk = k.repeat_interleave(g, dim=1) if g > 1 else k
    vv = v.repeat_interleave(g, dim=1) if g > 1 else v
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale           # (Hq, Lq, Lk)
    s = torch.where(mask, s, torch.finfo(s.dtype).min)        # finite: no NaN from all-masked rows
    row_ok = mask.any(-1)                                     # (Lq,)
    p = torch.where(mask & row_ok[:, None], torch.softmax(s, dim=-1), 0.0)
    out = torch.einsum("hqk,khd->qhd", p, vv)
    lse = torch.where(row_ok, torch.logsumexp(s, dim=-1), float("-inf"))
    return out, lse


def _fresh(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous tensor (the fakes promise contiguous outputs; a custom op may not return an alias)."""
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def _layout(q, k, cu_seqlens_q, cu_seqlens_k, seg_offsets, seg_start, seg_end, seg_mode, max_seqlen_q,
            max_seqlen_k) -> SpanLayout:
    return SpanLayout(cu_seqlens_q, cu_seqlens_k, seg_offsets, seg_start, seg_end, seg_mode, max_seqlen_q,
                      max_seqlen_k, validate=False, total_q=q.shape[0], total_k=k.shape[0])


def span_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seg_offsets, seg_start, seg_end, seg_mode,
                       max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float):
    layout = _layout(q, k, cu_seqlens_q, cu_seqlens_k, seg_offsets, seg_start, seg_end, seg_mode, max_seqlen_q,
                     max_seqlen_k)
    out, lse = span_attention_reference(_acc(q), _acc(k), _acc(v), layout, softmax_scale)
    return _fresh(out, q.dtype), _fresh(lse, lse.dtype)


def span_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seg_offsets, seg_start, seg_end,
                       seg_mode, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float):
    """(dq, dk, dv) by autograd through the dense reference (out and lse are recomputed, not used)."""
    layout = _layout(q, k, cu_seqlens_q, cu_seqlens_k, seg_offsets, seg_start, seg_end, seg_mode, max_seqlen_q,
                     max_seqlen_k)
    with _autograd_on():
        ins = [_acc(t).detach().requires_grad_(True) for t in (q, k, v)]
        o, _ = span_attention_reference(*ins, layout, softmax_scale)
        gs = torch.autograd.grad(o, ins, _acc(dout))
    return tuple(_fresh(g, t.dtype) for g, t in zip(gs, (q, k, v)))
