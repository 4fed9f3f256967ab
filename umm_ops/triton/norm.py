"""Triton kernels for the row-wise ops: gated_detail_residual, adaln_modulate, gated_residual (+ backwards).

Design
------
* Row kernels over the channel dim C: a program works on 2-D tiles of [BLOCK_R rows, BLOCK_C channels]
  with BLOCK_C = next_power_of_2(C) (a whole row per tile, so the LayerNorm / RMSNorm statistics are
  single-pass-in-registers, two-pass-numerically: mean first, then the centred sum of squares).
  BLOCK_R is chosen so a tile holds a few thousand elements; num_warps scales with the tile size.
* Loads are converted to float32, all arithmetic is float32, stores are in the activation dtype.
  Statistics (gate, mean, rstd) are float32.  No tl.dot: the gate of gated_detail_residual is a
  row-wise tl.sum of elementwise products.
* (B, C) modulation tensors (shift / scale / gate) need unit column stride only; their row stride is
  passed to the kernels.  Forward kernels flatten (B, L) into rows and gather the modulation row b = row // L.
* Backward kernels never use float atomics: each program covers a fixed block of rows (within one sample
  b for the adaLN / gated-residual ops, grid (B, P)) and writes float32 partial column sums to a
  workspace; the launcher finishes with torch .sum over the program axis (fixed order, deterministic).
  The split depends only on the shape.
* Under the Triton interpreter (TRITON_INTERPRET=1) the grids are kept tiny (a few programs that loop
  over their rows) because each program instance costs milliseconds there.
* bfloat16 stores round to nearest even explicitly (flow._cast_out): the interpreter truncates otherwise.
* Masked-out gradients are empty (0,) tensors and are not computed (constexpr flags).

NOTE: only the interpreter path has been run here (no GPU was available when this was written); the
GPU launch configuration (tile sizes, num_warps, grid split) is untested on real hardware.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .flow import _cast_out

_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# launch configuration


def _tile(rows: int, widest: int, bwd: bool):
    """(BLOCK_R, num_warps) for row tiles of `widest` (a power of 2) channels."""
    if _interpreting():
        target = 1 << 14
    else:
        target = 2048 if bwd else 4096
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), target // widest))
    elems = block_r * widest
    num_warps = min(16, max(1, elems // 512))
    return block_r, num_warps


def _split(rows: int, block_r: int, max_programs: int):
    """(rows_per_program, programs): a multiple of block_r rows per program, at most max_programs."""
    nblk = triton.cdiv(max(rows, 1), block_r)
    p = max(1, min(nblk, max_programs))
    rpp = triton.cdiv(nblk, p) * block_r
    return rpp, triton.cdiv(max(rows, 1), rpp)


def _fwd_programs(rows: int, block_r: int):
    if _interpreting():
        return _split(rows, block_r, 4)
    return block_r, triton.cdiv(rows, block_r)


def _bwd_max_programs(groups: int) -> int:
    """Programs per group (sample) for the reductions: the total stays ~1024 on a GPU, ~4 interpreted."""
    if _interpreting():
        return max(1, 4 // max(groups, 1))
    return max(1, 1024 // max(groups, 1))


def _check_act(x: torch.Tensor, name: str):
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"triton {name}: activations must be float32/bfloat16/float16, got {x.dtype}")


def _rowmajor(m: torch.Tensor) -> torch.Tensor:
    """A (B, C) modulation tensor with unit column stride (any row stride); copies only if needed."""
    if m.dim() != 2:
        raise ValueError(f"modulation tensors must be (B, C), got shape {tuple(m.shape)}")
    if m.shape[1] > 1 and m.stride(1) != 1:
        m = m.contiguous()
    return m


def _row_stride(m: torch.Tensor) -> int:
    return m.stride(0) if m.shape[0] > 1 else m.shape[1]


# ------------------------------------------------------------------------------------------------
# gated detail residual


@triton.jit
def _gdr_fwd_kernel(
    low_ptr, high_ptr, gh_ptr, wg_ptr, bg_ptr, lnw_ptr, lnb_ptr,
    out_ptr, gate_ptr, mean_ptr, rstd_ptr,
    N, C, Dg, eps, ROWS_PER_PROG,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    dcols = tl.arange(0, BLOCK_D)
    dm = dcols < Dg
    wg = tl.load(wg_ptr + dcols, mask=dm, other=0.0).to(tl.float32)
    bg = tl.load(bg_ptr).to(tl.float32)
    lnw = tl.load(lnw_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    row0 = pid.to(tl.int64) * ROWS_PER_PROG
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = row0 + r + tl.arange(0, BLOCK_R)
        rm = rows < N
        gm = rm[:, None] & dm[None, :]
        gh = tl.load(gh_ptr + rows[:, None] * Dg + dcols[None, :], mask=gm, other=0.0).to(tl.float32)
        g = tl.sum(gh * wg[None, :], axis=1) + bg
        m2 = rm[:, None] & cm[None, :]
        offs = rows[:, None] * C + cols[None, :]
        lo = tl.load(low_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        hi = tl.load(high_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        u = lo + g[:, None] * hi
        mu = tl.sum(u, axis=1) / C
        d = tl.where(m2, u - mu[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / C
        rs = tl.rsqrt(var + eps)
        y = d * rs[:, None] * lnw[None, :] + lnb[None, :]
        tl.store(out_ptr + offs, _cast_out(y, out_ptr), mask=m2)
        tl.store(gate_ptr + rows, g, mask=rm)
        tl.store(mean_ptr + rows, mu, mask=rm)
        tl.store(rstd_ptr + rows, rs, mask=rm)


@triton.jit
def _gdr_bwd_kernel(
    dy_ptr, low_ptr, high_ptr, gh_ptr, wg_ptr, lnw_ptr, gate_ptr, mean_ptr, rstd_ptr,
    dlow_ptr, dhigh_ptr, dgh_ptr, pdw_ptr, pdb_ptr, pdlnw_ptr, pdlnb_ptr,
    N, C, Dg, ROWS_PER_PROG,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    dcols = tl.arange(0, BLOCK_D)
    dm = dcols < Dg
    wg = tl.load(wg_ptr + dcols, mask=dm, other=0.0).to(tl.float32)
    lnw = tl.load(lnw_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_lnw = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_lnb = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    row0 = pid.to(tl.int64) * ROWS_PER_PROG
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = row0 + r + tl.arange(0, BLOCK_R)
        rm = rows < N
        m2 = rm[:, None] & cm[None, :]
        offs = rows[:, None] * C + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        lo = tl.load(low_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        hi = tl.load(high_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + rows, mask=rm, other=0.0)
        mu = tl.load(mean_ptr + rows, mask=rm, other=0.0)
        rs = tl.load(rstd_ptr + rows, mask=rm, other=0.0)
        uh = tl.where(m2, (lo + g[:, None] * hi - mu[:, None]) * rs[:, None], 0.0)
        dyw = dy * lnw[None, :]
        c1 = tl.sum(dyw * uh, axis=1) / C
        c2 = tl.sum(dyw, axis=1) / C
        du = tl.where(m2, rs[:, None] * (dyw - c2[:, None] - uh * c1[:, None]), 0.0)
        tl.store(dlow_ptr + offs, _cast_out(du, dlow_ptr), mask=m2)
        tl.store(dhigh_ptr + offs, _cast_out(g[:, None] * du, dhigh_ptr), mask=m2)
        dg = tl.sum(du * hi, axis=1)
        gm = rm[:, None] & dm[None, :]
        goffs = rows[:, None] * Dg + dcols[None, :]
        gh = tl.load(gh_ptr + goffs, mask=gm, other=0.0).to(tl.float32)
        tl.store(dgh_ptr + goffs, _cast_out(dg[:, None] * wg[None, :], dgh_ptr), mask=gm)
        acc_dw += dg[:, None] * gh
        acc_db += dg
        acc_lnw += dy * uh
        acc_lnb += dy
    tl.store(pdw_ptr + pid * Dg + dcols, tl.sum(acc_dw, axis=0), mask=dm)
    tl.store(pdb_ptr + pid, tl.sum(acc_db, axis=0))
    tl.store(pdlnw_ptr + pid * C + cols, tl.sum(acc_lnw, axis=0), mask=cm)
    tl.store(pdlnb_ptr + pid * C + cols, tl.sum(acc_lnb, axis=0), mask=cm)


def _gdr_blocks(C: int, Dg: int):
    return triton.next_power_of_2(max(C, 1)), triton.next_power_of_2(max(Dg, 1))


def gated_detail_residual(low, high, gate_hidden, w_gate, b_gate, ln_weight, ln_bias, eps):
    _check_act(low, "gated_detail_residual")
    low, high, gate_hidden = low.contiguous(), high.contiguous(), gate_hidden.contiguous()
    w_gate, b_gate = w_gate.contiguous(), b_gate.contiguous()
    ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    N, C = low.shape
    Dg = gate_hidden.shape[1]
    out = torch.empty_like(low)
    f32 = dict(dtype=torch.float32, device=low.device)
    gate, mean, rstd = torch.empty(N, **f32), torch.empty(N, **f32), torch.empty(N, **f32)
    if N == 0:
        return out, gate, mean, rstd
    block_c, block_d = _gdr_blocks(C, Dg)
    block_r, nw = _tile(N, max(block_c, block_d), bwd=False)
    rpp, P = _fwd_programs(N, block_r)
    _gdr_fwd_kernel[(P,)](
        low, high, gate_hidden, w_gate, b_gate, ln_weight, ln_bias, out, gate, mean, rstd,
        N, C, Dg, float(eps), rpp,
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=nw,
    )
    return out, gate, mean, rstd


def gated_detail_residual_backward(grad, low, high, gate_hidden, w_gate, ln_weight, gate, mean, rstd, eps):
    """Uses the saved float32 gate / mean / rstd; eps is not needed (kept for the contract)."""
    _check_act(low, "gated_detail_residual_backward")
    grad, low, high, gate_hidden = grad.contiguous(), low.contiguous(), high.contiguous(), gate_hidden.contiguous()
    w_gate, ln_weight = w_gate.contiguous(), ln_weight.contiguous()
    gate, mean, rstd = (a.to(torch.float32).contiguous() for a in (gate, mean, rstd))
    N, C = low.shape
    Dg = gate_hidden.shape[1]
    dt = low.dtype
    dlow = torch.empty_like(low, dtype=dt)
    dhigh = torch.empty_like(high, dtype=dt)
    dgh = torch.empty_like(gate_hidden, dtype=dt)
    if N == 0:
        z = dict(dtype=dt, device=low.device)
        return (dlow, dhigh, dgh, torch.zeros(w_gate.shape, **z), torch.zeros(1, **z),
                torch.zeros(ln_weight.shape, **z), torch.zeros(ln_weight.shape, **z))
    block_c, block_d = _gdr_blocks(C, Dg)
    block_r, nw = _tile(N, max(block_c, block_d), bwd=True)
    rpp, P = _split(N, block_r, _bwd_max_programs(1))
    f32 = dict(dtype=torch.float32, device=low.device)
    pdw, pdb = torch.empty(P, Dg, **f32), torch.empty(P, **f32)
    pdlnw, pdlnb = torch.empty(P, C, **f32), torch.empty(P, C, **f32)
    _gdr_bwd_kernel[(P,)](
        grad, low, high, gate_hidden, w_gate, ln_weight, gate, mean, rstd,
        dlow, dhigh, dgh, pdw, pdb, pdlnw, pdlnb,
        N, C, Dg, rpp,
        BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=nw,
    )
    dw = pdw.sum(0).to(dt).reshape(w_gate.shape)
    db = pdb.sum(0, keepdim=True).to(dt)
    dlnw = pdlnw.sum(0).to(dt).reshape(ln_weight.shape)
    dlnb = pdlnb.sum(0).to(dt).reshape(ln_weight.shape)
    return dlow, dhigh, dgh, dw, db, dlnw, dlnb


# ------------------------------------------------------------------------------------------------
# adaLN modulation


@triton.jit
def _adaln_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, w_ptr, b_ptr, out_ptr, mean_ptr, rstd_ptr,
    R, L, C, shift_stride, scale_stride, eps, ROWS_PER_PROG,
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    if HAS_B:
        bias = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    row0 = pid.to(tl.int64) * ROWS_PER_PROG
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = row0 + r + tl.arange(0, BLOCK_R)
        rm = rows < R
        m2 = rm[:, None] & cm[None, :]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        if RMS:
            ms = tl.sum(x * x, axis=1) / C
            rs = tl.rsqrt(ms + eps)
            n = x * rs[:, None]
        else:
            mu = tl.sum(x, axis=1) / C
            d = tl.where(m2, x - mu[:, None], 0.0)
            var = tl.sum(d * d, axis=1) / C
            rs = tl.rsqrt(var + eps)
            n = d * rs[:, None]
            tl.store(mean_ptr + rows, mu, mask=rm)
        tl.store(rstd_ptr + rows, rs, mask=rm)
        if HAS_W:
            n = n * w[None, :]
        if HAS_B:
            n = n + bias[None, :]
        bidx = rows // L
        sc = tl.load(scale_ptr + bidx[:, None] * scale_stride + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + bidx[:, None] * shift_stride + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        y = n * (1.0 + sc) + sh
        tl.store(out_ptr + offs, _cast_out(y, out_ptr), mask=m2)


@triton.jit
def _adaln_bwd_kernel(
    dy_ptr, x_ptr, scale_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
    dx_ptr, pdshift_ptr, pdscale_ptr, pdw_ptr, pdb_ptr,
    L, C, scale_stride, ROWS_PER_PROG, P,
    RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DSHIFT: tl.constexpr, WANT_DSCALE: tl.constexpr,
    WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    p = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    sc1 = 1.0 + tl.load(scale_ptr + b.to(tl.int64) * scale_stride + cols, mask=cm, other=0.0).to(tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    if HAS_B:
        bias = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    acc_sh = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_sc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    l0 = p.to(tl.int64) * ROWS_PER_PROG
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        ls = l0 + r + tl.arange(0, BLOCK_R)
        lm = ls < L
        rows = b.to(tl.int64) * L + ls
        m2 = lm[:, None] & cm[None, :]
        offs = rows[:, None] * C + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        rs = tl.load(rstd_ptr + rows, mask=lm, other=0.0)
        if RMS:
            xh = x * rs[:, None]
        else:
            mu = tl.load(mean_ptr + rows, mask=lm, other=0.0)
            xh = tl.where(m2, (x - mu[:, None]) * rs[:, None], 0.0)
        dn = dy * sc1[None, :]
        if WANT_DX:
            if HAS_W:
                dnw = dn * w[None, :]
            else:
                dnw = dn
            c1 = tl.sum(dnw * xh, axis=1) / C
            if RMS:
                dx = rs[:, None] * (dnw - xh * c1[:, None])
            else:
                c2 = tl.sum(dnw, axis=1) / C
                dx = rs[:, None] * (dnw - c2[:, None] - xh * c1[:, None])
            tl.store(dx_ptr + offs, _cast_out(dx, dx_ptr), mask=m2)
        if WANT_DSHIFT:
            acc_sh += dy
        if WANT_DSCALE:
            n = xh
            if HAS_W:
                n = n * w[None, :]
            if HAS_B:
                n = n + bias[None, :]
            acc_sc += dy * n
        if WANT_DW:
            acc_w += dn * xh
        if WANT_DB:
            acc_b += dn
    base = (b.to(tl.int64) * P + p) * C
    if WANT_DSHIFT:
        tl.store(pdshift_ptr + base + cols, tl.sum(acc_sh, axis=0), mask=cm)
    if WANT_DSCALE:
        tl.store(pdscale_ptr + base + cols, tl.sum(acc_sc, axis=0), mask=cm)
    if WANT_DW:
        tl.store(pdw_ptr + base + cols, tl.sum(acc_w, axis=0), mask=cm)
    if WANT_DB:
        tl.store(pdb_ptr + base + cols, tl.sum(acc_b, axis=0), mask=cm)


def adaln_modulate(x, shift, scale, weight, bias, eps, rms):
    _check_act(x, "adaln_modulate")
    x = x.contiguous()
    shift, scale = _rowmajor(shift), _rowmajor(scale)
    B, L, C = x.shape
    R = B * L
    rms = bool(rms)
    out = torch.empty_like(x)
    f32 = dict(dtype=torch.float32, device=x.device)
    mean = torch.empty(0 if rms else R, **f32)
    rstd = torch.empty(R, **f32)
    if R == 0:
        return out, mean, rstd
    has_w, has_b = weight is not None, bias is not None
    w = weight.contiguous() if has_w else x
    bb = bias.contiguous() if has_b else x
    block_c = triton.next_power_of_2(max(C, 1))
    block_r, nw = _tile(R, block_c, bwd=False)
    rpp, P = _fwd_programs(R, block_r)
    _adaln_fwd_kernel[(P,)](
        x, shift, scale, w, bb, out, rstd if rms else mean, rstd,
        R, L, C, _row_stride(shift), _row_stride(scale), float(eps), rpp,
        RMS=rms, HAS_W=has_w, HAS_B=has_b, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=nw,
    )
    return out, mean, rstd


def adaln_modulate_backward(grad, x, scale, weight, bias, mean, rstd, eps, rms, mask):
    """Uses the saved float32 mean / rstd (eps is not needed; kept for the contract).  `bias` enters
    dscale (n includes it, for RMSNorm too, as in the reference)."""
    _check_act(x, "adaln_modulate_backward")
    grad, x = grad.contiguous(), x.contiguous()
    scale = _rowmajor(scale)
    rms = bool(rms)
    B, L, C = x.shape
    dt = x.dtype
    has_w, has_b = weight is not None, bias is not None
    want = [bool(mask[0]), bool(mask[1]), bool(mask[2]), bool(mask[3]) and has_w, bool(mask[4]) and has_b]
    z = dict(dtype=dt, device=x.device)
    dx = torch.empty_like(x) if want[0] else x.new_empty(0)
    R = B * L
    if R == 0 or not any(want):
        return (
            dx,
            torch.zeros(B, C, **z) if want[1] else x.new_empty(0),
            torch.zeros(B, C, **z) if want[2] else x.new_empty(0),
            torch.zeros(weight.shape, **z) if want[3] else x.new_empty(0),
            torch.zeros(bias.shape, **z) if want[4] else x.new_empty(0),
        )
    rstd = rstd.to(torch.float32).contiguous()
    mean = rstd if rms else mean.to(torch.float32).contiguous()
    w = weight.contiguous() if has_w else x
    bb = bias.contiguous() if has_b else x
    block_c = triton.next_power_of_2(max(C, 1))
    block_r, nw = _tile(L, block_c, bwd=True)
    rpp, P = _split(L, block_r, _bwd_max_programs(B))
    f32 = dict(dtype=torch.float32, device=x.device)
    parts = [torch.empty(B, P, C, **f32) if want[i] else rstd for i in range(1, 5)]
    _adaln_bwd_kernel[(B, P)](
        grad, x, scale, w, bb, mean, rstd,
        dx if want[0] else x, *parts,
        L, C, _row_stride(scale), rpp, P,
        RMS=rms, HAS_W=has_w, HAS_B=has_b,
        WANT_DX=want[0], WANT_DSHIFT=want[1], WANT_DSCALE=want[2], WANT_DW=want[3], WANT_DB=want[4],
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=nw,
    )
    return (
        dx,
        parts[0].sum(1).to(dt) if want[1] else x.new_empty(0),
        parts[1].sum(1).to(dt) if want[2] else x.new_empty(0),
        parts[2].sum((0, 1)).to(dt).reshape(weight.shape) if want[3] else x.new_empty(0),
        parts[3].sum((0, 1)).to(dt).reshape(bias.shape) if want[4] else x.new_empty(0),
    )


# ------------------------------------------------------------------------------------------------
# gated residual


@triton.jit
def _gres_fwd_kernel(
    x_ptr, gate_ptr, y_ptr, out_ptr,
    R, L, C, gate_stride, ROWS_PER_PROG,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    row0 = pid.to(tl.int64) * ROWS_PER_PROG
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        rows = row0 + r + tl.arange(0, BLOCK_R)
        rm = rows < R
        m2 = rm[:, None] & cm[None, :]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        bidx = rows // L
        g = tl.load(gate_ptr + bidx[:, None] * gate_stride + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, _cast_out(x + g * y, out_ptr), mask=m2)


@triton.jit
def _gres_bwd_kernel(
    dout_ptr, gate_ptr, y_ptr, dy_ptr, pdg_ptr,
    L, C, gate_stride, ROWS_PER_PROG, P,
    WANT_DGATE: tl.constexpr, WANT_DY: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    p = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < C
    if WANT_DY:
        g = tl.load(gate_ptr + b.to(tl.int64) * gate_stride + cols, mask=cm, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    l0 = p.to(tl.int64) * ROWS_PER_PROG
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        ls = l0 + r + tl.arange(0, BLOCK_R)
        lm = ls < L
        rows = b.to(tl.int64) * L + ls
        m2 = lm[:, None] & cm[None, :]
        offs = rows[:, None] * C + cols[None, :]
        do = tl.load(dout_ptr + offs, mask=m2, other=0.0).to(tl.float32)
        if WANT_DY:
            tl.store(dy_ptr + offs, _cast_out(do * g[None, :], dy_ptr), mask=m2)
        if WANT_DGATE:
            y = tl.load(y_ptr + offs, mask=m2, other=0.0).to(tl.float32)
            acc += do * y
    if WANT_DGATE:
        tl.store(pdg_ptr + (b.to(tl.int64) * P + p) * C + cols, tl.sum(acc, axis=0), mask=cm)


def gated_residual(x, gate, y):
    _check_act(x, "gated_residual")
    x, y = x.contiguous(), y.contiguous()
    gate = _rowmajor(gate)
    B, L, C = x.shape
    R = B * L
    out = torch.empty_like(x)
    if R == 0:
        return out
    block_c = triton.next_power_of_2(max(C, 1))
    block_r, nw = _tile(R, block_c, bwd=False)
    rpp, P = _fwd_programs(R, block_r)
    _gres_fwd_kernel[(P,)](
        x, gate, y, out, R, L, C, _row_stride(gate), rpp,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=nw,
    )
    return out


def gated_residual_backward(grad, gate, y, mask):
    _check_act(grad, "gated_residual_backward")
    grad, y = grad.contiguous(), y.contiguous()
    gate = _rowmajor(gate)
    want_dg, want_dy = bool(mask[0]), bool(mask[1])
    B, L, C = grad.shape
    dy = torch.empty_like(y) if want_dy else grad.new_empty(0)
    if not (want_dg or want_dy):
        return grad.new_empty(0), dy
    if B * L == 0:
        dg = torch.zeros(B, C, dtype=gate.dtype, device=grad.device) if want_dg else grad.new_empty(0)
        return dg, dy
    block_c = triton.next_power_of_2(max(C, 1))
    block_r, nw = _tile(L, block_c, bwd=True)
    rpp, P = _split(L, block_r, _bwd_max_programs(B))
    pdg = torch.empty(B, P, C, dtype=torch.float32, device=grad.device) if want_dg else grad
    _gres_bwd_kernel[(B, P)](
        grad, gate, y, dy if want_dy else grad, pdg,
        L, C, _row_stride(gate), rpp, P,
        WANT_DGATE=want_dg, WANT_DY=want_dy, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=nw,
    )
    dg = pdg.sum(1).to(gate.dtype) if want_dg else grad.new_empty(0)
    return dg, dy
