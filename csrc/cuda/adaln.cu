// adaLN modulation: out = norm(x) * weight + bias, then * (1 + scale[b]) + shift[b] (RMSNorm or LayerNorm).
#include "common.cuh"

namespace umm {
namespace cuda {
namespace {

constexpr int kFwdEpt = 32;
constexpr int kBwdEpt = 16;

// Forward: one row (b, l) per group of tpr threads, grid-stride over rows.  CACHED: x in registers.
template <typename T, int VEC, bool CACHED>
__global__ void __launch_bounds__(kMaxTpr) adaln_fwd_kernel(AdaLNParams p, int tpr, int G) {
  constexpr int NV = CACHED ? kFwdEpt / VEC : 1;
  __shared__ float smem[32];
  const int g = threadIdx.x / tpr;
  const int t = threadIdx.x - g * tpr;
  const int64_t rows = p.B * p.L, C = p.C;
  const T* x = static_cast<const T*>(p.x);
  const T* shift = static_cast<const T*>(p.shift);
  const T* scale = static_cast<const T*>(p.scale);
  const T* wt = static_cast<const T*>(p.weight);
  const T* bs = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  const float fc = static_cast<float>(C);

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * G; base < rows; base += static_cast<int64_t>(gridDim.x) * G) {
    const int64_t row = base + g;
    const bool valid = row < rows;
    const int64_t rr = valid ? row : 0;
    const int64_t b = rr / p.L;
    const int64_t roff = rr * C;
    float cache[NV][VEC];
    // pass 1: sum x (LayerNorm) or sum x^2 (RMSNorm)
    float s[1] = {0.f};
    if (valid) {
      for_cols<CACHED, NV, VEC>(t, tpr, C, [&](int k, int64_t c) {
        float v[VEC];
        load_vec<T, VEC>(x + roff + c, v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if constexpr (CACHED) cache[k][j] = v[j];
          s[0] += p.rms ? v[j] * v[j] : v[j];
        }
      });
    }
    group_sum<1>(s, tpr, smem);
    float mean = 0.f, rstd;
    if (p.rms) {
      rstd = rsqrtf(s[0] / fc + p.eps);
    } else {  // pass 2: biased variance around the mean
      mean = s[0] / fc;
      float q[1] = {0.f};
      if (valid) {
        for_cols<CACHED, NV, VEC>(t, tpr, C, [&](int k, int64_t c) {
          float v[VEC];
          if constexpr (CACHED) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) v[j] = cache[k][j];
          } else {
            load_vec<T, VEC>(x + roff + c, v);
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float d = v[j] - mean;
            q[0] += d * d;
          }
        });
      }
      group_sum<1>(q, tpr, smem);
      rstd = rsqrtf(q[0] / fc + p.eps);
    }
    if (valid) {
      const T* sh = shift != nullptr ? shift + b * p.shift_stride : nullptr;
      const T* sc = scale != nullptr ? scale + b * p.scale_stride : nullptr;
      for_cols<CACHED, NV, VEC>(t, tpr, C, [&](int k, int64_t c) {
        float v[VEC], w[VEC], bb[VEC], shv[VEC], scv[VEC], o[VEC];
        if constexpr (CACHED) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) v[j] = cache[k][j];
        } else {
          load_vec<T, VEC>(x + roff + c, v);
        }
        load_vec_or<T, VEC>(wt != nullptr ? wt + c : nullptr, w, 1.f);
        load_vec_or<T, VEC>(bs != nullptr ? bs + c : nullptr, bb, 0.f);
        load_vec_or<T, VEC>(sh != nullptr ? sh + c : nullptr, shv, 0.f);
        load_vec_or<T, VEC>(sc != nullptr ? sc + c : nullptr, scv, 0.f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float n = (v[j] - mean) * rstd * w[j] + bb[j];
          o[j] = n * (1.f + scv[j]) + shv[j];
        }
        store_vec<T, VEC>(out + roff + c, o);
      });
      if (t == 0) {
        if (!p.rms && p.mean != nullptr) p.mean[row] = mean;
        if (p.rstd != nullptr) p.rstd[row] = rstd;
      }
    }
  }
}

// Backward row kernel over the plan (B, L, C): block (b, s) handles rows l in [s R, min(L, (s + 1) R)) of
// sample b; group g of it writes per-column partials A = sum_l dy and Bq = sum_l dy xhat into its slot.
struct AdaBwdK {
  int tpr, G, Gs;
  int64_t S, R, slots;  // slots: B * S * Gs
  float* part;          // [2][slots][C] or nullptr
};

template <typename T, int VEC, bool CACHED>
__global__ void __launch_bounds__(kMaxTpr) adaln_bwd_kernel(AdaLNBwdParams p, AdaBwdK k) {
  constexpr int NV = CACHED ? kBwdEpt / VEC : 1;
  __shared__ float smem[64];
  const int tpr = k.tpr;
  const int g = threadIdx.x / tpr;
  const int t = threadIdx.x - g * tpr;
  const int64_t L = p.L, C = p.C;
  const int64_t b = blockIdx.x / k.S;
  const int64_t s = blockIdx.x - b * k.S;
  const int64_t l0 = s * k.R;
  const int64_t l1 = l0 + k.R < L ? l0 + k.R : L;
  const bool owns_slot = g < k.Gs;  // groups g >= Gs never get a row
  const int64_t slot = (b * k.S + s) * k.Gs + g;
  float* pA = (k.part != nullptr && owns_slot) ? k.part + slot * C : nullptr;
  float* pB = (k.part != nullptr && owns_slot) ? k.part + (k.slots + slot) * C : nullptr;
  const T* dyp = static_cast<const T*>(p.grad);
  const T* x = static_cast<const T*>(p.x);
  const T* sc = p.scale != nullptr ? static_cast<const T*>(p.scale) + b * p.scale_stride : nullptr;
  const T* wt = static_cast<const T*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const bool use_mean = !p.rms && p.mean != nullptr;
  const float fc = static_cast<float>(C);

  float accA[NV][VEC], accB[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) accA[i][j] = accB[i][j] = 0.f;
  if constexpr (!CACHED) {
    if (pA != nullptr)
      for (int64_t c = t; c < C; c += tpr) pA[c] = pB[c] = 0.f;
  }

  for (int64_t base = l0; base < l1; base += k.G) {
    const int64_t l = base + g;
    const bool valid = l < l1;
    const int64_t row = b * L + (valid ? l : l0);
    const float mu = use_mean ? p.mean[row] : 0.f;
    const float rs = p.rstd[row];
    const int64_t roff = row * C;
    float cx[NV][VEC], cd[NV][VEC];  // xhat, dxhat
    auto fetch = [&](int64_t c, float (&xh)[VEC], float (&dxh)[VEC], float (&dy)[VEC]) {
      float xv[VEC], scv[VEC], w[VEC];
      load_vec<T, VEC>(dyp + roff + c, dy);
      load_vec<T, VEC>(x + roff + c, xv);
      load_vec_or<T, VEC>(sc != nullptr ? sc + c : nullptr, scv, 0.f);
      load_vec_or<T, VEC>(wt != nullptr ? wt + c : nullptr, w, 1.f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xh[j] = (xv[j] - mu) * rs;
        dxh[j] = dy[j] * (1.f + scv[j]) * w[j];
      }
    };
    float sums[2] = {0.f, 0.f};
    if (valid) {
      for_cols<CACHED, NV, VEC>(t, tpr, C, [&](int kk, int64_t c) {
        float xh[VEC], dxh[VEC], dy[VEC];
        fetch(c, xh, dxh, dy);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          sums[0] += dxh[j];
          sums[1] += dxh[j] * xh[j];
          if constexpr (CACHED) {
            cx[kk][j] = xh[j];
            cd[kk][j] = dxh[j];
            accA[kk][j] += dy[j];
            accB[kk][j] += dy[j] * xh[j];
          } else {
            if (pA != nullptr) {  // this thread owns column c + j of its slot
              pA[c + j] += dy[j];
              pB[c + j] += dy[j] * xh[j];
            }
          }
        }
      });
    }
    if (dx != nullptr) {  // uniform over the block
      group_sum<2>(sums, tpr, smem);
      const float m1 = p.rms ? 0.f : sums[0] / fc;
      const float m2 = sums[1] / fc;
      if (valid) {
        for_cols<CACHED, NV, VEC>(t, tpr, C, [&](int kk, int64_t c) {
          float xh[VEC], dxh[VEC], o[VEC];
          if constexpr (CACHED) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
              xh[j] = cx[kk][j];
              dxh[j] = cd[kk][j];
            }
          } else {
            float dy[VEC];
            fetch(c, xh, dxh, dy);
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) o[j] = rs * (dxh[j] - m1 - xh[j] * m2);
          store_vec<T, VEC>(dx + roff + c, o);
        });
      }
    }
  }
  if constexpr (CACHED) {
    if (pA != nullptr) {
      for_cols<CACHED, NV, VEC>(t, tpr, C, [&](int kk, int64_t c) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          pA[c + j] = accA[kk][j];
          pB[c + j] = accB[kk][j];
        }
      });
    }
  }
}

// Per (b, c) from A = sum_l dy, Bq = sum_l dy xhat:
//   dshift = A;  dscale = w Bq + bias A  (= sum_l dy n);
//   second level (ws2, [2][B][C]): (1 + scale) Bq -> dweight, (1 + scale) A -> dbias.
template <typename T>
struct AdaEpi1 {
  float* dshift;
  float* dscale;
  float* ws2;
  const T* scale;
  int64_t scale_stride;
  const T* weight;
  const T* bias;
  int64_t B, C;
  __device__ void operator()(int64_t b, int64_t c, const float (&s)[2]) const {
    const float A = s[0], Bq = s[1];
    if (dshift != nullptr) dshift[b * C + c] = A;
    if (dscale != nullptr) {
      const float w = weight != nullptr ? to_f<T>(weight[c]) : 1.f;
      const float bi = bias != nullptr ? to_f<T>(bias[c]) : 0.f;
      dscale[b * C + c] = w * Bq + bi * A;
    }
    if (ws2 != nullptr) {
      const float m = 1.f + (scale != nullptr ? to_f<T>(scale[b * scale_stride + c]) : 0.f);
      ws2[b * C + c] = m * Bq;
      ws2[(B + b) * C + c] = m * A;
    }
  }
};

struct AdaEpi2 {
  float* dweight;
  float* dbias;
  __device__ void operator()(int64_t, int64_t c, const float (&s)[2]) const {
    if (dweight != nullptr) dweight[c] = s[0];
    if (dbias != nullptr) dbias[c] = s[1];
  }
};

// Workspace layout (floats), from (B, L, C) only:
//   [0, 2 slots C)      per-slot column partials of A and Bq (slots = B S Gs of the row plan)
//   [.., + 2 B C)       (1 + scale) Bq and (1 + scale) A per (b, c)
struct AdaLayout {
  RowPlan plan;
  int64_t part, ws2, total;
};

AdaLayout ada_layout(int64_t B, int64_t L, int64_t C) {
  AdaLayout l;
  l.plan = make_row_plan(B, L, C, kBwdEpt);
  l.part = 0;
  l.ws2 = 2 * l.plan.slots() * C;
  l.total = l.ws2 + 2 * B * C;
  if (B <= 0 || L <= 0 || C <= 0) l.total = 0;
  return l;
}

template <typename T>
int adaln_fwd_launch(const AdaLNParams& p, cudaStream_t st) {
  constexpr int V = Vec16<T>::value;
  const RowPlan plan = make_row_plan(1, p.B * p.L, p.C, kFwdEpt);
  const bool vec = row_vec_fits(p.C, V, kFwdEpt) && aligned16(p.x) && aligned16(p.shift) && aligned16(p.scale) &&
                   aligned16(p.weight) && aligned16(p.bias) && aligned16(p.out) && p.shift_stride % V == 0 &&
                   p.scale_stride % V == 0;
  const unsigned grid = fwd_grid(p.B * p.L, plan.G);
  if (vec) {
    adaln_fwd_kernel<T, V, true><<<grid, plan.block, 0, st>>>(p, plan.tpr, plan.G);
  } else {
    adaln_fwd_kernel<T, 1, false><<<grid, plan.block, 0, st>>>(p, plan.tpr, plan.G);
  }
  return to_int(cudaGetLastError());
}

template <typename T>
int adaln_bwd_launch(const AdaLNBwdParams& p, cudaStream_t st) {
  constexpr int V = Vec16<T>::value;
  const int64_t B = p.B, L = p.L, C = p.C;
  const bool want_bc = p.dshift != nullptr || p.dscale != nullptr;
  const bool want_c = p.dweight != nullptr || p.dbias != nullptr;
  const AdaLayout lay = ada_layout(B, L, C);
  if ((want_bc || want_c) && (p.workspace == nullptr || p.workspace_elems < lay.total)) {
    return to_int(cudaErrorInvalidValue);
  }
  const RowPlan& plan = lay.plan;
  float* ws = p.workspace;
  if (p.dx == nullptr && !want_bc && !want_c) return 0;
  if (plan.grid() > kMaxGridX) return to_int(cudaErrorInvalidConfiguration);  // B > ~2^31 samples
  AdaBwdK k;
  k.tpr = plan.tpr;
  k.G = plan.G;
  k.Gs = plan.Gs;
  k.S = plan.S;
  k.R = plan.R;
  k.slots = plan.slots();
  k.part = (want_bc || want_c) ? ws + lay.part : nullptr;
  const bool vec = row_vec_fits(C, V, kBwdEpt) && aligned16(p.grad) && aligned16(p.x) && aligned16(p.scale) &&
                   aligned16(p.weight) && aligned16(p.dx) && p.scale_stride % V == 0;
  const unsigned grid = static_cast<unsigned>(plan.grid());
  if (vec) {
    adaln_bwd_kernel<T, V, true><<<grid, plan.block, 0, st>>>(p, k);
  } else {
    adaln_bwd_kernel<T, 1, false><<<grid, plan.block, 0, st>>>(p, k);
  }
  if (want_bc || want_c) {
    AdaEpi1<T> e1;
    e1.dshift = p.dshift;
    e1.dscale = p.dscale;
    e1.ws2 = want_c ? ws + lay.ws2 : nullptr;
    e1.scale = static_cast<const T*>(p.scale);
    e1.scale_stride = p.scale_stride;
    e1.weight = static_cast<const T*>(p.weight);
    e1.bias = static_cast<const T*>(p.bias);
    e1.B = B;
    e1.C = C;
    const int64_t per_seg = plan.S * plan.Gs;  // slots of one sample
    launch_seg_colsum<2>(ws + lay.part, k.slots * C, B, per_seg, C, e1, st);
    if (want_c) launch_seg_colsum<2>(ws + lay.ws2, B * C, 1, B, C, AdaEpi2{p.dweight, p.dbias}, st);
  }
  return to_int(cudaGetLastError());
}

}  // namespace
}  // namespace cuda
}  // namespace umm

using namespace umm::cuda;

extern "C" {

int umm_cuda_adaln(const umm::AdaLNParams* p, int dtype, void* stream) {
  if (!valid_dtype(dtype)) return to_int(cudaErrorInvalidValue);
  if (p->B <= 0 || p->L <= 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return adaln_fwd_launch<T>(*p, st);
  });
}

int64_t umm_cuda_adaln_bwd_workspace(int64_t B, int64_t L, int64_t C) { return ada_layout(B, L, C).total; }

int umm_cuda_adaln_bwd(const umm::AdaLNBwdParams* p, int dtype, void* stream) {
  if (!valid_dtype(dtype)) return to_int(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p->B <= 0 || p->L <= 0 || p->C <= 0) {  // reductions over an empty range: zeros
    const int64_t B = p->B > 0 ? p->B : 0, C = p->C > 0 ? p->C : 0;
    cudaError_t e = zero_floats(p->dshift, B * C, st);
    if (e == cudaSuccess) e = zero_floats(p->dscale, B * C, st);
    if (e == cudaSuccess) e = zero_floats(p->dweight, C, st);
    if (e == cudaSuccess) e = zero_floats(p->dbias, C, st);
    return to_int(e);
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return adaln_bwd_launch<T>(*p, st);
  });
}

}  // extern "C"
