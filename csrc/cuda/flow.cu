// Flow-matching sampler kernels: flow_step, flow_logprob, flow_kl and their backwards.
//
// Design (one kernel template for all six ops, OP a template parameter):
//  * The (B, N) problem is cut into tiles of kFlowBlock * kFlowUnroll * VEC elements of one sample
//    (VEC = 16 / sizeof(T) with 128-bit loads when every pointer is 16-byte aligned and N % VEC == 0,
//    else VEC = 1).  grid.x = B * chunks (sample-major, no grid.y limit), each block handles one chunk
//    (normally one tile) and loads its kFlowUnroll vectors per input before computing, for ILP.
//  * Per-sample reductions (logprob / kl) need no workspace in the params, so:
//      - chunks == 1 (N <= one tile): the block reduces and writes the final value itself;
//      - chunks  > 1: each block writes its partial sum to a B * chunks scratch buffer taken with
//        cudaMallocAsync on the stream, then flow_finalize_kernel (one block per sample) sums the
//        partials in a fixed order and applies the formula; the buffer is released with cudaFreeAsync on
//        the same stream.  This keeps ~1024 blocks in flight both for B = 1, N = 8M and for B = 64,
//        N = 131072, and the chunking depends only on (N, dtype, alignment), so results are
//        reproducible and do not depend on B.
//      - If cudaMallocAsync is unavailable (error), we fall back to one block per sample over the whole
//        row (correct, slower for small B).
#include "common.cuh"

namespace umm {
namespace cuda {
namespace {

enum FlowOp : int { kStep = 0, kLogprob = 1, kKl = 2, kStepBwd = 3, kLogprobBwd = 4, kKlBwd = 5 };
constexpr int kFlowBlock = 256;
constexpr int kFlowUnroll = 4;

struct FlowArgs {
  const void* in0;
  const void* in1;
  const void* in2;
  void* out0;
  void* out1;
  void* out2;
  const float* t;
  const float* t_next;
  const float* sigma;  // nullptr: 0 (Euler)
  const float* grad;   // (B,) for logprob / kl backward
  float* partial;      // (B * chunks,) when chunks > 1
  float* result;       // (B,) logprob / kl; nullptr: no reduction
  int64_t N, chunks, chunk_len;
};

__device__ __forceinline__ FlowCoef coef_of(const FlowArgs& a, int64_t b) {
  return flow_coef(a.t[b], a.t_next[b], a.sigma != nullptr ? a.sigma[b] : 0.f);
}

// Per-sample value from sum_n r^2 (logprob) or sum_n (av (v - v_ref))^2 (kl).
__device__ __forceinline__ float flow_final(int op, float sum, int64_t N, const FlowCoef& cf) {
  const float mean_sq = sum / static_cast<float>(N);
  const float two_var = 2.f * cf.std * cf.std;
  if (op == kKl) return mean_sq / two_var;
  return -mean_sq / two_var - logf(cf.std) - kHalfLog2Pi;
}

template <typename T, int VEC, int OP>
__global__ void __launch_bounds__(kFlowBlock) flow_kernel(FlowArgs a) {
  constexpr int U = kFlowUnroll;
  constexpr bool kHas1 = OP != kStepBwd;
  constexpr bool kHas2 = OP == kStep || OP == kLogprob || OP == kLogprobBwd;
  constexpr bool kReduce = OP == kStep || OP == kLogprob || OP == kKl;
  __shared__ float smem[32];

  const int64_t b = blockIdx.x / a.chunks;
  const int64_t ch = blockIdx.x - b * a.chunks;
  const FlowCoef cf = coef_of(a, b);
  const int64_t off = b * a.N;
  const int64_t c0 = ch * a.chunk_len;
  const int64_t c1 = c0 + a.chunk_len < a.N ? c0 + a.chunk_len : a.N;
  const T* in0 = static_cast<const T*>(a.in0);
  const T* in1 = static_cast<const T*>(a.in1);
  const T* in2 = static_cast<const T*>(a.in2);
  T* out0 = static_cast<T*>(a.out0);
  T* out1 = static_cast<T*>(a.out1);
  T* out2 = static_cast<T*>(a.out2);
  const bool has_noise = in2 != nullptr;  // kStep: SDE vs Euler
  const bool reduce = kReduce && a.result != nullptr;

  float gw = 0.f;
  if constexpr (OP == kLogprobBwd) gw = a.grad[b] / (cf.std * cf.std * static_cast<float>(a.N));
  if constexpr (OP == kKlBwd) gw = a.grad[b] * cf.av * cf.av / (cf.std * cf.std * static_cast<float>(a.N));

  float acc = 0.f;
  for (int64_t base = c0; base < c1; base += static_cast<int64_t>(kFlowBlock) * VEC * U) {
    float r0[U][VEC], r1[U][VEC], r2[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + (static_cast<int64_t>(u) * kFlowBlock + threadIdx.x) * VEC;
      if (i < c1) {  // c0, c1 and N are multiples of VEC here, so the whole vector is in range
        load_vec<T, VEC>(in0 + off + i, r0[u]);
        if constexpr (kHas1) load_vec<T, VEC>(in1 + off + i, r1[u]);
        if constexpr (kHas2) {
          if (OP != kStep || has_noise) {
            load_vec<T, VEC>(in2 + off + i, r2[u]);
          } else {  // Euler: no noise (never used, but never read uninitialised either)
#pragma unroll
            for (int j = 0; j < VEC; ++j) r2[u][j] = 0.f;
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + (static_cast<int64_t>(u) * kFlowBlock + threadIdx.x) * VEC;
      if (i >= c1) continue;
      const int64_t gi = off + i;
      float o0[VEC], o1[VEC], o2[VEC];
      if constexpr (OP == kStep) {  // x, v, noise
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float mean = cf.ax * r0[u][j] + cf.av * r1[u][j];
          o0[j] = has_noise ? mean + cf.std * r2[u][j] : mean;
          if (reduce) {  // logprob of the sample as stored (rounded to T)
            const float d = to_f<T>(from_f<T>(o0[j])) - mean;
            acc += d * d;
          }
        }
        store_vec<T, VEC>(out0 + gi, o0);
      } else if constexpr (OP == kLogprob) {  // x, x_next, v
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = r1[u][j] - (cf.ax * r0[u][j] + cf.av * r2[u][j]);
          acc += d * d;
        }
      } else if constexpr (OP == kKl) {  // v, v_ref
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = cf.av * (r0[u][j] - r1[u][j]);
          acc += d * d;
        }
      } else if constexpr (OP == kStepBwd) {  // grad -> dx, dv, dnoise
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          o0[j] = cf.ax * r0[u][j];
          o1[j] = cf.av * r0[u][j];
          o2[j] = cf.std * r0[u][j];
        }
        if (out0 != nullptr) store_vec<T, VEC>(out0 + gi, o0);
        if (out1 != nullptr) store_vec<T, VEC>(out1 + gi, o1);
        if (out2 != nullptr) store_vec<T, VEC>(out2 + gi, o2);
      } else if constexpr (OP == kLogprobBwd) {  // x, x_next, v -> dx, dx_next, dv
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float r = r1[u][j] - (cf.ax * r0[u][j] + cf.av * r2[u][j]);
          const float wr = gw * r;
          o0[j] = wr * cf.ax;
          o1[j] = -wr;
          o2[j] = wr * cf.av;
        }
        if (out0 != nullptr) store_vec<T, VEC>(out0 + gi, o0);
        if (out1 != nullptr) store_vec<T, VEC>(out1 + gi, o1);
        if (out2 != nullptr) store_vec<T, VEC>(out2 + gi, o2);
      } else {  // kKlBwd: v, v_ref -> dv, dv_ref
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          o0[j] = gw * (r0[u][j] - r1[u][j]);
          o1[j] = -o0[j];
        }
        if (out0 != nullptr) store_vec<T, VEC>(out0 + gi, o0);
        if (out1 != nullptr) store_vec<T, VEC>(out1 + gi, o1);
      }
    }
  }
  if constexpr (kReduce) {
    if (reduce) {  // uniform over the block
      float v[1] = {acc};
      group_sum<1>(v, kFlowBlock, smem);
      if (threadIdx.x == 0) {
        if (a.chunks == 1) {
          a.result[b] = flow_final(OP, v[0], a.N, cf);
        } else {
          a.partial[blockIdx.x] = v[0];
        }
      }
    }
  }
}

// One block per sample: sum the `chunks` partials in a fixed order, then apply the formula.
__global__ void __launch_bounds__(kFlowBlock)
    flow_finalize_kernel(const float* __restrict__ partial, int64_t chunks, const float* t, const float* t_next,
                         const float* sigma, int64_t N, int op, float* out) {
  __shared__ float smem[32];
  const int64_t b = blockIdx.x;
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < chunks; i += kFlowBlock) s += partial[b * chunks + i];
  float v[1] = {s};
  group_sum<1>(v, kFlowBlock, smem);
  if (threadIdx.x == 0) {
    out[b] = flow_final(op, v[0], N, flow_coef(t[b], t_next[b], sigma != nullptr ? sigma[b] : 0.f));
  }
}

// B > 0, N > 0.  vec_ok: every non-null pointer is 16-byte aligned.
template <typename T, int OP>
int launch_flow(FlowArgs a, int64_t B, bool vec_ok, cudaStream_t st) {
  constexpr int V = Vec16<T>::value;
  const bool vec = vec_ok && (a.N % V == 0);
  const int64_t tile = static_cast<int64_t>(kFlowBlock) * kFlowUnroll * (vec ? V : 1);
  if (B > INT_MAX) return to_int(cudaErrorInvalidConfiguration);  // (else the loop below never ends)
  int64_t chunk_len = tile;
  int64_t chunks = ceil_div(a.N, chunk_len);
  while (B * chunks > INT_MAX) {  // keep grid.x legal for absurd sizes
    chunk_len *= 2;
    chunks = ceil_div(a.N, chunk_len);
  }
  float* scratch = nullptr;
  if (a.result != nullptr && chunks > 1) {
    const cudaError_t e =
        cudaMallocAsync(reinterpret_cast<void**>(&scratch), static_cast<size_t>(B * chunks) * sizeof(float), st);
    if (e != cudaSuccess) {  // no stream-ordered allocator: one block per sample
      (void)cudaGetLastError();
      scratch = nullptr;
      chunks = 1;
      chunk_len = ceil_div(a.N, tile) * tile;
    }
  }
  a.partial = scratch;
  a.chunks = chunks;
  a.chunk_len = chunk_len;
  const unsigned grid = static_cast<unsigned>(B * chunks);
  if (vec) {
    flow_kernel<T, V, OP><<<grid, kFlowBlock, 0, st>>>(a);
  } else {
    flow_kernel<T, 1, OP><<<grid, kFlowBlock, 0, st>>>(a);
  }
  cudaError_t fe = cudaSuccess;
  if (scratch != nullptr) {
    flow_finalize_kernel<<<static_cast<unsigned>(B), kFlowBlock, 0, st>>>(scratch, chunks, a.t, a.t_next, a.sigma,
                                                                         a.N, OP, a.result);
    fe = cudaFreeAsync(scratch, st);
  }
  const cudaError_t le = cudaGetLastError();
  return to_int(le != cudaSuccess ? le : fe);
}

template <int OP>
int run_flow(const FlowArgs& a, int64_t B, bool vec_ok, int dtype, cudaStream_t st) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_flow<T, OP>(a, B, vec_ok, st);
  });
}

FlowArgs blank_args() {
  FlowArgs a;
  a.in0 = a.in1 = a.in2 = nullptr;
  a.out0 = a.out1 = a.out2 = nullptr;
  a.t = a.t_next = a.sigma = a.grad = nullptr;
  a.partial = a.result = nullptr;
  a.N = a.chunks = a.chunk_len = 0;
  return a;
}

}  // namespace
}  // namespace cuda
}  // namespace umm

using namespace umm::cuda;

extern "C" {

int umm_cuda_flow_step(const umm::FlowStepParams* p, int dtype, void* stream) {
  if (!valid_dtype(dtype)) return to_int(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool sde = p->noise != nullptr;
  float* lp = sde ? p->logprob : nullptr;  // Euler: no logprob
  if (p->B <= 0) return 0;
  if (p->N <= 0) return to_int(zero_floats(lp, p->B, st));
  FlowArgs a = blank_args();
  a.in0 = p->x;
  a.in1 = p->v;
  a.in2 = p->noise;
  a.out0 = p->x_next;
  a.t = p->t;
  a.t_next = p->t_next;
  a.sigma = sde ? p->sigma : nullptr;  // Euler ignores sigma
  a.result = lp;
  a.N = p->N;
  const bool vec_ok = aligned16(p->x) && aligned16(p->v) && aligned16(p->noise) && aligned16(p->x_next);
  return run_flow<kStep>(a, p->B, vec_ok, dtype, st);
}

int umm_cuda_flow_step_bwd(const umm::FlowStepBwdParams* p, int dtype, void* stream) {
  if (!valid_dtype(dtype)) return to_int(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p->B <= 0 || p->N <= 0) return 0;
  if (p->dx == nullptr && p->dv == nullptr && p->dnoise == nullptr) return 0;
  FlowArgs a = blank_args();
  a.in0 = p->grad;
  a.out0 = p->dx;
  a.out1 = p->dv;
  a.out2 = p->dnoise;
  a.t = p->t;
  a.t_next = p->t_next;
  a.sigma = p->sigma;
  a.N = p->N;
  const bool vec_ok = aligned16(p->grad) && aligned16(p->dx) && aligned16(p->dv) && aligned16(p->dnoise);
  return run_flow<kStepBwd>(a, p->B, vec_ok, dtype, st);
}

int umm_cuda_flow_logprob(const umm::FlowLogprobParams* p, int dtype, void* stream) {
  if (!valid_dtype(dtype)) return to_int(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p->B <= 0 || p->logprob == nullptr) return 0;
  if (p->N <= 0) return to_int(zero_floats(p->logprob, p->B, st));
  FlowArgs a = blank_args();
  a.in0 = p->x;
  a.in1 = p->x_next;
  a.in2 = p->v;
  a.t = p->t;
  a.t_next = p->t_next;
  a.sigma = p->sigma;
  a.result = p->logprob;
  a.N = p->N;
  const bool vec_ok = aligned16(p->x) && aligned16(p->x_next) && aligned16(p->v);
  return run_flow<kLogprob>(a, p->B, vec_ok, dtype, st);
}

int umm_cuda_flow_logprob_bwd(const umm::FlowLogprobBwdParams* p, int dtype, void* stream) {
  if (!valid_dtype(dtype)) return to_int(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p->B <= 0 || p->N <= 0) return 0;
  if (p->dx == nullptr && p->dx_next == nullptr && p->dv == nullptr) return 0;
  FlowArgs a = blank_args();
  a.in0 = p->x;
  a.in1 = p->x_next;
  a.in2 = p->v;
  a.out0 = p->dx;
  a.out1 = p->dx_next;
  a.out2 = p->dv;
  a.t = p->t;
  a.t_next = p->t_next;
  a.sigma = p->sigma;
  a.grad = p->grad;
  a.N = p->N;
  const bool vec_ok = aligned16(p->x) && aligned16(p->x_next) && aligned16(p->v) && aligned16(p->dx) &&
                      aligned16(p->dx_next) && aligned16(p->dv);
  return run_flow<kLogprobBwd>(a, p->B, vec_ok, dtype, st);
}

int umm_cuda_flow_kl(const umm::FlowKlParams* p, int dtype, void* stream) {
  if (!valid_dtype(dtype)) return to_int(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p->B <= 0 || p->kl == nullptr) return 0;
  if (p->N <= 0) return to_int(zero_floats(p->kl, p->B, st));
  FlowArgs a = blank_args();
  a.in0 = p->v;
  a.in1 = p->v_ref;
  a.t = p->t;
  a.t_next = p->t_next;
  a.sigma = p->sigma;
  a.result = p->kl;
  a.N = p->N;
  const bool vec_ok = aligned16(p->v) && aligned16(p->v_ref);
  return run_flow<kKl>(a, p->B, vec_ok, dtype, st);
}

int umm_cuda_flow_kl_bwd(const umm::FlowKlBwdParams* p, int dtype, void* stream) {
  if (!valid_dtype(dtype)) return to_int(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p->B <= 0 || p->N <= 0) return 0;
  if (p->dv == nullptr && p->dv_ref == nullptr) return 0;
  FlowArgs a = blank_args();
  a.in0 = p->v;
  a.in1 = p->v_ref;
  a.out0 = p->dv;
  a.out1 = p->dv_ref;
  a.t = p->t;
  a.t_next = p->t_next;
  a.sigma = p->sigma;
  a.grad = p->grad;
  a.N = p->N;
  const bool vec_ok = aligned16(p->v) && aligned16(p->v_ref) && aligned16(p->dv) && aligned16(p->dv_ref);
  return run_flow<kKlBwd>(a, p->B, vec_ok, dtype, st);
}

}  // extern "C"
