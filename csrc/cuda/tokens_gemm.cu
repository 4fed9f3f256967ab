// The fused gather-GEMM of compress_tokens / expand_tokens on tensor cores (umm/tokens.h, TokensGemmParams):
//   out = epilogue(A' W^T), A' (M, Kdim) gathered and normalised on the fly, W (Nout, Kdim) row-major.
//
// NOTE: written and compiled without a GPU (nvcc 13, sm_80 / sm_90a): this kernel has NEVER been run.
// tests/test_tokens.py::test_cuda_fused_gemm_cheers_sizes (and the cuda-backend cases of the other tests)
// check it against the float64 reference when a GPU is present.
//
// Tiling: CTA tile 128 x 128 x 32, 4 warps in a 2 x 2 TiledMMA of SM80_16x8x16 F32 += BF16/F16 atoms (tile
// 32 x 32 x 16 per step), fp32 accumulators (128 per thread).  Shared memory: two stages of the A and B tiles,
// K-major in Swizzle<2,3,3> atoms of 8 x 32 elements (conflict-free ldmatrix, 16-byte chunks kept whole),
// read with SM75 ldmatrix x4: 2 x (8 + 8) KiB = 32 KiB (static).
//   * B (the weight) goes global -> shared with cp.async (16-byte chunks, out-of-range chunks zero-filled).
//   * A is register-staged: each thread loads four 8-element chunks of the NEXT k-tile from global memory
//     (gather: chunk k..k+7 of coarse row m is channels c..c+7 of fine token fine_token(m, k / C), contiguous
//     because C % 8 == 0), normalises them in fp32 with the token's precomputed mean / rstd and the LayerNorm
//     affine, rounds to T and stores 16 bytes to shared memory after the current k-tile's MMAs are issued, so
//     the global loads overlap the tensor-core work.  The normalised, unfolded tensor never exists in memory.
//   * Epilogue straight from the accumulators (coordinates from an identity tensor partitioned like them):
//     + bias, optional store of the biased pre-activation, activation, store (or the depth-to-space scatter,
//     its destination token row_base(m) + col_off(n) read from per-tile shared tables).
//   * Index math: fine_token(m, s) = row_base(m) + di W + dj is separable; int32 divisions per row (once per
//     CTA) and per chunk column only, never int64 divisions per element.
// Coverage: T = bf16 / fp16, sm80+, Kdim % 8 == 0 (C % 8 for the gather, C_in % 8 for expand) and 16-byte
// aligned x / y / weight; anything else answers cudaErrorNotSupported and the caller runs gather + cuBLAS.
#include "common.cuh"
#include "umm/tokens.h"

#if defined(UMM_HAVE_CUTLASS)
#include "tokens_gemm.cuh"

namespace umm {
namespace cuda {
namespace tokgemm {

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}

union Pack8 {
  uint4 u;
  __align__(16) unsigned short h[8];
};

template <class T>
__device__ __forceinline__ float t2f(unsigned short bits) {
  return float(T::bitcast(bits));
}
template <class T>
__device__ __forceinline__ unsigned short f2t(float v) {
  return T(v).raw();  // round to nearest even
}

// Registers holding one thread's share of the next A tile (raw 16-byte chunks plus what normalises them).
struct AStage {
  uint4 raw[kChunks];
  float mean[kChunks], rstd[kChunks];
  int c0[kChunks];  // channel of the chunk's first element (gather) or -1 (masked out)
};

// fine_token(m, s) = row_base(m) + di W + dj is separable: the coarse-row part of the thread's kChunks rows is
// computed once per CTA (int32 token indices: the launcher checks N H W < 2^31), the segment part per chunk.
struct ARows {
  int base[kChunks];  // row_base of the chunk's row, or -1 when the row is past M
};

__device__ __forceinline__ ARows a_rows(const TokensGemmParams& p, int64_t m0, int tid) {
  ARows r;
  const int f = int(p.g.f), W = int(p.g.W), Wc = W / f, L = int(p.g.H / p.g.f) * Wc, HW = int(p.g.H) * W;
  CUTE_UNROLL
  for (int i = 0; i < kChunks; ++i) {
    const int64_t m = m0 + chunk_row(tid, i);
    if (m < p.M) {
      const int mi = int(m), n = mi / L, l = mi - n * L, ii = l / Wc, jj = l - ii * Wc;
      r.base[i] = n * HW + f * ii * W + f * jj;
    } else {
      r.base[i] = -1;
    }
  }
  return r;
}

__device__ __forceinline__ void load_a(const TokensGemmParams& p, const ARows& rows, int64_t m0, int64_t k0,
                                       AStage& st, int tid) {
  const uint4* base = static_cast<const uint4*>(p.a);
  CUTE_UNROLL
  for (int i = 0; i < kChunks; ++i) {
    const int row = chunk_row(tid, i), kc = chunk_col(tid, i);
    const int64_t m = m0 + row, k = k0 + kc;
    st.c0[i] = -1;
    st.raw[i] = make_uint4(0, 0, 0, 0);
    if (m < p.M && k < p.Kdim) {
      if (p.gather_a) {
        const int C = int(p.g.C), f = int(p.g.f), ki = int(k);
        const int s = ki / C, c = ki - s * C, di = s / f;
        const int64_t t = int64_t(rows.base[i]) + di * int(p.g.W) + (s - di * f);
        st.raw[i] = __ldg(base + (t * C + c) / 8);
        st.mean[i] = __ldg(p.mean + t);
        st.rstd[i] = __ldg(p.rstd + t);
        st.c0[i] = c;
      } else {
        st.raw[i] = __ldg(base + (m * p.Kdim + k) / 8);
        st.c0[i] = 0;
      }
    }
  }
}

// Normalise (gather_a) and store the staged chunks to shared stage `s` of the A tile.
template <class T, class SA>
__device__ __forceinline__ void store_a(const TokensGemmParams& p, const AStage& st, SA& sA, int stage, int tid) {
  CUTE_UNROLL
  for (int i = 0; i < kChunks; ++i) {
    const int row = chunk_row(tid, i), kc = chunk_col(tid, i);
    Pack8 v;
    v.u = st.raw[i];
    if (p.gather_a) {
      if (st.c0[i] >= 0) {
        const T* lw = static_cast<const T*>(p.ln_w);
        const T* lb = static_cast<const T*>(p.ln_b);
        CUTE_UNROLL
        for (int e = 0; e < 8; ++e) {
          float a = (t2f<T>(v.h[e]) - st.mean[i]) * st.rstd[i];
          if (lw) a *= float(lw[st.c0[i] + e]);
          if (lb) a += float(lb[st.c0[i] + e]);
          v.h[e] = f2t<T>(a);
        }
      }  // masked chunks stay 0: they contribute nothing to the dot products
    }
    // a 16-byte chunk of 8 consecutive k stays contiguous under the swizzle
    *reinterpret_cast<uint4*>(&sA(row, kc, stage)) = v.u;
  }
}

template <class T, class SB>
__device__ __forceinline__ void load_b_async(const TokensGemmParams& p, int64_t n0, int64_t k0, SB& sB, int stage,
                                             int tid) {
  const char* w = static_cast<const char*>(p.weight);
  CUTE_UNROLL
  for (int i = 0; i < kChunks; ++i) {
    const int row = chunk_row(tid, i), kc = chunk_col(tid, i);
    const int64_t n = n0 + row, k = k0 + kc;
    void* dst = &sB(row, kc, stage);
    if (n < p.Nout && k < p.Kdim) {
      cp_async_16(dst, w + (n * p.Kdim + k) * int64_t(sizeof(T)));
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }
}

// One instantiation per dtype; gather_a / scatter_out / act are uniform runtime branches (keeps the build short).
template <class T>
__global__ void __launch_bounds__(kThreads) gather_gemm_kernel(const TokensGemmParams p) {
  using C = Cfg<T>;
  __shared__ __align__(128) T smem_a[cosize_v<typename C::SmemA>];
  __shared__ __align__(128) T smem_b[cosize_v<typename C::SmemB>];
  Tensor sA = make_tensor(make_smem_ptr(smem_a), typename C::SmemA{});  // (BM, BK, 2)
  Tensor sB = make_tensor(make_smem_ptr(smem_b), typename C::SmemB{});  // (BN, BK, 2)
  const int tid = threadIdx.x;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;

  typename C::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA, MMA_M, MMA_K)
  Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));
  Tensor acc = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});
  clear(acc);
  auto s2r_a = make_tiled_copy_A(typename C::Ldsm{}, mma);
  auto thr_s2r_a = s2r_a.get_slice(tid);
  Tensor tAsA = thr_s2r_a.partition_S(sA);  // (CPY, CPY_M, CPY_K, 2)
  Tensor tArA = thr_s2r_a.retile_D(tCrA);
  auto s2r_b = make_tiled_copy_B(typename C::Ldsm{}, mma);
  auto thr_s2r_b = s2r_b.get_slice(tid);
  Tensor tBsB = thr_s2r_b.partition_S(sB);
  Tensor tBrB = thr_s2r_b.retile_D(tCrB);

  const int64_t ktiles = (p.Kdim + kBK - 1) / kBK;
  const ARows rows = a_rows(p, m0, tid);
  AStage st;
  load_b_async<T>(p, n0, 0, sB, 0, tid);
  cp_async_fence();
  load_a(p, rows, m0, 0, st, tid);
  store_a<T>(p, st, sA, 0, tid);
  cp_async_wait<0>();
  __syncthreads();
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    const int cur = static_cast<int>(kt & 1);
    const bool more = kt + 1 < ktiles;
    if (more) {
      load_b_async<T>(p, n0, (kt + 1) * kBK, sB, cur ^ 1, tid);
      cp_async_fence();
      load_a(p, rows, m0, (kt + 1) * kBK, st, tid);  // in flight during the MMAs below
    }
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tCrA); ++k) {
      copy(s2r_a, tAsA(_, _, k, cur), tArA(_, _, k));
      copy(s2r_b, tBsB(_, _, k, cur), tBrB(_, _, k));
      cute::gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
    }
    if (more) {
      store_a<T>(p, st, sA, cur ^ 1, tid);
      cp_async_wait<0>();
    }
    __syncthreads();
  }

  // epilogue.  Scatter (expand): the destination fine token of (m, n) is row_base(m) + col_off(n) (separable);
  // the tile's 128 row bases and 128 (col_off, channel) pairs go to shared memory once, one per thread.
  __shared__ int s_row[kBM], s_col[kBN], s_ch[kBN];
  static_assert(kBM == kThreads && kBN == kThreads, "one row and one column per thread");
  if (p.scatter_out) {
    const int f = int(p.g.f), W = int(p.g.W), Wc = W / f, L = int(p.g.H / p.g.f) * Wc, HW = int(p.g.H) * W;
    const int Cc = int(p.g.C);
    const int64_t m = m0 + tid, n = n0 + tid;
    if (m < p.M) {
      const int mi = int(m), nn = mi / L, l = mi - nn * L, ii = l / Wc, jj = l - ii * Wc;
      s_row[tid] = nn * HW + f * ii * W + f * jj;
    }
    if (n < p.Nout) {
      const int ni = int(n), sg = ni / Cc, di = sg / f;
      s_col[tid] = di * W + (sg - di * f);
      s_ch[tid] = ni - sg * Cc;
    }
    __syncthreads();
  }
  Tensor cC = make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{});
  Tensor tCcC = thr_mma.partition_C(cC);
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  T* pre = static_cast<T*>(p.pre);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int r = get<0>(tCcC(i)), cn = get<1>(tCcC(i));
    const int64_t m = m0 + r, n = n0 + cn;
    if (m >= p.M || n >= p.Nout) continue;
    float v = acc(i);
    if (bias) v += float(bias[n]);
    if (pre) pre[m * p.Nout + n] = T(v);
    v = token_act(v, p.act);
    if (p.scatter_out) {
      out[(int64_t(s_row[r]) + s_col[cn]) * p.g.C + s_ch[cn]] = T(v);
    } else {
      out[m * p.Nout + n] = T(v);
    }
  }
}

template <class T>
int launch(const TokensGemmParams& p, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>(ceil_div(p.Nout, kBN)), static_cast<unsigned>(ceil_div(p.M, kBM)));
  gather_gemm_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return to_int(cudaGetLastError());
}

}  // namespace tokgemm
}  // namespace cuda
}  // namespace umm

extern "C" int umm_cuda_tokens_gemm(const umm::TokensGemmParams* p, int dtype, void* stream) {
  using namespace umm::cuda;
  const int unsupported = static_cast<int>(cudaErrorNotSupported);
  if (dtype != 1 && dtype != 2) return unsupported;  // float32 runs gather + cuBLAS (TF32 is not our call)
  if (p->M <= 0 || p->Nout <= 0) return 0;
  if (p->Kdim % 8 != 0 || (p->gather_a && p->g.C % 8 != 0) || !aligned16(p->a) || !aligned16(p->weight))
    return unsupported;
  if (p->M > int64_t(65535) * tokgemm::kBM || p->Nout > int64_t(INT_MAX) || p->Kdim > int64_t(INT_MAX) ||
      p->g.N * p->g.H * p->g.W > int64_t(INT_MAX))  // int32 token / channel indices in the A loads
    return unsupported;
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) !=
                                                 cudaSuccess) {
    (void)cudaGetLastError();
    return unsupported;
  }
  if (major < 8) return unsupported;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dtype == 1 ? tokgemm::launch<cutlass::bfloat16_t>(*p, st) : tokgemm::launch<cutlass::half_t>(*p, st);
}

#else  // built without the CUTLASS headers

extern "C" int umm_cuda_tokens_gemm(const umm::TokensGemmParams*, int, void*) {
  return static_cast<int>(cudaErrorNotSupported);
}

#endif
