"""umm_ops.triton against the kernel contract (umm_ops.reference.kernels), run in the Triton interpreter.

CPU only: TRITON_INTERPRET=1 is set before triton is imported.  Sizes are small and ragged (N = 1,
C = 1, C not a power of 2, L = 1, B = 1) and grids stay tiny, so the whole module runs in well under a
minute.  Low-precision (bf16 / fp16) results are compared with the reference evaluated in float32 on the
same (upcast) inputs, to about 2 ulps of the dtype.
"""
from __future__ import annotations

import pytest
import torch
from triton_interp import interpreted_modules

tk_flow, tk_norm, tk = interpreted_modules(
    "umm_ops.triton.flow", "umm_ops.triton.norm", "umm_ops.triton",
    reason="GPU present: the Triton kernels are tested on the device by test_flow.py / test_norm.py")

import umm_ops.reference.kernels as ref  # noqa: E402

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (atol, rtol) for outputs in the activation dtype
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}
STAT_TOL = (2e-5, 1e-4)  # float32 statistics (logprob, kl, gate, mean, rstd)
RED_TOL = {torch.float32: (1e-4, 2e-4), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def _close(got, want, tol, what=""):
    atol, rtol = tol
    assert got.shape == want.shape, (what, got.shape, want.shape)
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _f(a):
    """The float32 view of an input (None passes through)."""
    return None if a is None else (a.float() if a.is_floating_point() else a)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def test_available():
    assert tk.interpreting()
    assert tk.available()
    for name in tk.__all__:
        assert callable(getattr(tk, name))


# ------------------------------------------------------------------------------------------------
# flow ops

FLOW_SHAPES = [(1, 1), (3, 37), (3, 300), (1, 300)]


def _times(B, g, sigma=True, zero_sigma_first=False):
    t = torch.rand(B, generator=g) * 0.7 + 0.1
    t_next = t + torch.rand(B, generator=g) * 0.08 + 0.02
    sig = torch.rand(B, generator=g) * 0.5 + 0.5 if sigma else None
    if sig is not None and zero_sigma_first:
        sig[0] = 0.0
    return t, t_next, sig


def _check_empty(got, what):
    assert got.numel() == 0 and got.shape == (0,), (what, got.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", FLOW_SHAPES)
@pytest.mark.parametrize("mode", ["euler", "sde", "sde_lp"])
def test_flow_step(dtype, B, N, mode):
    g = _gen(B * 1000 + N)
    x, v = _randn((B, N), dtype, g), _randn((B, N), dtype, g)
    t, t_next, sigma = _times(B, g)
    noise = None if mode == "euler" else _randn((B, N), dtype, g)
    want_lp = mode in ("euler", "sde_lp")  # euler + want_logprob -> empty logprob
    xn, lp = tk.flow_step(x, v, noise, t, t_next, sigma, want_lp)
    xn_ref, _ = ref.flow_step(_f(x), _f(v), _f(noise), t, t_next, sigma, want_lp)
    assert xn.dtype == dtype
    _close(xn, xn_ref, TOL[dtype], "x_next")
    if mode == "sde_lp":
        # the logprob is taken from the *stored* x_next: the reference on the native inputs rounds the same way
        _, lp_ref = ref.flow_step(x, v, noise, t, t_next, sigma, True)
        assert lp.dtype == torch.float32
        _close(lp, lp_ref, STAT_TOL, "logprob")
    else:
        _check_empty(lp, "logprob")
        assert lp.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", FLOW_SHAPES)
@pytest.mark.parametrize("mask,euler", [((True, True, True), False), ((False, True, False), False),
                                        ((True, False, True), True)])
def test_flow_step_backward(dtype, B, N, mask, euler):
    g = _gen(B * 1000 + N + 7)
    grad = _randn((B, N), dtype, g)
    t, t_next, sigma = _times(B, g, sigma=not euler, zero_sigma_first=True)
    got = tk.flow_step_backward(grad, t, t_next, sigma, mask)
    want = ref.flow_step_backward(_f(grad), t, t_next, sigma, mask)
    for name, a, b, m in zip(("dx", "dv", "dnoise"), got, want, mask):
        if m:
            assert a.dtype == dtype
            _close(a, b, TOL[dtype], name)
        else:
            _check_empty(a, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", FLOW_SHAPES)
def test_flow_logprob(dtype, B, N):
    g = _gen(B * 1000 + N + 11)
    x, v = _randn((B, N), dtype, g), _randn((B, N), dtype, g)
    t, t_next, sigma = _times(B, g)
    x_next = _randn((B, N), dtype, g)
    lp = tk.flow_logprob(x, x_next, v, t, t_next, sigma)
    lp_ref = ref.flow_logprob(_f(x), _f(x_next), _f(v), t, t_next, sigma)
    assert lp.dtype == torch.float32 and lp.shape == (B,)
    _close(lp, lp_ref, STAT_TOL, "logprob")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", FLOW_SHAPES)
@pytest.mark.parametrize("mask", [(True, True, True), (False, True, False), (True, False, True)])
def test_flow_logprob_backward(dtype, B, N, mask):
    g = _gen(B * 1000 + N + 13)
    x, v = _randn((B, N), dtype, g), _randn((B, N), dtype, g)
    t, t_next, sigma = _times(B, g)
    x_next = _randn((B, N), dtype, g)
    grad = torch.randn(B, generator=g)
    got = tk.flow_logprob_backward(grad, x, x_next, v, t, t_next, sigma, mask)
    want = ref.flow_logprob_backward(grad, _f(x), _f(x_next), _f(v), t, t_next, sigma, mask)
    for name, a, b, m in zip(("dx", "dx_next", "dv"), got, want, mask):
        if m:
            assert a.dtype == dtype
            _close(a, b, TOL[dtype], name)
        else:
            _check_empty(a, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", FLOW_SHAPES)
def test_flow_kl(dtype, B, N):
    g = _gen(B * 1000 + N + 17)
    v, v_ref = _randn((B, N), dtype, g), _randn((B, N), dtype, g)
    t, t_next, sigma = _times(B, g)
    kl = tk.flow_kl(v, v_ref, t, t_next, sigma)
    kl_ref = ref.flow_kl(_f(v), _f(v_ref), t, t_next, sigma)
    assert kl.dtype == torch.float32 and kl.shape == (B,)
    _close(kl, kl_ref, STAT_TOL, "kl")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", FLOW_SHAPES)
@pytest.mark.parametrize("mask", [(True, True), (False, True), (True, False)])
def test_flow_kl_backward(dtype, B, N, mask):
    g = _gen(B * 1000 + N + 19)
    v, v_ref = _randn((B, N), dtype, g), _randn((B, N), dtype, g)
    t, t_next, sigma = _times(B, g)
    grad = torch.randn(B, generator=g)
    got = tk.flow_kl_backward(grad, v, v_ref, t, t_next, sigma, mask)
    want = ref.flow_kl_backward(grad, _f(v), _f(v_ref), t, t_next, sigma, mask)
    for name, a, b, m in zip(("dv", "dv_ref"), got, want, mask):
        if m:
            assert a.dtype == dtype
            _close(a, b, TOL[dtype], name)
        else:
            _check_empty(a, name)


# ------------------------------------------------------------------------------------------------
# gated detail residual

GDR_SHAPES = [(1, 1, 5), (7, 17, 8), (5, 64, 33), (3, 100, 64)]  # (rows N, C, Dg), Dg != C


def _gdr_inputs(N, C, Dg, dtype, seed):
    g = _gen(seed)
    low, high = _randn((N, C), dtype, g), _randn((N, C), dtype, g)
    gh = _randn((N, Dg), dtype, g)
    w_gate = _randn((Dg,), dtype, g, scale=Dg**-0.5)
    b_gate = _randn((1,), dtype, g, scale=0.3)
    ln_w = (1 + 0.3 * torch.randn(C, generator=g)).to(dtype)
    ln_b = _randn((C,), dtype, g, scale=0.3)
    return low, high, gh, w_gate, b_gate, ln_w, ln_b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,Dg", GDR_SHAPES)
def test_gated_detail_residual(dtype, N, C, Dg):
    args = _gdr_inputs(N, C, Dg, dtype, N * 100 + C)
    out, gate, mean, rstd = tk.gated_detail_residual(*args, 1e-5)
    r_out, r_gate, r_mean, r_rstd = ref.gated_detail_residual(*(_f(a) for a in args), 1e-5)
    assert out.dtype == dtype and gate.dtype == mean.dtype == rstd.dtype == torch.float32
    _close(out, r_out, TOL[dtype], "out")
    _close(gate, r_gate, STAT_TOL, "gate")
    _close(mean, r_mean, STAT_TOL, "mean")
    _close(rstd, r_rstd, (1e-4, 1e-4), "rstd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C,Dg", GDR_SHAPES)
def test_gated_detail_residual_backward(dtype, N, C, Dg):
    low, high, gh, w_gate, b_gate, ln_w, ln_b = _gdr_inputs(N, C, Dg, dtype, N * 100 + C + 1)
    grad = _randn((N, C), dtype, _gen(N + C))
    eps = 1e-5
    _, gate, mean, rstd = ref.gated_detail_residual(*(_f(a) for a in (low, high, gh, w_gate, b_gate, ln_w, ln_b)), eps)
    got = tk.gated_detail_residual_backward(grad, low, high, gh, w_gate, ln_w, gate, mean, rstd, eps)
    want = ref.gated_detail_residual_backward(
        _f(grad), _f(low), _f(high), _f(gh), _f(w_gate), _f(ln_w), gate, mean, rstd, eps
    )
    names = ("dlow", "dhigh", "dgate_hidden", "dw_gate", "db_gate", "dln_w", "dln_b")
    for name, a, b in zip(names, got, want):
        assert a.dtype == dtype, name
        tol = RED_TOL[dtype] if name in ("dw_gate", "db_gate", "dln_w", "dln_b") else TOL[dtype]
        _close(a, b, tol, name)


# ------------------------------------------------------------------------------------------------
# adaLN modulation and gated residual

BLC = [(1, 1, 1), (3, 7, 17), (1, 5, 64), (3, 2, 100), (3, 1, 64)]


def _mod(B, C, k, dtype, g):
    """k (B, C) chunks of one (B, (k + 1) C) modulation tensor: unit column stride, row stride (k + 1) C."""
    m = _randn((B, (k + 1) * C), dtype, g, scale=0.5)
    return [m[:, i * C:(i + 1) * C] for i in range(k)]


def _adaln_inputs(B, L, C, dtype, affine, seed):
    g = _gen(seed)
    x = _randn((B, L, C), dtype, g) + 0.5
    shift, scale = _mod(B, C, 2, dtype, g)
    weight = (1 + 0.3 * torch.randn(C, generator=g)).to(dtype) if affine in ("w", "wb") else None
    bias = _randn((C,), dtype, g, scale=0.3) if affine == "wb" else None
    return x, shift, scale, weight, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,C", BLC)
@pytest.mark.parametrize("rms,affine", [(True, "w"), (True, "wb"), (False, "wb"), (False, "none"), (True, "none")])
def test_adaln_modulate(dtype, B, L, C, rms, affine):
    x, shift, scale, weight, bias = _adaln_inputs(B, L, C, dtype, affine, B * 100 + L * 10 + C)
    assert shift.stride() == (3 * C, 1)
    out, mean, rstd = tk.adaln_modulate(x, shift, scale, weight, bias, 1e-6, rms)
    r_out, r_mean, r_rstd = ref.adaln_modulate(*(_f(a) for a in (x, shift, scale, weight, bias)), 1e-6, rms)
    assert out.dtype == dtype and mean.dtype == rstd.dtype == torch.float32
    _close(out, r_out, TOL[dtype], "out")
    if rms:
        _check_empty(mean, "mean")
    else:
        _close(mean, r_mean, STAT_TOL, "mean")
    _close(rstd, r_rstd, (1e-4, 1e-4), "rstd")


ADALN_MASKS = [(True,) * 5, (True, False, True, False, True), (False, True, False, True, False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,C", BLC)
@pytest.mark.parametrize("rms,affine", [(True, "w"), (True, "wb"), (False, "wb"), (False, "none")])
@pytest.mark.parametrize("mask", ADALN_MASKS)
def test_adaln_modulate_backward(dtype, B, L, C, rms, affine, mask):
    x, shift, scale, weight, bias = _adaln_inputs(B, L, C, dtype, affine, B * 100 + L * 10 + C + 3)
    grad = _randn((B, L, C), dtype, _gen(B + L + C))
    eps = 1e-6
    _, mean, rstd = ref.adaln_modulate(*(_f(a) for a in (x, shift, scale, weight, bias)), eps, rms)
    got = tk.adaln_modulate_backward(grad, x, scale, weight, bias, mean, rstd, eps, rms, mask)
    want = ref.adaln_modulate_backward(_f(grad), _f(x), _f(scale), _f(weight), _f(bias), mean, rstd, eps, rms, mask)
    for name, a, b, m, p in zip(("dx", "dshift", "dscale", "dweight", "dbias"), got, want, mask,
                                (x, x, x, weight, bias)):
        if m and p is not None:
            assert a.dtype == dtype, name
            tol = TOL[dtype] if name == "dx" else RED_TOL[dtype]
            _close(a, b, tol, name)
        else:
            _check_empty(a, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,C", BLC)
def test_gated_residual(dtype, B, L, C):
    g = _gen(B * 100 + L * 10 + C + 5)
    x, y = _randn((B, L, C), dtype, g), _randn((B, L, C), dtype, g)
    (gate,) = _mod(B, C, 1, dtype, g)
    out = tk.gated_residual(x, gate, y)
    assert out.dtype == dtype
    _close(out, ref.gated_residual(_f(x), _f(gate), _f(y)), TOL[dtype], "out")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,C", BLC)
@pytest.mark.parametrize("mask", [(True, True), (True, False), (False, True)])
def test_gated_residual_backward(dtype, B, L, C, mask):
    g = _gen(B * 100 + L * 10 + C + 9)
    grad, y = _randn((B, L, C), dtype, g), _randn((B, L, C), dtype, g)
    (gate,) = _mod(B, C, 1, dtype, g)
    got = tk.gated_residual_backward(grad, gate, y, mask)
    want = ref.gated_residual_backward(_f(grad), _f(gate), _f(y), mask)
    for name, a, b, m in zip(("dgate", "dy"), got, want, mask):
        if m:
            assert a.dtype == dtype, name
            _close(a, b, RED_TOL[dtype] if name == "dgate" else TOL[dtype], name)
        else:
            _check_empty(a, name)


# ------------------------------------------------------------------------------------------------
# empty sizes, and the GPU launch configuration (several programs per row range) run interpreted


def test_empty_sizes():
    t, tn, s = torch.rand(0), torch.rand(0), torch.rand(0)
    e = torch.zeros(0, 5)
    xn, lp = tk.flow_step(e, e, e, t, tn, s, True)
    assert xn.shape == (0, 5) and lp.shape == (0,)
    assert tk.flow_logprob(e, e, e, t, tn, s).shape == (0,)
    assert tk.flow_kl(e, e, t, tn, s).shape == (0,)
    assert [a.shape for a in tk.flow_step_backward(e, t, tn, s, (True, False, True))] == [(0, 5), (0,), (0, 5)]
    C, Dg = 17, 9
    out, gate, mean, rstd = tk.gated_detail_residual(
        torch.zeros(0, C), torch.zeros(0, C), torch.zeros(0, Dg), torch.ones(Dg), torch.zeros(1),
        torch.ones(C), torch.zeros(C), 1e-5)
    assert out.shape == (0, C) and gate.shape == mean.shape == rstd.shape == (0,)
    grads = tk.gated_detail_residual_backward(
        torch.zeros(0, C), torch.zeros(0, C), torch.zeros(0, C), torch.zeros(0, Dg), torch.ones(Dg), torch.ones(C),
        gate, mean, rstd, 1e-5)
    assert [tuple(a.shape) for a in grads] == [(0, C), (0, C), (0, Dg), (Dg,), (1,), (C,), (C,)]
    x = torch.zeros(2, 0, C)
    sh = torch.zeros(2, C)
    out, mean, rstd = tk.adaln_modulate(x, sh, sh, torch.ones(C), torch.zeros(C), 1e-6, False)
    assert out.shape == (2, 0, C) and mean.shape == rstd.shape == (0,)
    grads = tk.adaln_modulate_backward(x, x, sh, torch.ones(C), torch.zeros(C), mean, rstd, 1e-6, False, (True,) * 5)
    assert [tuple(a.shape) for a in grads] == [(2, 0, C), (2, C), (2, C), (C,), (C,)]
    assert tk.gated_residual(x, sh, x).shape == (2, 0, C)
    dg, dy = tk.gated_residual_backward(x, sh, x, (True, True))
    assert dg.shape == (2, C) and float(dg.abs().sum()) == 0 and dy.shape == (2, 0, C)


def test_gpu_launch_config_interpreted(monkeypatch):
    """Runs the launch configuration meant for a GPU (several programs per sample / row range,
    workspace partial sums) through the interpreter, on sizes big enough to split."""
    monkeypatch.setattr(tk_flow, "_interpreting", lambda: False)
    monkeypatch.setattr(tk_norm, "_interpreting", lambda: False)
    g = _gen(123)
    B, N = 2, 5000
    assert tk_flow._cfg(B, N)[2] > 1
    x, v, z = (torch.randn(B, N, generator=g) for _ in range(3))
    t, t_next, sigma = _times(B, g)
    xn, lp = tk.flow_step(x, v, z, t, t_next, sigma, True)
    xn_ref, lp_ref = ref.flow_step(x, v, z, t, t_next, sigma, True)
    _close(xn, xn_ref, TOL[torch.float32], "x_next")
    _close(lp, lp_ref, STAT_TOL, "logprob")
    _close(tk.flow_kl(x, v, t, t_next, sigma), ref.flow_kl(x, v, t, t_next, sigma), STAT_TOL, "kl")
    gl = torch.randn(B, generator=g)
    for a, b in zip(tk.flow_logprob_backward(gl, x, xn, v, t, t_next, sigma, (True,) * 3),
                    ref.flow_logprob_backward(gl, x, xn, v, t, t_next, sigma, (True,) * 3)):
        _close(a, b, TOL[torch.float32], "logprob grads")

    N, C, Dg = 200, 17, 40
    args = _gdr_inputs(N, C, Dg, torch.float32, 9)
    out, gate, mean, rstd = tk.gated_detail_residual(*args, 1e-5)
    r = ref.gated_detail_residual(*args, 1e-5)
    _close(out, r[0], TOL[torch.float32], "gdr out")
    low, high, gh, w_gate, _, ln_w, _ = args
    grad = torch.randn(N, C, generator=g)
    for a, b in zip(tk.gated_detail_residual_backward(grad, low, high, gh, w_gate, ln_w, gate, mean, rstd, 1e-5),
                    ref.gated_detail_residual_backward(grad, low, high, gh, w_gate, ln_w, gate, mean, rstd, 1e-5)):
        _close(a, b, RED_TOL[torch.float32], "gdr grads")

    B, L, C = 2, 100, 100
    x, shift, scale, weight, bias = _adaln_inputs(B, L, C, torch.float32, "wb", 10)
    out, mean, rstd = tk.adaln_modulate(x, shift, scale, weight, bias, 1e-6, False)
    _close(out, ref.adaln_modulate(x, shift, scale, weight, bias, 1e-6, False)[0], TOL[torch.float32], "adaln out")
    grad = torch.randn(B, L, C, generator=g)
    for a, b in zip(tk.adaln_modulate_backward(grad, x, scale, weight, bias, mean, rstd, 1e-6, False, (True,) * 5),
                    ref.adaln_modulate_backward(grad, x, scale, weight, bias, mean, rstd, 1e-6, False, (True,) * 5)):
        _close(a, b, RED_TOL[torch.float32], "adaln grads")
    y = torch.randn(B, L, C, generator=g)
    _close(tk.gated_residual(x, shift, y), ref.gated_residual(x, shift, y), TOL[torch.float32], "gres out")
    for a, b in zip(tk.gated_residual_backward(grad, shift, y, (True, True)),
                    ref.gated_residual_backward(grad, shift, y, (True, True))):
        _close(a, b, RED_TOL[torch.float32], "gres grads")
