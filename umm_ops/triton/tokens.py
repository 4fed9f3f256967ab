"""Triton kernels of the tokenizer-compression ops (contract: umm_ops/reference/kernels.py, geometry: umm/tokens.h).

Design
------
* compress forward = a small statistics pre-pass (mean / rstd per fine token, two-pass in float32) and one
  gather-GEMM: program (pid_m, pid_n) owns a [BLOCK_M coarse rows, BLOCK_N outputs] tile and walks K = f*f*C in
  BLOCK_K steps; its A tile is loaded straight from x with space-to-depth addressing (unfolded channel
  k = s*C + c of coarse row m is channel c of fine token fine_token(m, s)) and normalised on the fly
  ((x - mean) rstd lnw + lnb, masked lanes forced to 0), so the normalised, unfolded tensor never exists in
  memory.  Epilogue: + bias, the biased pre-activation stored when the backward needs it, GELU, store.
* expand forward = the same kernel with a plain A (y) and a SCATTER epilogue: output column n = s*C + c of
  coarse row m is stored to channel c of fine token fine_token(m, s) (depth-to-space), bias included.
* backward (the mix): dpre = grad * act'(pre) in an elementwise kernel; dA = dpre @ W and dbias = column sums
  are plain torch (a plain GEMM / reduction); dW = dpre^T A by a gather-GEMM that re-gathers and re-normalises
  A tile by tile (A is never materialised, neither saved nor recomputed into memory); dx / dln_weight /
  dln_bias by a row kernel that reads its dA segment through the depth-to-space addressing and writes
  per-program partial column sums (summed by torch in a fixed order: no atomics).
  expand backward: dy = gather-GEMM over space_to_depth(grad) (B operand = W read with the other strides),
  dW = gather-GEMM dW kernel, db = torch sums.  pack / unpack (+ backwards): one elementwise kernel.
* Dots: float32 operands with IEEE products under the interpreter (its bf16 dot is wrong) and for float32
  inputs; otherwise both operands in the 16-bit input dtype with float32 accumulation.
* bfloat16 stores round to nearest even explicitly (flow._cast_out): the interpreter truncates otherwise.

NOTE: only the interpreter path has been run here (no GPU was available when this was written); the GPU tile
sizes / num_warps / num_stages are untested on real hardware.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .flow import _cast_out

_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ACT_CODE = {"none": 0, "gelu": 1, "gelu_tanh": 2}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(x: torch.Tensor, name: str):
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"triton {name}: activations must be float32/bfloat16/float16, got {x.dtype}")


def _act_code(activation: str) -> int:
    if activation not in _ACT_CODE:
        raise ValueError(f"activation must be one of {tuple(_ACT_CODE)}, got {activation!r}")
    return _ACT_CODE[activation]


def _gemm_blocks():
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if _interpreting():
        return 32, 32, 32, 4, 1
    return 128, 128, 32, 8, 3


# ------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _act(v, ACT: tl.constexpr):
    if ACT == 1:
        return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    elif ACT == 2:
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        th = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        return 0.5 * v * (1.0 + th)
    else:
        return v


@triton.jit
def _act_grad(v, ACT: tl.constexpr):
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * v * v)
        return cdf + v * pdf
    elif ACT == 2:
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        th = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        return 0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * v * v)
    else:
        return v * 0.0 + 1.0


@triton.jit
def _row_base(offs_m, H, W, Wc, L, F: tl.constexpr):
    """fine_token(m, s) = row_base(m) + col_off(s): the coarse-row part, n H W + F i W + F j (int64)."""
    n = offs_m // L
    l = offs_m - n * L
    i = l // Wc
    j = l - i * Wc
    return n * H * W + F * i * W + F * j


@triton.jit
def _col_split(offs_k, C, W, F: tl.constexpr):
    """Unfolded channel k = s C + c -> (col_off(s) = di W + dj, c)."""
    s = offs_k // C
    c = offs_k - s * C
    di = s // F
    return di * W + (s - di * F), c


@triton.jit
def _load_a(a_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, offs_m, offs_k, row_base, col_off, c, M, K, C,
            GATHER: tl.constexpr, NORM: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr):
    """A[offs_m, offs_k] in float32: gathered with space-to-depth addressing (GATHER; fine token
    row_base[m] + col_off[k], channel c[k]) and LayerNorm-ed from the per-token statistics (NORM), or a plain
    row-major (M, K) load.  Out-of-range lanes are 0.  The index split is separable, so the integer divisions
    are per row and per column, never per element."""
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    if GATHER:
        t = row_base[:, None] + col_off[None, :]
        a = tl.load(a_ptr + t * C + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if NORM:
            mu = tl.load(mean_ptr + t, mask=mask, other=0.0)
            rs = tl.load(rstd_ptr + t, mask=mask, other=0.0)
            a = (a - mu) * rs
            if HAS_LNW:
                a = a * tl.load(lnw_ptr + c, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
            if HAS_LNB:
                a = a + tl.load(lnb_ptr + c, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
            a = tl.where(mask, a, 0.0)
    else:
        a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    return a


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b)


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _stats_kernel(x_ptr, mean_ptr, rstd_ptr, T, C, eps, ROWS_PER_PROG,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    row0 = pid.to(tl.int64) * ROWS_PER_PROG
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = row0 + r + tl.arange(0, BLOCK_R)
        rm = rows < T
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m2 = rm[:, None] & (cols[None, :] < C)
            acc += tl.sum(tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=m2, other=0.0).to(tl.float32), 1)
        mu = acc / C
        q = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            m2 = rm[:, None] & (cols[None, :] < C)
            d = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=m2, other=0.0).to(tl.float32) - mu[:, None]
            q += tl.sum(tl.where(m2, d * d, 0.0), 1)
        tl.store(mean_ptr + rows, mu, mask=rm)
        tl.store(rstd_ptr + rows, tl.rsqrt(q / C + eps), mask=rm)


@triton.jit
def _gather_gemm_kernel(
    a_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, w_ptr, bias_ptr, out_ptr, pre_ptr,
    M, NOUT, K, C, H, W, Wc, L, stride_wn, stride_wk,
    F: tl.constexpr, GATHER: tl.constexpr, NORM: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, KEEP_PRE: tl.constexpr, SCATTER: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = epilogue(A' @ B), B[k, n] = w[n * stride_wn + k * stride_wk]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = offs_n < NOUT
    row_base = _row_base(offs_m, H, W, Wc, L, F)  # hoisted: depends on the output rows only
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        col_off, c = _col_split(offs_k, C, W, F)
        a = _load_a(a_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, offs_m, offs_k, row_base, col_off, c, M, K, C,
                    GATHER, NORM, HAS_LNW, HAS_LNB)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=(offs_k[:, None] < K) & nm[None, :], other=0.0)
        acc += _dot(a, b, F32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nm, other=0.0).to(tl.float32)[None, :]
    om = (offs_m[:, None] < M) & nm[None, :]
    if KEEP_PRE:
        tl.store(pre_ptr + offs_m[:, None] * NOUT + offs_n[None, :], _cast_out(acc, pre_ptr), mask=om)
    y = _act(acc, ACT)
    if SCATTER:
        col_off, c = _col_split(offs_n, C, W, F)
        t = row_base[:, None] + col_off[None, :]
        tl.store(out_ptr + t * C + c[None, :], _cast_out(y, out_ptr), mask=om)
    else:
        tl.store(out_ptr + offs_m[:, None] * NOUT + offs_n[None, :], _cast_out(y, out_ptr), mask=om)


@triton.jit
def _gather_dw_kernel(
    a_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, d_ptr, out_ptr,
    M, K, O, C, H, W, Wc, L, so_k, so_o,
    F: tl.constexpr, NORM: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """out[k, o] = sum_m A'[m, k] D[m, o] (A' gathered, and normalised when NORM); D (M, O) row-major; out stored
    at k * so_k + o * so_o (fp32 accumulation, one fixed-order pass over m: deterministic)."""
    pid_k = tl.program_id(0)
    pid_o = tl.program_id(1)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_o = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    om = offs_o < O
    col_off, c = _col_split(offs_k, C, W, F)  # hoisted: depends on the output rows (k) only
    acc = tl.zeros([BLOCK_K, BLOCK_O], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_base = _row_base(offs_m, H, W, Wc, L, F)
        a = _load_a(a_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, offs_m, offs_k, row_base, col_off, c, M, K, C,
                    True, NORM, HAS_LNW, HAS_LNB)
        d = tl.load(d_ptr + offs_m[:, None] * O + offs_o[None, :], mask=(offs_m[:, None] < M) & om[None, :],
                    other=0.0)
        acc += _dot(tl.trans(a), d, F32)
    mask = (offs_k[:, None] < K) & om[None, :]
    tl.store(out_ptr + offs_k[:, None] * so_k + offs_o[None, :] * so_o, _cast_out(acc, out_ptr), mask=mask)


@triton.jit
def _act_bwd_kernel(g_ptr, pre_ptr, out_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    p = tl.load(pre_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _cast_out(g * _act_grad(p, ACT), out_ptr), mask=m)


@triton.jit
def _ln_scatter_bwd_kernel(
    da_ptr, x_ptr, lnw_ptr, mean_ptr, rstd_ptr, dx_ptr, plw_ptr, plb_ptr,
    T, C, H, W, Wc, L, ROWS_PER_PROG,
    F: tl.constexpr, HAS_LNW: tl.constexpr, WANT_DX: tl.constexpr, WANT_P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Fine tokens t (row-major over images): dA segment = row m*K + s*C of dA with (m, s) the coarse row and
    segment of t; LayerNorm backward; per-program partial sums of dA*xhat and dA (one row of plw / plb)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    if HAS_LNW:
        lnw = tl.load(lnw_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    else:
        lnw = tl.where(cm, 1.0, 0.0)
    acc_w = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    row0 = pid.to(tl.int64) * ROWS_PER_PROG
    K = F * F * C
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        t = row0 + r + tl.arange(0, BLOCK_R)
        rm = t < T
        m2 = rm[:, None] & cm[None, :]
        hw = H * W
        n = t // hw
        p = t - n * hw
        h = p // W
        w = p - h * W
        m = n * L + (h // F) * Wc + w // F
        s = (h % F) * F + w % F
        dv = tl.load(da_ptr + (m * K + s * C)[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + t[:, None] * C + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + t, mask=rm, other=0.0)
        rs = tl.load(rstd_ptr + t, mask=rm, other=0.0)
        xh = tl.where(m2, (xv - mu[:, None]) * rs[:, None], 0.0)
        if WANT_DX:
            gy = dv * lnw[None, :]
            m1 = tl.sum(gy, axis=1) / C
            mm2 = tl.sum(gy * xh, axis=1) / C
            dx = rs[:, None] * (gy - m1[:, None] - xh * mm2[:, None])
            tl.store(dx_ptr + t[:, None] * C + cols[None, :], _cast_out(dx, dx_ptr), mask=m2)
        if WANT_P:
            acc_w += dv * xh
            acc_b += dv
    if WANT_P:
        tl.store(plw_ptr + pid * C + cols, tl.sum(acc_w, axis=0), mask=cm)
        tl.store(plb_ptr + pid * C + cols, tl.sum(acc_b, axis=0), mask=cm)


@triton.jit
def _latent_kernel(src_ptr, dst_ptr, scale_ptr, shift_ptr, n, C, H, W, Hc, Wc,
                   F: tl.constexpr, TO_TOKENS: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """offs enumerates the token layout (b, l, k), k = c*F*F + di*F + dj; lat is the matching (b, c, h, w)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    K = C * F * F
    b = offs // (Hc * Wc * K)
    r = offs - b * (Hc * Wc * K)
    l = r // K
    k = r - l * K
    i = l // Wc
    j = l - i * Wc
    c = k // (F * F)
    q = k - c * (F * F)
    di = q // F
    dj = q - di * F
    lat = ((b * C + c) * H + F * i + di) * W + F * j + dj
    sc = tl.load(scale_ptr + k, mask=msk, other=0.0)
    if HAS_SHIFT:
        sh = tl.load(shift_ptr + k, mask=msk, other=0.0)
    else:
        sh = sc * 0.0
    if TO_TOKENS:
        v = tl.load(src_ptr + lat, mask=msk, other=0.0).to(tl.float32) * sc + sh
        tl.store(dst_ptr + offs, _cast_out(v, dst_ptr), mask=msk)
    else:
        v = tl.load(src_ptr + offs, mask=msk, other=0.0).to(tl.float32) * sc + sh
        tl.store(dst_ptr + lat, _cast_out(v, dst_ptr), mask=msk)


# ------------------------------------------------------------------------------------------------
# launchers


def _f32(x: torch.Tensor) -> bool:
    return _interpreting() or x.dtype == torch.float32


def _stats(x2: torch.Tensor, eps: float):
    T, C = x2.shape
    mean = torch.empty(T, device=x2.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if T == 0:
        return mean, rstd
    block_c = min(triton.next_power_of_2(max(C, 1)), 1024)
    block_r = max(1, min(triton.next_power_of_2(T), 4096 // block_c))
    nblk = triton.cdiv(T, block_r)
    progs = min(nblk, 4) if _interpreting() else nblk
    rpp = triton.cdiv(nblk, progs) * block_r
    _stats_kernel[(triton.cdiv(T, rpp),)](x2, mean, rstd, T, C, float(eps), rpp, BLOCK_R=block_r, BLOCK_C=block_c)
    return mean, rstd


def _geom(H: int, W: int, f: int):
    Wc = W // f
    return Wc, (H // f) * Wc


def _gemm(a, mean, rstd, lnw, lnb, w, stride_wn, stride_wk, bias, out, pre, M, NOUT, K, C, H, W, f, *,
          gather, norm, act, scatter):
    BM, BN, BK, nw, ns = _gemm_blocks()
    Wc, L = _geom(H, W, f)
    dummy = a
    grid = (triton.cdiv(M, BM), triton.cdiv(NOUT, BN))
    _gather_gemm_kernel[grid](
        a, dummy if mean is None else mean, dummy if rstd is None else rstd,
        dummy if lnw is None else lnw, dummy if lnb is None else lnb, w, dummy if bias is None else bias,
        out, dummy if pre is None else pre, M, NOUT, K, C, H, W, Wc, L, stride_wn, stride_wk,
        F=f, GATHER=gather, NORM=norm, HAS_LNW=lnw is not None, HAS_LNB=lnb is not None,
        HAS_BIAS=bias is not None, ACT=act, KEEP_PRE=pre is not None, SCATTER=scatter, F32=_f32(a),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=nw, num_stages=ns)


def _gather_dw(a, mean, rstd, lnw, lnb, d, out, so_k, so_o, M, K, O, C, H, W, f, *, norm):
    BM, BO, BK, nw, ns = _gemm_blocks()
    Wc, L = _geom(H, W, f)
    dummy = a
    grid = (triton.cdiv(K, BK), triton.cdiv(O, BO))
    _gather_dw_kernel[grid](
        a, dummy if mean is None else mean, dummy if rstd is None else rstd, dummy if lnw is None else lnw,
        dummy if lnb is None else lnb, d, out, M, K, O, C, H, W, Wc, L, so_k, so_o,
        F=f, NORM=norm, HAS_LNW=lnw is not None, HAS_LNB=lnb is not None, F32=_f32(a),
        BLOCK_M=BM, BLOCK_K=BK, BLOCK_O=BO, num_warps=nw, num_stages=ns)


def compress_tokens(x, ln_weight, ln_bias, weight, bias, H, W, factor, activation, eps, save_pre):
    _check(x, "compress_tokens")
    act = _act_code(activation)
    x = x.contiguous()
    N, T, C = x.shape
    f = factor
    K, Co = f * f * C, weight.shape[0]
    M = N * (H // f) * (W // f)
    mean, rstd = _stats(x.reshape(-1, C), eps)
    out = torch.empty(N, (H // f) * (W // f), Co, device=x.device, dtype=x.dtype)
    keep = bool(save_pre) and act != 0
    pre = torch.empty(M, Co, device=x.device, dtype=x.dtype) if keep else x.new_empty(0)
    if M * Co > 0:
        w = weight.contiguous()
        _gemm(x, mean, rstd, ln_weight, ln_bias, w, K, 1, bias, out, pre if keep else None, M, Co, K, C, H, W, f,
              gather=True, norm=True, act=act, scatter=False)
    return out, pre, mean, rstd


def compress_tokens_backward(grad, x, ln_weight, ln_bias, weight, bias, pre, mean, rstd, H, W, factor, activation,
                             eps, mask):
    _check(x, "compress_tokens_backward")
    act = _act_code(activation)
    x, grad, weight = x.contiguous(), grad.contiguous(), weight.contiguous()
    N, T, C = x.shape
    f = factor
    K, Co = f * f * C, weight.shape[0]
    M = N * (H // f) * (W // f)
    g2 = grad.reshape(M, Co)
    if act != 0:
        if pre.numel() == 0:  # the forward kept nothing: recompute the biased pre-activation
            pre = torch.empty(M, Co, device=x.device, dtype=x.dtype)
            if M * Co > 0:
                _gemm(x, mean, rstd, ln_weight, ln_bias, weight, K, 1, bias, pre, None, M, Co, K, C, H, W, f,
                      gather=True, norm=True, act=0, scatter=False)
        dpre = torch.empty_like(g2)
        n = g2.numel()
        if n:
            blk = 1024
            _act_bwd_kernel[(triton.cdiv(n, blk),)](g2, pre, dpre, n, ACT=act, BLOCK=blk)
    else:
        dpre = g2
    want_dx, want_lw = bool(mask[0]), bool(mask[1]) and ln_weight is not None
    want_lb, want_w, want_b = bool(mask[2]) and ln_bias is not None, bool(mask[3]), bool(mask[4]) and bias is not None
    dx = torch.empty_like(x) if want_dx else x.new_empty(0)
    dlw, dlb, dw = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    db = dpre.float().sum(0).to(x.dtype) if want_b else x.new_empty(0)
    if want_w:
        dw = torch.empty(Co, K, device=x.device, dtype=x.dtype)
        if M == 0:
            dw.zero_()
        elif Co * K > 0:
            _gather_dw(x, mean, rstd, ln_weight, ln_bias, dpre, dw, 1, K, M, K, Co, C, H, W, f, norm=True)
    if want_dx or want_lw or want_lb:
        da = dpre @ weight  # (M, K): a plain GEMM
        rows = N * T
        block_c = triton.next_power_of_2(max(C, 1))
        block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), (1 << 14 if _interpreting() else 4096) // block_c))
        nblk = triton.cdiv(max(rows, 1), block_r)
        progs = min(nblk, 4 if _interpreting() else 1024)
        rpp = triton.cdiv(nblk, progs) * block_r
        progs = triton.cdiv(max(rows, 1), rpp)
        want_p = want_lw or want_lb
        plw = torch.zeros(progs, C, device=x.device, dtype=torch.float32)
        plb = torch.zeros_like(plw)
        Wc, L = _geom(H, W, f)
        if rows and C:
            _ln_scatter_bwd_kernel[(progs,)](
                da, x, ln_weight if ln_weight is not None else x, mean, rstd, dx if want_dx else x, plw, plb,
                rows, C, H, W, Wc, L, rpp, F=f, HAS_LNW=ln_weight is not None, WANT_DX=want_dx, WANT_P=want_p,
                BLOCK_R=block_r, BLOCK_C=block_c)
        if want_lw:
            dlw = plw.sum(0).to(x.dtype)
        if want_lb:
            dlb = plb.sum(0).to(x.dtype)
    return dx, dlw, dlb, dw, db


def expand_tokens(y, weight, bias, H, W, factor):
    _check(y, "expand_tokens")
    y, weight = y.contiguous(), weight.contiguous()
    N, L, Ci = y.shape
    f = factor
    K = weight.shape[0]
    C = K // (f * f)
    M = N * L
    out = torch.empty(N, H * W, C, device=y.device, dtype=y.dtype)
    if M * K > 0:
        _gemm(y, None, None, None, None, weight, Ci, 1, bias, out, None, M, K, Ci, C, H, W, f,
              gather=False, norm=False, act=0, scatter=True)
    return out


def expand_tokens_backward(grad, y, weight, H, W, factor, mask):
    _check(y, "expand_tokens_backward")
    grad, y, weight = grad.contiguous(), y.contiguous(), weight.contiguous()
    N, L, Ci = y.shape
    f = factor
    K = weight.shape[0]
    C = K // (f * f)
    M = N * L
    dy = torch.empty_like(y) if mask[0] else y.new_empty(0)
    dw = torch.empty_like(weight) if mask[1] else y.new_empty(0)
    if mask[0] and M * Ci > 0:
        # dy = space_to_depth(grad) @ weight: gather-GEMM, B[k, n] = weight[k, n]
        _gemm(grad, None, None, None, None, weight, 1, Ci, None, dy, None, M, Ci, K, C, H, W, f,
              gather=True, norm=False, act=0, scatter=False)
    if mask[1] and K * Ci > 0:
        if M == 0:
            dw.zero_()
        else:  # dW[k, o] = sum_m space_to_depth(grad)[m, k] y[m, o]
            _gather_dw(grad, None, None, None, None, y, dw, Ci, 1, M, K, Ci, C, H, W, f, norm=False)
    db = (grad.float().reshape(N, H // f, f, W // f, f, C).sum((0, 1, 3)).reshape(K).to(y.dtype) if mask[2]
          else y.new_empty(0))
    return dy, dw, db


def _latent(src, dst, scale, shift, C, H, W, f, to_tokens):
    n = dst.numel()
    if n == 0:
        return dst
    blk = 1024
    _latent_kernel[(triton.cdiv(n, blk),)](src, dst, scale.contiguous(), scale if shift is None else shift.contiguous(),
                                            n, C, H, W, H // f, W // f, F=f, TO_TOKENS=to_tokens,
                                            HAS_SHIFT=shift is not None, BLOCK=blk)
    return dst


def pack_latents(z, running_mean, running_var, factor, eps):
    _check(z, "pack_latents")
    z = z.contiguous()
    B, C, H, W = z.shape
    f = factor
    rstd = torch.rsqrt(running_var.float() + eps)
    out = torch.empty(B, (H // f) * (W // f), C * f * f, device=z.device, dtype=z.dtype)
    return _latent(z, out, rstd, -running_mean.float() * rstd, C, H, W, f, True)


def pack_latents_backward(grad, running_var, H, W, factor, eps):
    _check(grad, "pack_latents_backward")
    grad = grad.contiguous()
    B, _, K = grad.shape
    f = factor
    C = K // (f * f)
    out = torch.empty(B, C, H, W, device=grad.device, dtype=grad.dtype)
    return _latent(grad, out, torch.rsqrt(running_var.float() + eps), None, C, H, W, f, False)


def unpack_latents(tokens, running_mean, running_var, H, W, factor, eps):
    _check(tokens, "unpack_latents")
    tokens = tokens.contiguous()
    B, _, K = tokens.shape
    f = factor
    C = K // (f * f)
    out = torch.empty(B, C, H, W, device=tokens.device, dtype=tokens.dtype)
    return _latent(tokens, out, torch.sqrt(running_var.float() + eps), running_mean.float(), C, H, W, f, False)


def unpack_latents_backward(grad, running_var, factor, eps):
    _check(grad, "unpack_latents_backward")
    grad = grad.contiguous()
    B, C, H, W = grad.shape
    f = factor
    out = torch.empty(B, (H // f) * (W // f), C * f * f, device=grad.device, dtype=grad.dtype)
    return _latent(grad, out, torch.sqrt(running_var.float() + eps), None, C, H, W, f, True)
