"""Triton kernels of the LM-head ops (contract: umm_ops/reference/kernels.py, formulas: umm/lm_head.h).

Design
------
* statistics (the forward of both ops): one program per tile of BLOCK_N rows walks the vocabulary in BLOCK_V
  tiles, each tile's logits a tl.dot over BLOCK_D slices of D (+ bias), scaled / soft-capped, folded into an
  online log-sum-exp (running max, rescaled sum) together with the target logit, the row sum of the logits and
  the softmax-weighted sum sum_j p_j z'_j (entropy).  Nothing of size V is ever written: 4 floats per row.
  The losses / log-probs / entropies follow from these in torch (a few (N,) vector operations).
* gradients: the per-row coefficients (A, B, C, E) of d/dz'_j = A p_j + B [j == t] + C + E p_j z'_j come from the
  statistics and the upstream gradients (torch, (N,) vectors); then, per block of R rows, one kernel recomputes the
  block's logit tiles and writes dz (the gradient of the raw logits, the input dtype) into an (R, V) buffer, and
  two GEMMs (torch.mm: cuBLAS on a GPU) give dh = dz W for the block and add dz^T h to a float32 dW; db adds the
  column sums.  No atomics (deterministic), no (N, V) tensor: the buffer is R x V, R = chunk_rows or ~16M / V.
  linear_cross_entropy with "sum" / "mean" runs this right after the statistics (the gradient is known up to the
  upstream scalar); "none" and linear_logprob run it in the backward.
* Dots: float32 operands with IEEE products under the interpreter (its bf16 dot is wrong) and for float32 inputs;
  otherwise both operands in the 16-bit input dtype with float32 accumulation.  The logits stay float32 in
  registers (eager rounds them to the input dtype).

NOTE: only the interpreter path has been run (no GPU was available when this was written); the GPU tile sizes are
untested, and a real GPU kernel would fuse the gradient GEMMs too (Cut Cross-Entropy / Liger style) rather than
write dz per block.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .flow import _cast_out

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK_ELEMS = 1 << 24


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks():
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps)."""
    if _interpreting():
        return 16, 32, 32, 4
    return 64, 128, 64, 8


def _f32(x: torch.Tensor) -> bool:
    return _interpreting() or x.dtype == torch.float32


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, nm, vm, D, scale, cap, HAS_BIAS: tl.constexpr,
                 HAS_CAP: tl.constexpr, F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """z' of rows offs_n x classes offs_v, float32 (masked rows / classes hold finite values: callers mask)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dm = offs_d < D
        a = tl.load(h_ptr + offs_n[:, None] * D + offs_d[None, :], mask=nm[:, None] & dm[None, :], other=0.0)
        b = tl.load(w_ptr + offs_v[None, :] * D + offs_d[:, None], mask=vm[None, :] & dm[:, None], other=0.0)
        acc += _dot(a, b, F32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=vm, other=0.0).to(tl.float32)[None, :]
    z = acc * scale
    if HAS_CAP:
        u = z / cap
        th = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(u)) + 1.0)
        z = cap * tl.where(u < 0, -th, th)
    return z


@triton.jit
def _stats_kernel(h_ptr, w_ptr, b_ptr, t_ptr, stats_ptr, N, V, D, scale, cap, HAS_BIAS: tl.constexpr,
                  HAS_CAP: tl.constexpr, F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < N
    t = tl.load(t_ptr + offs_n, mask=nm, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sez = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        vm = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, nm, vm, D, scale, cap, HAS_BIAS, HAS_CAP, F32,
                         BLOCK_N, BLOCK_V, BLOCK_D)
        m_new = tl.maximum(m, tl.max(tl.where(vm[None, :], z, float("-inf")), 1))
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
        e = tl.where(vm[None, :], tl.exp(z - m_new[:, None]), 0.0)
        s = s * alpha + tl.sum(e, 1)
        sez = sez * alpha + tl.sum(e * z, 1)
        sz += tl.sum(tl.where(vm[None, :], z, 0.0), 1)
        zt += tl.sum(tl.where(offs_v[None, :] == t[:, None], z, 0.0), 1)
        m = m_new
    base = stats_ptr + offs_n * 4
    tl.store(base, m + tl.log(s), mask=nm)
    tl.store(base + 1, zt, mask=nm)
    tl.store(base + 2, sz, mask=nm)
    tl.store(base + 3, sez / s, mask=nm)


@triton.jit
def _dz_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, coef_ptr, dz_ptr, R, V, D, scale, cap, HAS_BIAS: tl.constexpr,
               HAS_CAP: tl.constexpr, F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_D: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    nm = offs_n < R
    vm = offs_v < V
    z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, nm, vm, D, scale, cap, HAS_BIAS, HAS_CAP, F32,
                     BLOCK_N, BLOCK_V, BLOCK_D)
    lse = tl.load(lse_ptr + offs_n, mask=nm, other=0.0)
    t = tl.load(t_ptr + offs_n, mask=nm, other=-1)
    A = tl.load(coef_ptr + offs_n * 4, mask=nm, other=0.0)
    B = tl.load(coef_ptr + offs_n * 4 + 1, mask=nm, other=0.0)
    C = tl.load(coef_ptr + offs_n * 4 + 2, mask=nm, other=0.0)
    E = tl.load(coef_ptr + offs_n * 4 + 3, mask=nm, other=0.0)
    p = tl.exp(z - lse[:, None])
    dz = A[:, None] * p + C[:, None] + E[:, None] * p * z
    dz += tl.where(offs_v[None, :] == t[:, None], B[:, None], 0.0)
    if HAS_CAP:
        q = z / cap
        dz = dz * (1.0 - q * q)
    dz = dz * scale
    tl.store(dz_ptr + offs_n[:, None] * V + offs_v[None, :], _cast_out(dz, dz_ptr), mask=nm[:, None] & vm[None, :])


# ------------------------------------------------------------------------------------------------ host side
def _check(hidden, weight, targets, V, ignore_index):
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"triton lm_head: hidden must be float32/bfloat16/float16, got {hidden.dtype}")
    ok = (targets >= 0) & (targets < V)
    if ignore_index is not None:
        ok |= targets == ignore_index
    if targets.numel() and not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        raise ValueError(f"targets must lie in [0, {V})" + ("" if ignore_index is None else
                         f" or equal ignore_index {ignore_index}") + f", got targets[{i}] = {int(targets[i])}")


def _stats(hidden, weight, bias, targets, scale, cap):
    """(N, 4) float32: lse, z'_target, sum_j z'_j, sum_j p_j z'_j."""
    N, D = hidden.shape
    V = weight.shape[0]
    stats = torch.empty(N, 4, dtype=torch.float32, device=hidden.device)
    if N == 0:
        return stats
    BN, BV, BD, nw = _blocks()
    _stats_kernel[(triton.cdiv(N, BN),)](
        hidden, weight, hidden if bias is None else bias, targets, stats, N, V, D, float(scale), float(cap or 1.0),
        HAS_BIAS=bias is not None, HAS_CAP=bool(cap), F32=_f32(hidden), BLOCK_N=BN, BLOCK_V=BV, BLOCK_D=BD,
        num_warps=nw)
    return stats


def _grads(hidden, weight, bias, targets, lse, coef, scale, cap, want, chunk_rows):
    """(dh, dw, db) of the loss whose per-row logit-gradient coefficients are coef (N, 4)."""
    N, D = hidden.shape
    V = weight.shape[0]
    e = lambda: hidden.new_empty(0)  # noqa: E731
    dh = torch.empty_like(hidden) if want[0] else e()
    dw32 = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if want[1] else None
    db32 = torch.zeros(V, dtype=torch.float32, device=hidden.device) if want[2] else None
    if N and any(want):
        BN, BV, BD, nw = _blocks()
        R = min(N, chunk_rows if chunk_rows > 0 else max(BN, _CHUNK_ELEMS // V))
        buf = torch.empty(R, V, dtype=hidden.dtype, device=hidden.device)
        for r0 in range(0, N, R):
            r = min(R, N - r0)
            hb, dz = hidden[r0:r0 + r], buf[:r]
            _dz_kernel[(triton.cdiv(r, BN), triton.cdiv(V, BV))](
                hb, weight, hidden if bias is None else bias, targets[r0:r0 + r], lse[r0:r0 + r], coef[r0:r0 + r], dz,
                r, V, D, float(scale), float(cap or 1.0), HAS_BIAS=bias is not None, HAS_CAP=bool(cap),
                F32=_f32(hidden), BLOCK_N=BN, BLOCK_V=BV, BLOCK_D=BD, num_warps=nw)
            if want[0]:
                torch.mm(dz, weight, out=dh[r0:r0 + r])
            if want[1]:
                if hidden.dtype == torch.float32:
                    dw32.addmm_(dz.t(), hb)
                else:
                    dw32 += torch.mm(dz.t(), hb)
            if want[2]:
                db32 += dz.sum(0, dtype=torch.float32)
    dw = (dw32 if hidden.dtype == torch.float32 else dw32.to(hidden.dtype)) if want[1] else e()
    db = db32.to(hidden.dtype) if want[2] else e()
    return dh, dw, db


def _ce_rows(stats, targets, ignore_index, label_smoothing, z_loss, V):
    lse, zt, sz = stats[:, 0], stats[:, 1], stats[:, 2]
    valid = targets != ignore_index
    rows = lse - (1 - label_smoothing) * zt - label_smoothing * (sz / V) + z_loss * lse * lse
    return torch.where(valid, rows, torch.zeros_like(rows)), valid


def _ce_coef(g, lse, label_smoothing, z_loss, V):
    return torch.stack([g * (1 + 2 * z_loss * lse), -g * (1 - label_smoothing), -g * (label_smoothing / V),
                        torch.zeros_like(g)], 1).contiguous()


def linear_cross_entropy(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap, reduction,
                         grad_mask, chunk_rows):
    V = weight.shape[0]
    _check(hidden, weight, targets, V, ignore_index)
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    stats = _stats(hidden, weight, bias, targets, 1.0, softcap)
    lse = stats[:, 0].contiguous()
    rows, valid = _ce_rows(stats, targets, ignore_index, label_smoothing, z_loss, V)
    if reduction == "none":
        loss = rows
    else:
        loss = rows.sum() if reduction == "sum" else rows.sum() / valid.sum()
    want = [reduction != "none" and bool(grad_mask[0]), reduction != "none" and bool(grad_mask[1]),
            reduction != "none" and bool(grad_mask[2]) and bias is not None]
    if any(want):
        n = valid.sum().clamp(min=1).to(torch.float32)
        g = valid.to(torch.float32) * (1.0 if reduction == "sum" else 1.0 / n)
        coef = _ce_coef(g, lse, label_smoothing, z_loss, V)
        dh, dw, db = _grads(hidden, weight, bias, targets, lse, coef, 1.0, softcap, want, chunk_rows)
    else:
        dh, dw, db = (hidden.new_empty(0) for _ in range(3))
    return loss, lse, dh, dw, db


def linear_cross_entropy_backward(grad, hidden, weight, bias, targets, lse, ignore_index, label_smoothing, z_loss,
                                  softcap, mask, chunk_rows):
    V = weight.shape[0]
    _check(hidden, weight, targets, V, ignore_index)
    g = torch.where(targets != ignore_index, grad.to(torch.float32), torch.zeros_like(grad, dtype=torch.float32))
    coef = _ce_coef(g, lse, label_smoothing, z_loss, V)
    want = [bool(mask[0]), bool(mask[1]), bool(mask[2]) and bias is not None]
    return _grads(hidden, weight, bias, targets, lse, coef, 1.0, softcap, want, chunk_rows)


def linear_logprob(hidden, weight, targets, temperature, want_entropy, chunk_rows):
    _check(hidden, weight, targets, weight.shape[0], None)
    stats = _stats(hidden, weight, None, targets, 1.0 / temperature, 0.0)
    lse = stats[:, 0].contiguous()
    lp = (stats[:, 1] - lse).contiguous()
    ent = (lse - stats[:, 3]).contiguous() if want_entropy else hidden.new_empty(0, dtype=torch.float32)
    return lp, ent, lse


def linear_logprob_backward(grad_logprob, grad_entropy, hidden, weight, targets, lse, entropy, temperature, mask,
                            chunk_rows):
    _check(hidden, weight, targets, weight.shape[0], None)
    g = grad_logprob.to(torch.float32)
    if grad_entropy.numel():
        gh = grad_entropy.to(torch.float32)
        S = lse - entropy
        coef = torch.stack([-g + gh * S, g, torch.zeros_like(g), -gh], 1).contiguous()
    else:
        coef = torch.stack([-g, g, torch.zeros_like(g), torch.zeros_like(g)], 1).contiguous()
    dh, dw, _ = _grads(hidden, weight, None, targets, lse, coef, 1.0 / temperature, 0.0,
                       [bool(mask[0]), bool(mask[1]), False], chunk_rows)
    return dh, dw
