// Host-side check of the layout arithmetic of the CuTe gather-GEMM (csrc/cuda/tokens_gemm.cu): the parts a GPU-
// less build can verify.  Not part of the library build (CMake globs csrc/cuda/*.cu only); build and run:
//   CUT=$(python -c "import cutlass_library, os; print(os.path.dirname(cutlass_library.__file__))")/source
//   nvcc -std=c++17 --expt-relaxed-constexpr -I csrc/include -I csrc/cuda -I $CUT/include \
//        csrc/cuda/checks/tokens_gemm_layout.cu -o /tmp/tokens_gemm_layout && /tmp/tokens_gemm_layout
// Checks:
//  1. every 16-byte chunk (8 consecutive k of one row, k % 8 == 0) of the swizzled shared tiles is contiguous and
//     16-byte aligned (store_a writes it as one uint4, cp.async as one 16-byte copy), and the layout is a
//     bijection onto [0, cosize);
//  2. the register-staging chunk map (chunk_row / chunk_col over 128 threads x kChunks) covers the 128 x 32 tile
//     exactly once;
//  3. the accumulator coordinates (identity tensor partitioned like the accumulators, used by the epilogue)
//     cover the 128 x 128 tile exactly once over the 128 threads;
//  4. the ldmatrix partitions of A and B address every element of a k-block's shared tile exactly once over the
//     128 threads and two k-blocks (the MMA reads the whole tile).
#include <cstdio>
#include <vector>

#include "tokens_gemm.cuh"

using namespace cute;
using namespace umm::cuda::tokgemm;

static int failures = 0;
#define CHECK(cond, ...)                 \
  do {                                   \
    if (!(cond)) {                       \
      if (failures < 20) {               \
        std::printf("FAIL: " __VA_ARGS__); \
        std::printf("\n");               \
      }                                  \
      ++failures;                        \
    }                                    \
  } while (0)

template <class T>
void check_all(const char* name) {
  using C = Cfg<T>;
  // 1. swizzled smem tiles
  auto check_smem = [&](auto layout, int rows, const char* what) {
    const int cos = int(cosize(layout));
    std::vector<int> seen(cos, 0);
    for (int st = 0; st < 2; ++st)
      for (int r = 0; r < rows; ++r)
        for (int k = 0; k < kBK; k += 8) {
          const int base = int(layout(r, k, st));
          CHECK(base % 8 == 0, "%s %s: chunk (%d, %d, %d) at %d not 16-byte aligned", name, what, r, k, st, base);
          for (int e = 0; e < 8; ++e) {
            const int off = int(layout(r, k + e, st));
            CHECK(off == base + e, "%s %s: chunk (%d, %d, %d) element %d at %d, expected %d", name, what, r, k, st, e,
                  off, base + e);
            if (off >= 0 && off < cos) ++seen[off];
          }
        }
    for (int i = 0; i < cos; ++i) CHECK(seen[i] == 1, "%s %s: offset %d hit %d times", name, what, i, seen[i]);
  };
  check_smem(typename C::SmemA{}, kBM, "SmemA");
  check_smem(typename C::SmemB{}, kBN, "SmemB");

  // 2. chunk map
  {
    std::vector<int> seen(kBM * kBK, 0);
    for (int tid = 0; tid < kThreads; ++tid)
      for (int i = 0; i < kChunks; ++i)
        for (int e = 0; e < 8; ++e) ++seen[chunk_row(tid, i) * kBK + chunk_col(tid, i) + e];
    for (int i = 0; i < kBM * kBK; ++i) CHECK(seen[i] == 1, "%s chunk map: element %d hit %d times", name, i, seen[i]);
  }

  // 3. accumulator coordinates
  {
    typename C::TiledMma mma;
    std::vector<int> seen(kBM * kBN, 0);
    int per_thread = -1;
    for (int tid = 0; tid < kThreads; ++tid) {
      auto thr = mma.get_slice(tid);
      Tensor cC = make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{});
      Tensor tCcC = thr.partition_C(cC);
      Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});
      CHECK(size(tCcC) == size(acc), "%s: accumulator / coordinate partitions differ in size", name);
      per_thread = int(size(acc));
      for (int i = 0; i < size(tCcC); ++i) ++seen[int(get<0>(tCcC(i))) * kBN + int(get<1>(tCcC(i)))];
    }
    for (int i = 0; i < kBM * kBN; ++i) CHECK(seen[i] == 1, "%s epilogue: (%d, %d) hit %d times", name, i / kBN,
                                              i % kBN, seen[i]);
    std::printf("%s: %d accumulators per thread\n", name, per_thread);
  }

  // 4. ldmatrix partitions (coordinates of the shared tiles of stage 0)
  auto check_ldsm = [&](auto tiled_copy, int rows, const char* what) {
    std::vector<int> seen(rows * kBK, 0);
    for (int tid = 0; tid < kThreads; ++tid) {
      auto thr = tiled_copy.get_slice(tid);
      Tensor c = make_identity_tensor(make_shape(rows, Int<kBK>{}));
      Tensor tc = thr.partition_S(c);  // (CPY, CPY_M, CPY_K)
      for (int i = 0; i < size(tc); ++i) ++seen[int(get<0>(tc(i))) * kBK + int(get<1>(tc(i)))];
    }
    // 2 x 2 warps: every A element is read by the 2 warps of its row block (each warp's MMA needs the whole
    // k-block of its rows), every B element by the 2 warps of its column block.
    for (int i = 0; i < rows * kBK; ++i) CHECK(seen[i] == 2, "%s %s: element (%d, %d) read %d times (expected 2)",
                                               name, what, i / kBK, i % kBK, seen[i]);
  };
  typename C::TiledMma mma;
  check_ldsm(make_tiled_copy_A(typename C::Ldsm{}, mma), kBM, "ldmatrix A");
  check_ldsm(make_tiled_copy_B(typename C::Ldsm{}, mma), kBN, "ldmatrix B");
}

int main() {
  check_all<cutlass::bfloat16_t>("bf16");
  check_all<cutlass::half_t>("fp16");
  std::printf(failures ? "%d FAILURES\n" : "all layout checks passed\n", failures);
  return failures ? 1 : 0;
}
