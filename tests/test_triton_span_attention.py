"""umm_ops.triton span attention (forward and backward) against the kernel contract
(umm_ops.reference.attention.span_attention_fwd / span_attention_bwd), run in the Triton interpreter.

CPU only: TRITON_INTERPRET=1 is set before triton is imported.  Tiny ragged layouts (<= 48 tokens), 2-4 query
heads with GQA groups of 1 and 2, head dims 8 and 12 (not a power of two), all three segment modes, the cache
case (fewer queries than keys, a document without queries), float32 and bfloat16.  Under the interpreter the
kernels use 16 x 16 tiles, so segments longer than 16 give FULL and EMPTY tiles as well as PARTIAL ones.
bfloat16 results are compared with the contract evaluated in float32 on the same (upcast) inputs.
"""
from __future__ import annotations

import pytest
import torch
from triton_interp import interpreted_modules

_tk_flow, tk_attn, tk = interpreted_modules(
    "umm_ops.triton.flow", "umm_ops.triton.attention", "umm_ops.triton",
    reason="GPU present: the Triton span attention is tested on the device by test_span_attention.py")

import umm_ops.reference.attention as ref  # noqa: E402
from umm_ops import SpanLayout  # noqa: E402
import nonfinite_cases as NF  # noqa: E402

pytestmark = pytest.mark.triton

TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (1.6e-2, 1.6e-2)}

# (docs, q_lens, Hq, Hkv, Dh): every mode, segments of length 1, segments longer than a 16-key tile (FULL /
# EMPTY tiles), noise first / between / last, cache case with a query-less document, non-power-of-two Dh.
CASES = [
    ([[(5, "causal"), (17, "full"), (3, "causal")], [(9, "causal"), (12, "noise"), (1, "full")]], None, 4, 2, 12),
    ([[(1, "noise"), (1, "causal"), (1, "full"), (1, "noise"), (1, "causal")]], None, 2, 2, 8),
    ([[(18, "noise"), (3, "causal"), (20, "full"), (5, "causal")]], [14], 2, 1, 8),
    ([[(4, "causal"), (6, "full")], [(8, "noise"), (3, "causal")], [(5, "causal")]], [0, 11, 1], 4, 2, 8),
    ([[(19, "causal"), (2, "noise")], [(20, "full"), (3, "causal")]], None, 2, 1, 12),
]
IDS = ["mixed", "len1", "cache-noise-first", "cache-empty-doc", "long-causal"]


def _args(lay, scale):
    return (*lay.tensors(), lay.max_seqlen_q, lay.max_seqlen_k, scale)


def _inputs(lay, Hq, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(lay.total_q, Hq, D, generator=g).to(dtype)
    k = torch.randn(lay.total_k, Hkv, D, generator=g).to(dtype)
    v = torch.randn(lay.total_k, Hkv, D, generator=g).to(dtype)
    do = torch.randn(lay.total_q, Hq, D, generator=g).to(dtype)
    return q, k, v, do


def _close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(got).all(), what
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def test_exported():
    assert tk.interpreting() and tk.available()
    assert "span_attention_fwd" in tk.__all__ and "span_attention_bwd" in tk.__all__
    assert tk_attn._config(12)[:2] == (16, 16)  # tiny tiles under the interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_fwd_bwd_against_contract(case, dtype):
    docs, q_lens, Hq, Hkv, D = CASES[case]
    lay = SpanLayout.from_segments(docs, q_lens)
    assert lay.total_k <= 48
    scale = 0.3 if case % 2 else D ** -0.5
    q, k, v, do = _inputs(lay, Hq, Hkv, D, dtype, 1234 + case)
    args = _args(lay, scale)
    out, lse = tk_attn.span_attention_fwd(q, k, v, *args)
    f = [t.float() for t in (q, k, v, do)]
    r_out, r_lse = ref.span_attention_fwd(*f[:3], *args)
    what = f"{IDS[case]} {dtype}"
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (Hq, lay.total_q)
    _close(out, r_out, dtype, f"{what} out")
    torch.testing.assert_close(lse, r_lse, atol=2e-5, rtol=1e-5, msg=lambda m: f"{what} lse: {m}")

    grads = tk_attn.span_attention_bwd(do, q, k, v, out, lse, *args)
    r_grads = ref.span_attention_bwd(f[3], *f[:3], r_out, r_lse, *args)
    for name, a, b, t in zip(("dq", "dk", "dv"), grads, r_grads, (q, k, v)):
        assert a.dtype == dtype and a.shape == t.shape, name
        _close(a, b, dtype, f"{what} {name}")
    # deterministic (no atomics): a second run is bitwise identical
    again = tk_attn.span_attention_bwd(do, q, k, v, out, lse, *args)
    for a, b in zip(grads, again):
        assert torch.equal(a, b)


def test_keys_without_viewers_get_zero_grads():
    """Cache case: noise keys before the first query and a query-less document have no viewers: dk = dv = 0."""
    lay = SpanLayout.from_segments([[(6, "noise"), (4, "causal")], [(5, "full")]], q_lens=[3, 0])
    q, k, v, do = _inputs(lay, 2, 1, 8, torch.float32, 7)
    args = _args(lay, 0.5)
    out, lse = tk_attn.span_attention_fwd(q, k, v, *args)
    dq, dk, dv = tk_attn.span_attention_bwd(do, q, k, v, out, lse, *args)
    assert (dk[:6] == 0).all() and (dv[:6] == 0).all() and (dk[10:] == 0).all() and (dv[10:] == 0).all()
    r = ref.span_attention_bwd(do, q, k, v, out, lse, *args)
    for a, b in zip((dq, dk, dv), r):
        _close(a, b, torch.float32, "viewers")


@pytest.mark.parametrize("case", range(len(NF.CASES)), ids=NF.IDS)
def test_nonfinite_inputs_make_exactly_their_rows_nan(case):
    """The contract's rule for NaN / Inf inputs (tests/nonfinite_cases.py): the rows that see the value are NaN,
    out and lse; the others match the reference, including queries sharing a 16-key tile with the poisoned key.
    The backward of a NaN row is NaN, never finite."""
    lay, q, k, v, bad = NF.inputs(case)
    args = _args(lay, NF.D ** -0.5)
    out, lse = tk_attn.span_attention_fwd(q, k, v, *args)
    want, _ = ref.span_attention_fwd(q.double(), k.double(), v.double(), *args)
    NF.check(out, lse, bad, want, f"triton {NF.IDS[case]}")
    do = torch.zeros_like(out)
    i = int(bad.nonzero()[0])
    do[i] = 1.0
    dq, dk, dv = tk_attn.span_attention_bwd(do, q, k, v, out, lse, *args)
    assert torch.isnan(dq[i]).all() and torch.isnan(dv[NF.visible(lay)[i]]).all()
