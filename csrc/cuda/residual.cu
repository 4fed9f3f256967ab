// Gated residual: out = x + gate[b] * y; backward dy = gate * grad, dgate = sum_l grad * y.
#include "common.cuh"

namespace umm {
namespace cuda {
namespace {

constexpr int kEpt = 16;

// One row (b, l) per group of tpr threads, grid-stride over rows; CACHED: each thread first loads its
// NV vectors of x and y (ILP), then computes and stores.
template <typename T, int VEC, bool CACHED>
__global__ void __launch_bounds__(kMaxTpr) residual_fwd_kernel(GatedResidualParams p, int tpr, int G) {
  constexpr int NV = CACHED ? kEpt / VEC : 1;
  const int g = threadIdx.x / tpr;
  const int t = threadIdx.x - g * tpr;
  const int64_t rows = p.B * p.L, C = p.C;
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);
  const T* gate = static_cast<const T*>(p.gate);
  T* out = static_cast<T*>(p.out);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * G + g; row < rows; row += static_cast<int64_t>(gridDim.x) * G) {
    const int64_t roff = row * C;
    const T* gr = gate + (row / p.L) * p.gate_stride;
    if constexpr (CACHED) {
      float xv[NV][VEC], yv[NV][VEC];
      for_cols<true, NV, VEC>(t, tpr, C, [&](int k, int64_t c) {
        load_vec<T, VEC>(x + roff + c, xv[k]);
        load_vec<T, VEC>(y + roff + c, yv[k]);
      });
      for_cols<true, NV, VEC>(t, tpr, C, [&](int k, int64_t c) {
        float gv[VEC], o[VEC];
        load_vec<T, VEC>(gr + c, gv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = xv[k][j] + gv[j] * yv[k][j];
        store_vec<T, VEC>(out + roff + c, o);
      });
    } else {
      for (int64_t c = t; c < C; c += tpr) {
        out[roff + c] = from_f<T>(to_f<T>(x[roff + c]) + to_f<T>(gr[c]) * to_f<T>(y[roff + c]));
      }
    }
  }
}

struct DgateEpi {
  float* dgate;
  int64_t C;
  __device__ void operator()(int64_t b, int64_t c, const float (&s)[1]) const { dgate[b * C + c] = s[0]; }
};

// Workspace (floats): [slots][C] column partials of sum grad * y (slots = B S Gs of the plan over (B, L, C)).
int64_t res_ws(int64_t B, int64_t L, int64_t C) {
  if (B <= 0 || L <= 0 || C <= 0) return 0;
  return make_row_plan(B, L, C, kRsEpt).slots() * C;
}

template <typename T>
int residual_fwd_launch(const GatedResidualParams& p, cudaStream_t st) {
  constexpr int V = Vec16<T>::value;
  const RowPlan plan = make_row_plan(1, p.B * p.L, p.C, kEpt);
  const bool vec = row_vec_fits(p.C, V, kEpt) && aligned16(p.x) && aligned16(p.y) && aligned16(p.gate) &&
                   aligned16(p.out) && p.gate_stride % V == 0;
  const unsigned grid = fwd_grid(p.B * p.L, plan.G);
  if (vec) {
    residual_fwd_kernel<T, V, true><<<grid, plan.block, 0, st>>>(p, plan.tpr, plan.G);
  } else {
    residual_fwd_kernel<T, 1, false><<<grid, plan.block, 0, st>>>(p, plan.tpr, plan.G);
  }
  return to_int(cudaGetLastError());
}

template <typename T>
int residual_bwd_launch(const GatedResidualBwdParams& p, cudaStream_t st) {
  const int64_t B = p.B, L = p.L, C = p.C;
  if (p.dgate != nullptr && (p.workspace == nullptr || p.workspace_elems < res_ws(B, L, C))) {
    return to_int(cudaErrorInvalidValue);
  }
  const RowPlan plan = make_row_plan(B, L, C, kRsEpt);
  RowScaleArgs a;
  a.a = p.grad;
  a.y = p.y;
  a.rowscale = nullptr;
  a.colvec = p.gate;
  a.colvec_stride = p.gate_stride;
  a.out = p.dy;
  a.part = p.dgate != nullptr ? p.workspace : nullptr;
  a.L = L;
  a.C = C;
  const cudaError_t e = launch_rowscale_colreduce<T>(a, plan, st);
  if (e != cudaSuccess) return to_int(e);
  if (p.dgate != nullptr) launch_seg_colsum<1>(p.workspace, 0, B, plan.S * plan.Gs, C, DgateEpi{p.dgate, C}, st);
  return to_int(cudaGetLastError());
}

}  // namespace
}  // namespace cuda
}  // namespace umm

using namespace umm::cuda;

extern "C" {

int umm_cuda_gated_residual(const umm::GatedResidualParams* p, int dtype, void* stream) {
  if (!valid_dtype(dtype)) return to_int(cudaErrorInvalidValue);
  if (p->B <= 0 || p->L <= 0 || p->C <= 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return residual_fwd_launch<T>(*p, st);
  });
}

int64_t umm_cuda_gated_residual_bwd_workspace(int64_t B, int64_t L, int64_t C) { return res_ws(B, L, C); }

int umm_cuda_gated_residual_bwd(const umm::GatedResidualBwdParams* p, int dtype, void* stream) {
  if (!valid_dtype(dtype)) return to_int(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p->B <= 0 || p->L <= 0 || p->C <= 0) {
    const int64_t B = p->B > 0 ? p->B : 0, C = p->C > 0 ? p->C : 0;
    return to_int(zero_floats(p->dgate, B * C, st));
  }
  if (p->dy == nullptr && p->dgate == nullptr) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return residual_bwd_launch<T>(*p, st);
  });
}

}  // extern "C"
