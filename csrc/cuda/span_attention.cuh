// Span attention (CUDA, sm80 tensor cores): tile traits, CuTe layout helpers and layout arithmetic shared by the
// kernels of span_attention.cu and by the host-side layout check span_layout_check.cu.  Torch-free.
#pragma once
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "common.cuh"
#include "umm/span.h"

namespace umm {
namespace cuda {
namespace span {

using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <class T>
struct MmaAtomFor;
template <>
struct MmaAtomFor<cutlass::bfloat16_t> {
  using type = SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct MmaAtomFor<cutlass::half_t> {
  using type = SM80_16x8x16_F32F16F16F32_TN;
};

// ------------------------------------------------------------------------------------------------ traits
// kHeadDim: the padded head dim (64, 96 or 128); the real Dh <= kHeadDim, the extra columns are zero-filled on load
// and never stored.  kM = 64 rows of the fixed operands (4 warps x 16 rows: each warp owns 16 full rows of every
// product, which is what lets P / dS go from the accumulator straight into the A operand of the next product);
// kN rows of the streamed operands.
template <int kHeadDim_, int kN_, class T_>
struct Traits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kM = 64;
  static constexpr int kN = kN_;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = 32 * kNWarps;
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 128, "padded head dim: 64, 96 or 128");
  static_assert(kN % 32 == 0, "streamed rows: a multiple of 32 (gmem copy passes, 16-wide MMA tiles)");

  using TiledMma = TiledMMA<MMA_Atom<typename MmaAtomFor<T>::type>, Layout<Shape<Int<kNWarps>, _1, _1>>,
                            Tile<Int<16 * kNWarps>, _16, _16>>;

  // Shared memory: rows of kHeadDim elements, in 8 x kBlockKSmem swizzled atoms (conflict-free ldmatrix and
  // 128-bit cp.async; a swizzle never moves the 8-element (16-byte) chunks apart).
  static constexpr int kBlockKSmem = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzle = kBlockKSmem == 64 ? 3 : 2;
  using SmemAtom = decltype(composition(Swizzle<kSwizzle, 3, 3>{},
                                        Layout<Shape<_8, Int<kBlockKSmem>>, Stride<Int<kBlockKSmem>, _1>>{}));
  using SmemFixed = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kM>, Int<kHeadDim>>{}));
  using SmemStream = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kN>, Int<kHeadDim>>{}));
  // Transposed view of a streamed tile: (d, row) -> element (row, d).  The B operand of O += P V (V^T),
  // dQ += dS K (K^T), dV += P^T dO (dO^T), dK += dS^T Q (Q^T); read with transposing ldmatrix.
  using SmemStreamT =
      decltype(composition(SmemStream{}, make_layout(Shape<Int<kHeadDim>, Int<kN>>{}, GenRowMajor{})));

  static constexpr int kFixedElems = kM * kHeadDim;
  static constexpr int kStreamElems = kN * kHeadDim;

  // Global <-> shared: 128-bit chunks (8 elements), kGmemThreadsPerRow threads per kBlockKSmem columns.
  static constexpr int kGmemThreadsPerRow = kBlockKSmem / 8;
  using GmemThreads = Layout<Shape<Int<kNThreads / kGmemThreadsPerRow>, Int<kGmemThreadsPerRow>>,
                             Stride<Int<kGmemThreadsPerRow>, _1>>;
  using GmemLoad = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, T>{},
                                            GmemThreads{}, Layout<Shape<_1, _8>>{}));
  using GmemStore =
      decltype(make_tiled_copy(Copy_Atom<UniversalCopy<cute::uint128_t>, T>{}, GmemThreads{}, Layout<Shape<_1, _8>>{}));
  static_assert(kM % (kNThreads / kGmemThreadsPerRow) == 0 && kN % (kNThreads / kGmemThreadsPerRow) == 0,
                "tile rows must be a multiple of the rows one gmem copy pass covers");

  // Shared -> registers.
  using LdsmA = Copy_Atom<SM75_U32x4_LDSM_N, T>;   // A operands (fixed tiles, row-major, d contiguous)
  using LdsmB = Copy_Atom<SM75_U32x4_LDSM_N, T>;   // B operands read as (row, d): S = Q K^T, dP = dO V^T, ...
  using LdsmBt = Copy_Atom<SM75_U16x8_LDSM_T, T>;  // B operands read transposed: (d, row)
};

// Key tile of the forward / dq kernels and query tile of the dk/dv kernel for each padded head dim (register
// budget of 128 threads; smem stays <= 96 KiB, the sm_86 / sm_89 per-block limit).
template <int kHeadDim>
struct Config {
  static constexpr int kFwdN = 64;
  static constexpr int kDkvN = kHeadDim <= 64 ? 64 : 32;
};

// ------------------------------------------------------------------------------------------------ helpers
// Accumulator layout ((2, 2), MMA_M, MMA_N) of the SM80 16x8 MMA -> (rows, cols) = ((2, MMA_M), (2, MMA_N)).
// Value (v0, v1) of atom (m, n) of thread t sits at row 16 m' + t / 4 + 8 v1, column 8 n + 2 (t % 4) + v0 of the
// warp's tile; we never rely on that formula: coordinates always come from an identity tensor partitioned the
// same way.  What we rely on: the four threads t with equal t / 4 (a quad) own all columns of their rows.
template <class L>
CUTE_HOST_DEVICE constexpr auto rowcol(L const& l) {
  static_assert(decltype(rank(l))::value == 3, "accumulator layout ((2,2), MMA_M, MMA_N) expected");
  static_assert(decltype(size<0>(l))::value == 4, "accumulator layout ((2,2), MMA_M, MMA_N) expected");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// Accumulator layout ((2, 2), MMA_M, MMA_N) -> A-operand layout ((2, 2, 2), MMA_M, MMA_N / 2) of the 16x8x16 MMA:
// the A fragment of k-block j is the accumulators of n-atoms 2j and 2j + 1 (the third value mode selects the
// second 8 columns).  Same register contents, only re-indexed.
template <class L>
CUTE_HOST_DEVICE constexpr auto acc_to_a(L const& l) {
  static_assert(decltype(size<2>(l))::value % 2 == 0, "the MMA_N of the scores must be even");
  auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});  // ((2, 2), MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0, 0>(d), get<0, 1>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

// Round a float accumulator fragment to T and return it, OWNING its registers, indexed as an A operand:
// element i of the accumulator (linear index over its shape) is stored at offset i, and the returned tensor reads
// that storage through acc_to_a(compact layout of the accumulator's shape) (span_layout_check.cu verifies that every
// A position then holds the coordinate the MMA expects).
template <class T, class Frag>
CUTE_HOST_DEVICE auto to_a_operand(Frag const& acc) {
  auto compact = make_layout(shape(acc));
  Tensor r = make_tensor<T>(acc_to_a(compact));  // owning; acc_to_a only re-indexes: cosize == size
  static_assert(decltype(cosize(r.layout()))::value == decltype(size(acc))::value, "fragment sizes");
  Tensor w = make_tensor(r.data(), compact);  // the same registers in the accumulator's shape
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) w(i) = T(acc(i));
  return r;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// acc += A B^T with both operands in shared memory; fragments are loaded with ldmatrix one k-block ahead.
// tCsA / tCsB: shared-memory partitions of the ldmatrix thread copies; tCrA / tCrB: MMA register fragments.
template <class Mma, class Acc, class RA, class RB, class SA, class SB, class CpA, class CpB, class ThrA, class ThrB>
__device__ __forceinline__ void gemm_ss(Mma const& mma, Acc& acc, RA& tCrA, RB& tCrB, SA const& tCsA,
                                        SB const& tCsB, CpA const& cpA, CpB const& cpB, ThrA const& thrA,
                                        ThrB const& thrB) {
  Tensor vA = thrA.retile_D(tCrA);
  Tensor vB = thrB.retile_D(tCrB);
  static_assert(decltype(size<1>(tCsA))::value == decltype(size<1>(vA))::value, "A copy / MMA partition mismatch");
  static_assert(decltype(size<1>(tCsB))::value == decltype(size<1>(vB))::value, "B copy / MMA partition mismatch");
  static_assert(decltype(size<2>(tCrA))::value == decltype(size<2>(tCrB))::value, "K extents differ");
  copy(cpA, tCsA(_, _, 0), vA(_, _, 0));
  copy(cpB, tCsB(_, _, 0), vB(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    if (k + 1 < size<2>(tCrA)) {
      copy(cpA, tCsA(_, _, k + 1), vA(_, _, k + 1));
      copy(cpB, tCsB(_, _, k + 1), vB(_, _, k + 1));
    }
    cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// acc += A B^T with A already in registers (P or dS) and B in shared memory.
template <class Mma, class Acc, class RA, class RB, class SB, class CpB, class ThrB>
__device__ __forceinline__ void gemm_rs(Mma const& mma, Acc& acc, RA const& tCrA, RB& tCrB, SB const& tCsB,
                                        CpB const& cpB, ThrB const& thrB) {
  Tensor vB = thrB.retile_D(tCrB);
  static_assert(decltype(size<1>(tCsB))::value == decltype(size<1>(vB))::value, "B copy / MMA partition mismatch");
  static_assert(decltype(size<2>(tCrA))::value == decltype(size<2>(tCrB))::value, "K extents differ");
  copy(cpB, tCsB(_, _, 0), vB(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    if (k + 1 < size<2>(tCrA)) copy(cpB, tCsB(_, _, k + 1), vB(_, _, k + 1));
    cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// Issue the cp.async loads of a ROWS x kHeadDim tile starting at `g` (row stride `ld` elements) into the shared
// tile `s`: rows >= rows_valid and columns >= cols_valid (a multiple of 8) are zero-filled with plain stores
// instead (never addressed in global memory).  The caller commits the group (cp_async_fence).
template <class K, int ROWS, class SmemLayout>
__device__ __forceinline__ void load_tile(typename K::T const* g, int64_t ld, int rows_valid, int cols_valid,
                                          typename K::T* s, int tid) {
  using T = typename K::T;
  Tensor gT = make_tensor(make_gmem_ptr(g), make_layout(make_shape(Int<ROWS>{}, Int<K::kHeadDim>{}),
                                                        make_stride(ld, _1{})));
  Tensor sT = make_tensor(make_smem_ptr(s), SmemLayout{});
  Tensor cT = make_identity_tensor(make_shape(Int<ROWS>{}, Int<K::kHeadDim>{}));
  typename K::GmemLoad cp;
  auto thr = cp.get_thread_slice(tid);
  Tensor tg = thr.partition_S(gT);
  Tensor ts = thr.partition_D(sT);
  Tensor tc = thr.partition_S(cT);
  CUTE_UNROLL
  for (int m = 0; m < size<1>(ts); ++m) {
    const bool row_ok = get<0>(tc(0, m, 0)) < rows_valid;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(ts); ++k) {
      if (row_ok && get<1>(tc(0, m, k)) < cols_valid) {
        copy(cp, tg(_, m, k), ts(_, m, k));
      } else {
        fill(ts(_, m, k), T(0.f));
      }
    }
  }
}

// Store a ROWS x kHeadDim shared tile to global memory (rows < rows_valid, columns < cols_valid only).  The
// caller has synchronised the block after writing the shared tile.
template <class K, int ROWS, class SmemLayout>
__device__ __forceinline__ void store_tile(typename K::T* g, int64_t ld, int rows_valid, int cols_valid,
                                           typename K::T const* s, int tid) {
  Tensor gT = make_tensor(make_gmem_ptr(g), make_layout(make_shape(Int<ROWS>{}, Int<K::kHeadDim>{}),
                                                        make_stride(ld, _1{})));
  Tensor sT = make_tensor(make_smem_ptr(s), SmemLayout{});
  Tensor cT = make_identity_tensor(make_shape(Int<ROWS>{}, Int<K::kHeadDim>{}));
  typename K::GmemStore cp;
  auto thr = cp.get_thread_slice(tid);
  Tensor ts = thr.partition_S(sT);
  Tensor tg = thr.partition_D(gT);
  Tensor tc = thr.partition_D(cT);
  Tensor tr = make_fragment_like(ts);
  copy(cp, ts, tr);
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tg); ++m) {
    if (get<0>(tc(0, m, 0)) < rows_valid) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tg); ++k) {
        if (get<1>(tc(0, m, k)) < cols_valid) copy(cp, tr(_, m, k), tg(_, m, k));
      }
    }
  }
}

// Write an fp32 accumulator tile (ROWS x kHeadDim, partitioned by thr_mma) to a shared tile, rounded to T.
template <class K, int ROWS, class SmemLayout, class Acc, class ThrMma>
__device__ __forceinline__ void acc_to_smem(Acc const& acc, typename K::T* s, ThrMma const& thr_mma, float mul) {
  using T = typename K::T;
  Tensor sT = make_tensor(make_smem_ptr(s), SmemLayout{});
  Tensor cT = make_identity_tensor(make_shape(Int<ROWS>{}, Int<K::kHeadDim>{}));
  Tensor tc = thr_mma.partition_C(cT);
  static_assert(decltype(size(tc))::value == decltype(size(acc))::value, "accumulator / coordinate partition");
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) sT(get<0>(tc(i)), get<1>(tc(i))) = T(acc(i) * mul);
}

// The layout arithmetic of one document.
struct Doc {
  int64_t q_begin, q_end, k_begin, k_end, shift, s0, s1;
};
__device__ __forceinline__ Doc load_doc(const SpanParams& p, int64_t d) {
  Doc D;
  D.q_begin = p.cu_seqlens_q[d];
  D.q_end = p.cu_seqlens_q[d + 1];
  D.k_begin = p.cu_seqlens_k[d];
  D.k_end = p.cu_seqlens_k[d + 1];
  D.shift = D.k_end - D.q_end;  // = span_query_shift
  D.s0 = p.seg_offsets[d];
  D.s1 = p.seg_offsets[d + 1];
  return D;
}

// Own-segment bounds of the query at key position `pos` (inside the document): visible own keys [a, hi).
__device__ __forceinline__ void own_range(const SpanParams& p, const Doc& D, int64_t pos, int64_t* a, int64_t* hi) {
  const int64_t s = span_segment_of(p.seg_start, D.s0, D.s1, pos);
  *a = p.seg_start[s];
  *hi = p.seg_mode[s] == kSpanCausal ? pos + 1 : int64_t(p.seg_end[s]);
}

// Whether key k (inside the document) lies in a noise segment; the search starts at segment s_from (<= k's).
__device__ __forceinline__ bool key_is_noise(const SpanParams& p, int64_t s_from, int64_t s1, int64_t k) {
  return p.seg_mode[span_segment_of(p.seg_start, s_from, s1, k)] == kSpanNoise;
}

__device__ __forceinline__ bool allowed(int64_t a, int64_t hi, int64_t k, bool k_noise) {
  return (a <= k && k < hi) || (k < a && !k_noise);
}

}  // namespace span
}  // namespace cuda
}  // namespace umm
