"""The public span-attention op: custom ops + fake kernels + autograd + backend choice.

``umm_ops::span_attention`` has the schema of the kernel contract's forward (docs/span-attention-contract.md)
and returns (out, lse); ``umm_ops::span_attention_backward`` the schema of its backward.  Each call runs the
kernel of the backend selected for it (``kernels(q, "span_attention_fwd")``: cuda / triton / cpu / reference,
skipping backends that have no span-attention kernel yet).
"""
from __future__ import annotations

import math

import torch

from .. import _lib
from ..ops._common import (ALL_DTYPES, autocast_policy, backward_op, backward_scope, check_tensor, dispatch, kernels,
                           register_autograd, remember_backend)
from .layout import SpanLayout

__all__ = ["span_attention"]

_LAYOUT_ARGS = ("Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor seg_offsets, Tensor seg_start, Tensor seg_end, "
                "Tensor seg_mode, int max_seqlen_q, int max_seqlen_k, float softmax_scale")
_S_FWD = f"(Tensor q, Tensor k, Tensor v, {_LAYOUT_ARGS}) -> (Tensor, Tensor)"
_S_BWD = (f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_LAYOUT_ARGS}) "
          "-> (Tensor, Tensor, Tensor)")


def _fwd_impl(q, k, v, cu_q, cu_k, seg_offsets, seg_start, seg_end, seg_mode, max_q, max_k, scale):
    return kernels(q, "span_attention_fwd").span_attention_fwd(
        q, k, v, cu_q, cu_k, seg_offsets, seg_start, seg_end, seg_mode, max_q, max_k, scale)


def _bwd_impl(dout, q, k, v, out, lse, cu_q, cu_k, seg_offsets, seg_start, seg_end, seg_mode, max_q, max_k, scale):
    return kernels(q, "span_attention_bwd").span_attention_bwd(
        dout, q, k, v, out, lse, cu_q, cu_k, seg_offsets, seg_start, seg_end, seg_mode, max_q, max_k, scale)


_fwd_op = torch.library.custom_op("umm_ops::span_attention", _fwd_impl, mutates_args=(), schema=_S_FWD)
_bwd_op = torch.library.custom_op("umm_ops::span_attention_backward", _bwd_impl, mutates_args=(), schema=_S_BWD)


def _fake_fwd(q, k, v, cu_q, cu_k, seg_offsets, seg_start, seg_end, seg_mode, max_q, max_k, scale):
    sd = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=sd)


def _fake_bwd(dout, q, k, v, out, lse, cu_q, cu_k, seg_offsets, seg_start, seg_end, seg_mode, max_q, max_k, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


torch.library.register_fake("umm_ops::span_attention", _fake_fwd)
torch.library.register_fake("umm_ops::span_attention_backward", _fake_bwd)


def _register_kernel_fakes() -> None:
    """Fakes of the C++ ops kernel_span_attention_fwd/bwd, when the compiled extension defines them (and has no
    fake of its own)."""
    if not _lib.loaded():
        return
    for name, fn in (("kernel_span_attention_fwd", _fake_fwd), ("kernel_span_attention_bwd", _fake_bwd)):
        if not hasattr(torch.ops.umm_ops, name):
            continue
        try:
            torch.library.register_fake(f"umm_ops::{name}", fn)
        except RuntimeError:  # already has a fake / Meta kernel registered elsewhere
            pass


_register_kernel_fakes()


def _setup(ctx, inputs, output):
    remember_backend(ctx)
    q, k, v, cu_q, cu_k, seg_offsets, seg_start, seg_end, seg_mode, max_q, max_k, scale = inputs
    out, lse = output
    ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seg_offsets, seg_start, seg_end, seg_mode)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, *lay = ctx.saved_tensors
    nig = ctx.needs_input_grad
    if dout is None or not any(nig[:3]):
        return (None,) * 12
    with backward_scope(ctx):
        dq, dk, dv = backward_op(ctx, _bwd_op, _bwd_impl)(dout.contiguous(), q, k, v, out, lse, *lay, ctx.max_q,
                                                          ctx.max_k, ctx.scale)
    return (dq if nig[0] else None, dk if nig[1] else None, dv if nig[2] else None) + (None,) * 9


_fwd_eager = register_autograd(_fwd_op, "SpanAttention", _fwd_impl, _setup, _backward)


# ----------------------------------------------------------------------------------- public API
@autocast_policy("lower")
def span_attention(q, k, v, layout: SpanLayout, softmax_scale: float | None = None, return_lse: bool = False):
    """Attention over a packed batch whose mask is given by spans (causal / full / noise, see SpanLayout).

    Args:
        q: (Lq_total, Hq, D) packed queries (``layout.total_q`` rows; in the cache case the last ``q_lens[i]``
            tokens of each document).
        k, v: (Lk_total, Hkv, D) packed keys and values (``layout.total_k`` rows), Hq % Hkv == 0: query head h
            uses kv head h // (Hq // Hkv) (GQA / MQA).
        layout: a SpanLayout on the device of q.
        softmax_scale: default 1 / sqrt(D).
        return_lse: also return the natural-log log-sum-exp (Hq, Lq_total), float32 (float64 for float64 inputs).
    Returns out (Lq_total, Hq, D) in the dtype of q, or (out, lse).  Differentiable in q, k and v (not through
    lse).  Dtypes: float32, bfloat16, float16 (float64 runs on the reference backend).

    Non-finite inputs (every backend): a query row whose computation meets a NaN or +-Inf - in its own q, in k
    or v at a key it can see, or a score that overflows - gets out = NaN (the whole row) and lse = NaN, never a
    finite stand-in; keys a row cannot see never affect it.  Gradients are NaN wherever they depend on such a
    row (and may be NaN for keys that share a kernel tile with a non-finite key).
    """
    check_tensor(q, "q", dtypes=ALL_DTYPES, dim=3)
    for t, name in ((k, "k"), (v, "v")):
        check_tensor(t, name, dtypes=ALL_DTYPES, dim=3)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (Lk_total, Hkv, D), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    Lq, Hq, D = q.shape
    Lk, Hkv, Dk = k.shape
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if D == 0 or Hq == 0 or Hkv == 0:
        raise ValueError(f"q and k need at least one head and a head dim > 0, got q {tuple(q.shape)} and k "
                         f"{tuple(k.shape)}")
    if Hq % Hkv:
        raise ValueError(f"the number of query heads must be a multiple of the kv heads (GQA/MQA), got Hq={Hq} "
                         f"and Hkv={Hkv}")
    if not isinstance(layout, SpanLayout):
        raise TypeError(f"layout must be a umm_ops.SpanLayout, got {type(layout).__name__}")
    if layout.device != q.device:
        raise ValueError(f"the layout tensors must be on the device of q ({q.device}), got {layout.device} "
                         f"(use layout.to(q.device) once, outside the training step)")
    if layout._total_q is not None and Lq != layout._total_q:
        raise ValueError(f"q must have layout.total_q = {layout._total_q} rows (one per query token), got "
                         f"shape {tuple(q.shape)}")
    if layout._total_k is not None and Lk != layout._total_k:
        raise ValueError(f"k and v must have layout.total_k = {layout._total_k} rows (one per token), got "
                         f"shape {tuple(k.shape)}")
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a finite number or None, got {softmax_scale!r} "
                            f"({type(softmax_scale).__name__})")
        scale = float(softmax_scale)
        if not math.isfinite(scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    qc = q.contiguous()
    out, lse = dispatch(_fwd_op, _fwd_eager, _fwd_impl, qc, qc, k.contiguous(), v.contiguous(), *layout.tensors(),
                        layout.max_seqlen_q, layout.max_seqlen_k, scale)
    return (out, lse) if return_lse else out
