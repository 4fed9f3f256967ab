"""flow_step / flow_logprob / flow_kl / time_shift / SigmaSchedule on every backend against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

import umm_ops
from umm_ops import reference as R
import umm_ops.reference.kernels  # noqa: F401  (R.kernels)
from conftest import device_backend_params, dtypes_for
from tolerance import assert_close_rule

# (B, per-sample shape): ragged, including 1 element and sizes that are not multiples of any block
SHAPES = [(1, (1,)), (3, (37,)), (2, (5, 7, 3)), (4, (300,)), (1, (16385,))]
SMALL = [(1, (1,)), (3, (37,)), (2, (5, 7, 3))]  # for the Triton interpreter


def _shapes(backend):
    return SMALL if backend == "triton" else SHAPES


def _times(B, device, gen_t0=True):
    t = torch.rand(B, device=device) * 0.9
    if gen_t0:
        t[0] = 0.0  # pure noise: exercises the schedule's t = 0 substitution
    t_next = torch.minimum(t + 0.02 + 0.1 * torch.rand(B, device=device), torch.ones_like(t))
    return t, t_next


def _inputs(B, shape, dtype, device, n=3):
    return [torch.randn(B, *shape, device=device).to(dtype) for _ in range(n)]


def _run(device, backend, fn):
    with umm_ops.use_backend(backend):
        return fn()


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("sde", [False, True], ids=["euler", "sde"])
def test_flow_step_matches_reference(device, backend, sde, seed):
    for dtype in dtypes_for(device, backend):
        for B, shape in _shapes(backend):
            x, v, z = _inputs(B, shape, dtype, device)
            t, tn = _times(B, device)
            sigma = umm_ops.SigmaSchedule(0.7)(t, tn) if sde else None
            xs = [a.clone().requires_grad_(True) for a in (x, v, z)]
            with umm_ops.use_backend(backend):
                if sde:
                    out, lp = umm_ops.flow_step(xs[0], xs[1], t, tn, noise=xs[2], sigma=sigma, return_logprob=True)
                else:
                    out = umm_ops.flow_step(xs[0], xs[1], t, tn)
            g = torch.randn_like(out)
            with umm_ops.use_backend(backend):  # the backward on the backend under test too
                grads = torch.autograd.grad(out, xs if sde else xs[:2], g)

            def ref(ds):
                ins = [a.to(ds).requires_grad_(True) for a in (x, v, z)]
                tt, tnn = t.to(ds if ds == torch.float64 else torch.float32), tn.to(ds if ds == torch.float64 else torch.float32)
                sg = sigma.to(tt.dtype) if sde else None
                res = R.flow_step(ins[0], ins[1], tt, tnn, noise=ins[2] if sde else None, sigma=sg,
                                  return_logprob=sde)
                o = res[0] if sde else res
                gr = torch.autograd.grad(o, ins if sde else ins[:2], g.to(ds))
                return o, gr

            o64, g64 = ref(torch.float64)
            olp, glp = ref(dtype)
            assert out.dtype == dtype and out.shape == x.shape
            assert_close_rule(out, o64, olp, dtype, f"x_next {dtype} {B}x{shape}")
            for i, (a, b, c) in enumerate(zip(grads, g64, glp)):
                assert_close_rule(a, b, c, dtype, f"grad[{i}] {dtype} {B}x{shape}")
            if sde:
                # the log-prob is of the returned (rounded) sample: check against a direct Gaussian density
                mean, std = R.flow_transition(x.double(), v.double(), t.double(), tn.double(), sigma.double())
                direct = torch.distributions.Normal(mean, std).log_prob(out.double()).flatten(1).mean(1)
                assert lp.dtype == torch.float32 and lp.shape == (B,)
                n = x[0].numel()
                assert (lp.double() - direct).abs().max().item() <= 1e-4 + 1e-5 * math.sqrt(n) * direct.abs().max().item()


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_flow_logprob_and_grads(device, backend, seed):
    for dtype in dtypes_for(device, backend):
        for B, shape in _shapes(backend):
            x, v, z = _inputs(B, shape, dtype, device)
            t, tn = _times(B, device, gen_t0=False)
            sigma = torch.rand(B, device=device) * 0.5 + 0.1
            with umm_ops.use_backend(backend):
                x_next = umm_ops.flow_step(x, v, t, tn, noise=z, sigma=sigma)
                xs = [a.clone().requires_grad_(True) for a in (x, x_next, v)]
                lp = umm_ops.flow_logprob(*xs, t, tn, sigma)
                # the recorded sample's log-prob equals the one flow_step reports
                _, lp_step = umm_ops.flow_step(x, v, t, tn, noise=z, sigma=sigma, return_logprob=True)
            assert torch.allclose(lp, lp_step, rtol=1e-5, atol=1e-5)
            g = torch.randn(B, device=device)
            with umm_ops.use_backend(backend):  # the backward on the backend under test too
                grads = torch.autograd.grad(lp, xs, g)

            def ref(ds):
                ins = [a.to(ds).requires_grad_(True) for a in (x, x_next, v)]
                sd = torch.float64 if ds == torch.float64 else torch.float32
                o = R.flow_logprob(*ins, t.to(sd), tn.to(sd), sigma.to(sd))
                return o, torch.autograd.grad(o, ins, g.to(o.dtype))

            o64, g64 = ref(torch.float64)
            olp, glp = ref(dtype)
            # the log-prob itself is float32 whatever the input dtype: judge it at float32
            assert_close_rule(lp, o64, olp.float(), torch.float32, "logprob", ulps=64)
            # The gradients scale the residual r = x_next - mean by g / (std^2 N).  r is a difference of O(|x|)
            # numbers, so one rounding of it (an ulp of |x|, |v|, |x_next|) is amplified by 1 / std^2: that is
            # the floor here (PyTorch's own fp32 chain is sometimes exact on a few elements, and 2x zero is zero).
            _, _, std = R.kernels.flow_coefficients(t, tn, sigma)
            mag = torch.stack([a.double().abs().flatten(1).max(1).values for a in (x, x_next, v)]).max(0).values
            res_floor = (4 * 2.0**-23 * mag / (std**2 * x[0].numel()) * g.double().abs()).max().item()
            for i, (a, b, c) in enumerate(zip(grads, g64, glp)):
                assert_close_rule(a, b, c, dtype, f"dlogprob/d{['x', 'x_next', 'v'][i]} {dtype}", floor=res_floor)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_flow_kl_and_grads(device, backend, seed):
    for dtype in dtypes_for(device, backend):
        for B, shape in _shapes(backend):
            v, vr = _inputs(B, shape, dtype, device, 2)
            t, tn = _times(B, device, gen_t0=False)
            sigma = 0.3
            xs = [a.clone().requires_grad_(True) for a in (v, vr)]
            with umm_ops.use_backend(backend):
                kl = umm_ops.flow_kl(*xs, t, tn, sigma)
            g = torch.randn(B, device=device)
            with umm_ops.use_backend(backend):  # the backward on the backend under test too
                grads = torch.autograd.grad(kl, xs, g)

            def ref(ds):
                ins = [a.to(ds).requires_grad_(True) for a in (v, vr)]
                sd = torch.float64 if ds == torch.float64 else torch.float32
                o = R.flow_kl(*ins, t.to(sd), tn.to(sd), torch.full((B,), sigma, dtype=sd, device=device))
                return o, torch.autograd.grad(o, ins, g.to(o.dtype))

            o64, g64 = ref(torch.float64)
            olp, glp = ref(dtype)
            assert_close_rule(kl, o64, olp.float(), torch.float32, "kl", ulps=64)
            for i, (a, b, c) in enumerate(zip(grads, g64, glp)):
                assert_close_rule(a, b, c, dtype, f"dkl[{i}] {dtype}")
            # closed form: KL of two Gaussians with the same std, element by element
            zero = torch.zeros_like(v, dtype=torch.float64)
            sg = torch.full((B,), sigma, dtype=torch.float64, device=device)
            m1, std = R.flow_transition(zero, v.double(), t.double(), tn.double(), sg)
            m2, _ = R.flow_transition(zero, vr.double(), t.double(), tn.double(), sg)
            std = std.expand_as(m1)
            direct = torch.distributions.kl_divergence(torch.distributions.Normal(m1, std),
                                                       torch.distributions.Normal(m2, std)).flatten(1).mean(1)
            assert torch.allclose(kl.double(), direct, rtol=1e-4, atol=1e-6)


def test_euler_follows_the_straight_path(seed):
    """With the exact velocity v = x_data - noise, Euler lands exactly on x_{t_next} (Cheers convention)."""
    data, noise = torch.randn(3, 64, dtype=torch.float64), torch.randn(3, 64, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.8], dtype=torch.float64)
    tn = t + 0.1
    x_t = t[:, None] * data + (1 - t[:, None]) * noise
    out = umm_ops.flow_step(x_t, data - noise, t, tn)
    assert torch.allclose(out, tn[:, None] * data + (1 - tn[:, None]) * noise)


def test_sde_matches_flow_grpo_formula_literally(seed):
    """The kernels' t-form coefficients equal Flow-GRPO's s-form transition (written out here by hand)."""
    x, v, z = (torch.randn(2, 50) for _ in range(3))
    t, tn = torch.tensor([0.2, 0.6]), torch.tensor([0.25, 0.7])
    sig = torch.tensor([0.3, 0.7])
    out = umm_ops.flow_step(x, v, t, tn, noise=z, sigma=sig)
    s, s_next = (1 - t)[:, None].double(), (1 - tn)[:, None].double()
    ds = s_next - s
    v_fg = -v.double()
    sg = sig[:, None].double()
    mean = x.double() + (v_fg + sg**2 / (2 * s) * (x.double() + (1 - s) * v_fg)) * ds
    expected = mean + sg * torch.sqrt(-ds) * z.double()
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_sigma_schedule():
    sched = umm_ops.SigmaSchedule(0.7)
    t = torch.tensor([0.0, 0.25, 0.5])
    tn = torch.tensor([0.1, 0.3, 0.6])
    s = sched(t, tn)
    assert torch.allclose(s[1:], 0.7 * torch.sqrt((1 - t[1:]) / t[1:]))
    assert torch.allclose(s[0], torch.tensor(0.7 * math.sqrt(1 / 0.1)))  # Flow-GRPO's t = 0 substitution
    with pytest.raises(ValueError, match="noise_level"):
        umm_ops.SigmaSchedule(float("nan"))


def test_time_shift():
    assert umm_ops.time_shift(0.0, 0.5) == 0.0 and umm_ops.time_shift(1.0, 0.5) == 1.0
    assert math.isclose(umm_ops.time_shift(0.5, 0.5), 0.25 / 0.75)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    # SD3-style shift b on s = 1 - t equals time_shift(t, 1 / b)
    b = 3.0
    s = 1 - t
    sd3 = 1 - b * s / (1 + (b - 1) * s)
    assert torch.allclose(umm_ops.time_shift(t, 1 / b), sd3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        umm_ops.time_shift(1.5, 0.5)
    with pytest.raises(ValueError, match="positive"):
        umm_ops.time_shift(0.5, -1.0)


def test_flow_bad_inputs():
    x = torch.randn(2, 8)
    v = torch.randn(2, 8)
    z = torch.randn(2, 8)
    with pytest.raises(TypeError, match="dtype"):
        umm_ops.flow_step(x.long(), v.long(), 0.1, 0.2)
    with pytest.raises(TypeError, match="dtype of x"):
        umm_ops.flow_step(x, v.bfloat16(), 0.1, 0.2)
    with pytest.raises(ValueError, match="shape of x"):
        umm_ops.flow_step(x, v[:, :4], 0.1, 0.2)
    with pytest.raises(ValueError, match=r"\(2,\) tensor"):
        umm_ops.flow_step(x, v, torch.tensor([0.1, 0.2, 0.3]), 0.4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        umm_ops.flow_step(x, v, -0.1, 0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        umm_ops.flow_step(x, v, 0.1, float("nan"))
    with pytest.raises(ValueError, match="t < t_next"):
        umm_ops.flow_step(x, v, 0.5, 0.4, noise=z, sigma=0.3)
    with pytest.raises(ValueError, match="finite and > 0"):
        umm_ops.flow_step(x, v, 0.1, 0.2, noise=z, sigma=float("inf"))
    with pytest.raises(ValueError, match="needs sigma"):
        umm_ops.flow_step(x, v, 0.1, 0.2, noise=z)
    with pytest.raises(ValueError, match="needs noise, got noise=None"):
        umm_ops.flow_step(x, v, 0.1, 0.2, sigma=0.3)
    with pytest.raises(ValueError, match="return_logprob needs an SDE"):
        umm_ops.flow_step(x, v, 0.1, 0.2, return_logprob=True)
    with pytest.raises(ValueError, match="reduction"):
        umm_ops.flow_logprob(x, x, v, 0.1, 0.2, 0.3, reduction="max")
    with pytest.raises(TypeError, match="torch.Tensor"):
        umm_ops.flow_step([1.0], v, 0.1, 0.2)
    # value checks can be switched off (no device sync), shape checks cannot
    with umm_ops.value_checks(False):
        umm_ops.flow_step(x, v, -0.1, 0.2)
        with pytest.raises(ValueError, match="shape of x"):
            umm_ops.flow_step(x, v[:, :4], 0.1, 0.2)


def test_flow_sum_reduction_and_shapes(seed):
    x, v, z = (torch.randn(3, 4, 5) for _ in range(3))
    xn = umm_ops.flow_step(x, v, 0.1, 0.2, noise=z, sigma=0.5)
    lp_mean = umm_ops.flow_logprob(x, xn, v, 0.1, 0.2, 0.5)
    lp_sum = umm_ops.flow_logprob(x, xn, v, 0.1, 0.2, 0.5, reduction="sum")
    assert torch.allclose(lp_sum, lp_mean * 20)
    # non-contiguous inputs are accepted (copied once)
    xt = x.transpose(1, 2)
    out = umm_ops.flow_step(xt, v.transpose(1, 2), 0.1, 0.3)
    assert torch.allclose(out, xt + 0.2 * v.transpose(1, 2), atol=1e-6)


def test_wrong_device_is_named():
    """A tensor on another device is rejected before any kernel runs (the meta device stands in for a GPU)."""
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="device of x"):
        umm_ops.flow_step(x, torch.empty(2, 8, device="meta"), 0.1, 0.2)
    with pytest.raises(ValueError, match="device of x"):
        umm_ops.flow_step(x, x, torch.zeros(2, device="meta"), 0.2)
    with pytest.raises(ValueError, match="device of x"):
        umm_ops.adaln_modulate(x[:, None], torch.zeros(2, 8, device="meta"), torch.zeros(2, 8))
