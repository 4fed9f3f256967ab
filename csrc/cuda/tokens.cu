// CUDA kernels of the tokenizer-compression ops (formulas and geometry: umm/tokens.h; launcher contract:
// umm/cuda_api.h).  The fused gather-GEMM lives in tokens_gemm.cu; this file holds the memory passes.
//
// NOTE: written and compiled without a GPU: none of these kernels has been run yet (tests/test_tokens.py
// checks them against the float64 reference when a GPU is present).
//
//  * gather (LayerNorm statistics + space-to-depth into A): one warp per fine token (m, s), two passes over
//    its C channels (sum, then centred squares; the second pass re-reads the row from L1/L2).
//  * bias_act, act_bwd: grid-stride elementwise kernels; depth_scatter, space_gather: one warp per (coarse row,
//    segment) pair, latent_pack: one warp per latent row (index math per row, not per element).
//  * ln_scatter_bwd: dx by one warp per fine token; dln_w / dln_b by a column kernel writing per-chunk
//    partials (a cudaMallocAsync scratch) summed in a fixed order by a finishing kernel: no atomics, the
//    result depends only on the shape.
#include "common.cuh"
#include "umm/tokens.h"

namespace umm {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(int64_t n, int per_block = kThreads) {
  const int64_t b = ceil_div(n, per_block);
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535 * 16));
}

template <typename T>
__device__ __forceinline__ float ld_or(const void* p, int64_t i, float dflt) {
  return p ? to_f<T>(static_cast<const T*>(p)[i]) : dflt;
}

// --------------------------------------------------------------------------------- gather
template <typename T>
__global__ void gather_kernel(TokensGatherParams p) {
  const TokensGeom g = p.g;
  const int64_t C = g.C, ff = g.f * g.f, K = ff * C;
  const int64_t rows = g.N * g.H * g.W;  // one (m, s) pair per fine token
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const T* x = static_cast<const T*>(p.x);
  T* a = static_cast<T*>(p.a);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const int64_t m = r / ff, s = r - m * ff;
    const int64_t t = fine_token(g, m, s);
    const T* xr = x + t * C;
    float mean, rstd;
    if (p.stats_given) {
      mean = p.mean[t];
      rstd = p.rstd[t];
    } else {
      float sum = 0.f;
      for (int64_t c = lane; c < C; c += 32) sum += to_f<T>(xr[c]);
      mean = warp_sum(sum) / float(C);
      float q = 0.f;
      for (int64_t c = lane; c < C; c += 32) {
        const float d = to_f<T>(xr[c]) - mean;
        q += d * d;
      }
      rstd = rsqrtf(warp_sum(q) / float(C) + p.eps);
      if (lane == 0) {
        p.mean[t] = mean;
        p.rstd[t] = rstd;
      }
    }
    if (a) {
      T* dst = a + m * K + s * C;
      for (int64_t c = lane; c < C; c += 32)
        dst[c] = from_f<T>((to_f<T>(xr[c]) - mean) * rstd * ld_or<T>(p.ln_w, c, 1.f) + ld_or<T>(p.ln_b, c, 0.f));
    }
  }
}

// --------------------------------------------------------------------------------- elementwise passes
template <typename T>
__global__ void bias_act_kernel(TokensBiasActParams p) {
  T* pre = static_cast<T*>(p.pre);
  T* out = static_cast<T*>(p.out);
  const int64_t n = p.M * p.Cout;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = to_f<T>(pre[i]) + ld_or<T>(p.bias, i % p.Cout, 0.f);
    if (p.keep_pre) pre[i] = from_f<T>(v);
    out[i] = from_f<T>(token_act(v, p.act));
  }
}

template <typename T>
__global__ void act_bwd_kernel(TokensActBwdParams p) {
  const T* gr = static_cast<const T*>(p.grad);
  const T* pre = static_cast<const T*>(p.pre);
  T* d = static_cast<T*>(p.dpre);
  const int64_t n = p.M * p.Cout;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gv = to_f<T>(gr[i]);
    d[i] = from_f<T>(p.act == int(TokenAct::kNone) ? gv : gv * token_act_grad(to_f<T>(pre[i]), p.act));
  }
}

// Row kernels: one warp per (coarse row m, segment s) pair r = m f f + s (the index math once per row).
template <typename T>
__global__ void depth_scatter_kernel(TokensDepthScatterParams p) {
  const TokensGeom g = p.g;
  const int64_t C = g.C, ff = g.f * g.f, rows = g.N * g.H * g.W;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const T* z = static_cast<const T*>(p.z);
  T* out = static_cast<T*>(p.out);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const int64_t m = r / ff, s = r - m * ff;
    const T* zr = z + r * C;  // = m K + s C
    T* orow = out + fine_token(g, m, s) * C;
    for (int64_t c = lane; c < C; c += 32) orow[c] = from_f<T>(to_f<T>(zr[c]) + ld_or<T>(p.bias, s * C + c, 0.f));
  }
}

template <typename T>
__global__ void space_gather_kernel(TokensSpaceGatherParams p) {
  const TokensGeom g = p.g;
  const int64_t C = g.C, ff = g.f * g.f, rows = g.N * g.H * g.W;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const int64_t m = r / ff, s = r - m * ff;
    const T* sr = src + fine_token(g, m, s) * C;
    T* dr = dst + r * C;
    for (int64_t c = lane; c < C; c += 32) dr[c] = sr[c];
  }
}

// One warp per latent row (b, c, h) of W elements; the token side is addressed per element with one division
// by f.
template <typename T>
__global__ void latent_pack_kernel(LatentPackParams p) {
  const int64_t f = p.f, ff = f * f, K = p.C * ff, Hc = p.H / f, Wc = p.W / f;
  const int64_t rows = p.B * p.C * p.H;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const int64_t b = r / (p.C * p.H), rem = r - b * p.C * p.H, c = rem / p.H, h = rem - c * p.H;
    const int64_t i = h / f, di = h - i * f;
    const int64_t tok0 = (b * Hc + i) * Wc;   // first token of the coarse row
    const int64_t k0 = c * ff + di * f;       // packed channel of (c, di, dj = 0)
    const int64_t lat = r * p.W;              // = ((b C + c) H + h) W
    for (int64_t w = lane; w < p.W; w += 32) {
      const int64_t j = w / f, k = k0 + (w - j * f);
      const int64_t tok = (tok0 + j) * K + k;
      const float sh = p.shift ? p.shift[k] : 0.f;
      if (p.to_tokens) {
        dst[tok] = from_f<T>(to_f<T>(src[lat + w]) * p.scale[k] + sh);
      } else {
        dst[lat + w] = from_f<T>(to_f<T>(src[tok]) * p.scale[k] + sh);
      }
    }
  }
}

// --------------------------------------------------------------------------------- LayerNorm backward
template <typename T>
__global__ void ln_scatter_dx_kernel(TokensLnScatterBwdParams p) {
  const TokensGeom g = p.g;
  const int64_t C = g.C, ff = g.f * g.f;
  const int64_t rows = g.N * g.H * g.W;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const T* da = static_cast<const T*>(p.da);
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.dx);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const int64_t m = r / ff, s = r - m * ff;
    const int64_t t = fine_token(g, m, s);
    const float mean = p.mean[t], rstd = p.rstd[t];
    const T* xr = x + t * C;
    const T* dr = da + r * C;  // = m K + s C
    float s1 = 0.f, s2 = 0.f;
    for (int64_t c = lane; c < C; c += 32) {
      const float xh = (to_f<T>(xr[c]) - mean) * rstd;
      const float gy = to_f<T>(dr[c]) * ld_or<T>(p.ln_w, c, 1.f);
      s1 += gy;
      s2 += gy * xh;
    }
    const float m1 = warp_sum(s1) / float(C), m2 = warp_sum(s2) / float(C);
    T* dxr = dx + t * C;
    for (int64_t c = lane; c < C; c += 32) {
      const float xh = (to_f<T>(xr[c]) - mean) * rstd;
      const float gy = to_f<T>(dr[c]) * ld_or<T>(p.ln_w, c, 1.f);
      dxr[c] = from_f<T>(rstd * (gy - m1 - xh * m2));
    }
  }
}

// Partial column sums over a chunk of fine-token rows: part[chunk][0 | 1][c] = sum dA xhat | sum dA.
// Block (32, 8): x = column within a 32-column tile, y = row lane; fixed-order shared-memory reduction.
template <typename T>
__global__ void ln_param_partial_kernel(TokensLnScatterBwdParams p, float* part, int64_t rows_per_chunk) {
  const TokensGeom g = p.g;
  const int64_t C = g.C, ff = g.f * g.f;
  const int64_t rows = g.N * g.H * g.W;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = min(rows, r0 + rows_per_chunk);
  const T* da = static_cast<const T*>(p.da);
  const T* x = static_cast<const T*>(p.x);
  float aw = 0.f, ab = 0.f;
  if (c < C) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const int64_t m = r / ff, s = r - m * ff;
      const int64_t t = fine_token(g, m, s);
      const float dv = to_f<T>(da[r * C + c]);
      aw += dv * (to_f<T>(x[t * C + c]) - p.mean[t]) * p.rstd[t];
      ab += dv;
    }
  }
  __shared__ float sw[8][33], sb[8][33];
  sw[threadIdx.y][threadIdx.x] = aw;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float tw = 0.f, tb = 0.f;
    for (int y = 0; y < 8; ++y) {
      tw += sw[y][threadIdx.x];
      tb += sb[y][threadIdx.x];
    }
    part[(static_cast<int64_t>(blockIdx.y) * 2) * C + c] = tw;
    part[(static_cast<int64_t>(blockIdx.y) * 2 + 1) * C + c] = tb;
  }
}

__global__ void ln_param_finish_kernel(const float* part, int64_t chunks, int64_t C, float* dw, float* db) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float tw = 0.f, tb = 0.f;
  for (int64_t k = 0; k < chunks; ++k) {
    tw += part[(2 * k) * C + c];
    tb += part[(2 * k + 1) * C + c];
  }
  if (dw) dw[c] = tw;
  if (db) db[c] = tb;
}

template <class Kern, class P>
int launch_1d(Kern k, const P& p, int64_t n, void* stream) {
  if (n <= 0) return 0;
  k<<<grid_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return to_int(cudaGetLastError());
}

}  // namespace
}  // namespace cuda
}  // namespace umm

using namespace umm;
using namespace umm::cuda;

extern "C" int umm_cuda_error_not_supported() { return static_cast<int>(cudaErrorNotSupported); }

extern "C" int umm_cuda_tokens_gather(const TokensGatherParams* p, int dtype, void* stream) {
  const int64_t rows = p->g.N * p->g.H * p->g.W;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_1d(gather_kernel<T>, *p, rows * 32, stream);
  });
}

extern "C" int umm_cuda_tokens_bias_act(const TokensBiasActParams* p, int dtype, void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_1d(bias_act_kernel<T>, *p, p->M * p->Cout, stream);
  });
}

extern "C" int umm_cuda_tokens_act_bwd(const TokensActBwdParams* p, int dtype, void* stream) {
  if (p->dbias != nullptr) return static_cast<int>(cudaErrorNotSupported);  // the fused bias gradient is CPU-only
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_1d(act_bwd_kernel<T>, *p, p->M * p->Cout, stream);
  });
}

extern "C" int umm_cuda_tokens_depth_scatter(const TokensDepthScatterParams* p, int dtype, void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_1d(depth_scatter_kernel<T>, *p, p->g.N * p->g.H * p->g.W * 32, stream);
  });
}

extern "C" int umm_cuda_tokens_space_gather(const TokensSpaceGatherParams* p, int dtype, void* stream) {
  if (p->dbias != nullptr) return static_cast<int>(cudaErrorNotSupported);  // the fused bias gradient is CPU-only
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_1d(space_gather_kernel<T>, *p, p->g.N * p->g.H * p->g.W * 32, stream);
  });
}

extern "C" int umm_cuda_latent_pack(const LatentPackParams* p, int dtype, void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_1d(latent_pack_kernel<T>, *p, p->B * p->C * p->H * 32, stream);
  });
}

extern "C" int umm_cuda_tokens_ln_scatter_bwd(const TokensLnScatterBwdParams* p, int dtype, void* stream) {
  if (p->a != nullptr) return static_cast<int>(cudaErrorNotSupported);  // re-writing A here is CPU-only
  const int64_t rows = p->g.N * p->g.H * p->g.W, C = p->g.C;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p->dx) {
      const int e = launch_1d(ln_scatter_dx_kernel<T>, *p, rows * 32, stream);
      if (e) return e;
    }
    if (!p->dln_w && !p->dln_b) return 0;
    if (rows == 0) {
      cudaError_t e = zero_floats(p->dln_w, C, st);
      if (e == cudaSuccess) e = zero_floats(p->dln_b, C, st);
      return to_int(e);
    }
    // ~256 row chunks (shape-only), at least 64 rows each
    const int64_t rpc = std::max<int64_t>(64, ceil_div(rows, 256)), chunks = ceil_div(rows, rpc);
    float* part = nullptr;
    cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&part), size_t(chunks * 2 * C) * sizeof(float), st);
    if (e != cudaSuccess) return to_int(e);
    dim3 grid(static_cast<unsigned>(ceil_div(C, 32)), static_cast<unsigned>(chunks));
    ln_param_partial_kernel<T><<<grid, dim3(32, 8), 0, st>>>(*p, part, rpc);
    ln_param_finish_kernel<<<grid_for(C), kThreads, 0, st>>>(part, chunks, C, p->dln_w, p->dln_b);
    e = cudaGetLastError();
    const cudaError_t ef = cudaFreeAsync(part, st);
    return to_int(e != cudaSuccess ? e : ef);
  });
}
