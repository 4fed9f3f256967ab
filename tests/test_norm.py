"""gated_detail_residual / adaln_modulate / gated_residual on every backend against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import umm_ops
from umm_ops import reference as R
from conftest import device_backend_params, dtypes_for
from tolerance import assert_close_rule

# token shapes (leading dims) x channels: ragged, C = 1, C not a multiple of any vector width, C > 1024
GDR_SHAPES = [((1,), 1, 1), ((2, 3), 17, 9), ((5,), 64, 64), ((2, 7), 100, 33), ((3,), 1152, 1152)]
MOD_SHAPES = [(1, (1,), 1), (2, (3,), 17), (3, (2, 5), 64), (2, (7,), 100), (2, (9,), 1152)]
SMALL_GDR = GDR_SHAPES[:3]
SMALL_MOD = MOD_SHAPES[:3]


def _check_all(outs, grads, ref_fn, inputs, g, dtype, what, grad_ulps=None):
    """Compare outputs and grads with the float64 reference and with PyTorch in `dtype`."""
    def ref(ds):
        ins = [None if a is None else a.detach().to(ds).requires_grad_(True) for a in inputs]
        o = ref_fn(*ins)
        used = [a for a in ins if a is not None]
        return o, torch.autograd.grad(o, used, g.to(ds))

    o64, g64 = ref(torch.float64)
    olp, glp = ref(dtype)
    assert outs.dtype == dtype
    assert_close_rule(outs, o64, olp, dtype, f"{what} out")
    for i, (a, b, c) in enumerate(zip(grads, g64, glp)):
        assert_close_rule(a, b, c, dtype, f"{what} grad[{i}]", ulps=grad_ulps)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_gated_detail_residual(device, backend, seed):
    for dtype in dtypes_for(device, backend):
        for lead, C, Dg in (SMALL_GDR if backend == "triton" else GDR_SHAPES):
            low, high = (torch.randn(*lead, C, device=device).to(dtype) for _ in range(2))
            gh = torch.randn(*lead, Dg, device=device).to(dtype)
            w = (torch.randn(Dg, device=device) / Dg**0.5).to(dtype)
            b = torch.randn(1, device=device).to(dtype)
            lw = (1 + 0.1 * torch.randn(C, device=device)).to(dtype)
            lb = (0.1 * torch.randn(C, device=device)).to(dtype)
            inputs = [low, high, gh, w, b, lw, lb]
            xs = [a.clone().requires_grad_(True) for a in inputs]
            with umm_ops.use_backend(backend):
                out = umm_ops.gated_detail_residual(*xs, eps=1e-5)
            g = torch.randn_like(out)
            with umm_ops.use_backend(backend):  # the backward on the backend under test too
                grads = torch.autograd.grad(out, xs, g)
            _check_all(out, grads, lambda *a: R.gated_detail_residual(*a, eps=1e-5), inputs, g, dtype,
                       f"gdr {dtype} {lead}x{C} Dg={Dg}")


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("affine", ["none", "weight", "weight+bias"])
def test_adaln_modulate(device, backend, norm, affine, seed):
    for dtype in dtypes_for(device, backend):
        for B, mid, C in (SMALL_MOD if backend == "triton" else MOD_SHAPES):
            x = torch.randn(B, *mid, C, device=device).to(dtype)
            # shift and scale are chunks of one (B, 6C) modulation tensor: strided rows, no copy needed
            mod = (0.5 * torch.randn(B, 6 * C, device=device)).to(dtype)
            w = (1 + 0.1 * torch.randn(C, device=device)).to(dtype) if affine != "none" else None
            bias = (0.1 * torch.randn(C, device=device)).to(dtype) if affine == "weight+bias" else None
            xs = [x.clone().requires_grad_(True), mod.clone().requires_grad_(True),
                  None if w is None else w.clone().requires_grad_(True),
                  None if bias is None else bias.clone().requires_grad_(True)]
            with umm_ops.use_backend(backend):
                shift, scale = xs[1][:, :C], xs[1][:, C:2 * C]
                out = umm_ops.adaln_modulate(xs[0], shift, scale, eps=1e-6, norm=norm, weight=xs[2], bias=xs[3])
            g = torch.randn_like(out)
            used = [a for a in xs if a is not None]
            with umm_ops.use_backend(backend):  # the backward on the backend under test too
                grads = torch.autograd.grad(out, used, g)

            def ref_fn(xx, mm, ww=None, bb=None):
                if ww is not None and bb is None and affine == "weight+bias":
                    raise AssertionError
                return R.adaln_modulate(xx, mm[:, :C], mm[:, C:2 * C], eps=1e-6, norm=norm, weight=ww, bias=bb)

            # C = 1: dx = rstd * dn * w * (1 - xhat^2) subtracts nearly equal numbers when |x| >> eps, so
            # rounding differences of a few ulps in xhat become ~100 ulps of dx's scale (PyTorch's too).
            _check_all(out, grads, ref_fn, [x, mod, w, bias], g, dtype, f"adaln-{norm} {dtype} {B}x{mid}x{C}",
                       grad_ulps=256 if (C == 1 and dtype == torch.float32) else None)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_gated_residual(device, backend, seed):
    for dtype in dtypes_for(device, backend):
        for B, mid, C in (SMALL_MOD if backend == "triton" else MOD_SHAPES):
            x, y = (torch.randn(B, *mid, C, device=device).to(dtype) for _ in range(2))
            mod = torch.randn(B, 3 * C, device=device).to(dtype)
            xs = [x.clone().requires_grad_(True), mod.clone().requires_grad_(True), y.clone().requires_grad_(True)]
            with umm_ops.use_backend(backend):
                out = umm_ops.gated_residual(xs[0], xs[1][:, 2 * C:], xs[2])
            g = torch.randn_like(out)
            with umm_ops.use_backend(backend):  # the backward on the backend under test too
                grads = torch.autograd.grad(out, xs, g)
            _check_all(out, grads, lambda a, m, c: R.gated_residual(a, m[:, 2 * C:], c), [x, mod, y], g, dtype,
                       f"gated_residual {dtype} {B}x{mid}x{C}")


def test_modulation_shapes_accepted():
    x = torch.randn(2, 5, 8)
    s = torch.randn(2, 8)
    a = umm_ops.adaln_modulate(x, s, s)
    b = umm_ops.adaln_modulate(x, s[:, None, :], s[:, None, :])
    assert torch.equal(a, b)
    # a non-unit column stride is accepted (copied once)
    st = torch.randn(8, 2).t()
    assert torch.allclose(umm_ops.gated_residual(x, st, x), R.gated_residual(x, st, x))
    # nn.Linear(Dg, 1) weight (1, Dg) and a 0-d bias are accepted
    # (low and high independent: with low == high the LayerNorm input (1 + g) x is ill-conditioned near g = -1)
    lin = torch.nn.Linear(8, 1)
    hi = torch.randn(2, 5, 8)
    out = umm_ops.gated_detail_residual(x, hi, x, lin.weight, lin.bias)
    ref = R.gated_detail_residual(x, hi, x, lin.weight.reshape(-1), lin.bias, None, None)
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None


def test_norm_bad_inputs():
    x = torch.randn(2, 4, 8)
    s = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        umm_ops.adaln_modulate(x, torch.randn(3, 8), s)
    with pytest.raises(TypeError, match="dtype of x"):
        umm_ops.adaln_modulate(x, s.double(), s)
    with pytest.raises(ValueError, match="norm must be"):
        umm_ops.adaln_modulate(x, s, s, norm="batch")
    with pytest.raises(ValueError, match="at least 2 dims"):
        umm_ops.gated_residual(torch.randn(8), s, torch.randn(8))
    with pytest.raises(ValueError, match="shape of x"):
        umm_ops.gated_residual(x, s, torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="leading dims"):
        umm_ops.gated_detail_residual(x, x, torch.randn(2, 5, 8), torch.randn(8))
    with pytest.raises(ValueError, match="w_gate must have 8 elements"):
        umm_ops.gated_detail_residual(x, x, x, torch.randn(7))
    with pytest.raises(TypeError, match="dtype of the activations"):
        umm_ops.gated_detail_residual(x, x, x, torch.randn(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps"):
        umm_ops.gated_detail_residual(x, x, x, torch.randn(8), eps=-1.0)
    with pytest.raises(TypeError, match="dtype"):
        umm_ops.gated_residual(x.int(), s.int(), x.int())


def test_kernel_op_checks_are_clear():
    """The C++ kernel ops validate on their own (for callers that skip the Python fronts)."""
    if not umm_ops.backends()["extension"]["loaded"]:
        pytest.skip("compiled extension not loaded")
    x = torch.randn(2, 4, 8)
    s = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="must have shape"):
        torch.ops.umm_ops.kernel_gated_residual(x, torch.randn(3, 8), x)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.umm_ops.kernel_gated_residual(x.double(), s.double(), x.double())
    with pytest.raises(RuntimeError, match="t must be float32"):
        torch.ops.umm_ops.kernel_flow_step(x[0], x[0], None, torch.zeros(2, dtype=torch.float64),
                                           torch.zeros(2), None, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.umm_ops.kernel_flow_step(x[0].t(), x[0].t(), None, torch.zeros(8), torch.zeros(8), None, False)
