// CPU kernel of span attention (docs/span-attention-contract.md, design notes: csrc/cpu/SPAN_ATTENTION.md).
//
// Forward / dq: one task per (query head, block of <= kBQ queries lying in ONE segment of one document).  The
// block's visible keys are a short list of key intervals (the non-noise segments before its segment, merged when
// adjacent, then its own segment up to the block's last query when causal); only the last interval of a causal
// block (the diagonal) needs a per-element bound.  Invisible keys are never touched.
// dk / dv: one task per (kv head, block of <= kBKV keys lying in ONE segment); the queries that see a key of
// segment T form one contiguous range of positions (T's own queries -- from the key on when T is causal -- then,
// unless T is noise, every later query of the document), iterated for every query head of the group.  The task
// also stores its dS tiles in a per-(key block, kv head) scratch slab; the dq tasks, run after all dk / dv
// tasks, sum dS K over the visible key blocks in key order (5 tile products per visible pair).  If the scratch
// would exceed 256 MB, dq tasks recompute S and dP instead (7 products).
// Every output element is produced by exactly one task with a fixed summation order: results are bitwise
// independent of the number of threads and of the scheduling (tasks are handed out dynamically).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"

namespace umm::cpu::UMM_CPU_NS {
namespace {

constexpr int64_t kBQ = 32;   // queries per forward / dq task
constexpr int kW = 64;        // keys per chunk in forward / dq; queries per chunk in dk / dv (vector width dim)
constexpr int64_t kBKV = 64;  // keys per dk / dv task
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// a * b + c: one fused multiply-add where the target has it (explicit, so the result does not depend on the
// compiler's contraction choices; the build uses -ffp-contract=off), else a multiply and an add.
inline float madd(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(x) for x <= ~0 (softmax arguments): Cephes polynomial, ~1.5 ulp, 0 below -88 (and for -inf).  No float
// comparisons (which GCC will not if-convert under -ftrapping-math), so loops calling it vectorise.
inline float vexp(float x) {
  int32_t xb;
  std::memcpy(&xb, &x, sizeof(float));
  constexpr int32_t kLo = int32_t(0xC2B00000u);  // bits of -88.0f; negative floats order like their bits
  // NaN in, NaN out (integer test: a float comparison would stop the vectorisation); the polynomial then runs
  // on -88 so that no NaN reaches the float -> int conversion below.
  const bool nan = (xb & 0x7fffffff) > 0x7f800000;
  xb = (((xb < 0) & (xb > kLo)) | nan) ? kLo : xb;  // x < -88 -> -88
  float xc;
  std::memcpy(&xc, &xb, sizeof(float));
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest integer
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.f;
  int32_t e2 = static_cast<int32_t>(n) + 127;  // 2^n as a float; n = -127 (x ~ -88) gives 0
  e2 = e2 > 0 ? e2 : 0;
  const int32_t bits = e2 << 23;
  float sc;
  std::memcpy(&sc, &bits, sizeof(float));
  float res = y * sc;
  int32_t rb;
  std::memcpy(&rb, &res, sizeof(float));
  rb = nan ? int32_t(0x7fc00000) : rb;
  std::memcpy(&res, &rb, sizeof(float));
  return res;
}

// 0 for a row of finite values, NaN when one of them is NaN or +-Inf (x - x; not folded without -ffast-math).
inline float nonfinite_sum(const float* x, int64_t n) {
  float z = 0.f;
#pragma omp simd reduction(+ : z)
  for (int64_t c = 0; c < n; ++c) z += x[c] - x[c];
  return z;
}

// Register-blocked products: micro-tiles of kMR rows x kMC columns are accumulated in registers: two vectors
// per row (AVX2: 16 floats; AVX-512: 32), i.e. 8 accumulators for kMR = 4 and 12 for the backward's 6.  Every
// output element is summed over the inner index in order with the same
// operations whatever the tiling, so a score comes out bitwise the same whichever operand is transposed.
#if defined(__AVX512F__)
constexpr int kMR = 4, kMC = 32;
#else
constexpr int kMR = 4, kMC = 16;
#endif

// C[r][0..kW) = sum_d A[r][d] * Bt[d][0..kW), for r < nr.  A: [nr][Dh] (row stride lda); Bt: [Dh][kW] (row
// stride ldb); C: [nr][kW].  Rows go in blocks of MR (then of 4, then one by one): the blocking changes only the
// speed, never a result.  MR = 6 (12 accumulators) is the backward's; the forward uses 4.
template <int MR>
inline int64_t gemm_nt_blocks(const float* __restrict A, int64_t lda, int64_t rbeg, int64_t nr,
                              const float* __restrict Bt, int64_t ldb, int64_t Dh, float* __restrict C) {
  const int64_t rmain = rbeg + (nr - rbeg) / MR * MR;
  // column groups outer: one group's Bt slice (Dh lines) stays in L1 across all row groups
  for (int j0 = 0; j0 < kW; j0 += kMC) {
    for (int64_t r0 = rbeg; r0 < rmain; r0 += MR) {
      float c[MR][kMC];
      for (int rr = 0; rr < MR; ++rr)
#pragma omp simd
        for (int jj = 0; jj < kMC; ++jj) c[rr][jj] = 0.f;
      for (int64_t d = 0; d < Dh; ++d) {
        const float* b = Bt + d * ldb + j0;
        for (int rr = 0; rr < MR; ++rr) {
          const float av = A[(r0 + rr) * lda + d];
#pragma omp simd
          for (int jj = 0; jj < kMC; ++jj) c[rr][jj] = madd(av, b[jj], c[rr][jj]);
        }
      }
      for (int rr = 0; rr < MR; ++rr)
#pragma omp simd
        for (int jj = 0; jj < kMC; ++jj) C[(r0 + rr) * kW + j0 + jj] = c[rr][jj];
    }
  }
  return rmain;
}
template <int MR = kMR>
inline void gemm_nt(const float* __restrict A, int64_t lda, int64_t nr, const float* __restrict Bt, int64_t ldb,
                    int64_t Dh, float* __restrict C) {
  int64_t rmain = gemm_nt_blocks<MR>(A, lda, 0, nr, Bt, ldb, Dh, C);
  if (MR != kMR) rmain = gemm_nt_blocks<kMR>(A, lda, rmain, nr, Bt, ldb, Dh, C);
  for (int64_t r = rmain; r < nr; ++r) {
    float acc[kW];
#pragma omp simd
    for (int j = 0; j < kW; ++j) acc[j] = 0.f;
    const float* a = A + r * lda;
    for (int64_t d = 0; d < Dh; ++d) {
      const float av = a[d];
      const float* b = Bt + d * ldb;
#pragma omp simd
      for (int j = 0; j < kW; ++j) acc[j] = madd(av, b[j], acc[j]);
    }
#pragma omp simd
    for (int j = 0; j < kW; ++j) C[r * kW + j] = acc[j];
  }
}

// C[r][0..Dh) += sum_{j < n} W(r, j) * B[j][0..Dh), for r < nr, summed over j in order.  W(r, j) is W[r * ldw + j]
// (kTransW false) or W[j * ldw + r] (kTransW true); B: [n][Dh] (row stride ldb); C: [nr][Dh].  Rows in blocks of
// MR, then 4, then one by one (speed only).
template <bool kTransW, int MR>
inline int64_t gemm_nn_blocks(float* __restrict C, const float* __restrict W, int64_t ldw, int64_t rbeg, int64_t nr,
                              int64_t n, const float* __restrict B, int64_t ldb, int64_t Dh) {
  const auto w_at = [&](int64_t r, int64_t j) { return kTransW ? W[j * ldw + r] : W[r * ldw + j]; };
  const int64_t rmain = rbeg + (nr - rbeg) / MR * MR;
  const int64_t dmain = Dh - Dh % kMC;
  // column groups outer: one group's B slice (n lines) stays in L1 across all row groups
  for (int64_t c0 = 0; c0 < dmain; c0 += kMC) {
    for (int64_t r0 = rbeg; r0 < rmain; r0 += MR) {
      float c[MR][kMC];
      for (int rr = 0; rr < MR; ++rr)
#pragma omp simd
        for (int cc = 0; cc < kMC; ++cc) c[rr][cc] = C[(r0 + rr) * Dh + c0 + cc];
      for (int64_t j = 0; j < n; ++j) {
        const float* b = B + j * ldb + c0;
        for (int rr = 0; rr < MR; ++rr) {
          const float w = w_at(r0 + rr, j);
#pragma omp simd
          for (int cc = 0; cc < kMC; ++cc) c[rr][cc] = madd(w, b[cc], c[rr][cc]);
        }
      }
      for (int rr = 0; rr < MR; ++rr)
#pragma omp simd
        for (int cc = 0; cc < kMC; ++cc) C[(r0 + rr) * Dh + c0 + cc] = c[rr][cc];
    }
  }
  return rmain;
}
template <bool kTransW, int MR = kMR>
inline void gemm_nn_w(float* __restrict C, const float* __restrict W, int64_t ldw, int64_t nr, int64_t n,
                      const float* __restrict B, int64_t ldb, int64_t Dh) {
  const auto w_at = [&](int64_t r, int64_t j) { return kTransW ? W[j * ldw + r] : W[r * ldw + j]; };
  int64_t rmain = gemm_nn_blocks<kTransW, MR>(C, W, ldw, 0, nr, n, B, ldb, Dh);
  if (MR != kMR) rmain = gemm_nn_blocks<kTransW, kMR>(C, W, ldw, rmain, nr, n, B, ldb, Dh);
  const int64_t dmain = Dh - Dh % kMC;
  // leftover rows (all columns) and the column tail of the blocked rows
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t cstart = r < rmain ? dmain : 0;
    if (cstart >= Dh) continue;
    float* cr = C + r * Dh;
    for (int64_t j = 0; j < n; ++j) {
      const float w = w_at(r, j);
      const float* b = B + j * ldb;
#pragma omp simd
      for (int64_t cc = cstart; cc < Dh; ++cc) cr[cc] = madd(w, b[cc], cr[cc]);
    }
  }
}
// W: [nr][kW]
template <int MR = kMR>
inline void gemm_nn(float* __restrict C, const float* __restrict W, int64_t nr, int64_t n,
                    const float* __restrict B, int64_t ldb, int64_t Dh) {
  gemm_nn_w<false, MR>(C, W, kW, nr, n, B, ldb, Dh);
}
constexpr int kMRB = 6;  // backward row blocking

// Whole-tensor float conversions done once per call (parallel, each element written by one thread).
// Rows: src (L, H, Dh) -> dst [H][L][Dh].
template <typename T>
void to_rows(const T* src, int64_t rs, int64_t L, int64_t H, int64_t Dh, float* dst) {
  at::parallel_for(0, H * L, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t x = lo; x < hi; ++x) {
      const int64_t h = x / L, t = x % L;
      const T* s = src + t * rs + h * Dh;
      float* d = dst + x * Dh;
#pragma omp simd
      for (int64_t c = 0; c < Dh; ++c) d[c] = ld(s, c);
    }
  });
}
// Transposed copy in overlapping tiles: tile t of head h holds columns [t*kW, t*kW + 2*kW) of the transposed
// [Dh][L] matrix (zero beyond L) as a contiguous [Dh][2*kW] block, so any kW-wide chunk starting at column c is
// at(h, c) with row stride 2*kW (a compact block: few pages and cache-friendly down the head dim).
struct Tiles {
  std::vector<float> data;
  int64_t ntiles = 0, Dh = 0;
  const float* at(int64_t h, int64_t c) const {
    return data.data() + ((h * ntiles + c / kW) * Dh) * (2 * kW) + c % kW;
  }
};
constexpr int64_t kLdT = 2 * kW;

template <typename T>
void to_tiles(const T* src, int64_t rs, int64_t L, int64_t H, int64_t Dh, Tiles& out) {
  out.ntiles = ceil_div(L, kW);
  out.Dh = Dh;
  out.data.assign(H * out.ntiles * Dh * kLdT, 0.f);
  at::parallel_for(0, H * out.ntiles, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t x = lo; x < hi; ++x) {
      const int64_t h = x / out.ntiles, t0 = (x % out.ntiles) * kW, t1 = std::min(L, t0 + kLdT);
      float* d = out.data.data() + x * Dh * kLdT;
      for (int64_t t = t0; t < t1; ++t) {
        const T* sp = src + t * rs + h * Dh;
        for (int64_t c = 0; c < Dh; ++c) d[c * kLdT + (t - t0)] = ld(sp, c);
      }
    }
  });
}

struct Layout {
  const int32_t *cu_q, *cu_k, *so, *ss, *se, *sm;
};

// A block of queries [q0, q1) (query indices) inside segment `seg` of document `doc`.
struct QBlock {
  int64_t doc, seg, q0, q1, cost;
};
// A block of keys [k0, k1) (key positions) inside segment `seg` of document `doc`.
struct KBlock {
  int64_t doc, seg, k0, k1, cost;
};
struct Interval {
  int64_t lo, hi;
  bool diag;  // own causal segment (key k visible to query p iff k <= p); the kernels classify each tile instead
};

std::vector<QBlock> query_blocks(const SpanParams& p, const Layout& L) {
  std::vector<QBlock> out;
  for (int64_t d = 0; d < p.num_docs; ++d) {
    const int64_t shift = span_query_shift(L.cu_q, L.cu_k, d);
    const int64_t pfirst = L.cu_q[d] + shift, s0 = L.so[d];
    int64_t prefix = 0;  // visible keys before the current segment
    for (int64_t s = s0; s < L.so[d + 1]; ++s) {
      const int64_t a = L.ss[s], b = L.se[s];
      for (int64_t pp = std::max(a, pfirst); pp < b; pp += kBQ) {
        const int64_t pe = std::min(b, pp + kBQ);
        const int64_t own = L.sm[s] == kSpanCausal ? pe - a : b - a;
        out.push_back({d, s, pp - shift, pe - shift, (pe - pp) * (prefix + own)});
      }
      if (L.sm[s] != kSpanNoise) prefix += b - a;
    }
  }
  return out;
}

std::vector<KBlock> key_blocks(const SpanParams& p, const Layout& L) {
  std::vector<KBlock> out;
  for (int64_t d = 0; d < p.num_docs; ++d) {
    const int64_t shift = span_query_shift(L.cu_q, L.cu_k, d);
    const int64_t pfirst = L.cu_q[d] + shift, doc_end = L.cu_k[d + 1];
    for (int64_t s = L.so[d]; s < L.so[d + 1]; ++s) {
      for (int64_t kk = L.ss[s]; kk < L.se[s]; kk += kBKV) {
        const int64_t ke = std::min<int64_t>(L.se[s], kk + kBKV);
        int64_t lo, hi;
        span_key_viewers(L.ss, L.se, L.sm, s, kk, pfirst, doc_end, &lo, &hi);
        out.push_back({d, s, kk, ke, (ke - kk) * std::max<int64_t>(hi - lo, 0) + 1});
      }
    }
  }
  return out;
}

// Visible key intervals of a query block of segment `seg` whose last query sits at position plast.
void visible_intervals(const Layout& L, int64_t doc, int64_t seg, int64_t plast, std::vector<Interval>& iv) {
  iv.clear();
  for (int64_t s = L.so[doc]; s < seg; ++s) {
    if (L.sm[s] == kSpanNoise) continue;
    if (!iv.empty() && iv.back().hi == L.ss[s]) iv.back().hi = L.se[s];
    else iv.push_back({L.ss[s], L.se[s], false});
  }
  const bool causal = L.sm[seg] == kSpanCausal;
  const int64_t own_hi = causal ? plast + 1 : int64_t(L.se[seg]);
  if (!causal && !iv.empty() && iv.back().hi == L.ss[seg]) iv.back().hi = own_hi;
  else iv.push_back({L.ss[seg], own_hi, causal});
}

// Run fn(task) over [0, n) with dynamic hand-out (results do not depend on which thread runs which task).
template <typename F>
void run_tasks(int64_t n, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t);
  });
}

template <typename B>
std::vector<int64_t> order_by_cost(const std::vector<B>& blocks, int64_t heads) {
  std::vector<int64_t> idx(blocks.size() * heads);
  for (int64_t i = 0; i < int64_t(idx.size()); ++i) idx[i] = i;
  std::stable_sort(idx.begin(), idx.end(),
                   [&](int64_t a, int64_t b) { return blocks[a / heads].cost > blocks[b / heads].cost; });
  return idx;
}

// ------------------------------------------------------------------------------------------ forward
template <typename T>
void fwd_impl(const SpanParams& p) {
  const Layout L{p.cu_seqlens_q, p.cu_seqlens_k, p.seg_offsets, p.seg_start, p.seg_end, p.seg_mode};
  const int64_t Dh = p.Dh, Hq = p.Hq, Hkv = p.Hkv, G = p.Hq / p.Hkv, Nk = p.total_k;
  const float scale = p.softmax_scale;
  const T* Q = static_cast<const T*>(p.q);
  T* O = static_cast<T*>(p.out);
  // K transposed (tiles) and V by rows ([Hkv][Nk][Dh]), float, once.
  Tiles kt_all;
  std::vector<float> v_all(Hkv * Nk * Dh);
  to_tiles(static_cast<const T*>(p.k), p.k_row_stride, Nk, Hkv, Dh, kt_all);
  to_rows(static_cast<const T*>(p.v), p.v_row_stride, Nk, Hkv, Dh, v_all.data());
  // Non-finite inputs (contract: a NaN / Inf entering a row's computation makes the row NaN; keys the row
  // cannot see never affect it).  Scores are checked where they are made; a value row of v with a NaN / Inf is
  // zeroed here (so that P V never forms 0 * Inf for a key a row cannot see) and counted in vbad: a row that
  // sees such a key is NaN.
  std::vector<uint8_t> vbad_key(Hkv * Nk, 0);
  at::parallel_for(0, Hkv * Nk, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t x = lo; x < hi; ++x) {
      float* r = v_all.data() + x * Dh;
      if (nonfinite_sum(r, Dh) != 0.f) {
        std::fill(r, r + Dh, 0.f);
        vbad_key[x] = 1;
      }
    }
  });
  std::vector<int32_t> vbad;  // [Hkv][Nk + 1] prefix counts of such keys; empty when there is none
  if (std::find(vbad_key.begin(), vbad_key.end(), uint8_t(1)) != vbad_key.end()) {
    vbad.assign(Hkv * (Nk + 1), 0);
    for (int64_t hk = 0; hk < Hkv; ++hk)
      for (int64_t t = 0; t < Nk; ++t)
        vbad[hk * (Nk + 1) + t + 1] = vbad[hk * (Nk + 1) + t] + vbad_key[hk * Nk + t];
  }
  const std::vector<QBlock> blocks = query_blocks(p, L);
  const std::vector<int64_t> order = order_by_cost(blocks, Hq);
  // Every query lies in a segment, hence in a block: out / lse are fully written.
  run_tasks(int64_t(order.size()), [&](int64_t t) {
    thread_local std::vector<float> buf;
    thread_local std::vector<Interval> iv;
    const QBlock& blk = blocks[order[t] / Hq];
    const int64_t h = order[t] % Hq, hk = h / G;
    const int64_t nq = blk.q1 - blk.q0, shift = span_query_shift(L.cu_q, L.cu_k, blk.doc);
    const float* vr = v_all.data() + hk * Nk * Dh;
    buf.resize(kBQ * Dh * 2 + kBQ * kW + 3 * kBQ);
    float* q = buf.data();
    float* acc = q + kBQ * Dh;
    float* s = acc + kBQ * Dh;
    float* m = s + kBQ * kW;
    float* l = m + kBQ;
    float* bad = l + kBQ;  // 1: the row met a non-finite score or value (its result is NaN)
    const int32_t* vb = vbad.empty() ? nullptr : vbad.data() + hk * (Nk + 1);
    for (int64_t i = 0; i < nq; ++i) {
      const T* src = Q + (blk.q0 + i) * p.q_row_stride + h * Dh;
#pragma omp simd
      for (int64_t c = 0; c < Dh; ++c) q[i * Dh + c] = ld(src, c);
    }
    std::fill(acc, acc + nq * Dh, 0.f);
    std::fill(m, m + nq, kNegInf);
    std::fill(l, l + nq, 0.f);
    std::fill(bad, bad + nq, 0.f);
    visible_intervals(L, blk.doc, blk.seg, blk.q1 - 1 + shift, iv);
    for (const Interval& I : iv) {
      for (int64_t kc = I.lo; kc < I.hi; kc += kW) {
        const int64_t kb = std::min<int64_t>(kW, I.hi - kc);
        // Chunks inside the intervals are FULL except on the causal diagonal (PARTIAL: per-element bound).
        const int cls = span_classify_tile_seg(L.ss, L.se, L.sm, L.so[blk.doc], L.so[blk.doc + 1], blk.seg,
                                               blk.q0 + shift, blk.q1 + shift, kc, kc + kb);
        if (cls == kTileEmpty) continue;
        const bool diag = cls == kTilePartial;
        gemm_nt(q, Dh, nq, kt_all.at(hk, kc), kLdT, Dh, s);
        for (int64_t i = 0; i < nq; ++i) {
          float* __restrict si = s + i * kW;
          const float sc = scale;  // a local: the captured reference could alias si for the vectoriser
          // keys visible to this row: j < lim
          const int64_t lim = diag ? std::clamp<int64_t>(blk.q0 + i + shift - kc + 1, 0, kb) : kb;
          for (int64_t j = lim; j < kb; ++j) si[j] = 0.f;
          if (lim == 0) continue;
          if (bad[i] != 0.f || (vb && vb[kc + lim] != vb[kc])) {  // NaN row already, or sees a non-finite v
            bad[i] = 1.f;
            std::fill(si, si + lim, 0.f);
            continue;
          }
          float mx = m[i], nf = 0.f;
#pragma omp simd reduction(max : mx) reduction(+ : nf)
          for (int64_t j = 0; j < lim; ++j) {
            const float v = si[j] * sc;
            si[j] = v;
            mx = v > mx ? v : mx;
            nf += v - v;  // NaN once a visible score is NaN or +-Inf
          }
          if (nf != 0.f) {
            bad[i] = 1.f;
            std::fill(si, si + lim, 0.f);
            continue;
          }
          if (mx == kNegInf) {  // only -inf scores so far (cannot happen for finite inputs)
            std::fill(si, si + lim, 0.f);
            continue;
          }
          const float alpha = m[i] == mx ? 1.f : vexp(m[i] - mx);
          const float mxl = mx;
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < lim; ++j) {
            const float e = vexp(si[j] - mxl);
            si[j] = e;
            sum += e;
          }
          l[i] = l[i] * alpha + sum;
          if (alpha != 1.f) {
            float* ai = acc + i * Dh;
#pragma omp simd
            for (int64_t c = 0; c < Dh; ++c) ai[c] *= alpha;
          }
          m[i] = mx;
        }
        gemm_nn(acc, s, nq, kb, vr + kc * Dh, Dh, Dh);
      }
    }
    for (int64_t i = 0; i < nq; ++i) {
      T* o = O + (blk.q0 + i) * p.o_row_stride + h * Dh;
      float* lse = p.lse + h * p.total_q + blk.q0 + i;
      if (bad[i] != 0.f) {
        const float nan = std::numeric_limits<float>::quiet_NaN();
        for (int64_t c = 0; c < Dh; ++c) st(o, c, nan);
        *lse = nan;
      } else if (l[i] > 0.f) {
        const float inv = 1.f / l[i];
        const float* ai = acc + i * Dh;
#pragma omp simd
        for (int64_t c = 0; c < Dh; ++c) st(o, c, ai[c] * inv);
        *lse = m[i] + std::log(l[i]);
      } else {  // no visible key: out row 0, lse -inf
        for (int64_t c = 0; c < Dh; ++c) st(o, c, 0.f);
        *lse = kNegInf;
      }
    }
  });
}

// ------------------------------------------------------------------------------------------ backward
template <typename T>
void bwd_impl(const SpanParams& p) {
  const Layout L{p.cu_seqlens_q, p.cu_seqlens_k, p.seg_offsets, p.seg_start, p.seg_end, p.seg_mode};
  const int64_t Dh = p.Dh, Hq = p.Hq, Hkv = p.Hkv, G = p.Hq / p.Hkv, Nq = p.total_q, Nk = p.total_k;
  const float scale = p.softmax_scale;
  const T* O = static_cast<const T*>(p.out);
  const T* dO = static_cast<const T*>(p.dout);
  T* dQ = static_cast<T*>(p.dq);
  T* dK = static_cast<T*>(p.dk);
  T* dV = static_cast<T*>(p.dv);
  const float* LSE = p.lse;
  float* DELTA = p.delta;

  // Delta[h, i] = sum_c dout[i, h, c] * out[i, h, c], summed in double (O(Nq Hq Dh), next to nothing): dS =
  // P (dP - Delta) subtracts two nearly equal terms, so Delta's rounding is seen at the scale of dP.
  at::parallel_for(0, Nq * Hq, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t i = r / Hq, h = r % Hq;
      const T* o = O + i * p.o_row_stride + h * Dh;
      const T* g = dO + i * p.o_row_stride + h * Dh;
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < Dh; ++c) sum += double(ld(o, c)) * double(ld(g, c));
      DELTA[h * Nq + i] = float(sum);
    }
  });

  // float copies, once: rows [H][L][Dh] and transposed tiles
  // Kept across calls by the calling thread (no page faults on every call); the tasks use them through these
  // references (a thread_local named inside a task would be the worker thread's own).
  thread_local std::vector<float> tl_q_r, tl_g_r, tl_k_r, tl_v_r;
  thread_local Tiles tl_q_t, tl_g_t, tl_k_t, tl_v_t;
  std::vector<float>&q_r = tl_q_r, &g_r = tl_g_r, &k_r = tl_k_r, &v_r = tl_v_r;
  Tiles &q_t = tl_q_t, &g_t = tl_g_t, &k_t = tl_k_t, &v_t = tl_v_t;
  q_r.resize(Hq * Nq * Dh);
  g_r.resize(Hq * Nq * Dh);
  k_r.resize(Hkv * Nk * Dh);
  v_r.resize(Hkv * Nk * Dh);
  const T* Q = static_cast<const T*>(p.q);
  const T* K = static_cast<const T*>(p.k);
  const T* V = static_cast<const T*>(p.v);
  to_rows(Q, p.q_row_stride, Nq, Hq, Dh, q_r.data());
  to_tiles(Q, p.q_row_stride, Nq, Hq, Dh, q_t);
  to_rows(dO, p.o_row_stride, Nq, Hq, Dh, g_r.data());
  to_tiles(dO, p.o_row_stride, Nq, Hq, Dh, g_t);
  to_rows(K, p.k_row_stride, Nk, Hkv, Dh, k_r.data());
  to_rows(V, p.v_row_stride, Nk, Hkv, Dh, v_r.data());

  const std::vector<QBlock> qblocks = query_blocks(p, L);
  const std::vector<KBlock> kblocks = key_blocks(p, L);
  const std::vector<int64_t> qorder = order_by_cost(qblocks, Hq);
  const std::vector<int64_t> korder = order_by_cost(kblocks, Hkv);
  const int64_t nqt = int64_t(qorder.size()), nkt = int64_t(korder.size());
  const int64_t nkb = int64_t(kblocks.size());

  // Single pass (default): the dk/dv tasks also store dS for their (key block, viewer range) in a scratch slab
  // per (key block, kv head): [G][nk][viewers] with the viewer (query) index contiguous; the dq tasks then only
  // compute dq = dS K, reading the slabs of the key blocks they see in key order.  Slab size ~ visible pairs x Hq
  // floats; above kMaxScratch the two-pass scheme (dq tasks recompute S and dP) is used instead.
  constexpr int64_t kMaxScratch = int64_t(256) << 20;  // bytes
  std::vector<int64_t> kb_plo(nkb), kb_ld(nkb), slab_off(nkb * Hkv + 1);
  std::vector<int64_t> seg_first_kb(p.num_segments, -1);
  slab_off[0] = 0;
  for (int64_t b = 0; b < nkb; ++b) {
    const KBlock& kb = kblocks[b];
    if (seg_first_kb[kb.seg] < 0) seg_first_kb[kb.seg] = b;
    const int64_t shift = span_query_shift(L.cu_q, L.cu_k, kb.doc);
    int64_t lo, hi;
    span_key_viewers(L.ss, L.se, L.sm, kb.seg, kb.k0, L.cu_q[kb.doc] + shift, L.cu_k[kb.doc + 1], &lo, &hi);
    kb_plo[b] = lo;
    kb_ld[b] = std::max<int64_t>(hi - lo, 0);
    for (int64_t hk = 0; hk < Hkv; ++hk)
      slab_off[b * Hkv + hk + 1] = slab_off[b * Hkv + hk] + G * (kb.k1 - kb.k0) * kb_ld[b];
  }
  const bool single_pass = slab_off[nkb * Hkv] * int64_t(sizeof(float)) <= kMaxScratch;
  // Kept across calls by the calling thread: a fresh allocation of this size costs a page fault per 4 KiB on
  // every call.  Every element that is read is written first in the same call (no zeroing needed).
  thread_local std::vector<float> ds_cache;
  float* ds_all = nullptr;
  if (single_pass) {
    if (int64_t(ds_cache.size()) < slab_off[nkb * Hkv]) ds_cache.resize(slab_off[nkb * Hkv]);
    ds_all = ds_cache.data();
  } else {
    to_tiles(K, p.k_row_stride, Nk, Hkv, Dh, k_t);
    to_tiles(V, p.v_row_stride, Nk, Hkv, Dh, v_t);
  }

  // dq task of the single pass: (query head, query block); dq = sum over the visible key blocks, in key order, of
  // dS_block K_block (each summed over the block's keys in order).
  auto dq_from_ds_task = [&](int64_t t) {
    thread_local std::vector<float> buf;
    const QBlock& blk = qblocks[qorder[t] / Hq];
    const int64_t h = qorder[t] % Hq, hk = h / G, hh = h % G;
    const int64_t nq = blk.q1 - blk.q0, shift = span_query_shift(L.cu_q, L.cu_k, blk.doc);
    const int64_t p0 = blk.q0 + shift, plast = blk.q1 - 1 + shift;
    buf.resize(kBQ * Dh);
    float* acc = buf.data();
    std::fill(acc, acc + nq * Dh, 0.f);
    const float* kr = k_r.data() + hk * Nk * Dh;
    for (int64_t s = L.so[blk.doc]; s <= blk.seg; ++s) {
      if (s < blk.seg && L.sm[s] == kSpanNoise) continue;
      // own causal segment: key blocks starting after the block's last query are invisible to all of it
      const int64_t khi = (s == blk.seg && L.sm[s] == kSpanCausal) ? plast + 1 : int64_t(L.se[s]);
      for (int64_t b = seg_first_kb[s]; b < nkb && kblocks[b].seg == s && kblocks[b].k0 < khi; ++b) {
        const KBlock& kb = kblocks[b];
        const int64_t nk = kb.k1 - kb.k0, ld = kb_ld[b];
        // queries of the block that see the key block's first key: positions [max(p0, plo), p1); the others
        // see none of its keys (diagonal block of a causal segment).  Invisible pairs hold dS = 0.
        const int64_t r0 = std::max<int64_t>(kb_plo[b] - p0, 0);
        if (r0 >= nq) continue;
        const float* w = ds_all + slab_off[b * Hkv + hk] + hh * nk * ld + (p0 + r0 - kb_plo[b]);
        gemm_nn_w<true, kMRB>(acc + r0 * Dh, w, ld, nq - r0, nk, kr + kb.k0 * Dh, Dh, Dh);
      }
    }
    for (int64_t i = 0; i < nq; ++i) {
      T* o = dQ + (blk.q0 + i) * p.o_row_stride + h * Dh;
      const float* ai = acc + i * Dh;
#pragma omp simd
      for (int64_t c = 0; c < Dh; ++c) st(o, c, ai[c] * scale);
    }
  };

  // dq task: (query head, query block)
  auto dq_task = [&](int64_t t) {
    thread_local std::vector<float> buf;
    thread_local std::vector<Interval> iv;
    const QBlock& blk = qblocks[qorder[t] / Hq];
    const int64_t h = qorder[t] % Hq, hk = h / G;
    const int64_t nq = blk.q1 - blk.q0, shift = span_query_shift(L.cu_q, L.cu_k, blk.doc);
    buf.resize(kBQ * Dh + 2 * kBQ * kW);
    float* acc = buf.data();
    float* s = acc + kBQ * Dh;
    float* dp = s + kBQ * kW;
    const float* q = q_r.data() + (h * Nq + blk.q0) * Dh;
    const float* g = g_r.data() + (h * Nq + blk.q0) * Dh;
    const float* kr = k_r.data() + hk * Nk * Dh;
    std::fill(acc, acc + nq * Dh, 0.f);
    const float* lse = LSE + h * Nq + blk.q0;
    const float* delta = DELTA + h * Nq + blk.q0;
    visible_intervals(L, blk.doc, blk.seg, blk.q1 - 1 + shift, iv);
    for (const Interval& I : iv) {
      for (int64_t kc = I.lo; kc < I.hi; kc += kW) {
        const int64_t kb = std::min<int64_t>(kW, I.hi - kc);
        const int cls = span_classify_tile_seg(L.ss, L.se, L.sm, L.so[blk.doc], L.so[blk.doc + 1], blk.seg,
                                               blk.q0 + shift, blk.q1 + shift, kc, kc + kb);
        if (cls == kTileEmpty) continue;
        const bool diag = cls == kTilePartial;
        gemm_nt(q, Dh, nq, k_t.at(hk, kc), kLdT, Dh, s);
        gemm_nt(g, Dh, nq, v_t.at(hk, kc), kLdT, Dh, dp);
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t lim = diag ? std::clamp<int64_t>(blk.q0 + i + shift - kc + 1, 0, kb) : kb;
          float* si = s + i * kW;
          if (lim == 0 || lse[i] == kNegInf) {
            std::fill(si, si + kb, 0.f);
            continue;
          }
          const float* dpi = dp + i * kW;
          const float li = lse[i], di = delta[i], sc = scale;
#pragma omp simd
          for (int64_t j = 0; j < kb; ++j) {
            const float e = vexp(si[j] * sc - li);
            const float pij = j < lim ? e : 0.f;
            si[j] = pij * (dpi[j] - di);  // dS
          }
        }
        gemm_nn(acc, s, nq, kb, kr + kc * Dh, Dh, Dh);
      }
    }
    for (int64_t i = 0; i < nq; ++i) {
      T* o = dQ + (blk.q0 + i) * p.o_row_stride + h * Dh;
      const float* ai = acc + i * Dh;
#pragma omp simd
      for (int64_t c = 0; c < Dh; ++c) st(o, c, ai[c] * scale);
    }
  };

  // dk / dv task: (kv head, key block)
  auto dkv_task = [&](int64_t t) {
    thread_local std::vector<float> buf;
    const KBlock& blk = kblocks[korder[t] / Hkv];
    const int64_t hk = korder[t] % Hkv, nk = blk.k1 - blk.k0;
    const int64_t shift = span_query_shift(L.cu_q, L.cu_k, blk.doc);
    const int64_t pfirst = L.cu_q[blk.doc] + shift, doc_end = L.cu_k[blk.doc + 1];
    buf.resize(kBKV * Dh * 4 + 2 * kBKV * kW);
    float* dk = buf.data();
    float* dv = dk + kBKV * Dh;
    float* s = dv + kBKV * Dh;
    float* dp = s + kBKV * kW;
    // Two-level sums: each chunk of kW queries is summed into pk / pv, then added to dk / dv.  A key seen by
    // thousands of queries would otherwise take one long sequential float sum (error growing with the count,
    // where PyTorch's blocked sums grow far slower); this way it grows with count / kW + kW.
    float* pk = dp + kBKV * kW;
    float* pv = pk + kBKV * Dh;
    const float* kr = k_r.data() + (hk * Nk + blk.k0) * Dh;
    const float* vr = v_r.data() + (hk * Nk + blk.k0) * Dh;
    std::fill(dk, dk + nk * Dh, 0.f);
    std::fill(dv, dv + nk * Dh, 0.f);
    int64_t plo, phi;  // query positions that see the block's first key (causal: later keys seen from the key on)
    span_key_viewers(L.ss, L.se, L.sm, blk.seg, blk.k0, pfirst, doc_end, &plo, &phi);
    const int64_t ld = std::max<int64_t>(phi - plo, 0);
    float* slab = single_pass ? ds_all + slab_off[(korder[t] / Hkv) * Hkv + hk] : nullptr;
    for (int64_t h = hk * G; h < (hk + 1) * G && plo < phi; ++h) {
      for (int64_t pc = plo; pc < phi; pc += kW) {
        const int64_t nq = std::min<int64_t>(kW, phi - pc), i0 = pc - shift;
        // FULL, or PARTIAL on the causal diagonal of segment T (query at pc + i sees key k0 + j iff k0 + j <= pc + i)
        const int cls = span_classify_tile(L.ss, L.se, L.sm, L.so[blk.doc], L.so[blk.doc + 1], pc, pc + nq, blk.k0,
                                           blk.k1);
        if (cls == kTileEmpty) {
          if (slab)
            for (int64_t j = 0; j < nk; ++j) {
              float* dst = slab + ((h - hk * G) * nk + j) * ld + (pc - plo);
              std::fill(dst, dst + nq, 0.f);
            }
          continue;
        }
        const bool diag = cls == kTilePartial;
        gemm_nt<kMRB>(kr, Dh, nk, q_t.at(h, i0), kLdT, Dh, s);
        gemm_nt<kMRB>(vr, Dh, nk, g_t.at(h, i0), kLdT, Dh, dp);
        const float* delta = DELTA + h * Nq + i0;
        float lse[kW];  // a row without visible keys (lse = -inf) gets +inf: P = exp(-inf) = 0
        for (int64_t i = 0; i < nq; ++i) {
          const float li = LSE[h * Nq + i0 + i];
          lse[i] = li == kNegInf ? -kNegInf : li;
        }
        for (int64_t j = 0; j < nk; ++j) {
          float* sj = s + j * kW;
          float* dpj = dp + j * kW;
          const int64_t first = diag ? std::clamp<int64_t>(blk.k0 + j - pc, 0, nq) : 0;
#pragma omp simd
          for (int64_t i = 0; i < nq; ++i) {
            const bool vis = i >= first;
            const float e = vexp(sj[i] * scale - lse[i]);
            const float pij = vis ? e : 0.f;
            sj[i] = pij;
            const float ds = pij * (dpj[i] - delta[i]);
            dpj[i] = vis ? ds : 0.f;  // dS
          }
        }
        std::fill(pv, pv + nk * Dh, 0.f);
        std::fill(pk, pk + nk * Dh, 0.f);
        gemm_nn<kMRB>(pv, s, nk, nq, g_r.data() + (h * Nq + i0) * Dh, Dh, Dh);
        gemm_nn<kMRB>(pk, dp, nk, nq, q_r.data() + (h * Nq + i0) * Dh, Dh, Dh);
#pragma omp simd
        for (int64_t e = 0; e < nk * Dh; ++e) {
          dv[e] += pv[e];
          dk[e] += pk[e];
        }
        if (slab) {  // dS^T tile -> slab[h - hk*G][j][pc - plo + i]
          float* dst = slab + (h - hk * G) * nk * ld + (pc - plo);
          for (int64_t j = 0; j < nk; ++j) std::copy(dp + j * kW, dp + j * kW + nq, dst + j * ld);
        }
      }
    }
    for (int64_t j = 0; j < nk; ++j) {
      T* ok = dK + (blk.k0 + j) * p.k_row_stride + hk * Dh;
      T* ov = dV + (blk.k0 + j) * p.v_row_stride + hk * Dh;
      const float* a = dk + j * Dh;
      const float* b = dv + j * Dh;
#pragma omp simd
      for (int64_t c = 0; c < Dh; ++c) {
        st(ok, c, a[c] * scale);
        st(ov, c, b[c]);
      }
    }
  };

  if (single_pass) {
    // dk/dv (and dS) first; the dq tasks read the slabs, so they run after all of them.
    run_tasks(nkt, dkv_task);
    run_tasks(nqt, dq_from_ds_task);
    return;
  }
  // Two-pass fallback, one pool of tasks: the dk/dv tasks (usually the larger ones) first, then the dq tasks.
  run_tasks(nqt + nkt, [&](int64_t t) {
    if (t < nkt) dkv_task(t);
    else dq_task(t - nkt);
  });
}

}  // namespace

void span_attention_fwd(const SpanParams& p, DType dt) { UMM_CPU_DISPATCH(dt, T, [&] { fwd_impl<T>(p); }); }
void span_attention_bwd(const SpanParams& p, DType dt) { UMM_CPU_DISPATCH(dt, T, [&] { bwd_impl<T>(p); }); }

}  // namespace umm::cpu::UMM_CPU_NS
