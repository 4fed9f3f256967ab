"""Drop-in adapters: turn an SDPA-style (dense boolean mask) or flex-style (mask_mod) call site into spans.

Most UMM code bases today build a dense ``(B, 1, L, L)`` boolean mask (Cheers, Show-o2: ``tril OR same image block,
AND same valid sample``) and call ``F.scaled_dot_product_attention``, or a flex_attention ``mask_mod``.  These
adapters recover the span layout behind such a mask (when there is one) so the same call site runs
``span_attention``:

    plan = SpanPlan.from_sdpa_mask(mask)          # once per packing: O(B L^2) host work, then reused
    out = plan(q, k, v)                           # q (B, Hq, L, D), k/v (B, Hkv, L, D) -> (B, Hq, L, D)

    out = sdpa_as_spans(q, k, v, attn_mask=mask)  # one-shot drop-in for F.scaled_dot_product_attention

    layout = layout_from_mask_mod(mask_mod, L)    # flex-style: evaluate mask_mod densely, recover the spans

Padding: a token whose mask row is all False (a padded position of a batch row, as in Cheers' "same valid sample")
is dropped from the packed batch and its output is ZERO (SDPA gives NaN there).  A mask that is not expressible as
spans raises ``ValueError("mask is not expressible as spans: ...")`` naming the first differing (query, key).
"""
from __future__ import annotations

import torch

from .layout import SpanLayout
from .ops import span_attention

__all__ = ["SpanPlan", "sdpa_as_spans", "layout_from_mask_mod"]


def layout_from_mask_mod(mask_mod, seq_len: int, device=None) -> SpanLayout:
    """The SpanLayout equivalent to a flex_attention ``mask_mod(b, h, q_idx, kv_idx)`` over ``seq_len`` tokens
    (queries = keys, b = h = 0).  Evaluated densely and vectorised (O(L^2) memory): for converting call sites and
    tests, not for a training loop - build the layout once and keep it."""
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    idx = torch.arange(seq_len, device=device)
    zero = torch.zeros((), dtype=torch.long, device=idx.device)
    mask = mask_mod(zero, zero, idx[:, None], idx[None, :])
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask_mod must return a boolean tensor, got {type(mask).__name__}"
                        + (f" of dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else ""))
    mask = mask.expand(seq_len, seq_len)
    return SpanLayout.from_dense_mask(mask, device=device)


class SpanPlan:
    """A packed span layout for a batch of ``B`` rows of ``L`` tokens, plus the gather indices of the kept tokens.

    Attributes: ``layout`` (SpanLayout over the kept tokens of all rows, row b's tokens form its own documents),
    ``index`` (n_kept,) int64 flat positions ``b * L + i`` of the kept tokens, ``batch``, ``seq_len``.
    """

    def __init__(self, layout: SpanLayout, index: torch.Tensor, batch: int, seq_len: int):
        self.layout, self.index, self.batch, self.seq_len = layout, index, batch, seq_len

    @classmethod
    def from_sdpa_mask(cls, attn_mask=None, *, batch: int | None = None, seq_len: int | None = None,
                       is_causal: bool = False, device=None) -> "SpanPlan":
        """From SDPA's arguments: a boolean ``attn_mask`` of shape (L, L), (B, L, L), (B, 1, L, L) or (1, 1, L, L)
        (True = may attend; the same for every head), or ``is_causal`` / no mask with ``batch`` and ``seq_len``."""
        if attn_mask is None:
            if batch is None or seq_len is None:
                raise ValueError("SpanPlan.from_sdpa_mask without attn_mask needs batch= and seq_len=")
            mode = "causal" if is_causal else "full"
            layout = SpanLayout.from_segments([[(seq_len, mode)]] * batch, device=device)
            index = torch.arange(batch * seq_len, device=layout.device)
            return cls(layout, index, batch, seq_len)
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as in SDPA)")
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
            raise TypeError("attn_mask must be a boolean tensor (True = may attend); a float (additive) mask is not "
                            "a span layout" + (f", got dtype {attn_mask.dtype}" if isinstance(attn_mask, torch.Tensor)
                                               else f", got {type(attn_mask).__name__}"))
        m = attn_mask
        if m.dim() == 4:
            if m.shape[1] != 1:
                raise ValueError(f"attn_mask must be the same for every head (shape (B, 1, L, L)), got shape "
                                 f"{tuple(m.shape)}: per-head masks are not span layouts")
            m = m[:, 0]
        elif m.dim() == 2:
            m = m[None]
        elif m.dim() != 3:
            raise ValueError(f"attn_mask must have shape (L, L), (B, L, L) or (B, 1, L, L), got {tuple(m.shape)}")
        if m.shape[-1] != m.shape[-2]:
            raise ValueError(f"attn_mask must be square (queries = keys), got {tuple(attn_mask.shape)}")
        L = m.shape[-1]
        if seq_len is not None and seq_len != L:
            raise ValueError(f"seq_len={seq_len} does not match the mask's {L}")
        B = m.shape[0] if batch is None else batch
        if m.shape[0] not in (1, B):
            raise ValueError(f"attn_mask batch dim {m.shape[0]} does not broadcast to batch={B}")
        if device is None:
            device = attn_mask.device
        mh = m.detach().to("cpu")
        docs, index = [], []
        for b in range(B):
            mb = mh[b if mh.shape[0] > 1 else 0]
            keep = mb.any(1)  # padded positions see nothing
            if bool((mb.any(0) & ~keep).any()):
                i = int((mb.any(0) & ~keep).nonzero()[0])
                raise ValueError(f"mask is not expressible as spans: batch row {b}, token {i} sees nothing but is "
                                 f"seen by other tokens")
            kept = keep.nonzero().flatten()
            if kept.numel() == 0:
                continue
            sub = mb[kept][:, kept]
            try:
                part = SpanLayout.from_dense_mask(sub)
            except ValueError as e:
                raise ValueError(f"batch row {b}: {e}") from None
            docs.extend(part.segments()[0])
            index.append(kept + b * L)
        if not docs:
            raise ValueError("attn_mask masks out every token of every batch row")
        layout = SpanLayout.from_segments(docs, device=device)
        return cls(layout, torch.cat(index).to(device), B, L)

    def __call__(self, q, k, v, scale: float | None = None):
        """q (B, Hq, L, D), k/v (B, Hkv, L, D) (SDPA's layout; Hq % Hkv == 0) -> (B, Hq, L, D); zeros at dropped
        (padded) query positions."""
        B, L = self.batch, self.seq_len
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[0] != B or t.shape[2] != L:
                raise ValueError(f"{name} must have shape (B={B}, heads, L={L}, D), got {tuple(t.shape)}")
        Hq, D = q.shape[1], q.shape[3]

        def pack(t):  # (B, H, L, D) -> (n_kept, H, D)
            return t.transpose(1, 2).reshape(B * L, t.shape[1], t.shape[3]).index_select(0, self.index)

        o = span_attention(pack(q), pack(k), pack(v), self.layout, softmax_scale=scale)
        out = o.new_zeros(B * L, Hq, D).index_copy(0, self.index, o)
        return out.reshape(B, L, Hq, D).transpose(1, 2)


def sdpa_as_spans(q, k, v, attn_mask=None, is_causal: bool = False, scale: float | None = None,
                  enable_gqa: bool = False):
    """Drop-in for ``F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=..., scale=..., enable_gqa=...)``
    with a boolean, head-independent mask: recovers the spans and runs span_attention (GQA always allowed).
    Rebuilds the plan on every call (O(B L^2) host work): keep a SpanPlan in a loop."""
    plan = SpanPlan.from_sdpa_mask(attn_mask, batch=q.shape[0], seq_len=q.shape[2], is_causal=is_causal,
                                   device=q.device)
    return plan(q, k, v, scale)
