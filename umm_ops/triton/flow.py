"""Triton kernels for the flow-matching ops (flow_step, flow_logprob, flow_kl and their backwards).

Design
------
* Activations are (B, N) contiguous tensors (float32 / bfloat16 / float16); every kernel loads them,
  converts to float32, computes in float32 and stores back in the activation dtype.  Statistics
  (logprob, kl) are float32.
* The per-sample transition coefficients (ax, av, std) of ``mean = ax x + av v`` are computed inside the
  kernels from t / t_next / sigma exactly as ``flow_coef`` in csrc/include/umm/params.h (float32).
* Grid = (B, P): program (b, p) handles a contiguous chunk of ``CHUNK`` elements of sample b, looping
  over it in vectors of ``BLOCK`` elements.  P depends only on the shape (never on the device), so the
  results are deterministic: the per-sample reductions (logprob, kl) write one float32 partial per
  program into a (B, P) float32 buffer; a tiny finishing kernel sums each row in a fixed order and
  applies the per-sample constants (-log std - 0.5 log 2 pi, av^2 / (2 std^2)).  No float atomics.
* bfloat16 stores round to nearest even explicitly (_cast_out): the interpreter truncates otherwise.
* Under the Triton interpreter (TRITON_INTERPRET=1) P is kept tiny (one program per sample) because
  every program instance costs milliseconds there.
* Masked-out gradients are returned as empty (0,) tensors and are never computed (constexpr flags).

NOTE: only the interpreter path has been run here (no GPU was available when this was written); the
GPU launch configuration (BLOCK, num_warps, P) is untested on real hardware.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _cast_out(v, ptr):
    """float32 -> the element type of `ptr`, rounding to nearest even.

    bfloat16 is pre-rounded with integer arithmetic so that the result is exact on every path: the
    Triton interpreter truncates on a plain float32 -> bfloat16 cast (the GPU rounds to nearest even),
    which would make e.g. the logprob of the stored x_next disagree with the reference.  Costs a few
    integer ops per stored element on the GPU (memory-bound kernels).
    """
    ty = ptr.dtype.element_ty
    if ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v.to(ty)


@triton.jit
def _coef_math(t, tn, sig):
    """flow_coef of params.h on float32 values (scalars or vectors): (ax, av, std); sigma == 0 -> Euler.
    dt < 0 gives std = 0 (as the reference's clamp) instead of NaN."""
    dt = tn - t
    sde = sig != 0.0
    den = tl.where(sde, 2.0 * (1.0 - t), 1.0)
    k = sig * sig / den
    ax = tl.where(sde, 1.0 - k * dt, 1.0)
    av = tl.where(sde, dt * (1.0 + k * t), dt)
    std = tl.where(sde, sig * tl.sqrt_rn(tl.maximum(dt, 0.0)), 0.0)
    return ax, av, std


@triton.jit
def _flow_coef(t_ptr, tn_ptr, sig_ptr, b, HAS_SIGMA: tl.constexpr):
    """(ax, av, std) of sample b, float32 (HAS_SIGMA False: Euler, sigma = 0)."""
    t = tl.load(t_ptr + b).to(tl.float32)
    tn = tl.load(tn_ptr + b).to(tl.float32)
    if HAS_SIGMA:
        sig = tl.load(sig_ptr + b).to(tl.float32)
    else:
        sig = t * 0.0
    return _coef_math(t, tn, sig)


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _flow_step_kernel(
    x_ptr, v_ptr, z_ptr, t_ptr, tn_ptr, sig_ptr, out_ptr, part_ptr,
    N, CHUNK, P,
    HAS_NOISE: tl.constexpr, HAS_SIGMA: tl.constexpr, WANT_LP: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    p = tl.program_id(1)
    ax, av, std = _flow_coef(t_ptr, tn_ptr, sig_ptr, b, HAS_SIGMA)
    if WANT_LP:
        inv2var = 1.0 / (2.0 * std * std)
    base = b.to(tl.int64) * N
    start = p.to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_NOISE:
            mean = ax * x + av * v
            z = tl.load(z_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
            xn = _cast_out(mean + std * z, out_ptr)
            tl.store(out_ptr + base + offs, xn, mask=m)
            if WANT_LP:
                r = xn.to(tl.float32) - mean
                acc += tl.where(m, r * r * inv2var, 0.0)
        else:
            xn = _cast_out(x + av * v, out_ptr)
            tl.store(out_ptr + base + offs, xn, mask=m)
    if WANT_LP:
        tl.store(part_ptr + b * P + p, tl.sum(acc, axis=0))


@triton.jit
def _flow_step_bwd_kernel(
    g_ptr, t_ptr, tn_ptr, sig_ptr, dx_ptr, dv_ptr, dz_ptr,
    N, CHUNK,
    HAS_SIGMA: tl.constexpr, WANT_DX: tl.constexpr, WANT_DV: tl.constexpr, WANT_DZ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    p = tl.program_id(1)
    ax, av, std = _flow_coef(t_ptr, tn_ptr, sig_ptr, b, HAS_SIGMA)
    base = b.to(tl.int64) * N
    start = p.to(tl.int64) * CHUNK
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        m = offs < N
        g = tl.load(g_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        if WANT_DX:
            tl.store(dx_ptr + base + offs, _cast_out(g * ax, dx_ptr), mask=m)
        if WANT_DV:
            tl.store(dv_ptr + base + offs, _cast_out(g * av, dv_ptr), mask=m)
        if WANT_DZ:
            tl.store(dz_ptr + base + offs, _cast_out(g * std, dz_ptr), mask=m)


@triton.jit
def _flow_logprob_kernel(
    x_ptr, xn_ptr, v_ptr, t_ptr, tn_ptr, sig_ptr, part_ptr,
    N, CHUNK, P,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    p = tl.program_id(1)
    ax, av, std = _flow_coef(t_ptr, tn_ptr, sig_ptr, b, True)
    inv2var = 1.0 / (2.0 * std * std)
    base = b.to(tl.int64) * N
    start = p.to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        xn = tl.load(xn_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        r = xn - (ax * x + av * v)
        acc += tl.where(m, r * r * inv2var, 0.0)
    tl.store(part_ptr + b * P + p, tl.sum(acc, axis=0))


@triton.jit
def _flow_logprob_bwd_kernel(
    gr_ptr, x_ptr, xn_ptr, v_ptr, t_ptr, tn_ptr, sig_ptr, dx_ptr, dxn_ptr, dv_ptr,
    N, CHUNK,
    WANT_DX: tl.constexpr, WANT_DXN: tl.constexpr, WANT_DV: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    p = tl.program_id(1)
    ax, av, std = _flow_coef(t_ptr, tn_ptr, sig_ptr, b, True)
    w = tl.load(gr_ptr + b).to(tl.float32) / (std * std * N)
    base = b.to(tl.int64) * N
    start = p.to(tl.int64) * CHUNK
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        xn = tl.load(xn_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        wr = w * (xn - (ax * x + av * v))
        if WANT_DX:
            tl.store(dx_ptr + base + offs, _cast_out(wr * ax, dx_ptr), mask=m)
        if WANT_DXN:
            tl.store(dxn_ptr + base + offs, _cast_out(-wr, dxn_ptr), mask=m)
        if WANT_DV:
            tl.store(dv_ptr + base + offs, _cast_out(wr * av, dv_ptr), mask=m)


@triton.jit
def _flow_kl_kernel(
    v_ptr, vr_ptr, t_ptr, tn_ptr, sig_ptr, part_ptr,
    N, CHUNK, P,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    p = tl.program_id(1)
    base = b.to(tl.int64) * N
    start = p.to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        m = offs < N
        v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        vr = tl.load(vr_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        d = v - vr
        acc += d * d
    tl.store(part_ptr + b * P + p, tl.sum(acc, axis=0))


@triton.jit
def _flow_kl_bwd_kernel(
    gr_ptr, v_ptr, vr_ptr, t_ptr, tn_ptr, sig_ptr, dv_ptr, dvr_ptr,
    N, CHUNK,
    WANT_DV: tl.constexpr, WANT_DVR: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    p = tl.program_id(1)
    ax, av, std = _flow_coef(t_ptr, tn_ptr, sig_ptr, b, True)
    w = tl.load(gr_ptr + b).to(tl.float32) * av * av / (std * std * N)
    base = b.to(tl.int64) * N
    start = p.to(tl.int64) * CHUNK
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        m = offs < N
        v = tl.load(v_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        vr = tl.load(vr_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        d = w * (v - vr)
        if WANT_DV:
            tl.store(dv_ptr + base + offs, _cast_out(d, dv_ptr), mask=m)
        if WANT_DVR:
            tl.store(dvr_ptr + base + offs, _cast_out(-d, dvr_ptr), mask=m)


@triton.jit
def _flow_finish_kernel(
    part_ptr, t_ptr, tn_ptr, sig_ptr, out_ptr, B, P, N,
    KL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """out[b] from the (B, P) partial sums, summed in a fixed order (deterministic):
    logprob = -sum/N - log(std) - 0.5 log(2 pi);   kl = sum/N * av^2 / (2 std^2)."""
    bb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = bb < B
    acc = tl.zeros([BLOCK_B, BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + tl.arange(0, BLOCK_P)
        m = mb[:, None] & (pp[None, :] < P)
        acc += tl.load(part_ptr + bb[:, None] * P + pp[None, :], mask=m, other=0.0)
    s = tl.sum(acc, axis=1) / N
    # (masked lanes get a harmless t = 0, t_next = 0.5, sigma = 1)
    t = tl.load(t_ptr + bb, mask=mb, other=0.0)
    tn = tl.load(tn_ptr + bb, mask=mb, other=0.5)
    sig = tl.load(sig_ptr + bb, mask=mb, other=1.0)
    ax, av, std = _coef_math(t, tn, sig)
    if KL:
        res = s * (av * av) / (2.0 * std * std)
    else:
        res = -s - tl.log(std) - 0.9189385332046727
    tl.store(out_ptr + bb, res, mask=mb)


# ------------------------------------------------------------------------------------------------
# launch helpers


def _cfg(B: int, N: int):
    """(BLOCK, CHUNK, P, num_warps): program (b, p) covers elements [p*CHUNK, (p+1)*CHUNK) of sample b.

    Depends on the shape only (deterministic partial sums).  Interpreter: one program per sample.
    """
    if _interpreting():
        block = triton.next_power_of_2(max(1, min(N, 4096)))
        chunk = triton.cdiv(max(N, 1), block) * block
        return block, chunk, 1, 1
    block = 1024 if N >= 1024 else max(128, triton.next_power_of_2(max(N, 1)))
    nblocks = triton.cdiv(max(N, 1), block)
    # aim for a few thousand programs in total, at least 4 blocks of work per program when N is large
    p_target = max(1, min(triton.cdiv(nblocks, 4), triton.cdiv(4096, max(B, 1))))
    blocks_per_prog = triton.cdiv(nblocks, p_target)
    chunk = blocks_per_prog * block
    p = triton.cdiv(max(N, 1), chunk)
    num_warps = 4 if block >= 512 else (2 if block >= 256 else 1)
    return block, chunk, p, num_warps


def _f32(a: torch.Tensor) -> torch.Tensor:
    return a.to(torch.float32).contiguous()


def _finish(part, t, t_next, sig, N, kl):
    """(B,) float32 logprob / kl from the (B, P) float32 partial sums; one tiny launch."""
    B, P = part.shape
    out = torch.empty(B, dtype=torch.float32, device=part.device)
    block_b = min(triton.next_power_of_2(B), 64 if not _interpreting() else 1024)
    block_p = min(triton.next_power_of_2(P), 64)
    _flow_finish_kernel[(triton.cdiv(B, block_b),)](
        part, t, t_next, sig, out, B, P, N, KL=kl, BLOCK_B=block_b, BLOCK_P=block_p, num_warps=1,
    )
    return out


def _check_bn(x: torch.Tensor):
    if x.dim() != 2:
        raise ValueError(f"flow ops take (B, N) tensors, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"triton flow ops support float32/bfloat16/float16, got {x.dtype}")


# ------------------------------------------------------------------------------------------------
# the contract functions (see umm_ops/reference/kernels.py)


def flow_step(x, v, noise, t, t_next, sigma, want_logprob):
    _check_bn(x)
    x, v = x.contiguous(), v.contiguous()
    t, t_next = _f32(t), _f32(t_next)
    B, N = x.shape
    x_next = torch.empty_like(x)
    has_noise = noise is not None
    want_lp = bool(want_logprob) and has_noise
    if B == 0:
        return x_next, (t.new_empty(B) if want_lp else t.new_empty(0))
    z = noise.contiguous() if has_noise else x
    has_sigma = sigma is not None
    sig = _f32(sigma) if has_sigma else t
    block, chunk, P, nw = _cfg(B, N)
    part = torch.empty(B, P, dtype=torch.float32, device=x.device) if want_lp else t
    if N > 0:
        _flow_step_kernel[(B, P)](
            x, v, z, t, t_next, sig, x_next, part, N, chunk, P,
            HAS_NOISE=has_noise, HAS_SIGMA=has_sigma and has_noise, WANT_LP=want_lp, BLOCK=block, num_warps=nw,
        )
    if not want_lp:
        return x_next, t.new_empty(0)
    if N == 0:
        return x_next, torch.full((B,), float("nan"), dtype=torch.float32, device=x.device)
    return x_next, _finish(part, t, t_next, _sigma_or_zeros(sigma, t), N, False)


def flow_step_backward(grad, t, t_next, sigma, mask):
    _check_bn(grad)
    grad = grad.contiguous()
    t, t_next = _f32(t), _f32(t_next)
    B, N = grad.shape
    outs = [torch.empty_like(grad) if bool(m) else grad.new_empty(0) for m in mask]
    if B == 0 or N == 0 or not any(bool(m) for m in mask):
        return tuple(outs)
    has_sigma = sigma is not None
    sig = _f32(sigma) if has_sigma else t
    dummy = grad
    dx, dv, dz = (o if bool(m) else dummy for o, m in zip(outs, mask))
    block, chunk, P, nw = _cfg(B, N)
    _flow_step_bwd_kernel[(B, P)](
        grad, t, t_next, sig, dx, dv, dz, N, chunk,
        HAS_SIGMA=has_sigma, WANT_DX=bool(mask[0]), WANT_DV=bool(mask[1]), WANT_DZ=bool(mask[2]),
        BLOCK=block, num_warps=nw,
    )
    return tuple(outs)


def _sigma_or_zeros(sigma, t):
    return _f32(sigma) if sigma is not None else torch.zeros_like(t)


def flow_logprob(x, x_next, v, t, t_next, sigma):
    _check_bn(x)
    x, x_next, v = x.contiguous(), x_next.contiguous(), v.contiguous()
    t, t_next = _f32(t), _f32(t_next)
    sig = _sigma_or_zeros(sigma, t)
    B, N = x.shape
    if B == 0:
        return torch.empty(0, dtype=torch.float32, device=x.device)
    if N == 0:
        return torch.full((B,), float("nan"), dtype=torch.float32, device=x.device)
    block, chunk, P, nw = _cfg(B, N)
    part = torch.empty(B, P, dtype=torch.float32, device=x.device)
    _flow_logprob_kernel[(B, P)](x, x_next, v, t, t_next, sig, part, N, chunk, P, BLOCK=block, num_warps=nw)
    return _finish(part, t, t_next, sig, N, False)


def flow_logprob_backward(grad, x, x_next, v, t, t_next, sigma, mask):
    _check_bn(x)
    x, x_next, v = x.contiguous(), x_next.contiguous(), v.contiguous()
    grad = _f32(grad)
    t, t_next = _f32(t), _f32(t_next)
    sig = _sigma_or_zeros(sigma, t)
    B, N = x.shape
    outs = [torch.empty_like(x) if bool(m) else x.new_empty(0) for m in mask]
    if B == 0 or N == 0 or not any(bool(m) for m in mask):
        return tuple(outs)
    dx, dxn, dv = (o if bool(m) else x for o, m in zip(outs, mask))
    block, chunk, P, nw = _cfg(B, N)
    _flow_logprob_bwd_kernel[(B, P)](
        grad, x, x_next, v, t, t_next, sig, dx, dxn, dv, N, chunk,
        WANT_DX=bool(mask[0]), WANT_DXN=bool(mask[1]), WANT_DV=bool(mask[2]), BLOCK=block, num_warps=nw,
    )
    return tuple(outs)


def flow_kl(v, v_ref, t, t_next, sigma):
    _check_bn(v)
    v, v_ref = v.contiguous(), v_ref.contiguous()
    t, t_next = _f32(t), _f32(t_next)
    sig = _sigma_or_zeros(sigma, t)
    B, N = v.shape
    if B == 0:
        return torch.empty(0, dtype=torch.float32, device=v.device)
    if N == 0:
        return torch.full((B,), float("nan"), dtype=torch.float32, device=v.device)
    block, chunk, P, nw = _cfg(B, N)
    part = torch.empty(B, P, dtype=torch.float32, device=v.device)
    _flow_kl_kernel[(B, P)](v, v_ref, t, t_next, sig, part, N, chunk, P, BLOCK=block, num_warps=nw)
    return _finish(part, t, t_next, sig, N, True)


def flow_kl_backward(grad, v, v_ref, t, t_next, sigma, mask):
    _check_bn(v)
    v, v_ref = v.contiguous(), v_ref.contiguous()
    grad = _f32(grad)
    t, t_next = _f32(t), _f32(t_next)
    sig = _sigma_or_zeros(sigma, t)
    B, N = v.shape
    outs = [torch.empty_like(v) if bool(m) else v.new_empty(0) for m in mask]
    if B == 0 or N == 0 or not any(bool(m) for m in mask):
        return tuple(outs)
    dv, dvr = (o if bool(m) else v for o, m in zip(outs, mask))
    block, chunk, P, nw = _cfg(B, N)
    _flow_kl_bwd_kernel[(B, P)](
        grad, v, v_ref, t, t_next, sig, dv, dvr, N, chunk,
        WANT_DV=bool(mask[0]), WANT_DVR=bool(mask[1]), BLOCK=block, num_warps=nw,
    )
    return tuple(outs)
