// CUDA row pass of the LM-head ops (formulas: umm/lm_head.h; launcher contract: umm/cuda_api.h).  The same
// algorithm as csrc/cpu/lm_head.cpp: the torch glue (csrc/torch/lm_head_ops.cpp) writes a block of rows of logits
// with cuBLAS (at::mm) and this pass turns each row into its statistics and, when asked, its gradient in place.
//
// NOTE: written and compiled without a GPU: this kernel has never been run (tests/test_lm_head.py checks it against
// the float64 reference when a GPU is present).
//
//  * rows: one block of 256 threads per row, three sweeps over the row (max; exp-sum with the row sums; dz), each
//    recomputing z' from the logits (the row, R x V in the workspace, is re-read from L2 / HBM: 2-3 reads and one
//    write per logit, against ~6 N V passes of the eager path).  Block reductions: warp butterflies, then the warp
//    totals in a fixed order (deterministic).
//  * colsum (bias gradient): one thread per column walks the block's rows in order (coalesced across threads).
#include "common.cuh"
#include "umm/lm_head.h"

namespace umm {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kWarps = kRowThreads / 32;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide max / sums (every thread gets the result); smem: kWarps * 4 floats.
__device__ __forceinline__ float block_max(float v, float* smem) {
  v = warp_max(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float m = smem[0];
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, smem[w]);
  __syncthreads();
  return m;
}

template <int NS>
__device__ __forceinline__ void block_sum(float (&v)[NS], float* smem) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    v[i] = warp_sum(v[i]);
    if (lane == 0) smem[i * kWarps + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NS; ++i) {
    float s = 0.f;
    for (int w = 0; w < kWarps; ++w) s += smem[i * kWarps + w];
    v[i] = s;
  }
  __syncthreads();
}

__device__ __forceinline__ float transform(float z, float scale, float softcap, float inv_cap) {
  z *= scale;
  return softcap > 0.f ? softcap * tanhf(z * inv_cap) : z;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) rows_kernel(LmHeadRowsParams p) {
  __shared__ float smem[4 * kWarps];
  const int64_t i = blockIdx.x;
  if (i >= p.rows) return;
  const int64_t V = p.V;
  T* row = static_cast<T*>(p.z) + i * V;
  const bool ce = p.loss == int(LmHeadLoss::kCrossEntropy);
  const float scale = p.scale, cap = p.softcap, inv_cap = cap > 0.f ? 1.f / cap : 0.f;
  const int64_t t = p.targets[i];
  const bool has_t = t >= 0 && t < V && !(ce && t == p.ignore_index);
  const bool valid = !(ce && t == p.ignore_index);
  float lse, m = 0.f, inv_sum = 1.f, S = 0.f;
  if (!p.backward) {
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < V; j += kRowThreads) mx = fmaxf(mx, transform(to_f<T>(row[j]), scale, cap, inv_cap));
    m = block_max(mx, smem);  // NaN is skipped here and reaches the sum through expf below
    float acc[3] = {0.f, 0.f, 0.f};  // sum e, sum z', sum e z'
    for (int64_t j = threadIdx.x; j < V; j += kRowThreads) {
      const float z = transform(to_f<T>(row[j]), scale, cap, inv_cap);
      const float e = expf(z - m);
      acc[0] += e;
      acc[1] += z;
      acc[2] += e * z;
    }
    block_sum<3>(acc, smem);
    lse = m + logf(acc[0]);
    inv_sum = 1.f / acc[0];
    const float zt = has_t ? transform(to_f<T>(row[t]), scale, cap, inv_cap) : 0.f;
    if (threadIdx.x == 0) {
      p.lse[i] = lse;
      if (ce) {
        p.out[i] = valid ? lse - (1.f - p.label_smoothing) * zt - p.label_smoothing * (acc[1] / float(V)) +
                               p.z_loss * lse * lse
                         : 0.f;
      } else {
        p.out[i] = zt - lse;
        if (p.entropy) p.entropy[i] = lse - acc[2] * inv_sum;
      }
    }
    S = acc[2] * inv_sum;
    if (!p.fused_grad) return;
    __syncthreads();  // row[t] was read above by every thread; dz overwrites the row below
  } else {
    lse = p.lse[i];
    if (!ce && p.grad_entropy) S = lse - p.entropy[i];
  }
  LmHeadCoef c;
  if (ce) {
    const float g = !valid ? 0.f : (p.backward ? p.grad[i] : p.grad_scale);
    c = lm_head_ce_coef(g, lse, p.label_smoothing, p.z_loss, V);
  } else {
    c = lm_head_logprob_coef(p.grad[i], p.grad_entropy ? p.grad_entropy[i] : 0.f, S);
  }
  const float base = p.backward ? lse : m;
  for (int64_t j = threadIdx.x; j < V; j += kRowThreads) {
    const float z = transform(to_f<T>(row[j]), scale, cap, inv_cap);
    const float pj = expf(z - base) * inv_sum;
    float d = c.A * pj + c.C + c.E * pj * z + (j == t && has_t ? c.B : 0.f);
    if (cap > 0.f) {
      const float q = z * inv_cap;
      d *= 1.f - q * q;
    }
    row[j] = from_f<T>(d * scale);
  }
}

template <typename T>
__global__ void colsum_kernel(LmHeadColsumParams p) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= p.V) return;
  const T* z = static_cast<const T*>(p.z);
  float s = p.acc[j];
  for (int64_t i = 0; i < p.rows; ++i) s += to_f<T>(z[i * p.V + j]);
  p.acc[j] = s;
}

}  // namespace
}  // namespace cuda
}  // namespace umm

using namespace umm;
using namespace umm::cuda;

extern "C" int umm_cuda_lm_head_rows(const LmHeadRowsParams* p, int dtype, void* stream) {
  if (p->rows <= 0) return 0;
  if (p->rows > kMaxGridX) return to_int(cudaErrorInvalidValue);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rows_kernel<T><<<static_cast<unsigned>(p->rows), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(*p);
    return to_int(cudaGetLastError());
  });
}

extern "C" int umm_cuda_lm_head_colsum(const LmHeadColsumParams* p, int dtype, void* stream) {
  if (p->rows <= 0 || p->V <= 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    colsum_kernel<T><<<static_cast<unsigned>(ceil_div(p->V, 256)), 256, 0, static_cast<cudaStream_t>(stream)>>>(*p);
    return to_int(cudaGetLastError());
  });
}
