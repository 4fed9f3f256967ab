"""Drop-in adapters (umm_ops.attention.adapters): SDPA-style dense masks and flex-style mask_mods -> spans."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import umm_ops
from umm_ops.attention.adapters import SpanPlan, layout_from_mask_mod, sdpa_as_spans


def cheers_mask(lengths, L, rng):
    """Cheers' released-code mask: (tril OR same image block) AND same valid sample, (B, 1, L, L) with padding."""
    B = len(lengths)
    mask = torch.zeros(B, 1, L, L, dtype=torch.bool)
    layouts = []
    for b, n in enumerate(lengths):
        t0 = rng.randint(1, max(1, n // 3))
        img = rng.randint(1, max(1, n - t0))
        block = torch.zeros(n, dtype=torch.long)
        block[t0:t0 + img] = 1
        same = (block[:, None] == block[None, :]) & (block[:, None] == 1)
        mask[b, 0, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril() | same
        segs = [(t0, "causal"), (img, "full")] + ([(n - t0 - img, "causal")] if n - t0 - img > 0 else [])
        layouts.append(segs)
    return mask, layouts


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_sdpa_as_spans_matches_sdpa_on_cheers_masks(hq, hkv):
    rng = random.Random(torch.initial_seed())
    L = 40
    lengths = [40, rng.randint(5, 39), rng.randint(5, 39)]
    mask, _ = cheers_mask(lengths, L, rng)
    B, D = len(lengths), 16
    q = torch.randn(B, hq, L, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, hkv, L, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, hkv, L, D, dtype=torch.float64, requires_grad=True)
    out = sdpa_as_spans(q, k, v, attn_mask=mask, enable_gqa=True)
    rep = hq // hkv
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    valid = mask[:, 0].any(-1)  # (B, L): padded queries are NaN in SDPA, zero here
    for b in range(B):
        torch.testing.assert_close(out[b][:, valid[b]], ref[b][:, valid[b]])
        assert (out[b][:, ~valid[b]] == 0).all()
    g = torch.randn_like(out) * valid[:, None, :, None]
    ga = torch.autograd.grad(out, (q, k, v), g)
    gb = torch.autograd.grad(ref.nan_to_num(), (q, k, v), g)
    for a, b_ in zip(ga, gb):
        torch.testing.assert_close(a, b_)


def test_plan_layout_is_the_cheers_layout():
    rng = random.Random(1)
    mask, segs = cheers_mask([12, 7], 12, rng)
    plan = SpanPlan.from_sdpa_mask(mask)
    docs, _ = plan.layout.segments()
    assert docs == segs
    assert plan.index.tolist() == list(range(12)) + [12 + i for i in range(7)]


@pytest.mark.parametrize("is_causal", [False, True])
def test_no_mask_and_is_causal(is_causal):
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    out = sdpa_as_spans(q, k, v, is_causal=is_causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))


def test_layout_from_mask_mod_matches_from_segments():
    docs = [[(5, "causal"), (6, "full"), (2, "causal")], [(3, "causal"), (4, "noise"), (2, "causal")]]
    ref = umm_ops.SpanLayout.from_segments(docs)
    got = layout_from_mask_mod(ref.mask_mod(), ref.total_k)
    assert got.segments() == ref.segments()
    # a trailing noise span is the same mask as a trailing full span: any equivalent layout is right
    ref = umm_ops.SpanLayout.from_segments([[(3, "causal"), (4, "noise")]])
    got = layout_from_mask_mod(ref.mask_mod(), ref.total_k)
    assert torch.equal(umm_ops.span_mask(got), umm_ops.span_mask(ref))

    def doc_causal(b, h, q_idx, kv_idx):  # a plain flex-style document-causal mask_mod
        doc = (q_idx >= 10).long(), (kv_idx >= 10).long()
        return (doc[0] == doc[1]) & (kv_idx <= q_idx)
    assert layout_from_mask_mod(doc_causal, 16).segments()[0] == [[(10, "causal")], [(6, "causal")]]


def test_errors():
    sliding = torch.ones(8, 8, dtype=torch.bool).tril() & ~torch.ones(8, 8, dtype=torch.bool).tril(-3)
    with pytest.raises(ValueError, match="not expressible as spans"):
        SpanPlan.from_sdpa_mask(sliding)
    with pytest.raises(ValueError, match="same for every head"):
        SpanPlan.from_sdpa_mask(torch.ones(1, 2, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="boolean"):
        SpanPlan.from_sdpa_mask(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="not both"):
        SpanPlan.from_sdpa_mask(torch.ones(4, 4, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match="every token"):
        SpanPlan.from_sdpa_mask(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch=.*seq_len="):
        SpanPlan.from_sdpa_mask(None)
    plan = SpanPlan.from_sdpa_mask(torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q must have shape \(B=2, heads, L=4, D\)"):
        plan(torch.randn(2, 1, 5, 8), torch.randn(2, 1, 4, 8), torch.randn(2, 1, 4, 8))
    with pytest.raises(TypeError, match="boolean tensor"):
        layout_from_mask_mod(lambda b, h, q, k: (q >= k).int(), 4)
