"""The public ops under torch.autocast (CPU, bfloat16), which the training engine's mixed precision uses.

Policy (umm_ops.ops._common.autocast_policy): the GEMM ops (span_attention, compress_tokens, expand_tokens) cast their
floating inputs to the autocast dtype, the others to the widest floating dtype among their inputs; the op then runs
with autocast off.  So an op under autocast equals, bitwise, the same op called outside autocast on the cast inputs.

The regression: compress_tokens' CPU glue runs its GEMM with at::mm; inside an autocast region that GEMM returned
bf16 into buffers sized for float32 (a heap overrun: "double free or corruption" at exit of a bf16 training run).
The glue now excludes autocast for its own ATen calls (UMM_NO_AUTOCAST), checked here on the kernel op directly."""
from __future__ import annotations

import pytest
import torch

import umm_ops

BF = torch.bfloat16


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _autocast():
    return torch.autocast("cpu", dtype=BF)


def test_compress_and_expand_tokens_lower_to_the_autocast_dtype():
    g = _g()
    x = torch.randn(2, 16, 8, generator=g)
    lw, lb = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    w, b = torch.randn(12, 32, generator=g), torch.randn(12, generator=g)
    with _autocast():
        got = umm_ops.compress_tokens(x, (4, 4), lw, lb, w, b)
    want = umm_ops.compress_tokens(x.to(BF), (4, 4), lw.to(BF), lb.to(BF), w.to(BF), b.to(BF))
    assert got.dtype == BF and torch.equal(got, want)
    y = torch.randn(2, 4, 12, generator=g)
    we, be = torch.randn(32, 12, generator=g), torch.randn(32, generator=g)
    with _autocast():
        got = umm_ops.expand_tokens(y, (4, 4), we, be)
    assert got.dtype == BF and torch.equal(got, umm_ops.expand_tokens(y.to(BF), (4, 4), we.to(BF), be.to(BF)))


def test_span_attention_mixed_dtypes_under_autocast():
    """Under autocast q may come out of a float32 rotary embedding while v comes out of a bf16 linear."""
    layout = umm_ops.SpanLayout.from_segments([[(5, "causal"), (8, "full")]])
    g = _g(1)
    q, k, v = (torch.randn(13, 2, 16, generator=g) for _ in range(3))
    with _autocast():
        got = umm_ops.span_attention(q, k.to(BF), v.to(BF), layout)
    assert got.dtype == BF and torch.equal(got, umm_ops.span_attention(q.to(BF), k.to(BF), v.to(BF), layout))


def test_norm_and_flow_ops_promote():
    g = _g(2)
    x, sh, sc = torch.randn(2, 6, 8, generator=g).to(BF), torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    with _autocast():
        got = umm_ops.adaln_modulate(x, sh, sc)
    assert got.dtype == torch.float32 and torch.equal(got, umm_ops.adaln_modulate(x.float(), sh, sc))
    y, gate = torch.randn(2, 6, 8, generator=g), torch.randn(2, 8, generator=g).to(BF)
    with _autocast():
        got = umm_ops.gated_residual(x, gate, y)
    assert got.dtype == torch.float32 and torch.equal(got, umm_ops.gated_residual(x.float(), gate.float(), y))
    xs, v = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g).to(BF)
    with _autocast():
        got = umm_ops.flow_step(xs, v, 0.2, 0.3)
    assert got.dtype == torch.float32 and torch.equal(got, umm_ops.flow_step(xs, v.float(), 0.2, 0.3))


def test_gradients_flow_to_float32_parameters_under_autocast():
    g = _g(3)
    x = torch.randn(2, 16, 8, generator=g)
    w = torch.randn(12, 32, generator=g, requires_grad=True)
    b = torch.zeros(12, requires_grad=True)
    with _autocast():
        y = umm_ops.compress_tokens(x, (4, 4), None, None, w, b, activation="none")
    y.float().square().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


@pytest.mark.skipif(not umm_ops._lib.loaded(), reason="needs the compiled CPU kernels")
def test_kernel_glue_ignores_a_callers_autocast():
    """torch.ops.umm_ops.kernel_compress_tokens called directly inside autocast with float32 tensors: its internal
    GEMM stays float32 (bitwise the result outside autocast); before UMM_NO_AUTOCAST it overran its buffers."""
    g = _g(4)
    x = torch.randn(3, 64, 16, generator=g)
    lw, lb = torch.ones(16), torch.zeros(16)
    w, b = torch.randn(24, 64, generator=g), torch.randn(24, generator=g)
    op = torch.ops.umm_ops.kernel_compress_tokens
    args = (x, lw, lb, w, b, 8, 8, 2, "gelu", 1e-6, False)
    want = op(*args)
    for _ in range(3):
        with _autocast():
            got = op(*args)
        assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0])
    ye = torch.randn(3, 16, 24, generator=g)
    we = torch.randn(64, 24, generator=g)
    opx = torch.ops.umm_ops.kernel_expand_tokens
    want = opx(ye, we, None, 8, 8, 2)
    with _autocast():
        got = opx(ye, we, None, 8, 8, 2)
    assert got.dtype == torch.float32 and torch.equal(got, want)
