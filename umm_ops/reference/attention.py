"""Span attention, the plain-PyTorch oracle: a dense mask and softmax attention (docs/span-attention-contract.md).

* ``span_attention_reference(q, k, v, layout, softmax_scale=None) -> (out, lse)``: the public reference,
  computed in the dtype of its inputs (float64 for the oracle, the low-precision dtype to measure PyTorch's own
  error in that dtype), differentiable by torch autograd.
* ``span_attention_fwd`` / ``span_attention_bwd``: the kernel contract (exact signatures of the C++ ops
  ``torch.ops.umm_ops.kernel_span_attention_fwd/bwd``), computing in float32 for 16-bit inputs (float64 for
  float64), lse float32 (float64 for float64 inputs).

A query with no allowed key (impossible under the semantics, guarded anyway) gets out = 0, lse = -inf and zero
gradients: the masked scores are replaced by a finite value BEFORE the softmax and the probabilities of empty
rows are zeroed with ``where`` (so neither the forward nor the backward makes a NaN of its own).

Non-finite inputs (the rule every backend follows, docs/span-attention-contract.md): a query row whose visible
scores include a NaN / +-Inf (a NaN / Inf in its q, or in k at a key it sees, or a float overflow) or that sees
a key whose v holds a NaN / Inf gets out = NaN (the whole row) and lse = NaN; values at keys a row cannot see
never affect it.  Gradients are never finite where they depend on such a row.
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
    # Non-finite inputs: a row is NaN when one of its visible scores is NaN / +-Inf or one of its visible keys
    # has a NaN / Inf in v; what a row cannot see never reaches it (no 0 * Inf through the dense P V).
    s_fin = torch.isfinite(s)
    v_fin = torch.isfinite(vv)
    v_badkey = (~v_fin.all(-1)).to(s.dtype)                   # (Lk, Hq)
    bad = ((~s_fin) & mask).any(-1) | (torch.einsum("qk,kh->hq", mask.to(s.dtype), v_badkey) > 0)  # (Hq, Lq)
    s = torch.where(mask & s_fin, s, torch.finfo(s.dtype).min)  # finite: no NaN from all-masked rows
    vv = torch.where(v_fin, vv, 0.0)
    row_ok = mask.any(-1)                                     # (Lq,)
    p = torch.where(mask & row_ok[:, None], torch.softmax(s, dim=-1), 0.0)
    out = torch.einsum("hqk,khd->qhd", p, vv)
    lse = torch.where(row_ok, torch.logsumexp(s, dim=-1), float("-inf"))
    out = out * torch.where(bad, float("nan"), 1.0).to(out.dtype).transpose(0, 1)[..., None]
    lse = torch.where(bad, float("nan"), lse)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # the sanitised scores would give a NaN row finite gradients (e.g. dq = 0 for a NaN q): put NaN back into
        # the gradients of its q row and of the k / v of the keys it sees
        bad_f = bad.to(s.dtype)
        kv_bad = (torch.einsum("qk,hq->kh", mask.to(s.dtype), bad_f) > 0).view(k.shape[0], Hkv, g).any(-1)
        out = _NanGrads.apply(out, q, k, v, bad.transpose(0, 1), kv_bad)
    return out, lse


class _NanGrads(torch.autograd.Function):
    """Identity on out; its backward adds NaN to the gradients of the flagged q rows (Lq, Hq) and k / v keys
    (Lk, Hkv), zero elsewhere."""

    @staticmethod
    def forward(ctx, out, q, k, v, q_bad, kv_bad):
        ctx.save_for_backward(q_bad, kv_bad)
        ctx.meta = (q.shape, k.shape)
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        q_bad, kv_bad = ctx.saved_tensors
        (q_shape, k_shape), nan = ctx.meta, float("nan")
        gq = torch.where(q_bad[..., None], nan, 0.0).to(g.dtype).expand(q_shape)
        gkv = torch.where(kv_bad[..., None], nan, 0.0).to(g.dtype).expand(k_shape)
        return g, gq, gkv, gkv, None, None


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
