// Shared device helpers of the umm_ops CUDA kernels (torch-free).
//
//  * dtype <-> float conversion and 128-bit vector loads/stores for float / __nv_bfloat16 / __half,
//  * deterministic warp / row-group reductions (fixed shuffle tree + fixed-order shared-memory sum),
//  * dispatch of the runtime `int dtype` (umm::DType) onto a template parameter,
//  * the row "plan" shared by every row kernel (threads per row, rows per block, row chunks) and the
//    kernels shared by several ops (segmented column sums of partials, row-scale + column-reduce).
//
// Everything here is either `inline`, a template, or lives in an anonymous namespace, so every .cu file
// gets its own copies and nothing collides at link time.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "umm/cuda_api.h"
#include "umm/params.h"

namespace umm {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// Host helpers.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline bool valid_dtype(int dtype) { return dtype >= 0 && dtype <= 2; }
inline int to_int(cudaError_t e) { return static_cast<int>(e); }

// Zero `n` floats (n <= 0 or p == nullptr: nothing).  A failure is returned *and* consumed from the
// runtime's last-error slot, so it is not reported a second time by the next launcher's cudaGetLastError.
inline cudaError_t zero_floats(float* p, int64_t n, cudaStream_t st) {
  if (p == nullptr || n <= 0) return cudaSuccess;
  const cudaError_t e = cudaMemsetAsync(p, 0, static_cast<size_t>(n) * sizeof(float), st);
  if (e != cudaSuccess) (void)cudaGetLastError();
  return e;
}

// Largest legal gridDim.x.
constexpr int64_t kMaxGridX = INT_MAX;

template <class T>
struct TypeTag {
  using type = T;
};

// f(TypeTag<T>{}) for the activation dtype; cudaErrorInvalidValue for an unknown dtype.
template <class F>
inline int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(TypeTag<float>{});
    case 1: return f(TypeTag<__nv_bfloat16>{});
    case 2: return f(TypeTag<__half>{});
    default: return to_int(cudaErrorInvalidValue);
  }
}

// ------------------------------------------------------------------------------------------------
// Device conversions and vector access.
template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// Elements of T in one 128-bit access.
template <typename T>
struct Vec16 {
  static constexpr int value = static_cast<int>(16 / sizeof(T));
};

// Load V consecutive elements (V * sizeof(T) == 16: one 128-bit load, p must be 16-byte aligned).
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&v)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = to_f<T>(e[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = to_f<T>(p[j]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const float (&v)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    alignas(16) T e[V];
#pragma unroll
    for (int j = 0; j < V; ++j) e[j] = from_f<T>(v[j]);
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(e);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = from_f<T>(v[j]);
  }
}

// Optional per-column vector (nullptr -> `dflt`).
template <typename T, int V>
__device__ __forceinline__ void load_vec_or(const T* p, float (&v)[V], float dflt) {
  if (p != nullptr) {
    load_vec<T, V>(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = dflt;
  }
}

// ------------------------------------------------------------------------------------------------
// Deterministic reductions.  The xor-butterfly gives every lane the bit-identical total, and the
// cross-warp step sums the warp totals in a fixed order, so the result depends only on the launch
// configuration (which the host derives from the problem sizes alone), never on timing.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Same butterfly in double (for reductions whose float32 accumulation is not accurate enough).
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums NS values over a "row group" of `tpr` consecutive threads (tpr a multiple of 32 dividing
// blockDim.x).  Every thread of the block must call it (it may __syncthreads when tpr > 32); every
// thread of a group gets the group total.  smem: at least NS * 32 elements of T (float or double).
template <int NS, typename T>
__device__ __forceinline__ void group_sum(T (&v)[NS], int tpr, T* smem) {
#pragma unroll
  for (int i = 0; i < NS; ++i) v[i] = warp_sum(v[i]);
  if (tpr <= 32) return;
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int wpg = tpr >> 5;
  const int w0 = warp - warp % wpg;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NS; ++i) smem[i * 32 + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    T s = T(0);
    for (int w = 0; w < wpg; ++w) s += smem[i * 32 + w0 + w];
    v[i] = s;
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// Row plan.  A row of C elements is handled by a group of `tpr` threads (a multiple of 32, at most
// kMaxTpr), chosen so that each thread owns at most `ept` elements; a block holds G = 256 / tpr groups
// (at least one).  Kernels that produce per-column partial sums split each of the B segments (of L
// rows) into S chunks of R consecutive rows; block (b, s) = blockIdx.x = b * S + s, and row group g of
// it accumulates rows l0 + g, l0 + g + G, ... into its own partial slot (b * S + s) * Gs + g
// (Gs = min(G, R): when a chunk has fewer rows than the block has groups, the idle groups own no slot).
// The plan depends on (B, L, C, ept) only -- not on the device or on pointer alignment -- so the
// *_bwd_workspace functions can size the workspace and results are reproducible across GPUs.
constexpr int kMaxTpr = 512;
constexpr int64_t kTargetBlocks = 1024;

struct RowPlan {
  int tpr;
  int G;
  int Gs;  // groups that own a partial slot: min(G, R) (groups g >= R of a chunk never get a row)
  int block;
  int64_t S;  // chunks per segment
  int64_t R;  // rows per chunk
  int64_t B;
  int64_t grid() const { return B * S; }
  int64_t slots() const { return B * S * Gs; }  // partial slots in total
};

inline RowPlan make_row_plan(int64_t B, int64_t L, int64_t C, int ept) {
  RowPlan p;
  int64_t need = ceil_div(C > 0 ? C : 1, ept);
  int64_t tpr = ceil_div(need, 32) * 32;
  if (tpr > kMaxTpr) tpr = kMaxTpr;
  p.tpr = static_cast<int>(tpr);
  p.G = 256 / p.tpr > 1 ? 256 / p.tpr : 1;
  p.block = p.G * p.tpr;
  p.Gs = p.G;
  p.B = B > 0 ? B : 0;
  if (B <= 0 || L <= 0) {
    p.S = 0;
    p.R = 0;
    return p;
  }
  int64_t S = ceil_div(kTargetBlocks, B);
  const int64_t maxS = ceil_div(L, p.G);
  if (S > maxS) S = maxS;
  if (S < 1) S = 1;
  p.R = ceil_div(L, S);
  p.S = ceil_div(L, p.R);
  p.Gs = p.R < p.G ? static_cast<int>(p.R) : p.G;
  return p;
}

// Whether the register-cached, 128-bit vectorised row kernels can be used for rows of C elements:
// C % V == 0, and every thread's share fits its `ept` registers (tpr not clamped).
inline bool row_vec_fits(int64_t C, int V, int ept) { return C % V == 0 && ceil_div(C, ept) <= kMaxTpr; }

// Grid for the forward row kernels (one row per group and grid-stride over rows beyond the cap).
inline unsigned fwd_grid(int64_t rows, int G) {
  int64_t g = ceil_div(rows, G);
  const int64_t cap = int64_t(1) << 20;
  return static_cast<unsigned>(g < cap ? g : cap);
}

namespace {

// Calls f(k, c) for the columns c (multiple of VEC) that thread t of a row group owns.  CACHED: the
// owned columns are ((k * tpr + t) * VEC) for the compile-time k < NV (so per-k register arrays can be
// used); otherwise a plain strided loop over any C (k is then always 0 and must not index caches).
template <bool CACHED, int NV, int VEC, class F>
__device__ __forceinline__ void for_cols(int t, int tpr, int64_t C, F&& f) {
  if constexpr (CACHED) {
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t c = (static_cast<int64_t>(k) * tpr + t) * VEC;
      if (c < C) f(k, c);
    }
  } else {
    for (int64_t c = static_cast<int64_t>(t) * VEC; c < C; c += static_cast<int64_t>(tpr) * VEC) f(0, c);
  }
}

// Segmented column sum of partials: part[a * arr_stride + (b * R + r) * C + c] summed over r in a fixed
// order (thread row y takes r = y, y + 32, ...; the 32 thread rows are then added in order y = 0..31),
// for the NA arrays a, then epi(b, c, sums).  Block (32, 32); tile index = b * ctiles + column tile, one
// tile per block and a block-uniform grid-stride loop over tiles beyond the grid (B * ctiles > 2^20).
constexpr int64_t kColsumMaxGrid = int64_t(1) << 20;

template <int NA, class Epi>
__global__ void __launch_bounds__(1024)
    seg_colsum_kernel(const float* __restrict__ part, int64_t arr_stride, int64_t R, int64_t C, int64_t ctiles,
                      int64_t ntiles, Epi epi) {
  __shared__ float sm[NA][32][33];
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {  // uniform over the block
    const int64_t b = tile / ctiles;
    const int64_t c = (tile - b * ctiles) * 32 + threadIdx.x;
    float s[NA];
#pragma unroll
    for (int a = 0; a < NA; ++a) s[a] = 0.f;
    if (c < C) {
      const float* base = part + b * R * C + c;
#pragma unroll 8
      for (int64_t r = threadIdx.y; r < R; r += 32) {
#pragma unroll
        for (int a = 0; a < NA; ++a) s[a] += base[a * arr_stride + r * C];
      }
    }
#pragma unroll
    for (int a = 0; a < NA; ++a) sm[a][threadIdx.y][threadIdx.x] = s[a];
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
      float tot[NA];
#pragma unroll
      for (int a = 0; a < NA; ++a) {
        float acc = 0.f;
        for (int y = 0; y < 32; ++y) acc += sm[a][y][threadIdx.x];
        tot[a] = acc;
      }
      epi(b, c, tot);
    }
    __syncthreads();  // sm is rewritten by the next tile
  }
}

template <int NA, class Epi>
inline void launch_seg_colsum(const float* part, int64_t arr_stride, int64_t B, int64_t R, int64_t C, Epi epi,
                              cudaStream_t st) {
  if (B <= 0 || C <= 0) return;
  const int64_t ctiles = ceil_div(C, 32);
  const int64_t ntiles = B * ctiles;
  const int64_t grid = ntiles < kColsumMaxGrid ? ntiles : kColsumMaxGrid;
  seg_colsum_kernel<NA, Epi><<<static_cast<unsigned>(grid), dim3(32, 32), 0, st>>>(part, arr_stride, R, C, ctiles,
                                                                                  ntiles, epi);
}

// Row-scale + column-reduce over B segments of L rows of C columns (row = b * L + l):
//   out[row, c]  = a[row, c] * rowscale[row] * colvec[b * colvec_stride + c]
//   part[slot,c] = sum over the slot's rows of a[row, c] * y[row, c] * rowscale[row]
// a == nullptr means 1, rowscale == nullptr means 1; out / part nullptr: not wanted.
// gated_residual backward: a = grad, colvec = gate, y = y.  gated_detail backward (gate path):
// a = 1, rowscale = dg, colvec = w_gate (stride 0), y = gate_hidden.
constexpr int kRsEpt = 16;

struct RowScaleArgs {
  const void* a;
  const void* y;
  const float* rowscale;
  const void* colvec;
  int64_t colvec_stride;
  void* out;
  float* part;
  int64_t L, C;
  int64_t S, R;
  int tpr, G, Gs;
};

template <typename T, int VEC, bool CACHED>
__global__ void __launch_bounds__(kMaxTpr) rowscale_colreduce_kernel(RowScaleArgs k) {
  constexpr int NV = CACHED ? kRsEpt / VEC : 1;
  const int g = threadIdx.x / k.tpr;
  const int t = threadIdx.x - g * k.tpr;
  const int64_t b = blockIdx.x / k.S;
  const int64_t s = blockIdx.x - b * k.S;
  const int64_t l0 = s * k.R;
  const int64_t l1 = l0 + k.R < k.L ? l0 + k.R : k.L;
  const int64_t C = k.C;
  const T* A = static_cast<const T*>(k.a);
  const T* Y = static_cast<const T*>(k.y);
  const T* cv = static_cast<const T*>(k.colvec) + b * k.colvec_stride;
  T* out = static_cast<T*>(k.out);
  float* pp = (k.part != nullptr && g < k.Gs) ? k.part + ((b * k.S + s) * k.Gs + g) * C : nullptr;

  float acc[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[i][j] = 0.f;
  if constexpr (!CACHED) {
    if (pp != nullptr)
      for (int64_t c = t; c < C; c += k.tpr) pp[c] = 0.f;
  }

  for (int64_t l = l0 + g; l < l1; l += k.G) {
    const int64_t row = b * k.L + l;
    const float rs = k.rowscale != nullptr ? k.rowscale[row] : 1.f;
    for_cols<CACHED, NV, VEC>(t, k.tpr, C, [&](int kk, int64_t c) {
      float av[VEC];
      if (A != nullptr) {
        load_vec<T, VEC>(A + row * C + c, av);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) av[j] = 1.f;
      }
      if (out != nullptr) {
        float w[VEC], o[VEC];
        load_vec<T, VEC>(cv + c, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = av[j] * rs * w[j];
        store_vec<T, VEC>(out + row * C + c, o);
      }
      if (pp != nullptr) {
        float yv[VEC];
        load_vec<T, VEC>(Y + row * C + c, yv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float term = av[j] * yv[j] * rs;
          if constexpr (CACHED) {
            acc[kk][j] += term;
          } else {
            pp[c + j] += term;  // this thread owns column c of slot pp: deterministic
          }
        }
      }
    });
  }
  if constexpr (CACHED) {
    if (pp != nullptr) {
      for_cols<CACHED, NV, VEC>(t, k.tpr, C, [&](int kk, int64_t c) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) pp[c + j] = acc[kk][j];
      });
    }
  }
}

// Launch helper: plan from (B, L, C), vectorised when every pointer is 16-byte aligned.  Returns
// cudaErrorInvalidConfiguration (launching nothing) when the plan's grid exceeds gridDim.x (B > ~2^31).
template <typename T>
inline cudaError_t launch_rowscale_colreduce(RowScaleArgs k, const RowPlan& plan, cudaStream_t st) {
  constexpr int V = Vec16<T>::value;
  if (plan.grid() <= 0) return cudaSuccess;
  if (plan.grid() > kMaxGridX) return cudaErrorInvalidConfiguration;
  k.S = plan.S;
  k.R = plan.R;
  k.tpr = plan.tpr;
  k.G = plan.G;
  k.Gs = plan.Gs;
  const bool vec = row_vec_fits(k.C, V, kRsEpt) && aligned16(k.a) && aligned16(k.y) && aligned16(k.colvec) &&
                   aligned16(k.out) && (k.colvec_stride % V == 0);
  const unsigned grid = static_cast<unsigned>(plan.grid());
  if (vec) {
    rowscale_colreduce_kernel<T, V, true><<<grid, plan.block, 0, st>>>(k);
  } else {
    rowscale_colreduce_kernel<T, 1, false><<<grid, plan.block, 0, st>>>(k);
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace cuda
}  // namespace umm
