// Host-side check of the register / shared-memory index assumptions of the span-attention kernels (no GPU needed:
// CuTe layouts and MMA / copy partitions are host-device code).  Build and run (from the repository root):
//
//   nvcc -std=c++17 --expt-relaxed-constexpr -I csrc/include -I csrc/cuda -I <cutlass>/include \
//        csrc/cuda/checks/span_layout_check.cu -o /tmp/span_layout_check && /tmp/span_layout_check
//
// For every tile configuration the launchers instantiate, for all 128 threads, it checks:
//  1. score accumulators (rows x streamed rows) and output accumulators (rows x head dim), viewed with rowcol():
//     every element owned exactly once; the row coordinate of a (r, c) entry depends on r only and the column on c
//     only; all owners of a row are the 4 threads of one quad (what the quad shuffles of the softmax assume); the
//     r-th row of the score and of the output view is the same row (per-row scaling of O / dQ);
//  2. to_a_operand() / acc_to_a(): the re-indexed score accumulator holds, at every A-fragment position of the
//     next product, the (row, k) coordinate the MMA partition expects there (P and dS go straight from
//     accumulators to A operands);
//  3. the transposed shared-memory view: SmemStreamT(d, n) == SmemStream(n, d);
//  4. global <-> shared copies: every (row, column) of a tile is moved exactly once, each thread's chunk is 8
//     consecutive columns of one row, and the chunk is 8 consecutive shared-memory elements (128-bit accesses).
// Exit status 0 and "all checks passed" on success; the first failure is printed and the status is 1.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "span_attention.cuh"

using namespace cute;
using umm::cuda::span::acc_to_a;
using umm::cuda::span::Config;
using umm::cuda::span::rowcol;
using umm::cuda::span::Traits;

static int g_fail = 0;
#define CHECK(cond, ...)                                                    \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::printf("FAIL %s:%d: %s -- ", __FILE__, __LINE__, #cond);        \
      std::printf(__VA_ARGS__);                                             \
      std::printf("\n");                                                    \
      g_fail = 1;                                                           \
      return;                                                               \
    }                                                                       \
  } while (0)

// 1. accumulator ownership for an (M x N) product of the tiled MMA.
template <class K, int M, int N>
void check_acc(const char* what, std::vector<int>* row_of_r /* [tid][r], filled */) {
  typename K::TiledMma mma;
  std::vector<int> owner(M * N, -1);
  row_of_r->clear();
  for (int tid = 0; tid < K::kNThreads; ++tid) {
    auto thr = mma.get_thread_slice(tid);
    Tensor c = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    Tensor rc = make_tensor(c.data(), rowcol(c.layout()));
    CHECK(size(rc) == size(c), "%s", what);
    for (int r = 0; r < size<0>(rc); ++r) {
      const int row = get<0>(rc(r, 0));
      row_of_r->push_back(row);
      for (int cc = 0; cc < size<1>(rc); ++cc) {
        const int m = get<0>(rc(r, cc)), n = get<1>(rc(r, cc));
        CHECK(m == row, "%s tid %d r %d c %d: row %d != %d", what, tid, r, cc, m, row);
        CHECK(n == get<1>(rc(0, cc)), "%s tid %d: column depends on r", what, tid);
        CHECK(m >= 0 && m < M && n >= 0 && n < N, "%s: coordinate out of range", what);
        CHECK(owner[m * N + n] == -1, "%s: (%d, %d) owned twice (tids %d, %d)", what, m, n, owner[m * N + n], tid);
        owner[m * N + n] = tid;
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      CHECK(owner[m * N + n] >= 0, "%s: (%d, %d) owned by no thread", what, m, n);
      CHECK(owner[m * N + n] / 4 == owner[m * N] / 4, "%s: row %d owned by threads of different quads (%d, %d)",
            what, m, owner[m * N + n], owner[m * N]);
    }
  }
}

// 2. acc_to_a against the MMA's A partition of an (M x N) operand.
template <class K, int M, int N>
void check_acc_to_a(const char* what) {
  typename K::TiledMma mma;
  for (int tid = 0; tid < K::kNThreads; ++tid) {
    auto thr = mma.get_thread_slice(tid);
    Tensor c = thr.partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));  // score coordinates
    Tensor a = thr.partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));  // expected A coordinates
    // the kernels' to_a_operand, fed accumulator "values" that are their own linear indices (exact in float)
    Tensor acc = make_tensor<float>(shape(c));
    for (int i = 0; i < size(acc); ++i) acc(i) = float(i);
    Tensor view = umm::cuda::span::to_a_operand<float>(acc);
    CHECK(size<0>(view) == size<0>(a) && size<1>(view) == size<1>(a) && size<2>(view) == size<2>(a),
          "%s: A view shape mismatch", what);
    CHECK(size<0>(view) == 8, "%s: A fragment of the 16x8x16 MMA has 8 values", what);
    for (int j = 0; j < size(a); ++j) {
      const int idx = int(view(j));  // the accumulator element found at A position j
      const auto got = c(idx);
      const auto want = a(j);
      CHECK(get<0>(got) == get<0>(want) && get<1>(got) == get<1>(want),
            "%s tid %d j %d: A position holds (%d, %d), the MMA expects (%d, %d)", what, tid, j, int(get<0>(got)),
            int(get<1>(got)), int(get<0>(want)), int(get<1>(want)));
    }
  }
}

// 3. transposed view
template <class K>
void check_transposed(const char* what) {
  typename K::SmemStream s;
  typename K::SmemStreamT st;
  for (int n = 0; n < K::kN; ++n)
    for (int d = 0; d < K::kHeadDim; ++d)
      CHECK(st(d, n) == s(n, d), "%s: transposed view (%d, %d)", what, d, n);
}

// 4. gmem <-> smem copy partitions of a ROWS x kHeadDim tile.
template <class K, class Copy, int ROWS, class SmemLayout>
void check_copy(const char* what) {
  Copy cp;
  std::vector<int> seen(ROWS * K::kHeadDim, 0);
  SmemLayout sl;
  for (int tid = 0; tid < K::kNThreads; ++tid) {
    auto thr = cp.get_thread_slice(tid);
    Tensor c = thr.partition_S(make_identity_tensor(make_shape(Int<ROWS>{}, Int<K::kHeadDim>{})));
    CHECK(size<0>(c) == 8, "%s: 8 values per chunk", what);
    for (int m = 0; m < size<1>(c); ++m)
      for (int k = 0; k < size<2>(c); ++k) {
        const int r0 = get<0>(c(0, m, k)), c0 = get<1>(c(0, m, k));
        CHECK(c0 % 8 == 0, "%s: chunk starts at column %d", what, c0);
        for (int v = 0; v < 8; ++v) {
          const int r = get<0>(c(v, m, k)), col = get<1>(c(v, m, k));
          CHECK(r == r0 && col == c0 + v, "%s tid %d: chunk not 8 consecutive columns of one row", what, tid);
          CHECK(sl(r, col) == sl(r0, c0) + v, "%s: chunk not contiguous in shared memory (%d, %d)", what, r, col);
          seen[r * K::kHeadDim + col] += 1;
        }
      }
  }
  for (int i = 0; i < ROWS * K::kHeadDim; ++i) CHECK(seen[i] == 1, "%s: element %d moved %d times", what, i, seen[i]);
}

template <class K>
void check_traits(const char* name) {
  constexpr int kM = K::kM, kN = K::kN, kD = K::kHeadDim;
  std::vector<int> rows_s, rows_o;
  char what[128];
  std::snprintf(what, sizeof what, "%s scores %dx%d", name, kM, kN);
  check_acc<K, kM, kN>(what, &rows_s);
  std::snprintf(what, sizeof what, "%s output %dx%d", name, kM, kD);
  check_acc<K, kM, kD>(what, &rows_o);
  // the kernels index per-row state by r in both views: same rows, same order, for every thread
  if (rows_s.size() != rows_o.size()) {
    std::printf("FAIL %s: score / output views have different row counts\n", name);
    g_fail = 1;
  } else {
    for (size_t i = 0; i < rows_s.size(); ++i)
      if (rows_s[i] != rows_o[i]) {
        std::printf("FAIL %s: row %zu of the score view is %d, of the output view %d\n", name, i, rows_s[i],
                    rows_o[i]);
        g_fail = 1;
        break;
      }
  }
  std::snprintf(what, sizeof what, "%s acc_to_a %dx%d", name, kM, kN);
  check_acc_to_a<K, kM, kN>(what);
  std::snprintf(what, sizeof what, "%s transposed", name);
  check_transposed<K>(what);
  std::snprintf(what, sizeof what, "%s load fixed", name);
  check_copy<K, typename K::GmemLoad, kM, typename K::SmemFixed>(what);
  std::snprintf(what, sizeof what, "%s load streamed", name);
  check_copy<K, typename K::GmemLoad, kN, typename K::SmemStream>(what);
  std::snprintf(what, sizeof what, "%s store", name);
  check_copy<K, typename K::GmemStore, kM, typename K::SmemFixed>(what);
  std::printf("%-28s checked (%d threads)\n", name, K::kNThreads);
}

template <class T>
void check_dtype(const char* dt) {
  char n[64];
  auto both = [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    std::snprintf(n, sizeof n, "%s D%d fwd/dq kN=%d", dt, D, Config<D>::kFwdN);
    check_traits<Traits<D, Config<D>::kFwdN, T>>(n);
    std::snprintf(n, sizeof n, "%s D%d dk/dv kN=%d", dt, D, Config<D>::kDkvN);
    check_traits<Traits<D, Config<D>::kDkvN, T>>(n);
  };
  both(std::integral_constant<int, 64>{});
  both(std::integral_constant<int, 96>{});
  both(std::integral_constant<int, 128>{});
}

int main() {
  check_dtype<cutlass::bfloat16_t>("bf16");
  check_dtype<cutlass::half_t>("fp16");
  if (g_fail) {
    std::printf("span layout check: FAILED\n");
    return 1;
  }
  std::printf("span layout check: all checks passed\n");
  return 0;
}
