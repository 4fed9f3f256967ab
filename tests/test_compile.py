"""torch.library.opcheck on every public op and every C++ kernel op, and torch.compile(fullgraph=True) through
the public fronts (forward and backward)."""
from __future__ import annotations

import pytest
import torch

import umm_ops
from conftest import device_backend_params

# opcheck's test_aot_dispatch_dynamic retraces with symbolic shapes: keep it, it is what torch.compile needs.


def _flow_cases(device, dtype):
    B, N = 3, 37
    x, v, z = (torch.randn(B, N, device=device, dtype=dtype) for _ in range(3))
    t = torch.tensor([0.1, 0.4, 0.7], device=device)
    tn = t + 0.05
    sig = torch.full((B,), 0.3, device=device)
    grad_b = torch.randn(B, device=device)
    rg = lambda a: a.clone().requires_grad_(True)  # noqa: E731
    return [
        ("flow_step", (rg(x), rg(v), rg(z), t, tn, sig, True)),
        ("flow_step", (rg(x), rg(v), None, t, tn, None, False)),
        ("flow_step_backward", (x, t, tn, sig, [True, False, True])),
        ("flow_logprob", (rg(x), rg(z), rg(v), t, tn, sig)),
        ("flow_logprob_backward", (grad_b, x, z, v, t, tn, sig, [True, True, True])),
        ("flow_kl", (rg(v), rg(z), t, tn, sig)),
        ("flow_kl_backward", (grad_b, v, z, t, tn, sig, [True, False])),
    ]


def _norm_cases(device, dtype):
    B, L, C, Dg = 2, 5, 24, 16
    rg = lambda a: a.clone().requires_grad_(True)  # noqa: E731
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    low, high, gh = r(B * L, C), r(B * L, C), r(B * L, Dg)
    w, b, lw, lb = r(Dg), r(1), r(C), r(C)
    x, y = r(B, L, C), r(B, L, C)
    mod = r(B, 3 * C)
    sh, sc, gt = mod[:, :C], mod[:, C:2 * C], mod[:, 2 * C:]
    _, g, m, s = torch.ops.umm_ops.gated_detail_residual(low, high, gh, w, b, lw, lb, 1e-5)
    _, am, ars = torch.ops.umm_ops.adaln_modulate(x, sh, sc, lw, lb, 1e-6, False)
    _, _, rrs = torch.ops.umm_ops.adaln_modulate(x, sh, sc, lw, None, 1e-6, True)
    return [
        ("gated_detail_residual", (rg(low), rg(high), rg(gh), rg(w), rg(b), rg(lw), rg(lb), 1e-5)),
        ("gated_detail_residual_backward", (r(B * L, C), low, high, gh, w, lw, g, m, s, 1e-5)),
        ("adaln_modulate", (rg(x), sh.detach().requires_grad_(True), rg(sc), rg(lw), rg(lb), 1e-6, False)),
        ("adaln_modulate", (rg(x), rg(sh), rg(sc), None, None, 1e-6, True)),
        ("adaln_modulate_backward", (r(B, L, C), x, sc, lw, lb, am, ars, 1e-6, False, [True] * 5)),
        ("adaln_modulate_backward", (r(B, L, C), x, sc, lw, None, x.new_empty(0, dtype=torch.float32), rrs, 1e-6,
                                     True, [True, False, True, True, False])),
        ("gated_residual", (rg(x), rg(gt), rg(y))),
        ("gated_residual_backward", (r(B, L, C), gt, y, [True, True])),
    ]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_public_ops(device, backend, dtype, seed):
    with umm_ops.use_backend(backend):
        for name, args in _flow_cases(device, dtype) + _norm_cases(device, dtype):
            op = getattr(torch.ops.umm_ops, name).default
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_opcheck_kernel_ops(device, seed):
    """The C++ ops (torch.ops.umm_ops.kernel_*) have schemas, fake kernels and no autograd of their own."""
    if not umm_ops.backends()["extension"]["loaded"]:
        pytest.skip("compiled extension not loaded")
    if device == "cuda" and not umm_ops.backends()["cuda"]["runnable"]:
        pytest.skip("no CUDA kernels")
    for name, args in _flow_cases(device, torch.float32) + _norm_cases(device, torch.float32):
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        op = getattr(torch.ops.umm_ops, "kernel_" + name).default
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _model_step(x, v, z, t, tn, low, high, gh, w, b, mod, y):
    """A head-like step through every public op (forward + a scalar loss for the backward)."""
    C = x.shape[-1]
    sh, sc, gt = mod.chunk(3, dim=-1)
    h = umm_ops.adaln_modulate(x, sh, sc, norm="rms")
    h = umm_ops.gated_residual(x, gt, h * y)
    d = umm_ops.gated_detail_residual(low, high, gh, w, b)
    xn, lp = umm_ops.flow_step(h, v, t, tn, noise=z, sigma=0.3, return_logprob=True)
    lp2 = umm_ops.flow_logprob(h, xn.detach(), v, t, tn, umm_ops.SigmaSchedule(0.7))
    kl = umm_ops.flow_kl(v, h, t, tn, 0.3)
    e = umm_ops.flow_step(h, v, t, tn)
    return xn.sum() + lp.sum() + lp2.sum() + kl.sum() + d.sum() + e.square().mean() + C * 0


@pytest.mark.slow
def test_torch_compile_fullgraph_forward_backward(seed):
    B, L, C = 2, 6, 16
    r = lambda *s: torch.randn(*s)  # noqa: E731
    args = [r(B, L, C), r(B, L, C), r(B, L, C), torch.tensor([0.1, 0.5]), torch.tensor([0.2, 0.6]),
            r(B, L, C), r(B, L, C), r(B, L, C), r(C), r(1), r(B, 3 * C), r(B, L, C)]
    leaves = [a.requires_grad_(True) if a.dim() > 1 or a.numel() > 2 else a for a in args]
    eager_loss = _model_step(*leaves)
    eager_grads = torch.autograd.grad(eager_loss, [a for a in leaves if a.requires_grad])
    compiled = torch.compile(_model_step, fullgraph=True, dynamic=False)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, [a for a in leaves if a.requires_grad])
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, eager_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_compile_sees_custom_ops_not_decomposed():
    """The traced graph holds our ops as single nodes (so inductor cannot split them)."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    backend = EagerAndRecordGraphs()
    f = torch.compile(lambda x, s: umm_ops.adaln_modulate(x, s, s), backend=backend, fullgraph=True)
    f(torch.randn(2, 3, 8), torch.randn(2, 8))
    code = backend.graphs[0].code
    assert "umm_ops.adaln_modulate" in code
