"""Triton kernels for span attention (docs/span-attention-contract.md): span_attention_fwd / span_attention_bwd.

Design (FlashAttention-2 style, varlen, packed documents)
---------------------------------------------------------
* Forward: grid (query block, query head).  A query block is at most BLOCK_M consecutive queries of ONE
  document (blocks are aligned to each document's first query).  The program walks the key blocks of BLOCK_N
  keys of its document only (aligned to the document's first key), from the document's first key up to the
  last key any of its queries can see (``p + 1`` for a causal last query, the end of its segment otherwise),
  with an online softmax in float32 (running max / sum per row).  ``lse`` is the natural-log log-sum-exp.
* Tile classification from the segment table (O(1) scalar loads per tile, never per element):
    - EMPTY   all keys of the tile lie before the first query's segment and are noise: skipped entirely.
    - FULL    (a) all keys lie before the first query's segment and none is noise (every query of the block
              sees them: earlier non-noise keys of its document), or (b) queries and keys all lie in one
              segment that is full/noise, or causal with every key <= the first query: no per-element mask.
    - PARTIAL otherwise: per-element mask
              ``(seg(k) == seg(q) and (mode(q) != causal or k <= p)) or (k < start(seg(q)) and mode(k) != noise)``.
  The same-document condition holds by construction (keys of the query block's document only).  Bounds masks
  (rows past the block, keys past the block's last visible key) are applied on every tile (a few vector ops).
* Per-token metadata (precomputed by the launcher with torch ops, no Python loop over tokens): the segment id
  and mode of every key, a prefix count of noise keys, the key position p of every query.  This is O(L) int32
  memory per call, acceptable for this first version; the per-query segment start / mode are gathered from
  the segment table inside the kernels.  The block lists (query blocks, key blocks: document, first, end) are
  built with torch ops and sized by a host bound (total // BLOCK + #documents) so no device->host sync is
  needed; padding entries are empty ranges and do nothing.
* Backward (FlashAttention-2 formulas, P recomputed from lse):
    - Delta = rowsum(dout * out) in float32 (torch, in the launcher).
    - dk/dv kernel: grid (key block, kv head).  The keys of a block are seen by one contiguous range of query
      positions (from the first key when its segment is causal, else from its segment start; up to the
      document's end unless every key of the block is noise, then up to the end of the last segment).  The
      program loops over the query heads of its GQA group and over that query range in chunks of BLOCK_M,
      classifying each tile as above: dv += P^T dout, dk += dS^T q.  No atomics: deterministic.
    - dq kernel: grid (query block, query head), the same key walk as the forward: dq += dS k.
* A query with no allowed key (impossible for a valid layout) gets out 0, lse -inf and zero gradients; the
  running max is made finite before every exp, so no NaN appears.
* Non-finite inputs (the contract's rule): the forward flags a row that meets a NaN / Inf score or a visible key
  whose v holds a NaN / Inf, computes the rest with those values replaced, and writes the flagged row as NaN
  (out and lse).  The backward then propagates NaN from lse; it does not sanitise k / v, so a non-finite key may
  also leave NaN in the gradients of rows sharing its tile.
* Dots: under the interpreter (bf16 tl.dot is wrong there) and for float32 inputs, operands are float32 and
  the products use input_precision="ieee" (no TF32).  On a GPU with 16-bit inputs the products run in the
  input dtype with float32 accumulation (P and dS rounded to the input dtype, as FlashAttention does).
* Head dim: padded to the next power of two >= 16 with masks (any Dh works).  GQA: kv head = h // (Hq // Hkv).
* bfloat16 stores round to nearest even (flow._cast_out): the interpreter truncates otherwise.

NOTE: only the interpreter path has been run here (no GPU was available when this was written).  The three
kernels were compiled down to cubin for sm_80 and sm_90 (triton.compile with a GPUTarget, no device) for
float32 and bfloat16 and head dims 8..256, which checks that they lower; the GPU launch configuration
(BLOCK_M / BLOCK_N / num_warps) has not been run or timed on real hardware.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .flow import _cast_out

__all__ = ["span_attention_fwd", "span_attention_bwd"]

CAUSAL, FULL, NOISE = 0, 1, 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """a @ b accumulated in float32.  F32: both operands in float32, IEEE products; else a is cast to b's
    (16-bit) dtype."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b)


@triton.jit
def _block_info(q_pos, tok_seg, seg_start, seg_mode, q0, q1):
    """Scalars of the query range [q0, q1) (non-empty, or clamped to query 0 when empty): first key position
    p0, first / last segment, start and mode of the first segment, last position p1 and mode of its segment."""
    qa = q0
    qb = tl.maximum(q1 - 1, q0)
    p0 = tl.load(q_pos + qa)
    p1 = tl.load(q_pos + qb)
    sq0 = tl.load(tok_seg + p0)
    sq1 = tl.load(tok_seg + p1)
    st0 = tl.load(seg_start + sq0)
    mq0 = tl.load(seg_mode + sq0)
    mq1 = tl.load(seg_mode + sq1)
    return p0, p1, sq0, sq1, st0, mq0, mq1


@triton.jit
def _classify(p0, sq0, sq1, st0, mq0, k0, k1, tok_seg, noise_cum):
    """(empty, full) of the tile (queries with first position p0 / segments sq0..sq1, keys [k0, k1))."""
    sk0 = tl.load(tok_seg + k0)
    sk1 = tl.load(tok_seg + k1 - 1)
    nno = tl.load(noise_cum + k1) - tl.load(noise_cum + k0)
    before = k1 <= st0
    empty = before & (nno == k1 - k0)
    full_a = before & (nno == 0)
    full_b = (sk0 == sk1) & (sk0 == sq0) & (sq0 == sq1) & ((mq0 != 0) | (k1 - 1 <= p0))
    return empty, full_a | full_b


@triton.jit
def _elem_mask(qp, qseg, qstart, qmode, offs_n, kseg, kmode):
    own = (kseg[None, :] == qseg[:, None]) & ((qmode[:, None] != 0) | (offs_n[None, :] <= qp[:, None]))
    earlier = (offs_n[None, :] < qstart[:, None]) & (kmode[None, :] != 2)
    return own | earlier


@triton.jit
def _q_block(pid, qb_doc, qb_q0, qb_q1, cu_k, q_pos, tok_seg, seg_start, seg_end, seg_mode):
    """Query range [q0, q1) of block `pid`, the key range [k_lo, k_hi) of its document that it can see, and the
    block scalars the tile classifier needs (p0, sq0, sq1, st0, mq0)."""
    d = tl.load(qb_doc + pid)
    q0 = tl.load(qb_q0 + pid)
    q1 = tl.load(qb_q1 + pid)
    k_lo = tl.load(cu_k + d)
    p0, p1, sq0, sq1, st0, mq0, mq1 = _block_info(q_pos, tok_seg, seg_start, seg_mode, q0, q1)
    k_hi = tl.where(mq1 == 0, p1 + 1, tl.load(seg_end + sq1))
    k_hi = tl.where(q1 > q0, k_hi, k_lo)
    return q0, q1, k_lo, k_hi, p0, sq0, sq1, st0, mq0


@triton.jit
def _q_rows(offs_m, row_ok, q_pos, tok_seg, seg_start, seg_mode):
    """Per-query mask inputs: key position, segment, segment start and mode."""
    qp = tl.load(q_pos + offs_m, mask=row_ok, other=0)
    qseg = tl.load(tok_seg + qp, mask=row_ok, other=-1)
    qstart = tl.load(seg_start + qseg, mask=row_ok, other=0)
    qmode = tl.load(seg_mode + qseg, mask=row_ok, other=0)
    return qp, qseg, qstart, qmode


@triton.jit
def _key_mask(qp, qseg, qstart, qmode, offs_n, col_ok, tok_seg, tok_mode):
    """The per-element mask of a PARTIAL tile."""
    kseg = tl.load(tok_seg + offs_n, mask=col_ok, other=-2)
    kmode = tl.load(tok_mode + offs_n, mask=col_ok, other=2)
    return _elem_mask(qp, qseg, qstart, qmode, offs_n, kseg, kmode)


# ------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    qb_doc, qb_q0, qb_q1, cu_k, q_pos, tok_seg, tok_mode, noise_cum, seg_start, seg_end, seg_mode,
    Lq, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    kh = h // (HQ // HKV)
    q0, q1, k_lo, k_hi, p0, sq0, sq1, st0, mq0 = _q_block(pid, qb_doc, qb_q0, qb_q1, cu_k, q_pos, tok_seg,
                                                            seg_start, seg_end, seg_mode)

    offs_m = q0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q1
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q = tl.load(Q + offs_m.to(tl.int64)[:, None] * (HQ * HEAD_D) + h * HEAD_D + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qp, qseg, qstart, qmode = _q_rows(offs_m, row_ok, q_pos, tok_seg, seg_start, seg_mode)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    bad = tl.zeros([BLOCK_M], dtype=tl.int32)  # 1: the row met a non-finite score or v (its result is NaN)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for kb in range(k_lo, k_hi, BLOCK_N):
        k1 = tl.minimum(kb + BLOCK_N, k_hi)
        empty, full = _classify(p0, sq0, sq1, st0, mq0, kb, k1, tok_seg, noise_cum)
        if not empty:
            offs_n = kb + tl.arange(0, BLOCK_N)
            col_ok = offs_n < k1
            kv_off = offs_n.to(tl.int64)[:, None] * (HKV * HEAD_D) + kh * HEAD_D + offs_d[None, :]
            kv_m = col_ok[:, None] & d_ok[None, :]
            k = tl.load(K + kv_off, mask=kv_m, other=0.0)
            s = _dot(q, tl.trans(k), F32) * scale
            allowed = row_ok[:, None] & col_ok[None, :]
            if not full:
                allowed = allowed & _key_mask(qp, qseg, qstart, qmode, offs_n, col_ok, tok_seg, tok_mode)
            # Non-finite inputs (contract): a visible NaN / Inf score, or a visible key whose v holds one, makes
            # the row NaN; such values are replaced (score -inf, v 0) so that nothing else, in particular no
            # row that cannot see the key (0 * Inf in P V), is touched by them.
            s_fin = (s == s) & (tl.abs(s) != float("inf"))
            v = tl.load(V + kv_off, mask=kv_m, other=0.0)
            v_fin = (v == v) & (tl.abs(v.to(tl.float32)) != float("inf"))
            v_badkey = tl.max(tl.where(v_fin, 0, 1), axis=1)  # (BLOCK_N,)
            hit = (allowed & (~s_fin | (v_badkey[None, :] != 0))).to(tl.int32)
            bad = tl.maximum(bad, tl.max(hit, axis=1))
            v = tl.where(v_fin, v, 0.0)
            s = tl.where(allowed & s_fin, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p, v, F32)
            m_i = m_new

    ok = l_i > 0.0
    out = tl.where(ok[:, None], acc / tl.where(ok, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(ok, m_i + tl.log(tl.where(ok, l_i, 1.0)), float("-inf"))
    out = tl.where(bad[:, None] != 0, float("nan"), out)
    lse = tl.where(bad != 0, float("nan"), lse)
    tl.store(O + offs_m.to(tl.int64)[:, None] * (HQ * HEAD_D) + h * HEAD_D + offs_d[None, :],
             _cast_out(out, O), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + h.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    qb_doc, qb_q0, qb_q1, cu_k, q_pos, tok_seg, tok_mode, noise_cum, seg_start, seg_end, seg_mode,
    Lq, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    kh = h // (HQ // HKV)
    q0, q1, k_lo, k_hi, p0, sq0, sq1, st0, mq0 = _q_block(pid, qb_doc, qb_q0, qb_q1, cu_k, q_pos, tok_seg,
                                                            seg_start, seg_end, seg_mode)

    offs_m = q0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < q1
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q_off = offs_m.to(tl.int64)[:, None] * (HQ * HEAD_D) + h * HEAD_D + offs_d[None, :]
    q_m = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_m, other=0.0)
    do = tl.load(DO + q_off, mask=q_m, other=0.0)
    lse = tl.load(LSE + h.to(tl.int64) * Lq + offs_m, mask=row_ok, other=float("-inf"))
    delta = tl.load(DELTA + h.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
    live = lse != float("-inf")
    lse = tl.where(live, lse, 0.0)
    qp, qseg, qstart, qmode = _q_rows(offs_m, row_ok, q_pos, tok_seg, seg_start, seg_mode)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for kb in range(k_lo, k_hi, BLOCK_N):
        k1 = tl.minimum(kb + BLOCK_N, k_hi)
        empty, full = _classify(p0, sq0, sq1, st0, mq0, kb, k1, tok_seg, noise_cum)
        if not empty:
            offs_n = kb + tl.arange(0, BLOCK_N)
            col_ok = offs_n < k1
            kv_off = offs_n.to(tl.int64)[:, None] * (HKV * HEAD_D) + kh * HEAD_D + offs_d[None, :]
            kv_m = col_ok[:, None] & d_ok[None, :]
            k = tl.load(K + kv_off, mask=kv_m, other=0.0)
            v = tl.load(V + kv_off, mask=kv_m, other=0.0)
            s = _dot(q, tl.trans(k), F32) * scale
            allowed = (row_ok & live)[:, None] & col_ok[None, :]
            if not full:
                allowed = allowed & _key_mask(qp, qseg, qstart, qmode, offs_n, col_ok, tok_seg, tok_mode)
            p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), F32)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds, k, F32)

    tl.store(DQ + q_off, _cast_out(dq * scale, DQ), mask=q_m)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    kb_doc, kb_k0, kb_k1, cu_q, cu_k, q_pos, tok_seg, tok_mode, noise_cum, seg_start, seg_end, seg_mode,
    Lq, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
):
    GROUP: tl.constexpr = HQ // HKV
    pid = tl.program_id(0)
    kh = tl.program_id(1)
    d = tl.load(kb_doc + pid)
    k0 = tl.load(kb_k0 + pid)
    k1 = tl.load(kb_k1 + pid)
    nk = k1 - k0
    kc1 = tl.maximum(k1, k0 + 1)  # clamped for the scalar loads of an empty (padding) entry
    sk0 = tl.load(tok_seg + k0)
    sk1 = tl.load(tok_seg + kc1 - 1)
    nno = tl.load(noise_cum + kc1) - tl.load(noise_cum + k0)
    # the contiguous range of query positions that can see some key of [k0, k1)
    p_lo = tl.where(tl.load(seg_mode + sk0) == 0, k0, tl.load(seg_start + sk0))
    doc_kend = tl.load(cu_k + d + 1)
    p_hi = tl.where(nno < nk, doc_kend, tl.load(seg_end + sk1))  # exclusive
    shift = doc_kend - tl.load(cu_q + d + 1)  # query index = p - shift
    q_lo = tl.maximum(p_lo - shift, tl.load(cu_q + d))
    q_hi = tl.where(nk > 0, p_hi - shift, q_lo)

    offs_n = k0 + tl.arange(0, BLOCK_N)
    col_ok = offs_n < k1
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    kv_off = offs_n.to(tl.int64)[:, None] * (HKV * HEAD_D) + kh * HEAD_D + offs_d[None, :]
    kv_m = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_m, other=0.0)
    v = tl.load(V + kv_off, mask=kv_m, other=0.0)
    kseg = tl.load(tok_seg + offs_n, mask=col_ok, other=-2)
    kmode = tl.load(tok_mode + offs_n, mask=col_ok, other=2)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = kh * GROUP + g
        for qs in range(q_lo, q_hi, BLOCK_M):
            q1 = tl.minimum(qs + BLOCK_M, q_hi)
            p0, p1, sq0, sq1, st0, mq0, mq1 = _block_info(q_pos, tok_seg, seg_start, seg_mode, qs, q1)
            empty, full = _classify(p0, sq0, sq1, st0, mq0, k0, k1, tok_seg, noise_cum)
            if not empty:
                offs_m = qs + tl.arange(0, BLOCK_M)
                row_ok = offs_m < q1
                q_off = offs_m.to(tl.int64)[:, None] * (HQ * HEAD_D) + h * HEAD_D + offs_d[None, :]
                q_m = row_ok[:, None] & d_ok[None, :]
                q = tl.load(Q + q_off, mask=q_m, other=0.0)
                do = tl.load(DO + q_off, mask=q_m, other=0.0)
                lse = tl.load(LSE + h.to(tl.int64) * Lq + offs_m, mask=row_ok, other=float("-inf"))
                delta = tl.load(DELTA + h.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
                live = lse != float("-inf")
                lse = tl.where(live, lse, 0.0)
                s = _dot(q, tl.trans(k), F32) * scale
                allowed = (row_ok & live)[:, None] & col_ok[None, :]
                if not full:
                    qp = tl.load(q_pos + offs_m, mask=row_ok, other=0)
                    qseg = tl.load(tok_seg + qp, mask=row_ok, other=-1)
                    qstart = tl.load(seg_start + qseg, mask=row_ok, other=0)
                    qmode = tl.load(seg_mode + qseg, mask=row_ok, other=0)
                    allowed = allowed & _elem_mask(qp, qseg, qstart, qmode, offs_n, kseg, kmode)
                p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
                dv += _dot(tl.trans(p), do, F32)
                dp = _dot(do, tl.trans(v), F32)
                ds = p * (dp - delta[:, None])
                dk += _dot(tl.trans(ds), q, F32)

    tl.store(DK + kv_off, _cast_out(dk * scale, DK), mask=kv_m)
    tl.store(DV + kv_off, _cast_out(dv, DV), mask=kv_m)


# ------------------------------------------------------------------------------------------------
# launchers


def _blocks(cu: torch.Tensor, total: int, block: int):
    """Block list of the documents' ranges cu[d]..cu[d+1] in chunks of `block` (aligned to each document's
    start): (doc, first, end) int32, padded to the host bound total // block + #docs with empty entries."""
    n_docs = cu.numel() - 1
    cu = cu.long()
    nb = (cu[1:] - cu[:-1] + block - 1) // block
    cum = torch.cumsum(nb, 0)
    bound = total // block + n_docs
    b = torch.arange(bound, device=cu.device)
    doc = torch.searchsorted(cum, b, right=True).clamp_(max=n_docs - 1)
    valid = b < cum[-1]
    first = cu[doc] + (b - (cum - nb)[doc]) * block
    end = torch.minimum(first + block, cu[doc + 1])
    doc = torch.where(valid, doc, 0)
    first = torch.where(valid, first, 0)
    end = torch.where(valid, end, 0)
    return doc.int().contiguous(), first.int().contiguous(), end.int().contiguous(), bound


def _meta(Lq, Lk, cu_q, cu_k, seg_start, seg_end, seg_mode):
    """Per-token int32 tables: segment id and mode of each key, prefix count of noise keys (Lk + 1), key
    position p of each query.  O(L) memory (see the module docstring)."""
    dev = cu_k.device
    S = seg_start.numel()
    n_docs = cu_q.numel() - 1
    tok_seg = torch.repeat_interleave(torch.arange(S, device=dev), (seg_end - seg_start).long(), output_size=Lk)
    tok_mode = seg_mode.long()[tok_seg]
    noise_cum = torch.zeros(Lk + 1, dtype=torch.int64, device=dev)
    noise_cum[1:] = torch.cumsum(tok_mode == NOISE, 0)
    cq, ck = cu_q.long(), cu_k.long()
    doc_q = torch.repeat_interleave(torch.arange(n_docs, device=dev), cq[1:] - cq[:-1], output_size=Lq)
    q_pos = torch.arange(Lq, device=dev) + (ck[1:] - cq[1:])[doc_q]
    return (tok_seg.int().contiguous(), tok_mode.int().contiguous(), noise_cum.int().contiguous(),
            q_pos.int().contiguous())


def _config(Dh: int, dtype: torch.dtype = torch.bfloat16, bwd: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps).  Interpreter: 16 x 16 tiles (few programs).  GPU (untested on
    hardware): tiles chosen so that the shared memory of every kernel, as reported by triton.compile for
    sm_80 (Dh 8..256, both float32 and bfloat16), stays under ~96 KiB (the sm_86 / sm_89 limit; sm_80 and
    sm_90 allow more); float32 operands take twice the space of 16-bit ones."""
    BLOCK_D = max(16, triton.next_power_of_2(Dh))
    if _interpreting():
        return 16, 16, BLOCK_D, 1
    nw = 4 if BLOCK_D <= 64 else 8
    wide = dtype == torch.float32
    if not bwd:
        if BLOCK_D <= (64 if wide else 128):
            return 64, 64, BLOCK_D, nw
        if BLOCK_D <= 128 or not wide:
            return 64, 32, BLOCK_D, nw
        return 32, 32, BLOCK_D, nw
    if BLOCK_D <= (64 if wide else 128):
        return 64, 64, BLOCK_D, nw
    if BLOCK_D <= 128 or not wide:
        return 32, 32, BLOCK_D, nw
    return 16, 16, BLOCK_D, nw


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


def span_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seg_offsets, seg_start, seg_end, seg_mode,
                       max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    Lq, Hq, Dh = q.shape
    Lk, Hkv = k.shape[0], k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the kv heads ({Hkv})")
    out = torch.empty_like(q)
    lse = torch.empty((Hq, Lq), dtype=torch.float32, device=q.device)
    if Lq == 0 or Hq == 0:
        return out, lse
    cu_q, cu_k = _i32(cu_seqlens_q), _i32(cu_seqlens_k)
    st, en, mo = _i32(seg_start), _i32(seg_end), _i32(seg_mode)
    tok_seg, tok_mode, noise_cum, q_pos = _meta(Lq, Lk, cu_q, cu_k, st, en, mo)
    BM, BN, BD, nw = _config(Dh, q.dtype)
    qb_doc, qb_q0, qb_q1, nqb = _blocks(cu_q, Lq, BM)
    f32 = _interpreting() or q.dtype == torch.float32
    _fwd_kernel[(nqb, Hq)](
        q, k, v, out, lse, qb_doc, qb_q0, qb_q1, cu_k, q_pos, tok_seg, tok_mode, noise_cum, st, en, mo,
        Lq, float(softmax_scale),
        HQ=Hq, HKV=Hkv, HEAD_D=Dh, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, F32=f32, num_warps=nw,
    )
    return out, lse


def span_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seg_offsets, seg_start, seg_end,
                       seg_mode, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.contiguous()
    Lq, Hq, Dh = q.shape
    Lk, Hkv = k.shape[0], k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the kv heads ({Hkv})")
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if Lq == 0 or Hq == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return dq, dk, dv
    lse = lse.to(torch.float32).contiguous()
    delta = (dout.float() * out.float()).sum(-1).t().contiguous()  # (Hq, Lq) float32
    cu_q, cu_k = _i32(cu_seqlens_q), _i32(cu_seqlens_k)
    st, en, mo = _i32(seg_start), _i32(seg_end), _i32(seg_mode)
    tok_seg, tok_mode, noise_cum, q_pos = _meta(Lq, Lk, cu_q, cu_k, st, en, mo)
    BM, BN, BD, nw = _config(Dh, q.dtype, bwd=True)
    f32 = _interpreting() or q.dtype == torch.float32
    scale = float(softmax_scale)
    qb_doc, qb_q0, qb_q1, nqb = _blocks(cu_q, Lq, BM)
    _bwd_dq_kernel[(nqb, Hq)](
        q, k, v, dout, lse, delta, dq, qb_doc, qb_q0, qb_q1, cu_k, q_pos, tok_seg, tok_mode, noise_cum,
        st, en, mo, Lq, scale,
        HQ=Hq, HKV=Hkv, HEAD_D=Dh, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, F32=f32, num_warps=nw,
    )
    if Lk > 0:
        kb_doc, kb_k0, kb_k1, nkb = _blocks(cu_k, Lk, BN)
        _bwd_dkdv_kernel[(nkb, Hkv)](
            q, k, v, dout, lse, delta, dk, dv, kb_doc, kb_k0, kb_k1, cu_q, cu_k, q_pos, tok_seg, tok_mode,
            noise_cum, st, en, mo, Lq, scale,
            HQ=Hq, HKV=Hkv, HEAD_D=Dh, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, F32=f32, num_warps=nw,
        )
    return dq, dk, dv
