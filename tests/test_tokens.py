"""compress_tokens / expand_tokens / pack_latents / unpack_latents on every backend against the float64 reference.

The low-precision comparison chain (tolerance.py's "PyTorch in the input dtype") is the eager chain a model
writes: F.layer_norm -> space-to-depth -> F.linear -> GELU in the input dtype (the reference upcasts to float32,
which would make the allowed error of a bfloat16 GEMM unreasonably small).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import umm_ops
from umm_ops import backend as B
from umm_ops.reference import tokens as R
from conftest import device_backend_params, dtypes_for, results_by_thread_count
from tolerance import assert_close_rule

# (N, H, W, C, C_out, f): square and non-square grids, batch 1..3, C / C_out odd and not multiples of any tile,
# a factor of 3, one wider case (K = 520 > every K tile).
COMPRESS_SHAPES = [(1, 2, 2, 3, 5, 2), (3, 6, 4, 17, 33, 2), (2, 4, 8, 130, 65, 2), (2, 6, 9, 7, 11, 3)]
TRITON_SHAPES = [(1, 2, 2, 3, 5, 2), (2, 6, 4, 17, 9, 2), (3, 8, 6, 5, 37, 2)]  # M, C_out and K > one tile
LATENT_SHAPES = [(1, 1, 2, 2, 2), (2, 4, 6, 8, 2), (3, 3, 6, 9, 3), (2, 32, 8, 4, 2)]  # (B, C, H, W, f)


def _params():
    """device_backend_params() without backends that lack the tokens kernels (ops land backend by backend)."""
    out = []
    for p in device_backend_params():
        dev, be = p.values
        if B._has_op(be, "compress_tokens"):
            out.append(p)
    return out


def _eager_compress(x, grid, lw, lb, w, b, f, act, eps):
    xn = F.layer_norm(x, (x.shape[-1],), lw, lb, eps)
    y = F.linear(R.space_to_depth(xn, grid, f), w, b)
    return R._activation(y, act)


def _eager_expand(y, grid, w, b, f):
    return R.depth_to_space(F.linear(y, w, b), grid, f)


def _compare(fn_kernel, fn_eager, inputs, dtype, what, backend, grad_ulps=None):
    """Outputs and gradients of every input that is not None, against float64 and the eager chain in dtype."""
    xs = [None if a is None else a.clone().requires_grad_(True) for a in inputs]
    with umm_ops.use_backend(backend):
        out = fn_kernel(*xs)
    g = torch.randn_like(out)
    used = [a for a in xs if a is not None]
    with umm_ops.use_backend(backend):  # the backward on the backend under test too
        grads = torch.autograd.grad(out, used, g)

    def chain(ds):
        ins = [None if a is None else a.detach().to(ds).requires_grad_(True) for a in inputs]
        o = fn_eager(*ins)
        return o, torch.autograd.grad(o, [a for a in ins if a is not None], g.to(ds))

    o64, g64 = chain(torch.float64)
    olp, glp = chain(dtype)
    assert out.dtype == dtype
    assert_close_rule(out, o64, olp, dtype, f"{what} out")
    for i, (a, b, c) in enumerate(zip(grads, g64, glp)):
        assert_close_rule(a, b, c, dtype, f"{what} grad[{i}]", ulps=grad_ulps)


def _compress_inputs(N, H, W, C, Co, f, dtype, device, affine=True, with_bias=True):
    x = (torch.randn(N, H * W, C, device=device) * 2 + 0.5).to(dtype)
    lw = (1 + 0.2 * torch.randn(C, device=device)).to(dtype) if affine else None
    lb = (0.2 * torch.randn(C, device=device)).to(dtype) if affine else None
    w = (torch.randn(Co, f * f * C, device=device) / (f * f * C) ** 0.5).to(dtype)
    b = (0.5 * torch.randn(Co, device=device)).to(dtype) if with_bias else None
    return x, lw, lb, w, b


@pytest.mark.parametrize("device,backend", _params())
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "none"])
def test_compress_tokens(device, backend, activation, seed):
    shapes = TRITON_SHAPES if backend == "triton" else COMPRESS_SHAPES
    for dtype in dtypes_for(device, backend):
        for k, (N, H, W, C, Co, f) in enumerate(shapes):
            affine = k % 2 == 0 or activation != "none"  # some cases without LayerNorm affine / bias
            with_bias = k != 1 or activation == "gelu"
            inputs = _compress_inputs(N, H, W, C, Co, f, dtype, device, affine, with_bias)
            eps = 1e-6
            _compare(lambda x, *p: umm_ops.compress_tokens(x, (H, W), *p, factor=f, activation=activation, eps=eps),
                     lambda x, *p: _eager_compress(x, (H, W), *p, f, activation, eps),
                     inputs, dtype, f"compress {activation} {dtype} N={N} {H}x{W} C={C}->{Co} f={f}", backend)


@pytest.mark.parametrize("device,backend", _params())
def test_expand_tokens(device, backend, seed):
    shapes = TRITON_SHAPES if backend == "triton" else COMPRESS_SHAPES
    for dtype in dtypes_for(device, backend):
        for k, (N, H, W, C, Ci, f) in enumerate(shapes):
            y = torch.randn(N, (H // f) * (W // f), Ci, device=device).to(dtype)
            w = (torch.randn(f * f * C, Ci, device=device) / Ci**0.5).to(dtype)
            b = (0.5 * torch.randn(f * f * C, device=device)).to(dtype) if k != 1 else None
            _compare(lambda yy, ww, bb=None: umm_ops.expand_tokens(yy, (H, W), ww, bb, factor=f),
                     lambda yy, ww, bb=None: _eager_expand(yy, (H, W), ww, bb, f),
                     [y, w, b], dtype, f"expand {dtype} N={N} {H}x{W} {Ci}->{f * f}x{C}", backend)


def _latent_stats(C, f, device):
    n = C * f * f
    return torch.randn(n, device=device), torch.rand(n, device=device) * 2 + 0.1


@pytest.mark.parametrize("device,backend", _params())
def test_pack_unpack_latents(device, backend, seed):
    shapes = LATENT_SHAPES[:2] if backend == "triton" else LATENT_SHAPES
    for dtype in dtypes_for(device, backend):
        for Bn, C, H, W, f in shapes:
            rm, rv = _latent_stats(C, f, device)
            z = torch.randn(Bn, C, H, W, device=device).to(dtype)
            _compare(lambda zz: umm_ops.pack_latents(zz, rm, rv, factor=f, eps=1e-4),
                     lambda zz: R.pack_latents(zz, rm.to(zz.dtype), rv.to(zz.dtype), f, 1e-4),
                     [z], dtype, f"pack {dtype} {Bn}x{C}x{H}x{W} f={f}", backend)
            t = torch.randn(Bn, (H // f) * (W // f), C * f * f, device=device).to(dtype)
            _compare(lambda tt: umm_ops.unpack_latents(tt, (H, W), rm, rv, factor=f, eps=1e-4),
                     lambda tt: R.unpack_latents(tt, (H, W), rm.to(tt.dtype), rv.to(tt.dtype), f, 1e-4),
                     [t], dtype, f"unpack {dtype} {Bn}x{C}x{H}x{W} f={f}", backend)
            # round trip: unpack(pack(z)) == z up to the two roundings of the packed tokens
            with umm_ops.use_backend(backend):
                back = umm_ops.unpack_latents(umm_ops.pack_latents(z, rm, rv, f), (H, W), rm, rv, f)
            tol = {torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 4e-3}[dtype]
            scale = z.float().abs().max().item() + rm.abs().max().item()
            assert (back.float() - z.float()).abs().max().item() <= tol * scale, f"round trip {dtype} {z.shape}"


def test_round_trip_float64_exact():
    z = torch.randn(2, 8, 6, 4, dtype=torch.float64)
    rm, rv = torch.randn(32, dtype=torch.float64), torch.rand(32, dtype=torch.float64) + 0.1
    back = umm_ops.unpack_latents(umm_ops.pack_latents(z, rm, rv), (6, 4), rm, rv)
    assert torch.allclose(back, z, rtol=0, atol=1e-13)
    # and the pure layout round trips are exact
    x = torch.randn(2, 24, 5, dtype=torch.float64)
    assert torch.equal(R.depth_to_space(R.space_to_depth(x, (6, 4), 2), (6, 4), 2), x)


def test_conventions_match_the_reference_layout():
    """Token (r, c) of the fine grid lands in coarse token (r // f, c // f), unfolded channel (r%f*f + c%f)*C."""
    H, W, C, f = 4, 6, 3, 2
    x = torch.arange(H * W * C, dtype=torch.float32).reshape(1, H * W, C)
    w = torch.eye(f * f * C)  # the projection is the identity: out == the normalised unfolded tokens
    out = umm_ops.compress_tokens(x, (H, W), None, None, w, None, factor=f, activation="none", eps=0.0)
    xn = F.layer_norm(x, (C,), eps=0.0)
    for r in range(H):
        for c in range(W):
            seg = (r % f) * f + (c % f)
            got = out[0, (r // f) * (W // f) + c // f, seg * C:(seg + 1) * C]
            assert torch.allclose(got, xn[0, r * W + c], atol=1e-6)
    # latents: packed channel c*f*f + di*f + dj
    z = torch.arange(2 * H * W, dtype=torch.float32).reshape(1, 2, H, W)
    t = umm_ops.pack_latents(z, torch.zeros(8), torch.ones(8), factor=f, eps=0.0)
    assert t[0, 0, 1 * 4 + 1 * 2 + 0].item() == z[0, 1, 1, 0].item()


def test_compress_without_grad_keeps_no_preactivation():
    x, lw, lb, w, b = _compress_inputs(2, 4, 4, 8, 6, 2, torch.float32, "cpu")
    with torch.no_grad():
        out, pre, mean, rstd = torch.ops.umm_ops.compress_tokens(x, lw, lb, w, b, 4, 4, 2, "gelu", 1e-6, False)
    assert pre.numel() == 0 and mean.shape == (32,) and rstd.shape == (32,)
    # backward from a forward that kept nothing recomputes the pre-activation
    g = torch.randn_like(out)
    got = torch.ops.umm_ops.compress_tokens_backward(g, x, lw, lb, w, b, pre, mean, rstd, 4, 4, 2, "gelu", 1e-6,
                                                     [True] * 5)
    _, pre2, _, _ = torch.ops.umm_ops.compress_tokens(x, lw, lb, w, b, 4, 4, 2, "gelu", 1e-6, True)
    want = torch.ops.umm_ops.compress_tokens_backward(g, x, lw, lb, w, b, pre2, mean, rstd, 4, 4, 2, "gelu", 1e-6,
                                                      [True] * 5)
    for a, bb in zip(got, want):
        assert torch.allclose(a, bb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "none"])
def test_compress_forward_without_grad_same_bits(dtype, activation, seed, cpu_isa):
    """Without gradients the CPU epilogue runs in place in the GEMM's output (no pre-activation kept): the
    same bits as the forward that keeps the pre-activation, and the result is its own tensor, not a view."""
    x, lw, lb, w, b = _compress_inputs(3, 6, 4, 37, 29, 2, dtype, "cpu")
    k = torch.ops.umm_ops.kernel_compress_tokens
    out, pre, _, _ = k(x, lw, lb, w, b, 6, 4, 2, activation, 1e-6, False)
    kept, pre2, _, _ = k(x, lw, lb, w, b, 6, 4, 2, activation, 1e-6, True)
    assert pre.numel() == 0 and out._base is None and out.is_contiguous()
    assert pre2.numel() == (0 if activation == "none" else 18 * 29)
    assert torch.equal(out, kept)


def test_eager_path_equals_the_custom_op(seed, monkeypatch):
    """Eager calls skip the custom op's dispatch (ops/_common.py `dispatch`): the implementation directly without
    gradients, a plain autograd.Function with the custom op's setup / backward with them: same kernels, same
    bits, forward and backward.  Under a dispatch mode (FakeTensorMode) or torch.compile the custom op runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from umm_ops.ops import _common as C
    from umm_ops.ops import tokens as T

    x, lw, lb, w, b = _compress_inputs(2, 4, 6, 8, 6, 2, torch.float32, "cpu")
    y, we, be = torch.randn(3, 6, 5), torch.randn(4 * 7, 5), torch.randn(4 * 7)
    z, rm, rv = torch.randn(2, 3, 4, 6), torch.randn(12), torch.rand(12) + 0.5
    ins = [x, lw, lb, w, b, y, we, be, z]

    def fn():
        outs = (umm_ops.compress_tokens(x, (4, 6), lw, lb, w, b), umm_ops.expand_tokens(y, (4, 6), we, be),
                umm_ops.pack_latents(z, rm, rv), umm_ops.unpack_latents(umm_ops.pack_latents(z, rm, rv), (4, 6), rm, rv))
        if not torch.is_grad_enabled() or not x.requires_grad:
            return outs, None
        loss = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i))).sum()
                   for i, o in enumerate(outs))
        return outs, torch.autograd.grad(loss, ins)

    with torch.no_grad():
        direct, _ = fn()
    for t in ins:
        t.requires_grad_(True)
    eager_outs, eager_grads = fn()
    calls = []
    for name in ("_ct_op", "_et_op", "_pk_op", "_up_op"):
        op = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    monkeypatch.setattr(C, "eager_ok", lambda t: False)  # force the custom op
    op_outs, op_grads = fn()
    assert sorted(set(calls)) == ["_ct_op", "_et_op", "_pk_op", "_up_op"]
    for a, bb, c in zip(direct, eager_outs, op_outs):
        assert torch.equal(a, bb.detach()) and torch.equal(a, c.detach())
    for a, bb in zip(eager_grads, op_grads):
        assert torch.equal(a, bb)
    monkeypatch.undo()
    calls.clear()
    for name in ("_et_op",):
        op = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
    yd, wd, bd = y.detach(), we.detach(), be.detach()
    with FakeTensorMode() as mode:
        fo = umm_ops.expand_tokens(mode.from_tensor(yd), (4, 6), mode.from_tensor(wd), mode.from_tensor(bd))
    assert calls == ["_et_op"] and fo.shape == (3, 24, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_results_independent_of_threads(dtype, seed, cpu_isa):
    """The CPU kernels' column sums (LayerNorm-weight / bias gradients) go in shape-only row chunks, then in
    order: bitwise the same results with 1 and 2 threads (M = 13 x 8 = 104 rows: six 16-row chunks and a ragged
    one)."""
    x, lw, lb, w, b = _compress_inputs(13, 4, 8, 24, 40, 2, dtype, "cpu")
    y, we, be = torch.randn(13, 8, 16).to(dtype), (torch.randn(4 * 12, 16) / 4).to(dtype), torch.randn(48).to(dtype)
    ins = [t.requires_grad_(True) for t in (x, lw, lb, w, b, y, we, be)]

    def run():
        with umm_ops.use_backend("cpu"):
            o1 = umm_ops.compress_tokens(ins[0], (4, 8), *ins[1:5])
            o2 = umm_ops.expand_tokens(ins[5], (4, 8), ins[6], ins[7])
            gs = torch.autograd.grad((o1.float().square().sum() + o2.float().square().sum()), ins)
        return (o1, o2) + gs

    a, bb = results_by_thread_count(run)
    for u, v in zip(a, bb):
        assert torch.equal(u, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_cpu_weight_grad_same_with_and_without_layernorm_backward(dtype, affine, seed, cpu_isa):
    """The CPU backward re-writes A (the GEMM operand of dW) inside the LayerNorm-backward pass when that pass
    runs, and with a separate gather when it does not (only weight / bias need gradients): the two A's, hence
    dW and db, must be bitwise the same; and the mask subsets must not change the gradients they share."""
    x, lw, lb, w, b = _compress_inputs(3, 6, 4, 37, 29, 2, dtype, "cpu", affine=affine)
    g = torch.randn(3, 6, 29).to(dtype)

    def grads(*req):
        ins = [None if t is None else t.detach().clone().requires_grad_(r) for t, r in zip((x, lw, lb, w, b), req)]
        with umm_ops.use_backend("cpu"):
            out = umm_ops.compress_tokens(ins[0], (6, 4), *ins[1:])
            out.backward(g)
        return [None if t is None else t.grad for t in ins]

    full = grads(True, True, True, True, True)
    only_w = grads(False, False, False, True, True)
    only_x = grads(True, False, False, False, False)
    assert torch.equal(full[3], only_w[3]) and torch.equal(full[4], only_w[4])
    assert torch.equal(full[0], only_x[0])


def test_tokens_bad_inputs():
    x, lw, lb, w, b = _compress_inputs(2, 4, 6, 8, 5, 2, torch.float32, "cpu")
    ct = umm_ops.compress_tokens
    with pytest.raises(ValueError, match=r"divisible by factor 2"):
        ct(torch.randn(2, 15, 8), (5, 3), lw, lb, w, b)
    with pytest.raises(ValueError, match=r"24 tokens per image but grid_hw = \(4, 4\) needs H\*W = 16"):
        ct(x, (4, 4), lw, lb, w, b)
    with pytest.raises(ValueError, match=r"weight must be \(C_out, f\*f\*C\) = \(C_out, 32\)"):
        ct(x, (4, 6), lw, lb, w[:, :30], b)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        ct(x, (4, 6), lw, lb, w, torch.randn(4))
    with pytest.raises(ValueError, match=r"ln_weight must have shape \(8,\)"):
        ct(x, (4, 6), torch.randn(7), lb, w, b)
    with pytest.raises(TypeError, match="dtype of x"):
        ct(x, (4, 6), lw, lb, w.double(), b)
    with pytest.raises(TypeError, match="dtype"):
        ct(x.int(), (4, 6), lw, lb, w, b)
    with pytest.raises(ValueError, match="activation must be one of"):
        ct(x, (4, 6), lw, lb, w, b, activation="relu")
    with pytest.raises(ValueError, match="3 dims"):
        ct(x[0], (4, 6), lw, lb, w, b)
    with pytest.raises(ValueError, match="grid_hw must be a pair"):
        ct(x, 24, lw, lb, w, b)
    with pytest.raises(ValueError, match="factor must be a positive int"):
        ct(x, (4, 6), lw, lb, w, b, factor=0)
    y = torch.randn(2, 6, 5)
    with pytest.raises(ValueError, match=r"y has 6 tokens per image but grid_hw = \(4, 4\)"):
        umm_ops.expand_tokens(y, (4, 4), torch.randn(32, 5), None)
    with pytest.raises(ValueError, match=r"weight must be \(f\*f\*C, C_in\) with C_in = 5"):
        umm_ops.expand_tokens(y, (4, 6), torch.randn(30, 5), None)
    rm, rv = _latent_stats(4, 2, "cpu")
    with pytest.raises(ValueError, match=r"latent grid \(H, W\) must be divisible by factor 2, got \(5, 4\)"):
        umm_ops.pack_latents(torch.randn(1, 4, 5, 4), rm, rv)
    with pytest.raises(ValueError, match="4 dims"):
        umm_ops.pack_latents(torch.randn(4, 4, 4), rm, rv)
    with pytest.raises(ValueError, match=r"running_var must have C\*f\*f = 16 elements"):
        umm_ops.pack_latents(torch.randn(1, 4, 4, 4), rm, rv[:8])
    with pytest.raises(ValueError, match=r"tokens must be \(B, \(H/f\)\*\(W/f\), C\*f\*f\) with \(H/f\)\*\(W/f\) = 4"):
        umm_ops.unpack_latents(torch.randn(1, 5, 16), (4, 4), rm, rv)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            ct(x, (4, 6), lw.cuda(), lb, w, b)


def test_kernel_op_checks_are_clear():
    """The C++ kernel ops validate on their own (for callers that skip the Python fronts)."""
    if not umm_ops.backends()["extension"]["loaded"]:
        pytest.skip("compiled extension not loaded")
    k = torch.ops.umm_ops
    x, lw, lb, w, b = _compress_inputs(1, 4, 4, 8, 5, 2, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"must be divisible by factor 3"):
        k.kernel_compress_tokens(x, lw, lb, w, b, 4, 4, 3, "gelu", 1e-6, False)
    with pytest.raises(RuntimeError, match=r"x must be \(N, H\*W, C\) with H\*W = 36"):
        k.kernel_compress_tokens(x, lw, lb, w, b, 6, 6, 2, "gelu", 1e-6, False)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        k.kernel_compress_tokens(x, lw, lb, w, b, 4, 4, 2, "silu", 1e-6, False)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        k.kernel_compress_tokens(x.double(), None, None, w.double(), None, 4, 4, 2, "gelu", 1e-6, False)
    with pytest.raises(RuntimeError, match="weight must have the dtype of x"):
        k.kernel_compress_tokens(x, None, None, w.half(), None, 4, 4, 2, "gelu", 1e-6, False)
    with pytest.raises(RuntimeError, match="running_mean must be float32"):
        k.kernel_pack_latents(torch.randn(1, 2, 4, 4), torch.zeros(8, dtype=torch.float64), torch.ones(8), 2, 1e-4)


def _opcheck_cases(device, dtype):
    N, H, W, C, Co, f = 2, 4, 6, 5, 7, 2
    rg = lambda a: None if a is None else a.clone().requires_grad_(True)  # noqa: E731
    x, lw, lb, w, b = _compress_inputs(N, H, W, C, Co, f, dtype, device)
    out, pre, mean, rstd = torch.ops.umm_ops.compress_tokens(x, lw, lb, w, b, H, W, f, "gelu", 1e-6, True)
    y = torch.randn(N, 6, Co, device=device, dtype=dtype)
    we = torch.randn(f * f * C, Co, device=device, dtype=dtype)
    be = torch.randn(f * f * C, device=device, dtype=dtype)
    z = torch.randn(N, 3, H, W, device=device, dtype=dtype)
    rm, rv = _latent_stats(3, f, device)
    t = torch.randn(N, 6, 12, device=device, dtype=dtype)
    ge = torch.randn(N, H * W, C, device=device, dtype=dtype)
    return [
        ("compress_tokens", (rg(x), rg(lw), rg(lb), rg(w), rg(b), H, W, f, "gelu", 1e-6, True)),
        ("compress_tokens", (rg(x), None, None, rg(w), None, H, W, f, "none", 1e-6, False)),
        ("compress_tokens_backward", (torch.randn_like(out), x, lw, lb, w, b, pre, mean, rstd, H, W, f, "gelu", 1e-6,
                                      [True] * 5)),
        ("compress_tokens_backward", (torch.randn_like(out), x, None, lb, w, None, pre.new_empty(0), mean, rstd, H, W,
                                      f, "gelu_tanh", 1e-6, [True, False, True, False, False])),
        ("expand_tokens", (rg(y), rg(we), rg(be), H, W, f)),
        ("expand_tokens_backward", (ge, y, we, H, W, f, [True, True, True])),
        ("pack_latents", (rg(z), rm, rv, f, 1e-4)),
        ("pack_latents_backward", (t, rv, H, W, f, 1e-4)),
        ("unpack_latents", (rg(t), rm, rv, H, W, f, 1e-4)),
        ("unpack_latents_backward", (z, rv, f, 1e-4)),
    ]


@pytest.mark.parametrize("device,backend", _params())
def test_opcheck_public_ops(device, backend, seed):
    dtypes = [torch.float32] if backend == "triton" else [torch.float32, torch.bfloat16]
    with umm_ops.use_backend(backend):
        for dtype in dtypes:
            for name, args in _opcheck_cases(device, dtype):
                torch.library.opcheck(getattr(torch.ops.umm_ops, name).default, args)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck_kernel_ops(device, seed):
    if not umm_ops.backends()["extension"]["loaded"]:
        pytest.skip("compiled extension not loaded")
    for name, args in _opcheck_cases(device, torch.float32):
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(getattr(torch.ops.umm_ops, "kernel_" + name).default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compile_fullgraph(seed):
    """Cheers' tokenizer chain under torch.compile(fullgraph=True) (inductor), forward and backward."""
    N, H, W, C, Co, f = 2, 4, 4, 8, 12, 2
    x, lw, lb, w, b = _compress_inputs(N, H, W, C, Co, f, torch.float32, "cpu")
    w2 = torch.randn(f * f * 3, Co) / Co**0.5
    rm, rv = _latent_stats(3, f, "cpu")
    z = torch.randn(N, 3, H, W)

    def step(x, lw, lb, w, b, w2, z):
        tok = umm_ops.compress_tokens(x, (H, W), lw, lb, w, b, factor=f)
        lat = umm_ops.pack_latents(z, rm, rv, factor=f)
        back = umm_ops.expand_tokens(tok, (H, W), w2, None, factor=f)          # (N, H*W, 3)
        img = umm_ops.unpack_latents(lat, (H, W), rm, rv, factor=f)
        return (back.sum(-1).reshape(N, H, W) * img.mean(1)).square().mean() + tok.square().mean()

    ins = [a.clone().requires_grad_(True) for a in (x, lw, lb, w, b, w2, z)]
    ref_ins = [a.clone().requires_grad_(True) for a in (x, lw, lb, w, b, w2, z)]
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    loss = compiled(*ins)
    loss.backward()
    ref = step(*ref_ins)
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(ins, ref_ins):
        assert torch.allclose(a.grad, r.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 32, 32, 1152, 4608, 2), (3, 6, 10, 72, 200, 2), (2, 4, 4, 17, 33, 2)])
def test_cuda_fused_gemm_cheers_sizes(dtype, shape, seed):
    """The CUDA gather-GEMM (tensor cores, sm80+) at Cheers' size and ragged ones, forward and expand; the
    backward goes through cuBLAS + fused passes.  Checked against float64 with the tolerance rule."""
    N, H, W, C, Co, f = shape
    if N * H * W * C > 2**22:  # the Cheers size: forward only, float64 reference on the GPU
        x, lw, lb, w, b = _compress_inputs(N, H, W, C, Co, f, dtype, "cuda")
        with torch.no_grad():
            out = umm_ops.compress_tokens(x, (H, W), lw, lb, w, b)
            o64 = _eager_compress(x.double(), (H, W), lw.double(), lb.double(), w.double(), b.double(), f, "gelu",
                                  1e-6)
            olp = _eager_compress(x, (H, W), lw, lb, w, b, f, "gelu", 1e-6)
        assert_close_rule(out, o64, olp, dtype, "cheers compress")
        return
    inputs = _compress_inputs(N, H, W, C, Co, f, dtype, "cuda")
    _compare(lambda x, *p: umm_ops.compress_tokens(x, (H, W), *p, factor=f),
             lambda x, *p: _eager_compress(x, (H, W), *p, f, "gelu", 1e-6), inputs, dtype, f"cuda compress {shape}",
             "cuda")
    y = torch.randn(N, (H // f) * (W // f), Co, device="cuda").to(dtype)
    w2 = (torch.randn(f * f * C, Co, device="cuda") / Co**0.5).to(dtype)
    b2 = torch.randn(f * f * C, device="cuda").to(dtype)
    _compare(lambda yy, ww, bb: umm_ops.expand_tokens(yy, (H, W), ww, bb, factor=f),
             lambda yy, ww, bb: _eager_expand(yy, (H, W), ww, bb, f), [y, w2, b2], dtype, f"cuda expand {shape}",
             "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_gemm_is_the_path_taken(seed):
    """bf16 with C % 8 == 0 runs the CuTe gather-GEMM (the fallback would pass the accuracy tests too); C = 17
    falls back to gather + cuBLAS."""
    if not umm_ops.backends()["cuda"]["runnable"]:
        pytest.skip("no CUDA kernels in this build")
    from torch.profiler import ProfilerActivity, profile

    def kernels_run(C):
        x, lw, lb, w, b = _compress_inputs(2, 8, 8, C, 40, 2, torch.bfloat16, "cuda")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            umm_ops.compress_tokens(x, (8, 8), lw, lb, w, b)
            torch.cuda.synchronize()
        return " ".join(e.name for e in prof.events())

    assert "gather_gemm_kernel" in kernels_run(24)
    assert "gather_gemm_kernel" not in kernels_run(17)



@pytest.mark.parametrize("device,backend", _params())
def test_empty_batch(device, backend):
    """N = 0 images: every op returns the shapes its fake kernel promises (found: compress gave (0, 0, C_out)
    instead of (0, (H/f)(W/f), C_out)), forward and backward, without touching memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    H, W, C, Co, f = 4, 6, 5, 7, 2
    x, lw, lb, w, b = (t.to(device) for t in _compress_inputs(0, H, W, C, Co, f, torch.float32, "cpu"))
    y, we, be = torch.randn(0, 6, 3, device=device), torch.randn(4 * C, 3, device=device), torch.randn(4 * C, device=device)
    z = torch.randn(0, 2, H, W, device=device)
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    calls = {
        "compress": lambda *a: umm_ops.compress_tokens(a[0], (H, W), *a[1:]),
        "expand": lambda *a: umm_ops.expand_tokens(a[0], (H, W), *a[1:]),
        "pack": lambda zz: umm_ops.pack_latents(zz, rm, rv),
        "unpack": lambda t: umm_ops.unpack_latents(t, (H, W), rm, rv),
    }
    inputs = {"compress": (x, lw, lb, w, b), "expand": (y, we, be), "pack": (z,),
              "unpack": (torch.randn(0, 6, 8, device=device),)}
    for name, fn in calls.items():
        ins = [t.clone().requires_grad_(True) for t in inputs[name]]
        with umm_ops.use_backend(backend):
            out = fn(*ins)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # (the latent statistics stay real)
                fake = fn(*(mode.from_tensor(t.detach()) for t in inputs[name]))
            grads = torch.autograd.grad(out.sum(), ins, allow_unused=True)
        assert out.shape == fake.shape, (name, out.shape, fake.shape)
        for t, g in zip(ins, grads):
            assert g is None or g.shape == t.shape, name
