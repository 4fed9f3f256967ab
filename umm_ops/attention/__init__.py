"""Span attention: packed mixed autoregressive / bidirectional / noisy-span attention (issue 3).

    layout = umm_ops.SpanLayout.from_segments([[(12, "causal"), (64, "full"), (5, "causal")],
                                               [(30, "causal"), (64, "noise")]])
    out = umm_ops.span_attention(q, k, v, layout)        # q (Lq, Hq, D), k/v (Lk, Hkv, D)

Drop-in adapters for existing call sites (umm_ops.attention.adapters): ``sdpa_as_spans`` / ``SpanPlan`` for
SDPA with a dense boolean mask, ``layout_from_mask_mod`` for flex_attention mask_mods.

See docs/span-attention-contract.md for the layout tensors, the mask semantics and the kernel contract.
"""
from .layout import SpanLayout, span_mask
from .ops import span_attention
from .adapters import SpanPlan, layout_from_mask_mod, sdpa_as_spans  # noqa: E402  (needs .ops)

__all__ = ["SpanLayout", "span_attention", "span_mask", "SpanPlan", "sdpa_as_spans", "layout_from_mask_mod"]
