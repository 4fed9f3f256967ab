"""Span attention: packed mixed autoregressive / bidirectional / noisy-span attention (issue 3).

    layout = umm_ops.SpanLayout.from_segments([[(12, "causal"), (64, "full"), (5, "causal")],
                                               [(30, "causal"), (64, "noise")]])
    out = umm_ops.span_attention(q, k, v, layout)        # q (Lq, Hq, D), k/v (Lk, Hkv, D)

See docs/span-attention-contract.md for the layout tensors, the mask semantics and the kernel contract.
"""
from .layout import SpanLayout, span_mask
from .ops import span_attention

__all__ = ["SpanLayout", "span_attention", "span_mask"]
