"""Benchmark cases: each op at the Cheers model's sizes (and a sweep), against its peers.

Peers, per case:
  umm_ops          the public op, automatic backend (CUDA kernel on a GPU, C++ kernel on the CPU)
  umm_ops[triton]  the Triton kernel (GPU only)
  eager            the same computation written as a PyTorch user writes it (native layer_norm / rms_norm where
                   they exist), in the input dtype with float32 where the models use it
  compile          torch.compile of the eager code (inductor fuses the elementwise chain)
Each case also states the bytes an ideal kernel must move (every input read once, every output written
once): GB/s = bytes / time, comparable to the device-copy bandwidth measured by the `copy` case.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import umm_ops

# Cheers per-image token grids: packed latents 32x32 -> 1024 tokens x 128 channels (flow ops);
# ViT-width head tokens 1024 x 1152 (gate, detail stage); LLM-width semantic tokens 256 x 1536.
FLOW_TOKENS, FLOW_CH = 1024, 128
VIT_TOKENS, VIT_CH = 1024, 1152
SEM_TOKENS, SEM_CH = 256, 1536


@dataclass
class Case:
    op: str            # e.g. "gated_detail_residual"
    direction: str     # "fwd" or "fwd+bwd"
    images: int        # batch of images
    dtype: torch.dtype
    device: str
    shape: str         # human-readable tensor shape
    bytes: int         # ideal bytes moved
    make: Callable[[], tuple]  # -> inputs
    impls: dict = field(default_factory=dict)  # name -> fn(*inputs)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.direction}-{self.images}img-{str(self.dtype).replace('torch.', '')}"


def _esize(dtype):
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------- eager peers
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def eager_flow_sde_step(x, v, z, t, tn, sigma):
    """Flow-GRPO's SDE step with log-prob, written in PyTorch (float32 math as the reference code does)."""
    xf, vf = x.float(), v.float()
    dt = (tn - t)[:, None]
    k = (sigma**2 / (2 * (1 - t)))[:, None]
    mean = (1 - k * dt) * xf + dt * (1 + k * t[:, None]) * vf
    std = sigma[:, None] * dt.sqrt()
    x_next = (mean + std * z.float()).to(x.dtype)
    lp = (-((x_next.float() - mean) ** 2) / (2 * std**2) - std.log() - LOG_SQRT_2PI).mean(1)
    return x_next, lp


def eager_flow_logprob(x, x_next, v, t, tn, sigma):
    xf, vf = x.float(), v.float()
    dt = (tn - t)[:, None]
    k = (sigma**2 / (2 * (1 - t)))[:, None]
    mean = (1 - k * dt) * xf + dt * (1 + k * t[:, None]) * vf
    std = sigma[:, None] * dt.sqrt()
    return (-((x_next.float() - mean) ** 2) / (2 * std**2) - std.log() - LOG_SQRT_2PI).mean(1)


def eager_gdr(low, high, gh, w, b, lw, lb):
    g = gh @ w[:, None] + b
    return F.layer_norm(low + g * high, (low.shape[-1],), lw, lb, 1e-5)


def eager_adaln(x, shift, scale, w):
    # Cheers: RMSNorm (learnable), modulation in float32
    n = F.rms_norm(x, (x.shape[-1],), w, 1e-6)
    return (n.float() * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


def eager_gated_residual(x, gate, y):
    return x + gate[:, None] * y


# ------------------------------------------------------------------------------------- umm_ops fronts
def umm_flow_sde_step(x, v, z, t, tn, sigma):
    return umm_ops.flow_step(x, v, t, tn, noise=z, sigma=sigma, return_logprob=True)


def umm_flow_logprob(x, x_next, v, t, tn, sigma):
    return umm_ops.flow_logprob(x, x_next, v, t, tn, sigma)


def umm_gdr(low, high, gh, w, b, lw, lb):
    return umm_ops.gated_detail_residual(low, high, gh, w, b, lw, lb, eps=1e-5)


def umm_adaln(x, shift, scale, w):
    return umm_ops.adaln_modulate(x, shift, scale, eps=1e-6, norm="rms", weight=w)


def umm_gated_residual(x, gate, y):
    return umm_ops.gated_residual(x, gate, y)


# ------------------------------------------------------------------------------------- helpers
def _with_backward(fn, n_grad_inputs):
    """fwd+bwd timing: loss = sum of outputs (cast to float32); grads for the first n inputs.  Every
    implementation runs under the same eager harness: the compile peer is _with_backward(torch.compile(fn)),
    not torch.compile(_with_backward(fn)), which would also fuse the harness's own cast / sum and their
    backwards into the compiled graph and time less work than the others."""
    def run(*inputs):
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.float() * 1.0).sum() for o in outs if o.requires_grad)
        return torch.autograd.grad(loss, [i for i in inputs[:n_grad_inputs]])
    return run


def _rg(*ts):
    return tuple(t.requires_grad_(True) for t in ts)


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def make_cases(device: str, quick: bool) -> list[Case]:
    on_gpu = device == "cuda"
    if quick:
        images_list = [2]
        dtypes = [torch.bfloat16] if on_gpu else [torch.float32]
    else:
        images_list = [1, 8, 64]
        dtypes = [torch.bfloat16, torch.float16, torch.float32] if on_gpu else [torch.float32, torch.bfloat16]
    with_triton = on_gpu and umm_ops.backends()["triton"]["runnable"]
    cases = []
    for dtype in dtypes:
        es = _esize(dtype)
        for n_img in images_list:
            B = n_img
            N = FLOW_TOKENS * FLOW_CH
            r = lambda *s, dt=dtype: torch.randn(*s, device=device, dtype=dt)  # noqa: E731

            def flow_inputs(B=B, N=N, r=r):
                t = torch.rand(B, device=device) * 0.8
                return r(B, N), r(B, N), r(B, N), t, t + 0.05, torch.full((B,), 0.7, device=device)

            cases.append(Case("flow_step_sde_logprob", "fwd", n_img, dtype, device, f"({B}, {FLOW_TOKENS}x{FLOW_CH})",
                              B * N * es * 4, flow_inputs,
                              {"umm_ops": umm_flow_sde_step, "eager": eager_flow_sde_step,
                               "compile": _compiled(eager_flow_sde_step)}))

            def lp_inputs(B=B, N=N, r=r):
                t = torch.rand(B, device=device) * 0.8
                return (r(B, N), r(B, N), r(B, N).requires_grad_(True), t, t + 0.05,
                        torch.full((B,), 0.7, device=device))

            # GRPO's hot path: log-prob of a recorded step and its gradient w.r.t. the velocity
            def lp_bwd(fn):
                def run(x, xn, v, t, tn, s):
                    return torch.autograd.grad(fn(x, xn, v, t, tn, s).sum(), [v])
                return run

            cases.append(Case("flow_logprob", "fwd+bwd", n_img, dtype, device, f"({B}, {FLOW_TOKENS}x{FLOW_CH})",
                              B * N * es * (3 + 3 + 1), lp_inputs,
                              {"umm_ops": lp_bwd(umm_flow_logprob), "eager": lp_bwd(eager_flow_logprob),
                               "compile": lp_bwd(_compiled(eager_flow_logprob))}))

            T, C = n_img * VIT_TOKENS, VIT_CH

            def gdr_inputs(T=T, C=C, r=r, grad=False):
                ins = (r(T, C), r(T, C), r(T, C), r(C) / C**0.5, r(1), 1 + 0.1 * r(C), 0.1 * r(C))
                return _rg(*ins) if grad else ins

            for direction in ("fwd", "fwd+bwd"):
                bwd = direction == "fwd+bwd"
                impls = {"umm_ops": umm_gdr, "eager": eager_gdr, "compile": _compiled(eager_gdr)}
                if bwd:
                    impls = {k: _with_backward(f, 7) for k, f in impls.items()}
                nbytes = T * C * es * (4 if not bwd else 4 + 7)
                cases.append(Case("gated_detail_residual", direction, n_img, dtype, device, f"({T}, {C})", nbytes,
                                  lambda g=bwd, f=gdr_inputs: f(grad=g), impls))

            for (L, C, label) in ((SEM_TOKENS, SEM_CH, "semantic"), (VIT_TOKENS, VIT_CH, "detail")):
                def ada_inputs(B=B, L=L, C=C, r=r, grad=False):
                    mod = r(B, 6 * C) * 0.1
                    ins = (r(B, L, C), mod[:, :C], mod[:, C:2 * C], 1 + 0.1 * r(C))
                    if grad:
                        ins = (ins[0].requires_grad_(True), *(a.detach().requires_grad_(True) for a in ins[1:]))
                    return ins

                for direction in ("fwd", "fwd+bwd"):
                    bwd = direction == "fwd+bwd"
                    impls = {"umm_ops": umm_adaln, "eager": eager_adaln, "compile": _compiled(eager_adaln)}
                    if bwd:
                        impls = {k: _with_backward(f, 4) for k, f in impls.items()}
                    nbytes = B * L * C * es * (2 if not bwd else 2 + 3)
                    cases.append(Case(f"adaln_modulate[{label}]", direction, n_img, dtype, device, f"({B}, {L}, {C})",
                                      nbytes, lambda g=bwd, f=ada_inputs: f(grad=g), impls))

                def gr_inputs(B=B, L=L, C=C, r=r, grad=False):
                    ins = (r(B, L, C), r(B, C), r(B, L, C))
                    return _rg(*ins) if grad else ins

                for direction in ("fwd", "fwd+bwd"):
                    bwd = direction == "fwd+bwd"
                    impls = {"umm_ops": umm_gated_residual, "eager": eager_gated_residual,
                             "compile": _compiled(eager_gated_residual)}
                    if bwd:
                        impls = {k: _with_backward(f, 3) for k, f in impls.items()}
                    nbytes = B * L * C * es * (3 if not bwd else 3 + 3)  # bwd: read grad, y; write dy (dx is grad)
                    cases.append(Case(f"gated_residual[{label}]", direction, n_img, dtype, device, f"({B}, {L}, {C})",
                                      nbytes, lambda g=bwd, f=gr_inputs: f(grad=g), impls))
    if with_triton:
        for c in cases:
            fn = c.impls["umm_ops"]

            def tri(*a, fn=fn):
                with umm_ops.use_backend("triton"):
                    return fn(*a)
            c.impls = {"umm_ops": c.impls["umm_ops"], "umm_ops[triton]": tri,
                       **{k: v for k, v in c.impls.items() if k != "umm_ops"}}
    return cases


def copy_case(device: str, quick: bool) -> Case:
    n = (64 if quick else 256) * 2**20 // 4  # 64 / 256 MiB of float32
    def make():  # into a preallocated output: the device's copy bandwidth, no allocation or page faults
        return torch.randn(n, device=device), torch.empty(n, device=device)

    def copy(x, out):
        return out.copy_(x)
    return Case("copy", "fwd", 0, torch.float32, device, f"({n},)", 2 * n * 4, make, {"torch": copy})
