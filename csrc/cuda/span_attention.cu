// CUDA span attention (docs/span-attention-contract.md), sm80+ tensor cores via CuTe: forward and backward.
// Design notes: csrc/cuda/SPAN_ATTENTION.md.  Same tiling idea and the same tile classifier
// (umm/span.h: span_classify_tile) as the CPU kernel (csrc/cpu/span_attention.cpp) and the Triton kernel
// (umm_ops/triton/attention.py).
//
// Three tile kernels share one structure ("fixed" operands loaded once per CTA, "streamed" operands double
// buffered through shared memory with cp.async):
//
//   kernel      CTA                         fixed (A side, 64 rows)   streamed (B side, kN rows)   products per tile
//   forward     (query block, doc, q head)  Q                         K, V                         S = Q K^T, O += P V
//   dq          (query block, doc, q head)  Q, dO                     K, V                         S, dP = dO V^T, dQ += dS K
//   dk / dv     (key block, doc, kv head)   K, V                       Q, dO (every q head of       S^T = K Q^T, dP^T = V dO^T,
//                                                                     the GQA group)               dV += P^T dO, dK += dS^T Q
//
// The dk/dv kernel computes the TRANSPOSED scores directly (keys are its rows), so P^T and dS^T are already in
// the accumulator layout of the A operand of the next product: no shared-memory round trip for P or dS, and no
// atomics anywhere.  dQ is a separate pass (it recomputes S and dP: 7 tile products per visible pair instead of
// FlashAttention-2's 5 with float atomics) so every output element is written once, in a fixed order: the
// backward is bitwise deterministic, as the project's other CUDA kernels are.
//
// Rows / columns of a tile and the mask.  A document owns keys [k_begin, k_end) and queries [q_begin, q_end); query
// i sits at key position p = i + shift (shift = k_end - q_end, the cache case's bottom-right alignment).  With
// a = start of the segment of p and hi = p + 1 (causal segment) or the segment's end (full / noise):
//
//   allowed(p, k) = (a <= k < hi) || (k < a && mode(segment of k) != noise)          (k, p in the same document)
//
// which is the contract's definition.  Every (query tile, key tile) pair is classified from the segment table
// alone (span_classify_tile): EMPTY tiles are skipped (never loaded), FULL tiles need only the bounds mask (key
// columns past the tile's end, rows / columns past the valid range), PARTIAL tiles evaluate allowed() per element.
//
// Numerics: bf16/fp16 operands, fp32 accumulation (SM80_16x8x16 MMA); softmax in fp32 in log2 units
// (scores * softmax_scale * log2(e), max taken after scaling, so any finite scale, even <= 0, is fine); P and dS
// are rounded to the input dtype before their products (as FlashAttention does); lse is written in float32 in
// natural log units.  A query with no visible key gets out = 0, lse = -inf and zero gradients (never NaN).
// Non-finite inputs: a visible NaN / Inf score (NaN / Inf in q, or in k at a visible key) makes the row NaN (out
// and lse), as the contract says; so does v holding a NaN / Inf at a visible key: each landed V tile is scanned
// per key in shared memory (flag_nonfinite_v), a flagged key's row is zeroed there (so a key a row cannot see never
// reaches it through 0 * Inf in P V) and every row that sees a flagged key is flagged like a non-finite score.
// The backward does not sanitise k / v: it may return NaN gradients for rows or keys sharing a tile with a
// non-finite input, which the contract allows.  Written without a GPU: compiled, never run.
//
// NOTE: compiled only (no GPU in the session that wrote it); see SPAN_ATTENTION.md for what was checked.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "span_attention.cuh"

namespace umm {
namespace cuda {
namespace span {

using namespace cute;

// ------------------------------------------------------------------------------------------------ forward / dq
// Grid: x = doc * m_blocks + (m_blocks - 1 - query block) (the longer-running later blocks of a document first),
// y = query head.  Query block mb of document d: queries [q_begin + 64 mb, min(q_begin + 64 (mb + 1), q_end)).
// Key tiles: [k_begin + kN t, ...) up to k_hi = the last visible key of the block's last query, + 1 (later keys are
// invisible to every query of the block: earlier queries' own ranges end no later).
template <class K, bool kIsDq>
struct FwdDqSmem {
  static constexpr int kQ = 0;
  static constexpr int kDO = K::kFixedElems;                          // dq only
  static constexpr int kK = K::kFixedElems * (kIsDq ? 2 : 1);         // two buffers of kStreamElems
  static constexpr int kV = kK + 2 * K::kStreamElems;                 // two buffers
  static constexpr int kElems = kV + 2 * K::kStreamElems;
  static constexpr int kBytes = kElems * int(sizeof(typename K::T));
};

// Non-finite v (contract): for each key (row) of a landed V tile, vbad[n] = 1 when its row holds a NaN / Inf, and
// that row is zeroed in shared memory.  A lane pair per key, each lane over every other column; the caller
// synchronises the block before anyone reads vbad or the tile.  Rows past the tile's valid keys and columns past Dh
// were zero-filled by load_tile, so they are never flagged.
template <class K>
__device__ __forceinline__ void flag_nonfinite_v(typename K::T* vbuf, unsigned char* vbad, int tid) {
  using T = typename K::T;
  static_assert(K::kNThreads % 64 == 0, "whole lane pairs in every warp");
  Tensor sV = make_tensor(make_smem_ptr(vbuf), typename K::SmemStream{});
  const int half = tid & 1;
  const unsigned pair = 3u << ((tid & 31) & ~1);  // the two lanes of this key (same warp, both take the same n)
  for (int n = tid >> 1; n < K::kN; n += K::kNThreads / 2) {
    int bad = 0;
    CUTE_UNROLL
    for (int d = half; d < K::kHeadDim; d += 2) bad |= isfinite(static_cast<float>(sV(n, d))) ? 0 : 1;
    bad |= __shfl_xor_sync(pair, bad, 1);
    if (bad) {
      CUTE_UNROLL
      for (int d = half; d < K::kHeadDim; d += 2) sV(n, d) = T(0.f);
    }
    if (half == 0) vbad[n] = static_cast<unsigned char>(bad);
  }
}

template <class K, bool kIsDq>
__global__ void __launch_bounds__(128) fwd_dq_kernel(const SpanParams p, int64_t m_blocks) {
  using T = typename K::T;
  using Sm = FwdDqSmem<K, kIsDq>;
  constexpr int kM = K::kM, kN = K::kN;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ unsigned char vbad_s[kIsDq ? 1 : kN];  // forward: the current V tile's flagged keys
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x;

  const int64_t doc = int64_t(blockIdx.x) / m_blocks;
  const int64_t mb = m_blocks - 1 - (int64_t(blockIdx.x) - doc * m_blocks);
  const int64_t h = blockIdx.y;
  const int64_t hk = h / (p.Hq / p.Hkv);
  const Doc D = load_doc(p, doc);
  const int64_t q0 = D.q_begin + mb * kM;
  if (q0 >= D.q_end) return;  // block-uniform
  const int64_t q1 = min(q0 + int64_t(kM), D.q_end);
  const int rows_valid = int(q1 - q0);
  const int Dh = int(p.Dh);
  const int64_t p0 = q0 + D.shift, p1 = q1 + D.shift;  // key positions of the block's queries: [p0, p1)
  int64_t a_last, k_hi;
  own_range(p, D, p1 - 1, &a_last, &k_hi);
  const int64_t n_tiles = (k_hi - D.k_begin + kN - 1) / kN;

  const T* Q = static_cast<const T*>(p.q);
  const T* Kp = static_cast<const T*>(p.k);
  const T* Vp = static_cast<const T*>(p.v);
  const T* dO = static_cast<const T*>(p.dout);

  // Tile classification (identical in every thread: the loop below branches on it around __syncthreads).
  auto tile_k0 = [&](int64_t t) { return D.k_begin + t * kN; };
  auto tile_k1 = [&](int64_t t) { return min(D.k_begin + (t + 1) * kN, k_hi); };
  auto classify = [&](int64_t t) {
    return span_classify_tile(p.seg_start, p.seg_end, p.seg_mode, D.s0, D.s1, p0, p1, tile_k0(t), tile_k1(t));
  };
  auto next_tile = [&](int64_t t, int* cls) {  // first non-empty tile after t (n_tiles if none)
    for (++t; t < n_tiles; ++t) {
      *cls = classify(t);
      if (*cls != kTileEmpty) break;
    }
    return t;
  };
  auto load_kv = [&](int64_t t, int buf) {
    const int64_t k0 = tile_k0(t);
    const int nvalid = int(tile_k1(t) - k0);
    load_tile<K, kN, typename K::SmemStream>(Kp + k0 * p.k_row_stride + hk * Dh, p.k_row_stride, nvalid, Dh,
                                             smem + Sm::kK + buf * K::kStreamElems, tid);
    load_tile<K, kN, typename K::SmemStream>(Vp + k0 * p.v_row_stride + hk * Dh, p.v_row_stride, nvalid, Dh,
                                             smem + Sm::kV + buf * K::kStreamElems, tid);
  };

  // MMA machinery.
  typename K::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(smem + Sm::kQ), typename K::SmemFixed{});
  Tensor sDO = make_tensor(make_smem_ptr(smem + Sm::kDO), typename K::SmemFixed{});
  Tensor sK0 = make_tensor(make_smem_ptr(smem + Sm::kK), typename K::SmemStream{});
  Tensor sK0t = make_tensor(make_smem_ptr(smem + Sm::kK), typename K::SmemStreamT{});
  auto cpA = make_tiled_copy_A(typename K::LdsmA{}, mma);
  auto thrA = cpA.get_thread_slice(tid);
  auto cpB = make_tiled_copy_B(typename K::LdsmB{}, mma);
  auto thrB = cpB.get_thread_slice(tid);
  auto cpBt = make_tiled_copy_B(typename K::LdsmBt{}, mma);
  auto thrBt = cpBt.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);     // (MMA, MMA_M, MMA_K = kHeadDim / 16)
  Tensor tSrK = thr_mma.partition_fragment_B(sK0);    // (MMA, MMA_N = kN / 8, MMA_K)
  Tensor tOrVt = thr_mma.partition_fragment_B(sK0t);  // (MMA, MMA_N = kHeadDim / 8, MMA_K = kN / 16)
  Tensor tSsQ = thrA.partition_S(sQ);
  Tensor tSsDO = thrA.partition_S(sDO);
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kM>, Int<K::kHeadDim>>{});  // O (forward) or dQ (dq)
  clear(acc_o);
  Tensor o_rc = make_tensor(acc_o.data(), rowcol(acc_o.layout()));

  // Coordinates of the score accumulators: (row = query in block, col = key in tile).
  Tensor cS = make_identity_tensor(Shape<Int<kM>, Int<kN>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor cS_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(cS_rc))::value;  // 2 rows per thread (MMA_M = 1)
  constexpr int kCols = decltype(size<1>(cS_rc))::value;

  // Per-row constants: own range [a, hi), and (dq) lse in log2 units and delta.  Rows past the block's last
  // query use the last query's values (finite; their results are never stored).
  int64_t row_a[kRows], row_hi[kRows];
  float row_lse2[kRows], row_delta[kRows];
  bool row_live[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int m = get<0>(cS_rc(r, 0));
    const int64_t pos = min(p0 + m, p1 - 1);
    own_range(p, D, pos, &row_a[r], &row_hi[r]);
    row_lse2[r] = 0.f;
    row_delta[r] = 0.f;
    row_live[r] = true;
    if constexpr (kIsDq) {
      const int64_t qi = pos - D.shift;
      const float l = p.lse[h * p.total_q + qi];
      row_live[r] = m < rows_valid && l != -INFINITY;  // rows past the block: P = 0 (dO is zero-filled there)
      row_lse2[r] = row_live[r] ? l * kLog2e : 0.f;
      row_delta[r] = p.delta[h * p.total_q + qi];
    }
  }
  float row_m[kRows], row_l[kRows];  // forward: running max (log2 units) and this thread's partial row sum
  float row_bad[kRows];              // forward: 1 once this thread saw a non-finite visible score of the row
                                     // or a visible key whose v row held a NaN / Inf
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_m[r] = -INFINITY;
    row_l[r] = 0.f;
    row_bad[r] = 0.f;
  }
  const float scale_log2 = p.softmax_scale * kLog2e;

  // Prologue: the fixed tiles and the first non-empty key tile in one cp.async group.
  load_tile<K, kM, typename K::SmemFixed>(Q + q0 * p.q_row_stride + h * Dh, p.q_row_stride, rows_valid, Dh,
                                          smem + Sm::kQ, tid);
  if constexpr (kIsDq)
    load_tile<K, kM, typename K::SmemFixed>(dO + q0 * p.o_row_stride + h * Dh, p.o_row_stride, rows_valid, Dh,
                                            smem + Sm::kDO, tid);
  int cls = kTileEmpty;
  int64_t t = next_tile(-1, &cls);
  if (t < n_tiles) load_kv(t, 0);
  cp_async_fence();

  int buf = 0;
  while (t < n_tiles) {  // uniform: t and cls are the same in every thread
    int cls_next = kTileEmpty;
    const int64_t t_next = next_tile(t, &cls_next);
    if (t_next < n_tiles) {
      load_kv(t_next, buf ^ 1);  // buffer buf ^ 1 was released by the __syncthreads ending the previous iteration
      cp_async_fence();
      cp_async_wait<1>();  // everything but the group just issued has landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    T* kbuf = smem + Sm::kK + buf * K::kStreamElems;
    T* vbuf = smem + Sm::kV + buf * K::kStreamElems;
    Tensor sK = make_tensor(make_smem_ptr(kbuf), typename K::SmemStream{});
    Tensor sV = make_tensor(make_smem_ptr(vbuf), typename K::SmemStream{});
    const int64_t k0 = tile_k0(t);
    const int nvalid = int(tile_k1(t) - k0);
    if constexpr (!kIsDq) {
      // vbad_s of the previous tile was last read before the __syncthreads ending the previous iteration
      flag_nonfinite_v<K>(vbuf, vbad_s, tid);
      __syncthreads();
    }

    // S = Q K^T
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kM>, Int<kN>>{});
    clear(acc_s);
    gemm_ss(mma, acc_s, tSrQ, tSrK, tSsQ, thrB.partition_S(sK), cpA, cpB, thrA, thrB);
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));

    if constexpr (!kIsDq) {
      // Scale into log2 units and mask (-inf): bounds always, allowed() on PARTIAL tiles.
      const int64_t s_from = cls == kTilePartial ? span_segment_of(p.seg_start, D.s0, D.s1, k0) : D.s0;
      CUTE_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const int n = get<1>(cS_rc(0, c));
        const int64_t k = k0 + n;
        const bool col_ok = n < nvalid;
        const bool knoise = (cls == kTilePartial && col_ok) ? key_is_noise(p, s_from, D.s1, k) : false;
        const bool vbad = col_ok && vbad_s[n] != 0;
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
          const bool ok = col_ok && (cls == kTileFull || allowed(row_a[r], row_hi[r], k, knoise));
          const float sv = s_rc(r, c) * scale_log2;
          // non-finite inputs (contract): a NaN / Inf visible score, or a visible key whose v row held one (now
          // zeroed), makes the row NaN (epilogue); a non-finite score takes no part in the softmax (fmaxf would
          // drop a NaN and exp2 turn it into a weight)
          const bool fin = isfinite(sv);
          row_bad[r] = (ok && (!fin || vbad)) ? 1.f : row_bad[r];
          s_rc(r, c) = (ok && fin) ? sv : -INFINITY;
        }
      }
      // Online softmax (rows are owned by quads).
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float mx = -INFINITY;
        CUTE_UNROLL
        for (int c = 0; c < kCols; ++c) mx = fmaxf(mx, s_rc(r, c));
        mx = quad_max(mx);
        const float m_new = fmaxf(row_m[r], mx);
        // m_new == -inf: nothing visible so far (acc and l are 0): keep them, P below is 0.
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = m_new == -INFINITY ? 1.f : exp2f(row_m[r] - m_new);  // exp2(-inf) = 0 on the first hit
        float sum = 0.f;
        CUTE_UNROLL
        for (int c = 0; c < kCols; ++c) {
          const float e = exp2f(s_rc(r, c) - m_use);
          s_rc(r, c) = e;
          sum += e;
        }
        row_l[r] = row_l[r] * alpha + sum;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(o_rc); ++c) o_rc(r, c) *= alpha;
        row_m[r] = m_new;
      }
      // O += P V
      Tensor tOrP = to_a_operand<T>(acc_s);
      Tensor sVt = make_tensor(make_smem_ptr(vbuf), typename K::SmemStreamT{});
      gemm_rs(mma, acc_o, tOrP, tOrVt, thrBt.partition_S(sVt), cpBt, thrBt);
    } else {
      // dP = dO V^T
      Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kM>, Int<kN>>{});
      clear(acc_dp);
      gemm_ss(mma, acc_dp, tSrQ, tSrK, tSsDO, thrB.partition_S(sV), cpA, cpB, thrA, thrB);
      Tensor dp_rc = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));
      // dS = P (dP - delta), P = exp2(S scale log2e - lse log2e) on allowed pairs, 0 elsewhere.
      const int64_t s_from = cls == kTilePartial ? span_segment_of(p.seg_start, D.s0, D.s1, k0) : D.s0;
      CUTE_UNROLL
      for (int c = 0; c < kCols; ++c) {
        const int n = get<1>(cS_rc(0, c));
        const int64_t k = k0 + n;
        const bool col_ok = n < nvalid;
        const bool knoise = (cls == kTilePartial && col_ok) ? key_is_noise(p, s_from, D.s1, k) : false;
        CUTE_UNROLL
        for (int r = 0; r < kRows; ++r) {
          const bool ok = col_ok && row_live[r] && (cls == kTileFull || allowed(row_a[r], row_hi[r], k, knoise));
          const float pv = ok ? exp2f(s_rc(r, c) * scale_log2 - row_lse2[r]) : 0.f;
          s_rc(r, c) = pv * (dp_rc(r, c) - row_delta[r]);
        }
      }
      // dQ += dS K   (the softmax scale is applied once, in the epilogue)
      Tensor tdSr = to_a_operand<T>(acc_s);
      Tensor sKt = make_tensor(make_smem_ptr(kbuf), typename K::SmemStreamT{});
      gemm_rs(mma, acc_o, tdSr, tOrVt, thrBt.partition_S(sKt), cpBt, thrBt);
    }
    __syncthreads();  // every thread is done with buffer `buf` before it is refilled
    t = t_next;
    cls = cls_next;
    buf ^= 1;
  }
  cp_async_wait<0>();  // no tile at all: the fixed loads may still be in flight
  __syncthreads();

  // Epilogue: O = acc / l (forward) or dQ = scale * acc; through shared memory (the Q tile) for 128-bit stores.
  float mul[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    if constexpr (!kIsDq) {
      const float l = quad_sum(row_l[r]);
      const bool bad = quad_max(row_bad[r]) > 0.f;
      const bool ok = l > 0.f;
      mul[r] = bad ? NAN : (ok ? 1.f / l : 0.f);
      const float lse = bad ? NAN : (ok ? row_m[r] * kLn2 + logf(l) : -INFINITY);
      const int m = get<0>(cS_rc(r, 0));
      if ((tid & 3) == 0 && m < rows_valid) p.lse[h * p.total_q + q0 + m] = lse;
    } else {
      mul[r] = p.softmax_scale;
    }
  }
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(o_rc); ++c) o_rc(r, c) *= mul[r];
  }
  acc_to_smem<K, kM, typename K::SmemFixed>(acc_o, smem + Sm::kQ, thr_mma, 1.f);
  __syncthreads();
  T* out = static_cast<T*>(kIsDq ? p.dq : p.out);
  store_tile<K, kM, typename K::SmemFixed>(out + q0 * p.o_row_stride + h * Dh, p.o_row_stride, rows_valid, Dh,
                                           smem + Sm::kQ, tid);
}

// ------------------------------------------------------------------------------------------------ dk / dv
// Grid: x = doc * n_blocks + key block, y = kv head.  Key block nb of document d: keys [k_begin + 64 nb, ...).
// Its viewers form ONE contiguous range of query positions [v_lo, v_hi) (span.h, span_key_viewers): from the first
// key (causal segment) or its segment's start, to the document's end -- or, when every key of the block is noise,
// to the end of the block's last segment.  Query tiles of kN positions from v_lo; every query head of the GQA
// group walks them (head outer), all in one double-buffered pipeline.
template <class K>
struct DkvSmem {
  static constexpr int kK = 0;
  static constexpr int kV = K::kFixedElems;
  static constexpr int kQ = 2 * K::kFixedElems;             // two buffers
  static constexpr int kDO = kQ + 2 * K::kStreamElems;      // two buffers
  static constexpr int kElems = kDO + 2 * K::kStreamElems;
  static constexpr int kBytes = kElems * int(sizeof(typename K::T));
};

template <class K>
__global__ void __launch_bounds__(128) dkv_kernel(const SpanParams p, int64_t n_blocks) {
  using T = typename K::T;
  using Sm = DkvSmem<K>;
  constexpr int kM = K::kM, kN = K::kN;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x;

  const int64_t doc = int64_t(blockIdx.x) / n_blocks;
  const int64_t nb = int64_t(blockIdx.x) - doc * n_blocks;
  const int64_t hk = blockIdx.y;
  const int64_t G = p.Hq / p.Hkv;
  const Doc D = load_doc(p, doc);
  const int64_t kb0 = D.k_begin + nb * kM;
  if (kb0 >= D.k_end) return;  // block-uniform
  const int64_t kb1 = min(kb0 + int64_t(kM), D.k_end);
  const int rows_valid = int(kb1 - kb0);
  const int Dh = int(p.Dh);

  // Viewer range (query positions), see above.
  const int64_t seg_first = span_segment_of(p.seg_start, D.s0, D.s1, kb0);
  bool any_visible_later = false;
  int64_t seg_last = seg_first;
  for (int64_t s = seg_first; s < D.s1 && p.seg_start[s] < kb1; ++s) {
    if (p.seg_mode[s] != kSpanNoise) any_visible_later = true;
    seg_last = s;
  }
  const int64_t lo = p.seg_mode[seg_first] == kSpanCausal ? kb0 : int64_t(p.seg_start[seg_first]);
  const int64_t p_first = D.q_begin + D.shift;  // the document's first query position
  const int64_t v_lo = max(lo, p_first);
  const int64_t v_hi = any_visible_later ? D.k_end : int64_t(p.seg_end[seg_last]);
  const int64_t n_tiles = v_lo < v_hi ? (v_hi - v_lo + kN - 1) / kN : 0;

  const T* Q = static_cast<const T*>(p.q);
  const T* Kp = static_cast<const T*>(p.k);
  const T* Vp = static_cast<const T*>(p.v);
  const T* dO = static_cast<const T*>(p.dout);

  auto tile_p0 = [&](int64_t t) { return v_lo + t * kN; };
  auto tile_p1 = [&](int64_t t) { return min(v_lo + (t + 1) * kN, v_hi); };
  auto classify = [&](int64_t t) {
    return span_classify_tile(p.seg_start, p.seg_end, p.seg_mode, D.s0, D.s1, tile_p0(t), tile_p1(t), kb0, kb1);
  };
  auto next_tile = [&](int64_t t, int* cls) {
    for (++t; t < n_tiles; ++t) {
      *cls = classify(t);
      if (*cls != kTileEmpty) break;
    }
    return t;
  };
  // Iteration (g, t): query head hk * G + g, query tile t; the same non-empty tiles for every head.
  int cls_first = kTileEmpty;
  const int64_t t_first = next_tile(-1, &cls_first);
  auto load_qdo = [&](int64_t g, int64_t t, int buf) {
    const int64_t i0 = tile_p0(t) - D.shift;  // query index of the tile's first row
    const int nvalid = int(tile_p1(t) - tile_p0(t));
    const int64_t h = hk * G + g;
    load_tile<K, kN, typename K::SmemStream>(Q + i0 * p.q_row_stride + h * Dh, p.q_row_stride, nvalid, Dh,
                                             smem + Sm::kQ + buf * K::kStreamElems, tid);
    load_tile<K, kN, typename K::SmemStream>(dO + i0 * p.o_row_stride + h * Dh, p.o_row_stride, nvalid, Dh,
                                             smem + Sm::kDO + buf * K::kStreamElems, tid);
  };

  typename K::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor sK = make_tensor(make_smem_ptr(smem + Sm::kK), typename K::SmemFixed{});
  Tensor sV = make_tensor(make_smem_ptr(smem + Sm::kV), typename K::SmemFixed{});
  Tensor sQ0 = make_tensor(make_smem_ptr(smem + Sm::kQ), typename K::SmemStream{});
  Tensor sQ0t = make_tensor(make_smem_ptr(smem + Sm::kQ), typename K::SmemStreamT{});
  auto cpA = make_tiled_copy_A(typename K::LdsmA{}, mma);
  auto thrA = cpA.get_thread_slice(tid);
  auto cpB = make_tiled_copy_B(typename K::LdsmB{}, mma);
  auto thrB = cpB.get_thread_slice(tid);
  auto cpBt = make_tiled_copy_B(typename K::LdsmBt{}, mma);
  auto thrBt = cpBt.get_thread_slice(tid);
  Tensor tSrK = thr_mma.partition_fragment_A(sK);     // (MMA, MMA_M, MMA_K = kHeadDim / 16)
  Tensor tSrQ = thr_mma.partition_fragment_B(sQ0);    // (MMA, MMA_N = kN / 8, MMA_K)
  Tensor tDrQt = thr_mma.partition_fragment_B(sQ0t);  // (MMA, MMA_N = kHeadDim / 8, MMA_K = kN / 16)
  Tensor tSsK = thrA.partition_S(sK);
  Tensor tSsV = thrA.partition_S(sV);
  Tensor acc_dk = partition_fragment_C(mma, Shape<Int<kM>, Int<K::kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma, Shape<Int<kM>, Int<K::kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);

  // Coordinates of the (transposed) score accumulators: (row = key in block, col = query in tile).
  Tensor cS = make_identity_tensor(Shape<Int<kM>, Int<kN>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor cS_rc = make_tensor(tScS.data(), rowcol(tScS.layout()));
  constexpr int kRows = decltype(size<0>(cS_rc))::value;
  constexpr int kCols = decltype(size<1>(cS_rc))::value;
  int64_t row_k[kRows];
  bool row_ok[kRows], row_noise[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int m = get<0>(cS_rc(r, 0));
    row_ok[r] = m < rows_valid;
    row_k[r] = kb0 + min(m, rows_valid - 1);
    row_noise[r] = key_is_noise(p, seg_first, D.s1, row_k[r]);
  }
  const float scale_log2 = p.softmax_scale * kLog2e;

  // Prologue: K, V and the first (Q, dO) tile in one group.
  load_tile<K, kM, typename K::SmemFixed>(Kp + kb0 * p.k_row_stride + hk * Dh, p.k_row_stride, rows_valid, Dh,
                                          smem + Sm::kK, tid);
  load_tile<K, kM, typename K::SmemFixed>(Vp + kb0 * p.v_row_stride + hk * Dh, p.v_row_stride, rows_valid, Dh,
                                          smem + Sm::kV, tid);
  int64_t g = 0, t = t_first;
  int cls = cls_first;
  if (t < n_tiles) load_qdo(g, t, 0);
  cp_async_fence();

  int buf = 0;
  while (t < n_tiles) {  // uniform
    // next iteration: the next non-empty tile of this head, else the first one of the next head
    int cls_next = kTileEmpty;
    int64_t g_next = g, t_next = next_tile(t, &cls_next);
    if (t_next >= n_tiles && g + 1 < G) {
      g_next = g + 1;
      t_next = t_first;
      cls_next = cls_first;
    }
    if (t_next < n_tiles) {
      load_qdo(g_next, t_next, buf ^ 1);
      cp_async_fence();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const int64_t h = hk * G + g;
    T* qbuf = smem + Sm::kQ + buf * K::kStreamElems;
    T* dobuf = smem + Sm::kDO + buf * K::kStreamElems;
    Tensor sQ = make_tensor(make_smem_ptr(qbuf), typename K::SmemStream{});
    Tensor sDO = make_tensor(make_smem_ptr(dobuf), typename K::SmemStream{});
    const int64_t pt0 = tile_p0(t), pt1 = tile_p1(t);

    // S^T = K Q^T, dP^T = V dO^T
    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kM>, Int<kN>>{});
    Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kM>, Int<kN>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_ss(mma, acc_s, tSrK, tSrQ, tSsK, thrB.partition_S(sQ), cpA, cpB, thrA, thrB);
    gemm_ss(mma, acc_dp, tSrK, tSrQ, tSsV, thrB.partition_S(sDO), cpA, cpB, thrA, thrB);
    Tensor s_rc = make_tensor(acc_s.data(), rowcol(acc_s.layout()));
    Tensor dp_rc = make_tensor(acc_dp.data(), rowcol(acc_dp.layout()));

    // P^T = exp2(S^T scale log2e - lse log2e) on allowed pairs (0 elsewhere), dS^T = P^T (dP^T - delta).
    CUTE_UNROLL
    for (int c = 0; c < kCols; ++c) {
      const int n = get<1>(cS_rc(0, c));
      const int64_t pos = pt0 + n;
      const bool col_ok = pos < pt1;
      const int64_t qi = pos - D.shift;
      float lse2 = 0.f, dl = 0.f;
      bool live = false;
      if (col_ok) {
        const float l = p.lse[h * p.total_q + qi];
        live = l != -INFINITY;
        lse2 = live ? l * kLog2e : 0.f;
        dl = p.delta[h * p.total_q + qi];
      }
      int64_t a = 0, hi = 0;
      if (cls == kTilePartial && col_ok) own_range(p, D, pos, &a, &hi);
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const bool ok = col_ok && live && row_ok[r] &&
                        (cls == kTileFull || allowed(a, hi, row_k[r], row_noise[r]));
        const float pv = ok ? exp2f(s_rc(r, c) * scale_log2 - lse2) : 0.f;
        s_rc(r, c) = pv;
        dp_rc(r, c) = pv * (dp_rc(r, c) - dl);
      }
    }
    // dV += P^T dO, dK += dS^T Q   (the softmax scale of dK is applied in the epilogue)
    Tensor tPr = to_a_operand<T>(acc_s);
    Tensor sDOt = make_tensor(make_smem_ptr(dobuf), typename K::SmemStreamT{});
    gemm_rs(mma, acc_dv, tPr, tDrQt, thrBt.partition_S(sDOt), cpBt, thrBt);
    Tensor tdSr = to_a_operand<T>(acc_dp);
    Tensor sQt = make_tensor(make_smem_ptr(qbuf), typename K::SmemStreamT{});
    gemm_rs(mma, acc_dk, tdSr, tDrQt, thrBt.partition_S(sQt), cpBt, thrBt);

    __syncthreads();  // buffer `buf` is free for the next prefetch
    g = g_next;
    t = t_next;
    cls = cls_next;
    buf ^= 1;
  }
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue (through the K and V tiles): dK = scale * acc_dk, dV = acc_dv; keys no query sees get zeros.
  acc_to_smem<K, kM, typename K::SmemFixed>(acc_dk, smem + Sm::kK, thr_mma, p.softmax_scale);
  acc_to_smem<K, kM, typename K::SmemFixed>(acc_dv, smem + Sm::kV, thr_mma, 1.f);
  __syncthreads();
  store_tile<K, kM, typename K::SmemFixed>(static_cast<T*>(p.dk) + kb0 * p.k_row_stride + hk * Dh, p.k_row_stride,
                                           rows_valid, Dh, smem + Sm::kK, tid);
  store_tile<K, kM, typename K::SmemFixed>(static_cast<T*>(p.dv) + kb0 * p.v_row_stride + hk * Dh, p.v_row_stride,
                                           rows_valid, Dh, smem + Sm::kV, tid);
}

// ------------------------------------------------------------------------------------------------ delta
// delta[h, i] = sum_d dout[i, h, d] * out[i, h, d] in float32; one warp per (i, h) row, fixed order.
template <class T>
__global__ void __launch_bounds__(256) delta_kernel(const SpanParams p) {
  const T* O = static_cast<const T*>(p.out);
  const T* G = static_cast<const T*>(p.dout);
  const int lane = threadIdx.x & 31;
  const int64_t rows = p.total_q * p.Hq;
  for (int64_t row = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5); row < rows; row += int64_t(gridDim.x) * 8) {
    const int64_t i = row / p.Hq, h = row - i * p.Hq;
    const T* o = O + i * p.o_row_stride + h * p.Dh;
    const T* g = G + i * p.o_row_stride + h * p.Dh;
    float s = 0.f;
    for (int64_t d = lane; d < p.Dh; d += 32) s += float(o[d]) * float(g[d]);
    s = warp_sum(s);
    if (lane == 0) p.delta[h * p.total_q + i] = s;
  }
}

// ------------------------------------------------------------------------------------------------ launchers
template <class Kern>
cudaError_t set_smem(Kern kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <class T, int kHeadDim, bool kIsDq>
cudaError_t launch_fwd_dq(const SpanParams& p, cudaStream_t st) {
  using K = Traits<kHeadDim, Config<kHeadDim>::kFwdN, T>;
  constexpr int smem = FwdDqSmem<K, kIsDq>::kBytes;
  const int64_t m_blocks = ceil_div(p.max_seqlen_q, K::kM);
  if (m_blocks <= 0 || p.num_docs <= 0) return cudaSuccess;
  if (m_blocks * p.num_docs > kMaxGridX || p.Hq > 65535) return cudaErrorInvalidConfiguration;
  auto kernel = fwd_dq_kernel<K, kIsDq>;
  cudaError_t e = set_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<dim3(unsigned(m_blocks * p.num_docs), unsigned(p.Hq)), K::kNThreads, smem, st>>>(p, m_blocks);
  return cudaGetLastError();
}

template <class T, int kHeadDim>
cudaError_t launch_dkv(const SpanParams& p, cudaStream_t st) {
  using K = Traits<kHeadDim, Config<kHeadDim>::kDkvN, T>;
  constexpr int smem = DkvSmem<K>::kBytes;
  const int64_t n_blocks = ceil_div(p.max_seqlen_k, K::kM);
  if (n_blocks <= 0 || p.num_docs <= 0) return cudaSuccess;
  if (n_blocks * p.num_docs > kMaxGridX || p.Hkv > 65535) return cudaErrorInvalidConfiguration;
  auto kernel = dkv_kernel<K>;
  cudaError_t e = set_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<dim3(unsigned(n_blocks * p.num_docs), unsigned(p.Hkv)), K::kNThreads, smem, st>>>(p, n_blocks);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_delta(const SpanParams& p, cudaStream_t st) {
  const int64_t rows = p.total_q * p.Hq;
  if (rows <= 0) return cudaSuccess;
  const int64_t grid = min(ceil_div(rows, 8), int64_t(1) << 20);
  delta_kernel<T><<<unsigned(grid), 256, 0, st>>>(p);
  return cudaGetLastError();
}

// f(TypeTag<T>{}, std::integral_constant<int, kHeadDim>{}) for the dtype (1 bf16, 2 fp16) and padded head dim.
template <class F>
cudaError_t dispatch(const SpanParams& p, int dtype, F&& f) {
  auto by_dim = [&](auto tag) -> cudaError_t {
    if (p.Dh <= 64) return f(tag, std::integral_constant<int, 64>{});
    if (p.Dh <= 96) return f(tag, std::integral_constant<int, 96>{});
    return f(tag, std::integral_constant<int, 128>{});
  };
  if (dtype == 1) return by_dim(TypeTag<cutlass::bfloat16_t>{});
  if (dtype == 2) return by_dim(TypeTag<cutlass::half_t>{});
  return cudaErrorInvalidValue;
}

bool valid_params(const SpanParams& p, int dtype) {
  if (dtype != 1 && dtype != 2) return false;
  if (p.Dh < 1 || p.Dh > 128 || p.Dh % 8 != 0) return false;
  if (p.Hq < 1 || p.Hkv < 1 || p.Hq % p.Hkv != 0) return false;
  if (p.num_docs < 0 || p.total_q < 0 || p.total_k < 0) return false;
  for (int64_t s : {p.q_row_stride, p.k_row_stride, p.v_row_stride, p.o_row_stride})
    if (s % 8 != 0) return false;
  return true;
}

}  // namespace span
}  // namespace cuda
}  // namespace umm

extern "C" int umm_cuda_span_attention_fwd(const umm::SpanParams* pp, int dtype, void* stream) {
  using namespace umm::cuda;
  using namespace umm::cuda::span;
  if (pp == nullptr || !valid_params(*pp, dtype)) return to_int(cudaErrorInvalidValue);
  const umm::SpanParams& p = *pp;
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out))
    return to_int(cudaErrorInvalidValue);
  if (p.total_q == 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return to_int(dispatch(p, dtype, [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    return launch_fwd_dq<T, decltype(dim)::value, false>(p, st);
  }));
}

extern "C" int umm_cuda_span_attention_bwd(const umm::SpanParams* pp, int dtype, void* stream) {
  using namespace umm::cuda;
  using namespace umm::cuda::span;
  if (pp == nullptr || !valid_params(*pp, dtype)) return to_int(cudaErrorInvalidValue);
  const umm::SpanParams& p = *pp;
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out) || !aligned16(p.dout) ||
      !aligned16(p.dq) || !aligned16(p.dk) || !aligned16(p.dv))
    return to_int(cudaErrorInvalidValue);
  if (p.total_q > 0 && p.delta == nullptr) return to_int(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return to_int(dispatch(p, dtype, [&](auto tag, auto dim) {
    using T = typename decltype(tag)::type;
    constexpr int kD = decltype(dim)::value;
    cudaError_t e = launch_delta<T>(p, st);  // read by both kernels below (same stream)
    if (e == cudaSuccess && p.total_q > 0) e = launch_fwd_dq<T, kD, true>(p, st);
    if (e == cudaSuccess && p.total_k > 0) e = launch_dkv<T, kD>(p, st);  // also zeros for keys nobody sees
    return e;
  }));
}
