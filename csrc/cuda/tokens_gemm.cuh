// Tile configuration of the CuTe gather-GEMM (tokens_gemm.cu), shared with the host-side layout check
// csrc/cuda/checks/tokens_gemm_layout.cu.  Needs the CUTLASS / CuTe headers.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace umm {
namespace cuda {
namespace tokgemm {

using namespace cute;

constexpr int kBM = 128, kBN = 128, kBK = 32, kThreads = 128;
constexpr int kChunks = kBM * kBK / 8 / kThreads;  // 16-byte chunks per thread per operand tile (4)
static_assert(kBM == kBN, "A and B tiles share the chunk mapping");

template <class T>
struct Atom;
template <>
struct Atom<cutlass::bfloat16_t> {
  using type = SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct Atom<cutlass::half_t> {
  using type = SM80_16x8x16_F32F16F16F32_TN;
};

template <class T>
struct Cfg {
  using TiledMma = TiledMMA<MMA_Atom<typename Atom<T>::type>, Layout<Shape<_2, _2, _1>>, Tile<_32, _32, _16>>;
  using SmemAtom = decltype(composition(Swizzle<2, 3, 3>{}, Layout<Shape<_8, Int<kBK>>, Stride<Int<kBK>, _1>>{}));
  using SmemA = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBM>, Int<kBK>, _2>{}));
  using SmemB = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBN>, Int<kBK>, _2>{}));
  using Ldsm = Copy_Atom<SM75_U32x4_LDSM_N, T>;
};

// Thread tid's q-th 16-byte chunk of a (kBM x kBK) operand tile: (row, first column).
CUTE_HOST_DEVICE constexpr int chunk_row(int tid, int i) { return (tid + i * kThreads) / (kBK / 8); }
CUTE_HOST_DEVICE constexpr int chunk_col(int tid, int i) { return ((tid + i * kThreads) % (kBK / 8)) * 8; }

}  // namespace tokgemm
}  // namespace cuda
}  // namespace umm
