"""The CUDA (sm80 tensor-core) span-attention kernels: torch.ops.umm_ops.kernel_span_attention_fwd / _bwd on CUDA
tensors, directly and through umm_ops.span_attention with the "cuda" backend forced.

Against the float64 reference on random ragged layouts (all three modes, segment lengths 1, around the 64-token
tiles and longer, the cache case, documents without queries, GQA / MQA), head dims 64 / 72 / 80 / 96 / 128 (72 and
80 run padded to 96), bfloat16 and float16: outputs, lse and gradients with FlashAttention's tolerance rule
(tests/tolerance.py); agreement with flex_attention; bitwise determinism (no atomics); inputs that are not
16-byte aligned; clear errors for what the kernel does not take (float32, head dims that are not multiples of 8).

Skipped without a GPU or when umm_ops was built without the CUDA span-attention kernel.
"""
from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

import umm_ops
from umm_ops import SpanLayout, span_attention
from umm_ops.reference.attention import span_attention_reference
from tolerance import assert_close_rule

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not hasattr(torch.ops.umm_ops, "kernel_span_attention_fwd") or not torch._C._dispatch_has_kernel_for_dispatch_key(
        "umm_ops::kernel_span_attention_fwd", "CUDA"):
    pytest.skip("umm_ops was built without the CUDA span-attention kernel", allow_module_level=True)

FWD = torch.ops.umm_ops.kernel_span_attention_fwd
BWD = torch.ops.umm_ops.kernel_span_attention_bwd
DEV = "cuda"
MODES = ("causal", "full", "noise")
# lengths that hit the 64-row tiles' edges (1, 63, 64, 65, 127, 129) and multi-tile segments
LENGTHS = (1, 2, 7, 31, 33, 63, 64, 65, 100, 127, 129, 200)


def random_layout(rng: random.Random, max_docs=4, max_segs=5, cache=None, no_query_doc=False):
    docs = [[(rng.choice(LENGTHS), rng.choice(MODES)) for _ in range(rng.randint(1, max_segs))]
            for _ in range(rng.randint(1, max_docs))]
    if cache is None:
        cache = rng.random() < 0.5
    q_lens = None
    if cache:
        q_lens = [rng.choice([1, rng.randint(1, sum(n for n, _ in d)), sum(n for n, _ in d)]) for d in docs]
        if no_query_doc:
            q_lens[rng.randrange(len(docs))] = 0
    return docs, q_lens


# fixed layouts: BAGEL-like (text, ViT, noisy latents, text), Cheers-like, noise first, single tokens, the cache case,
# a document without queries, tile-aligned image blocks
FIXED = [
    ([[(37, "causal"), (64, "full"), (128, "noise"), (5, "causal")], [(3, "causal"), (65, "full"), (20, "causal")]],
     None),
    ([[(1, "noise"), (1, "causal"), (1, "full"), (1, "noise"), (1, "causal")]], None),
    ([[(70, "causal"), (33, "full")], [(20, "full"), (45, "causal")]], [1, 50]),
    ([[(64, "causal"), (64, "full"), (64, "noise")], [(130, "causal")], [(9, "full"), (2, "noise")]], [0, 130, 11]),
    ([[(300, "causal")]], None),
]


def make_inputs(lay, Hq, Hkv, D, dtype, gen_seed):
    g = torch.Generator(device="cpu").manual_seed(gen_seed)
    q = torch.randn(lay.total_q, Hq, D, generator=g).to(DEV, dtype)
    k = torch.randn(lay.total_k, Hkv, D, generator=g).to(DEV, dtype)
    v = torch.randn(lay.total_k, Hkv, D, generator=g).to(DEV, dtype)
    dout = torch.randn(lay.total_q, Hq, D, generator=g).to(DEV, dtype)
    return q, k, v, dout


def reference_all(q, k, v, dout, lay, scale, dtype):
    """out, lse, (dq, dk, dv) of the dense reference computed in `dtype` (float64: the oracle)."""
    ins = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, lse = span_attention_reference(*ins, lay, scale)
    grads = torch.autograd.grad(out, ins, dout.to(dtype)) if out.numel() else tuple(torch.zeros_like(t) for t in ins)
    return out.detach(), lse.detach(), grads


def lay_args(lay, scale):
    return (*lay.tensors(), lay.max_seqlen_q, lay.max_seqlen_k, scale)


def check_case(docs, q_lens, Hq, Hkv, D, dtype, seed, scale=None, public=False):
    lay = SpanLayout.from_segments(docs, q_lens, device=DEV)
    q, k, v, dout = make_inputs(lay, Hq, Hkv, D, dtype, seed)
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    if public:
        xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with umm_ops.use_backend("cuda"):
            out, lse = span_attention(*xs, lay, softmax_scale=sc, return_lse=True)
            grads = torch.autograd.grad(out, xs, dout) if out.numel() else (None,) * 3
    else:
        out, lse = FWD(q, k, v, *lay_args(lay, sc))
        grads = BWD(dout, q, k, v, out, lse, *lay_args(lay, sc))
    torch.cuda.synchronize()
    what = f"{dtype} D={D} H={Hq}/{Hkv} scale={sc:.3g} docs={docs} q_lens={q_lens}"
    assert out.dtype == dtype and out.shape == q.shape, what
    assert lse.dtype == torch.float32 and lse.shape == (Hq, lay.total_q), what
    o64, l64, g64 = reference_all(q, k, v, dout, lay, sc, torch.float64)
    olp, llp, glp = reference_all(q, k, v, dout, lay, sc, dtype)
    assert_close_rule(out, o64, olp, dtype, f"{what} out")
    assert_close_rule(lse, l64, llp, dtype, f"{what} lse")
    if public and out.numel() == 0:
        return
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, g64, glp):
        assert a.dtype == dtype and a.shape == b.shape, f"{what} {name}"
        assert_close_rule(a, b, c, dtype, f"{what} {name}")


# ----------------------------------------------------------------------------------------------- vs the reference
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 72, 80, 96, 128])
def test_against_reference_random_layouts(D, dtype, seed):
    rng = random.Random(seed)
    heads = [(4, 4), (4, 2), (6, 1), (2, 2)]
    cases = [random_layout(rng, cache=False), random_layout(rng, cache=True),
             random_layout(rng, cache=True, no_query_doc=True), FIXED[D % len(FIXED)]]
    for i, (docs, q_lens) in enumerate(cases):
        Hq, Hkv = heads[i % len(heads)]
        scale = None if i % 2 == 0 else rng.choice([0.05, 0.3])
        check_case(docs, q_lens, Hq, Hkv, D, dtype, seed + i, scale)


@pytest.mark.parametrize("case", range(len(FIXED)))
def test_fixed_layouts_through_public_op(case, seed):
    docs, q_lens = FIXED[case]
    check_case(docs, q_lens, 8, 2, 128, torch.bfloat16, seed, public=True)


@pytest.mark.parametrize("D", [8, 16, 40, 120])
def test_other_head_dims_padded(D, seed):
    """Any multiple of 8 up to 128 runs (padded to 64 / 96 / 128 inside the kernel)."""
    rng = random.Random(seed)
    docs, q_lens = random_layout(rng)
    check_case(docs, q_lens, 4, 2, D, torch.float16, seed)


def test_bagel_like_long_layout(seed):
    """Several documents of ~1000 tokens: many key / query tiles per block, every pipeline path."""
    docs = [[(120, "causal"), (256, "full"), (512, "noise"), (17, "causal")],
            [(300, "causal"), (256, "full"), (64, "causal")],
            [(1000, "causal")]]
    check_case(docs, None, 8, 2, 128, torch.bfloat16, seed)
    check_case(docs, [905, 1, 640], 4, 4, 64, torch.float16, seed + 1)


def test_no_queries_gives_zero_key_gradients(seed):
    lay = SpanLayout.from_segments([[(70, "causal"), (5, "full")], [(3, "noise")]], q_lens=[0, 0], device=DEV)
    q, k, v, dout = make_inputs(lay, 2, 1, 64, torch.bfloat16, seed)
    out, lse = FWD(q, k, v, *lay_args(lay, 0.125))
    assert out.shape == (0, 2, 64) and lse.shape == (2, 0)
    dq, dk, dv = BWD(dout, q, k, v, out, lse, *lay_args(lay, 0.125))
    assert dq.shape == (0, 2, 64)
    assert (dk == 0).all() and (dv == 0).all()


def test_keys_nobody_sees_get_zero_gradients(seed):
    """Cache case with one query: keys of an earlier noise segment and keys after the query see no query."""
    lay = SpanLayout.from_segments([[(40, "noise"), (90, "causal"), (10, "full")]], q_lens=[1], device=DEV)
    q, k, v, dout = make_inputs(lay, 2, 2, 64, torch.float16, seed)
    out, lse = FWD(q, k, v, *lay_args(lay, 0.125))
    dq, dk, dv = BWD(dout, q, k, v, out, lse, *lay_args(lay, 0.125))
    # the query is the last token (in the full segment): it sees the causal segment and its own segment, not noise
    assert (dk[:40] == 0).all() and (dv[:40] == 0).all()
    assert (dv[40:] != 0).any()
    assert torch.isfinite(dq).all() and torch.isfinite(lse).all()


# ----------------------------------------------------------------------------------------------- properties
def test_deterministic(seed):
    """No atomics: two runs give bitwise identical outputs and gradients."""
    docs, q_lens = FIXED[0]
    lay = SpanLayout.from_segments(docs, q_lens, device=DEV)
    q, k, v, dout = make_inputs(lay, 8, 2, 96, torch.bfloat16, seed)
    a = FWD(q, k, v, *lay_args(lay, 0.1))
    b = FWD(q, k, v, *lay_args(lay, 0.1))
    ga = BWD(dout, q, k, v, *a, *lay_args(lay, 0.1))
    gb = BWD(dout, q, k, v, *b, *lay_args(lay, 0.1))
    for x, y in zip((*a, *ga), (*b, *gb)):
        assert torch.equal(x, y)


def test_unaligned_inputs(seed):
    """Contiguous views whose data pointer is not 16-byte aligned are copied once, results unchanged."""
    docs, q_lens = FIXED[2]
    lay = SpanLayout.from_segments(docs, q_lens, device=DEV)
    q, k, v, dout = make_inputs(lay, 4, 2, 72, torch.float16, seed)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 16 != 0
        return view

    ref = FWD(q, k, v, *lay_args(lay, 0.2))
    got = FWD(shifted(q), shifted(k), shifted(v), *lay_args(lay, 0.2))
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    gref = BWD(dout, q, k, v, *ref, *lay_args(lay, 0.2))
    ggot = BWD(shifted(dout), shifted(q), shifted(k), shifted(v), shifted(ref[0]), ref[1], *lay_args(lay, 0.2))
    for x, y in zip(gref, ggot):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_agrees_with_flex_attention(dtype, seed):
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    rng = random.Random(seed)
    for docs, q_lens in (FIXED[0], FIXED[2], random_layout(rng)):
        lay = SpanLayout.from_segments(docs, q_lens, device=DEV)
        Hq, Hkv, D = 4, 2, 64
        q, k, v, _ = make_inputs(lay, Hq, Hkv, D, dtype, seed)
        bm = create_block_mask(lay.mask_mod(), 1, 1, lay.total_q, lay.total_k, device=DEV)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex_attention warns; the numbers are what we compare
            fo, aux = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                     block_mask=bm, enable_gqa=True, return_aux=AuxRequest(lse=True))
        out, lse = FWD(q, k, v, *lay_args(lay, 1.0 / math.sqrt(D)))
        # both are within a few 16-bit ulps of the exact result (|out| <= max |v| ~ 4); lse is float32 in both
        tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
        torch.testing.assert_close(out.float(), fo[0].transpose(0, 1).float(), rtol=tol, atol=tol)
        torch.testing.assert_close(lse, aux.lse[0].float(), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------- errors
def test_clear_errors(seed):
    lay = SpanLayout.from_segments([[(5, "causal"), (9, "full")]], device=DEV)
    q, k, v, _ = make_inputs(lay, 2, 1, 64, torch.bfloat16, seed)
    args = lay_args(lay, 0.125)
    with pytest.raises(RuntimeError, match="bfloat16 or float16, got Float"):
        FWD(q.float(), k.float(), v.float(), *args)
    q100, k100, v100, _ = make_inputs(lay, 2, 1, 100, torch.bfloat16, seed)
    with pytest.raises(RuntimeError, match="multiples of 8 up to 128.*got 100"):
        FWD(q100, k100, v100, *args)
    q256, k256, v256, _ = make_inputs(lay, 2, 1, 256, torch.bfloat16, seed)
    with pytest.raises(RuntimeError, match="multiples of 8 up to 128.*got 256"):
        FWD(q256, k256, v256, *args)
    cpu = lay.to("cpu")
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be on the device of q"):
        FWD(q, k, v, *lay_args(cpu, 0.125))
    with pytest.raises(RuntimeError, match="multiple of the kv heads"):
        FWD(q[:, :1].contiguous().expand(-1, 3, -1).contiguous(), torch.cat([k, k], 1), torch.cat([v, v], 1), *args)
    with pytest.raises(RuntimeError, match="max_seqlen_q / max_seqlen_k"):
        FWD(q, k, v, *lay.tensors(), lay.total_q + 1, lay.max_seqlen_k, 0.125)
