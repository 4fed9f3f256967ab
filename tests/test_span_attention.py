"""span_attention: the reference against a naive per-query loop, every backend against the float64 reference
(outputs, lse, gradients; FlashAttention's tolerance rule), agreement with flex_attention, opcheck,
torch.compile(fullgraph=True) and the error messages."""
from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

import umm_ops
from umm_ops import SpanLayout, span_attention
from umm_ops import backend as B
from umm_ops.reference.attention import span_attention_reference
from conftest import device_backend_params
from tolerance import assert_close_rule
import nonfinite_cases as NF

MODES = ("causal", "full", "noise")

# fixed layouts: segments of length 1, cache case (q_lens), a document with no queries, noise first / last
FIXED = [
    ([[(1, "causal")]], None),
    ([[(5, "causal"), (17, "full"), (3, "causal")], [(9, "causal"), (12, "noise"), (1, "full")]], None),
    ([[(1, "noise"), (1, "causal"), (1, "full"), (1, "noise"), (1, "causal")]], None),
    ([[(7, "causal"), (20, "full"), (4, "noise"), (6, "causal")], [(3, "full"), (30, "causal")]], [12, 5]),
    ([[(4, "causal"), (6, "full")], [(8, "noise"), (3, "causal")], [(5, "causal")]], [0, 11, 1]),
]


def random_layout(rng: random.Random, max_docs=4, max_segs=4, max_len=24, cache=None):
    docs = [[(rng.choice([1, rng.randint(1, max_len)]), rng.choice(MODES)) for _ in range(rng.randint(1, max_segs))]
            for _ in range(rng.randint(1, max_docs))]
    if cache is None:
        cache = rng.random() < 0.5
    q_lens = [rng.randint(0, sum(n for n, _ in d)) for d in docs] if cache else None
    return docs, q_lens


def allowed_keys(docs, q_lens):
    """For each query, the list of global key indices it attends to, built constructively per document: the
    tokens of the earlier non-noise segments, then its own segment (up to itself when causal)."""
    out = []
    base = 0
    for d, doc in enumerate(docs):
        n = sum(length for length, _ in doc)
        nq = n if q_lens is None else q_lens[d]
        bounds = []
        s0 = base
        for length, mode in doc:
            bounds.append((s0, s0 + length, mode))
            s0 += length
        for p in range(base + n - nq, base + n):
            keys = []
            for a, b, mode in bounds:
                if a <= p < b:
                    keys.extend(range(a, p + 1) if mode == "causal" else range(a, b))
                    break
                if mode != "noise":
                    keys.extend(range(a, b))
            out.append(keys)
        base += n
    return out


def naive_attention(q, k, v, docs, q_lens, scale):
    """Per (query, head) softmax over the allowed keys, float64."""
    q, k, v = q.double(), k.double(), v.double()
    Lq, Hq, D = q.shape
    g = Hq // k.shape[1]
    out = torch.zeros(Lq, Hq, D, dtype=torch.float64)
    lse = torch.full((Hq, Lq), float("-inf"), dtype=torch.float64)
    for i, keys in enumerate(allowed_keys(docs, q_lens)):
        idx = torch.tensor(keys, dtype=torch.long)
        for h in range(Hq):
            s = (k[idx, h // g] @ q[i, h]) * scale
            m = s.max()
            e = torch.exp(s - m)
            out[i, h] = (e @ v[idx, h // g]) / e.sum()
            lse[h, i] = m + torch.log(e.sum())
    return out, lse


def make_qkv(layout, Hq, Hkv, D, dtype=torch.float64, device="cpu"):
    q = torch.randn(layout.total_q, Hq, D, device=device).to(dtype)
    k = torch.randn(layout.total_k, Hkv, D, device=device).to(dtype)
    v = torch.randn(layout.total_k, Hkv, D, device=device).to(dtype)
    return q, k, v


# ----------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa2", "mqa4"])
@pytest.mark.parametrize("D", [8, 72])
def test_reference_matches_naive_loop(heads, D, seed):
    rng = random.Random(seed)
    Hq, Hkv = heads
    cases = FIXED + [random_layout(rng) for _ in range(3)]
    for docs, q_lens in cases:
        lay = SpanLayout.from_segments(docs, q_lens)
        q, k, v = make_qkv(lay, Hq, Hkv, D)
        scale = 1 / math.sqrt(D) if rng.random() < 0.5 else 0.3
        out, lse = span_attention_reference(q, k, v, lay, scale)
        n_out, n_lse = naive_attention(q, k, v, docs, q_lens, scale)
        assert out.dtype == lse.dtype == torch.float64
        assert out.shape == (lay.total_q, Hq, D) and lse.shape == (Hq, lay.total_q)
        torch.testing.assert_close(out, n_out, rtol=1e-10, atol=1e-10, msg=lambda m: f"{docs} {q_lens}: {m}")
        torch.testing.assert_close(lse, n_lse, rtol=1e-10, atol=1e-10)


def test_reference_empty_rows_give_zeros_not_nan(monkeypatch):
    """A query with no allowed key cannot come from a layout: feed the reference a mask with an empty row (the
    kernel contract says: out 0, lse -inf, zero gradients, never NaN)."""
    import umm_ops.reference.attention as RA

    lay = SpanLayout.from_segments([[(3, "causal"), (2, "full")]])
    real = RA.span_mask

    def holed(layout):
        m = real(layout).clone()
        m[0] = False
        return m

    monkeypatch.setattr(RA, "span_mask", holed)
    q, k, v = (t.requires_grad_(True) for t in make_qkv(lay, 2, 1, 8))
    out, lse = span_attention_reference(q, k, v, lay)
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    assert torch.isneginf(lse[:, 0]).all() and torch.isfinite(lse[:, 1:]).all()
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[0] == 0).all()


# ----------------------------------------------------------------------------------- every backend
def _skip_without_kernel(backend, dtype=None):
    if not B._has_op(backend, "span_attention_fwd") or not B._has_op(backend, "span_attention_bwd"):
        pytest.skip(f"the {backend!r} backend has no span attention kernel (yet)")
    limits = B._OP_LIMITS.get((backend, "span_attention_fwd"))
    why = limits(dtype, None) if limits is not None and dtype is not None else None
    if why:
        pytest.skip(why + " (the automatic choice runs such tensors on the next backend)")


def _reference_all(q, k, v, lay, g, dtype, scale):
    """out, lse and (dq, dk, dv) of the reference computed in `dtype` (float64 for the oracle)."""
    ins = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, lse = span_attention_reference(*ins, lay, scale)
    grads = torch.autograd.grad(out, ins, g.to(dtype))
    return out, lse, grads


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_against_reference(device, backend, dtype, seed):
    _skip_without_kernel(backend, dtype)
    rng = random.Random(seed)
    cases = [(FIXED[1], 4, 2, 8), (FIXED[3], 4, 1, 72), (FIXED[4], 2, 2, 16),
             (random_layout(rng, cache=True), 4, 2, 64), (random_layout(rng, cache=False), 2, 1, 72),
             (random_layout(rng), 4, 4, 8)]
    for (docs, q_lens), Hq, Hkv, D in cases:
        lay = SpanLayout.from_segments(docs, q_lens, device=device)
        q, k, v = make_qkv(lay, Hq, Hkv, D, dtype, device)
        scale = None if rng.random() < 0.5 else 0.2
        xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with umm_ops.use_backend(backend):
            out, lse = span_attention(*xs, lay, softmax_scale=scale, return_lse=True)
        g = torch.randn_like(out)
        with umm_ops.use_backend(backend):  # the backward on the backend under test too
            grads = torch.autograd.grad(out, xs, g)
        assert out.dtype == dtype and out.shape == q.shape
        assert lse.dtype == torch.float32 and lse.shape == (Hq, lay.total_q)
        o64, l64, g64 = _reference_all(q, k, v, lay, g, torch.float64, scale)
        olp, llp, glp = _reference_all(q, k, v, lay, g, dtype, scale)
        what = f"{backend} {dtype} {docs} q_lens={q_lens} H={Hq}/{Hkv} D={D}"
        assert_close_rule(out, o64, olp, dtype, f"{what} out")
        assert_close_rule(lse, l64, llp, dtype, f"{what} lse")
        for name, a, b, c in zip(("dq", "dk", "dv"), grads, g64, glp):
            assert a.dtype == dtype
            assert_close_rule(a, b, c, dtype, f"{what} {name}")


def test_float64_and_default_backend(seed):
    lay = SpanLayout.from_segments(*FIXED[3])
    q, k, v = (t.requires_grad_(True) for t in make_qkv(lay, 4, 2, 16, torch.float64))
    out, lse = span_attention(q, k, v, lay, return_lse=True)  # float64 runs on the reference
    assert out.dtype == lse.dtype == torch.float64
    n_out, n_lse = naive_attention(q.detach(), k.detach(), v.detach(), *FIXED[3], 1 / 4)
    torch.testing.assert_close(out.detach(), n_out)
    torch.testing.assert_close(lse, n_lse)
    small = SpanLayout.from_segments([[(2, "causal"), (3, "full"), (1, "noise"), (2, "causal")]], q_lens=[5])
    args = tuple(t.requires_grad_(True) for t in make_qkv(small, 2, 1, 3))
    assert torch.autograd.gradcheck(lambda a, b, c: span_attention(a, b, c, small), args)
    # without return_lse: just out; non-contiguous inputs are accepted
    qt = torch.randn(4, lay.total_q, 16, dtype=torch.float64).transpose(0, 1)
    assert torch.equal(span_attention(qt, k.detach(), v.detach(), lay),
                       span_attention(qt.contiguous(), k.detach(), v.detach(), lay))


# ----------------------------------------------------------------------------------- flex_attention
@pytest.mark.parametrize("case", range(len(FIXED) + 2))
def test_agrees_with_flex_attention(case, seed):
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    rng = random.Random(seed)
    docs, q_lens = FIXED[case] if case < len(FIXED) else random_layout(rng, cache=case % 2 == 0)
    lay = SpanLayout.from_segments(docs, q_lens)
    if lay.total_q == 0:
        pytest.skip("no queries")
    Hq, Hkv, D = 4, 2, 16
    q, k, v = make_qkv(lay, Hq, Hkv, D, torch.float32)
    bm = create_block_mask(lay.mask_mod(), 1, 1, lay.total_q, lay.total_k, device="cpu", BLOCK_SIZE=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()": eager is the point
        fo, aux = flex_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                 block_mask=bm, enable_gqa=True, return_aux=AuxRequest(lse=True))
    out, lse = span_attention(q, k, v, lay, return_lse=True)
    torch.testing.assert_close(out, fo[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, aux.lse[0].float(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- opcheck and compile
def _op_args(requires_grad: bool, dtype=torch.float32):
    lay = SpanLayout.from_segments(*FIXED[3])
    q, k, v = make_qkv(lay, 4, 2, 8, dtype)
    if requires_grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    return lay, q, k, v


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[0] == "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, backend, dtype, seed):
    _skip_without_kernel(backend)
    with umm_ops.use_backend(backend):
        lay, q, k, v = _op_args(True, dtype)
        rest = (*lay.tensors(), lay.max_seqlen_q, lay.max_seqlen_k, 0.35)
        torch.library.opcheck(torch.ops.umm_ops.span_attention.default, (q, k, v, *rest))
        out, lse = torch.ops.umm_ops.span_attention(q.detach(), k.detach(), v.detach(), *rest)
        dout = torch.randn_like(out)
        torch.library.opcheck(torch.ops.umm_ops.span_attention_backward.default,
                              (dout, q.detach(), k.detach(), v.detach(), out, lse, *rest))


def test_opcheck_kernel_ops(seed):
    """The C++ kernel ops (when built) against the fakes registered in umm_ops.attention.ops."""
    if not hasattr(torch.ops.umm_ops, "kernel_span_attention_fwd"):
        pytest.skip("no compiled span attention kernel")
    lay, q, k, v = _op_args(False)
    rest = (*lay.tensors(), lay.max_seqlen_q, lay.max_seqlen_k, 0.35)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.umm_ops.kernel_span_attention_fwd.default, (q, k, v, *rest), test_utils=utils)
    out, lse = torch.ops.umm_ops.kernel_span_attention_fwd(q, k, v, *rest)
    torch.library.opcheck(torch.ops.umm_ops.kernel_span_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, *rest), test_utils=utils)


def test_torch_compile_fullgraph_forward_backward(seed):
    lay, q, k, v = _op_args(True)

    def step(q, k, v, layout):
        out, lse = span_attention(q, k, v, layout, return_lse=True)
        return out.square().sum() + (out * q).mean() + lse.detach().sum() * 0

    eager = step(q, k, v, lay)
    eg = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    loss = compiled(q, k, v, lay)
    cg = torch.autograd.grad(loss, (q, k, v))
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(cg, eg):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compile_sees_the_custom_op():
    from torch._dynamo.testing import EagerAndRecordGraphs

    lay, q, k, v = _op_args(False)
    backend = EagerAndRecordGraphs()
    f = torch.compile(lambda q, k, v: span_attention(q, k, v, lay), backend=backend, fullgraph=True)
    torch.testing.assert_close(f(q, k, v), span_attention(q, k, v, lay))
    assert "umm_ops.span_attention" in backend.graphs[0].code


# ----------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    lay, q, k, v = _op_args(False)
    Lq, Lk = lay.total_q, lay.total_k
    r = torch.randn
    cases = [
        ((q[0], k, v, lay), ValueError, "q must have 3 dims"),
        ((q, k[None], v, lay), ValueError, "k must have 3 dims"),
        ((q.int(), k, v, lay), TypeError, "q must have dtype in"),
        ((q, k.double(), v, lay), TypeError, "k must have the dtype of q"),
        ((q, k, r(Lk, 2, 9), lay), ValueError, "k and v must have the same shape"),
        ((q, r(Lk, 2, 9), r(Lk, 2, 9), lay), ValueError, "same head dim"),
        ((q, r(Lk, 3, 8), r(Lk, 3, 8), lay), ValueError, "multiple of the kv heads.*Hq=4 and Hkv=3"),
        ((r(Lq + 1, 4, 8), k, v, lay), ValueError, f"q must have layout.total_q = {Lq} rows"),
        ((q, r(Lk - 1, 2, 8), r(Lk - 1, 2, 8), lay), ValueError, f"layout.total_k = {Lk} rows"),
        ((q, k, v, lay.tensors()), TypeError, "layout must be a umm_ops.SpanLayout, got tuple"),
        ((q, k, v, lay, float("nan")), ValueError, "softmax_scale must be finite"),
        (("q", k, v, lay), TypeError, "q must be a torch.Tensor"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            span_attention(*args)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="layout tensors must be on the device of q"):
            span_attention(q.cuda(), k.cuda(), v.cuda(), lay)
        with pytest.raises(ValueError, match="k must be on the device of q"):
            span_attention(q, k.cuda(), v, lay)
    else:
        meta = lay.to("meta")
        with pytest.raises(ValueError, match="layout tensors must be on the device of q"):
            span_attention(q, k, v, meta)


def test_forced_backend_without_kernel_is_refused():
    lay, q, k, v = _op_args(False)
    for name in ("cpu", "triton"):
        if B._why_not_device(name, q.device, q.dtype) is None and not B._has_op(name, "span_attention_fwd"):
            with umm_ops.use_backend(name), pytest.raises(umm_ops.BackendUnavailableError,
                                                          match="span_attention_fwd"):
                span_attention(q, k, v, lay)


# ----------------------------------------------------------------------------------- non-finite inputs
@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("case", range(len(NF.CASES)), ids=NF.IDS)
def test_nonfinite_inputs_make_exactly_their_rows_nan(device, backend, case):
    """A NaN / Inf in q, k or v makes NaN exactly the rows that see it (out and lse); the other rows match the
    float64 reference, whatever tile they share with the poisoned key (docs/span-attention-contract.md).
    The CUDA kernel runs bfloat16 only (tensor cores): its inputs are rounded to bf16 and its clean rows held to
    bf16's rounding of O(1) averages (2e-2; the reference is computed from the same rounded inputs)."""
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    lay, q, k, v, bad = NF.inputs(case, dtype)
    lay_d = lay.to(device)
    want, _ = span_attention_reference(q.double(), k.double(), v.double(), lay, NF.D ** -0.5)
    with umm_ops.use_backend(backend):
        out, lse = span_attention(q.to(device), k.to(device), v.to(device), lay_d, return_lse=True)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    NF.check(out.cpu(), lse.cpu(), bad, want, f"{backend} {NF.IDS[case]}", **tol)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_nonfinite_row_never_gives_finite_gradients(device, backend):
    """The backward of a NaN row: dq of that row and dk / dv of the keys it sees are NaN, not finite numbers."""
    lay, q, k, v, bad = NF.inputs(0, torch.bfloat16 if backend == "cuda" else torch.float32)  # NaN in q, row 40
    i = int(bad.nonzero()[0])
    ins = [t.to(device).requires_grad_(True) for t in (q, k, v)]
    with umm_ops.use_backend(backend):
        out = span_attention(*ins, lay.to(device))
        out[i].sum().backward()
    seen = NF.visible(lay)[i]
    assert torch.isnan(ins[0].grad[i].cpu()).all(), backend
    assert torch.isnan(ins[2].grad.cpu()[seen]).all(), backend
