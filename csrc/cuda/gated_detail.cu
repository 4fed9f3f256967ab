// Cheers' gated detail residual: g = dot(gate_hidden[n], w_gate) + b_gate; u = low + g high;
// out = LayerNorm(u) * ln_w + ln_b.  Forward and backward (see params.h / README.md).
#include "common.cuh"

namespace umm {
namespace cuda {
namespace {

constexpr int kFwdEpt = 32;  // forward: row cached in registers, <= 32 floats per thread
constexpr int kBwdEpt = 16;  // backward: 3 cached row arrays + 2 column accumulators of <= 16 floats

// u = low + g * high, the one expression shared by the forward and the backward's recomputation.  The fma
// is explicit so both compute bit-identical u (nvcc's default -fmad=true may or may not contract a plain
// `l + g * h` at each site); any difference would be amplified by rstd (C = 1, near-constant rows).
__device__ __forceinline__ float gd_u(float low, float gate, float high) { return fmaf(gate, high, low); }

// ---------------------------------------------------------------------------------------------
// Forward: one row per group of tpr threads, G rows per block, grid-stride over rows.
// CACHED (VEC = 16 / sizeof(T)): u kept in registers, exact two-pass mean / variance.
// !CACHED (VEC = 1): any C; u recomputed from global memory (L1/L2) in each of the three passes.
template <typename T, int VEC, bool CACHED>
__global__ void __launch_bounds__(kMaxTpr)
    gd_fwd_kernel(GatedDetailParams p, int tpr, int G, bool gh_vec) {
  constexpr int NV = CACHED ? kFwdEpt / VEC : 1;
  __shared__ float smem[32];
  const int g = threadIdx.x / tpr;
  const int t = threadIdx.x - g * tpr;
  const int64_t N = p.N, C = p.C, Dg = p.Dg;
  const T* low = static_cast<const T*>(p.low);
  const T* high = static_cast<const T*>(p.high);
  const T* ghid = static_cast<const T*>(p.gate_hidden);
  const T* wg = static_cast<const T*>(p.w_gate);
  const T* lw = static_cast<const T*>(p.ln_w);
  const T* lb = static_cast<const T*>(p.ln_b);
  T* out = static_cast<T*>(p.out);
  const float bgate = p.b_gate != nullptr ? to_f<T>(static_cast<const T*>(p.b_gate)[0]) : 0.f;
  const float fc = static_cast<float>(C);

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * G; base < N; base += static_cast<int64_t>(gridDim.x) * G) {
    const int64_t n = base + g;
    const bool valid = n < N;  // invalid groups still join the group reductions
    // g[n] = dot(gate_hidden[n, :], w_gate) + b_gate
    float red[1] = {0.f};
    if (valid) {
      const T* gh = ghid + n * Dg;
      if (gh_vec) {
        for (int64_t d = static_cast<int64_t>(t) * VEC; d < Dg; d += static_cast<int64_t>(tpr) * VEC) {
          float a[VEC], w[VEC];
          load_vec<T, VEC>(gh + d, a);
          load_vec<T, VEC>(wg + d, w);
#pragma unroll
          for (int j = 0; j < VEC; ++j) red[0] += a[j] * w[j];
        }
      } else {
        for (int64_t d = t; d < Dg; d += tpr) red[0] += to_f<T>(gh[d]) * to_f<T>(wg[d]);
      }
    }
    group_sum<1>(red, tpr, smem);
    const float gate = red[0] + bgate;

    const int64_t roff = (valid ? n : 0) * C;
    float cache[NV][VEC];
    auto load_u = [&](int64_t c, float (&u)[VEC]) {
      float l[VEC], h[VEC];
      load_vec<T, VEC>(low + roff + c, l);
      load_vec<T, VEC>(high + roff + c, h);
#pragma unroll
      for (int j = 0; j < VEC; ++j) u[j] = gd_u(l[j], gate, h[j]);
    };
    // pass 1: mean
    float s[1] = {0.f};
    if (valid) {
      for_cols<CACHED, NV, VEC>(t, tpr, C, [&](int k, int64_t c) {
        float u[VEC];
        load_u(c, u);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if constexpr (CACHED) cache[k][j] = u[j];
          s[0] += u[j];
        }
      });
    }
    group_sum<1>(s, tpr, smem);
    const float mean = s[0] / fc;  // IEEE division: a constant row gives mean == u exactly more often
    // pass 2: biased variance
    float q[1] = {0.f};
    if (valid) {
      for_cols<CACHED, NV, VEC>(t, tpr, C, [&](int k, int64_t c) {
        float u[VEC];
        if constexpr (CACHED) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) u[j] = cache[k][j];
        } else {
          load_u(c, u);
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = u[j] - mean;
          q[0] += d * d;
        }
      });
    }
    group_sum<1>(q, tpr, smem);
    const float rstd = rsqrtf(q[0] / fc + p.eps);
    // pass 3: output
    if (valid) {
      for_cols<CACHED, NV, VEC>(t, tpr, C, [&](int k, int64_t c) {
        float u[VEC], w[VEC], bb[VEC], o[VEC];
        if constexpr (CACHED) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) u[j] = cache[k][j];
        } else {
          load_u(c, u);
        }
        load_vec_or<T, VEC>(lw != nullptr ? lw + c : nullptr, w, 1.f);
        load_vec_or<T, VEC>(lb != nullptr ? lb + c : nullptr, bb, 0.f);
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = (u[j] - mean) * rstd * w[j] + bb[j];
        store_vec<T, VEC>(out + roff + c, o);
      });
      if (t == 0) {
        if (p.gate != nullptr) p.gate[n] = gate;
        if (p.mean != nullptr) p.mean[n] = mean;
        if (p.rstd != nullptr) p.rstd[n] = rstd;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward row kernel.  Plan over (B = 1, L = N): block s handles rows [s R, min(N, (s + 1) R)), group g
// rows l0 + g, l0 + g + G, ...; it writes per-column partials of sum dy (-> dln_b) and sum dy uhat
// (-> dln_w) into its slot, per-row dg into dgbuf and the slot's sum of dg (-> db_gate) into dgpart.
// The row sums s1 = sum dyw, s2 = sum dyw uhat and dg = sum du high are accumulated in double (per-thread
// partials and group reduction), as in the CPU kernel: dg adds C terms whose common error (that of m1/m2,
// times rstd) is correlated, so float32 s1/s2/dg cost ~1e-4 relative accuracy in dg (-> dgate_hidden,
// dw_gate, db_gate).  m1, m2 and dg are rounded to float once the row totals are known.
struct GdBwdK {
  int tpr, G, Gs;
  int64_t S, R, slots;
  float* part;    // [2][slots][C] or nullptr (dln_w / dln_b not wanted)
  float* dgbuf;   // [N] or nullptr
  float* dgpart;  // [slots] or nullptr
  bool need_dg;
};

template <typename T, int VEC, bool CACHED>
__global__ void __launch_bounds__(kMaxTpr) gd_bwd_kernel(GatedDetailBwdParams p, GdBwdK k) {
  constexpr int NV = CACHED ? kBwdEpt / VEC : 1;
  __shared__ double smem[64];  // group_sum<2> in double: 2 * 32 doubles
  const int tpr = k.tpr;
  const int g = threadIdx.x / tpr;
  const int t = threadIdx.x - g * tpr;
  const int64_t N = p.N, C = p.C;
  const int64_t s = blockIdx.x;
  const int64_t l0 = s * k.R;
  const int64_t l1 = l0 + k.R < N ? l0 + k.R : N;
  const bool owns_slot = g < k.Gs;  // groups g >= Gs never get a row
  const int64_t slot = s * k.Gs + g;
  float* pA = (k.part != nullptr && owns_slot) ? k.part + slot * C : nullptr;              // sum dy
  float* pB = (k.part != nullptr && owns_slot) ? k.part + (k.slots + slot) * C : nullptr;  // sum dy * uhat
  const T* dyp = static_cast<const T*>(p.grad);
  const T* low = static_cast<const T*>(p.low);
  const T* high = static_cast<const T*>(p.high);
  const T* lw = static_cast<const T*>(p.ln_w);
  T* dlow = static_cast<T*>(p.dlow);
  T* dhigh = static_cast<T*>(p.dhigh);
  const double dc = static_cast<double>(C);

  float accA[NV][VEC], accB[NV][VEC];
#pragma unroll
  for (int i = 0; i < NV; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) accA[i][j] = accB[i][j] = 0.f;
  if constexpr (!CACHED) {
    if (pA != nullptr)
      for (int64_t c = t; c < C; c += tpr) pA[c] = pB[c] = 0.f;
  }
  float dg_slot = 0.f;

  for (int64_t base = l0; base < l1; base += k.G) {
    const int64_t n = base + g;
    const bool valid = n < l1;
    const int64_t nn = valid ? n : l0;
    const float gate = p.gate[nn], mean = p.mean[nn], rstd = p.rstd[nn];
    const int64_t roff = nn * C;
    float cu[NV][VEC], cd[NV][VEC], ch[NV][VEC];  // uhat, dy * ln_w, high
    // (uhat, dyw, high, dy) of one vector, from global memory
    auto fetch = [&](int64_t c, float (&uh)[VEC], float (&dyw)[VEC], float (&hi)[VEC], float (&dy)[VEC]) {
      float lo[VEC], w[VEC];
      load_vec<T, VEC>(dyp + roff + c, dy);
      load_vec<T, VEC>(low + roff + c, lo);
      load_vec<T, VEC>(high + roff + c, hi);
      load_vec_or<T, VEC>(lw != nullptr ? lw + c : nullptr, w, 1.f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        uh[j] = (gd_u(lo[j], gate, hi[j]) - mean) * rstd;  // same u as the forward, bit for bit
        dyw[j] = dy[j] * w[j];
      }
    };
    // pass 1: sums of dyw and dyw * uhat; column partials
    double sums[2] = {0.0, 0.0};  // s1, s2 in double
    if (valid) {
      for_cols<CACHED, NV, VEC>(t, tpr, C, [&](int kk, int64_t c) {
        float uh[VEC], dyw[VEC], hi[VEC], dy[VEC];
        fetch(c, uh, dyw, hi, dy);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          sums[0] += static_cast<double>(dyw[j]);
          sums[1] += static_cast<double>(dyw[j] * uh[j]);
          if constexpr (CACHED) {
            cu[kk][j] = uh[j];
            cd[kk][j] = dyw[j];
            ch[kk][j] = hi[j];
            accA[kk][j] += dy[j];
            accB[kk][j] += dy[j] * uh[j];
          } else {
            if (pA != nullptr) {  // this thread owns column c + j of its slot
              pA[c + j] += dy[j];
              pB[c + j] += dy[j] * uh[j];
            }
          }
        }
      });
    }
    group_sum<2>(sums, tpr, smem);  // double: see the note above the kernel
    const float m1 = static_cast<float>(sums[0] / dc), m2 = static_cast<float>(sums[1] / dc);
    // pass 2: du -> dlow, dhigh, dg
    double dg[1] = {0.0};  // in double
    if (valid && (dlow != nullptr || dhigh != nullptr || k.need_dg)) {
      for_cols<CACHED, NV, VEC>(t, tpr, C, [&](int kk, int64_t c) {
        float uh[VEC], dyw[VEC], hi[VEC];
        if constexpr (CACHED) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            uh[j] = cu[kk][j];
            dyw[j] = cd[kk][j];
            hi[j] = ch[kk][j];
          }
        } else {
          float dy[VEC];
          fetch(c, uh, dyw, hi, dy);
        }
        float du[VEC], dh[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          du[j] = rstd * (dyw[j] - m1 - uh[j] * m2);
          dh[j] = gate * du[j];
          dg[0] += static_cast<double>(du[j]) * static_cast<double>(hi[j]);  // exact product, as on the CPU
        }
        if (dlow != nullptr) store_vec<T, VEC>(dlow + roff + c, du);
        if (dhigh != nullptr) store_vec<T, VEC>(dhigh + roff + c, dh);
      });
    }
    if (k.need_dg) {  // uniform over the block
      group_sum<1>(dg, tpr, smem);
      if (valid) {
        const float dgf = static_cast<float>(dg[0]);
        if (t == 0 && k.dgbuf != nullptr) k.dgbuf[n] = dgf;
        dg_slot += dgf;
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
  if (k.dgpart != nullptr && owns_slot && t == 0) k.dgpart[slot] = dg_slot;
}

struct LnEpi {  // dln_b = sum dy, dln_w = sum dy uhat
  float* dln_b;
  float* dln_w;
  __device__ void operator()(int64_t, int64_t c, const float (&s)[2]) const {
    if (dln_b != nullptr) dln_b[c] = s[0];
    if (dln_w != nullptr) dln_w[c] = s[1];
  }
};

struct Store1Epi {  // out[b * C + c] = sum
  float* out;
  int64_t C;
  __device__ void operator()(int64_t b, int64_t c, const float (&s)[1]) const { out[b * C + c] = s[0]; }
};

// Workspace layout (floats), from (N, C, Dg) only:
//   [0, 2 S Gs C)           column partials of sum dy and sum dy uhat, slot-major
//   [.., + N)               dg per row
//   [.., + S Gs)            per-slot sums of dg
//   [.., + S2 Gs2 Dg)       column partials of dw_gate (plan over (1, N, Dg))
struct GdLayout {
  RowPlan plan, gplan;
  int64_t part, dgbuf, dgpart, gpart, total;
};

GdLayout gd_layout(int64_t N, int64_t C, int64_t Dg) {
  GdLayout l;
  l.plan = make_row_plan(1, N, C, kBwdEpt);
  l.gplan = make_row_plan(1, N, Dg, kRsEpt);
  const int64_t slots = l.plan.slots();
  l.part = 0;
  l.dgbuf = l.part + 2 * slots * (C > 0 ? C : 0);
  l.dgpart = l.dgbuf + (N > 0 ? N : 0);
  l.gpart = l.dgpart + slots;
  l.total = l.gpart + (Dg > 0 ? l.gplan.slots() * Dg : 0);
  if (N <= 0) l.total = 0;
  return l;
}

template <typename T>
int gd_fwd_launch(const GatedDetailParams& p, cudaStream_t st) {
  constexpr int V = Vec16<T>::value;
  const RowPlan plan = make_row_plan(1, p.N, p.C, kFwdEpt);
  const bool vec = row_vec_fits(p.C, V, kFwdEpt) && aligned16(p.low) && aligned16(p.high) && aligned16(p.ln_w) &&
                   aligned16(p.ln_b) && aligned16(p.out);
  const bool gh_vec = p.Dg % V == 0 && aligned16(p.gate_hidden) && aligned16(p.w_gate);
  const unsigned grid = fwd_grid(p.N, plan.G);
  if (vec) {
    gd_fwd_kernel<T, V, true><<<grid, plan.block, 0, st>>>(p, plan.tpr, plan.G, gh_vec);
  } else {
    gd_fwd_kernel<T, 1, false><<<grid, plan.block, 0, st>>>(p, plan.tpr, plan.G, gh_vec);
  }
  return to_int(cudaGetLastError());
}

template <typename T>
int gd_bwd_launch(const GatedDetailBwdParams& p, cudaStream_t st) {
  constexpr int V = Vec16<T>::value;
  const int64_t N = p.N, C = p.C, Dg = p.Dg;
  const bool want_ln = p.dln_w != nullptr || p.dln_b != nullptr;
  const bool want_gate_cols = Dg > 0 && (p.dgate_hidden != nullptr || p.dw_gate != nullptr);
  const bool need_dg = p.db_gate != nullptr || want_gate_cols;
  const GdLayout lay = gd_layout(N, C, Dg);
  if ((want_ln || need_dg) && (p.workspace == nullptr || p.workspace_elems < lay.total)) {
    return to_int(cudaErrorInvalidValue);
  }
  float* ws = p.workspace;
  const RowPlan& plan = lay.plan;
  const int64_t slots = plan.slots();

  if (p.dlow != nullptr || p.dhigh != nullptr || want_ln || need_dg) {
    GdBwdK k;
    k.tpr = plan.tpr;
    k.G = plan.G;
    k.Gs = plan.Gs;
    k.S = plan.S;
    k.R = plan.R;
    k.slots = slots;
    k.part = want_ln && C > 0 ? ws + lay.part : nullptr;
    k.dgbuf = need_dg ? ws + lay.dgbuf : nullptr;
    k.dgpart = need_dg ? ws + lay.dgpart : nullptr;
    k.need_dg = need_dg;
    const bool vec = row_vec_fits(C, V, kBwdEpt) && aligned16(p.grad) && aligned16(p.low) && aligned16(p.high) &&
                     aligned16(p.ln_w) && aligned16(p.dlow) && aligned16(p.dhigh);
    const unsigned grid = static_cast<unsigned>(plan.grid());
    if (vec) {
      gd_bwd_kernel<T, V, true><<<grid, plan.block, 0, st>>>(p, k);
    } else {
      gd_bwd_kernel<T, 1, false><<<grid, plan.block, 0, st>>>(p, k);
    }
  }
  if (want_ln) launch_seg_colsum<2>(ws + lay.part, slots * C, 1, slots, C, LnEpi{p.dln_b, p.dln_w}, st);
  if (p.db_gate != nullptr) launch_seg_colsum<1>(ws + lay.dgpart, 0, 1, slots, 1, Store1Epi{p.db_gate, 1}, st);
  if (want_gate_cols) {
    RowScaleArgs a;
    a.a = nullptr;
    a.y = p.gate_hidden;
    a.rowscale = ws + lay.dgbuf;
    a.colvec = p.w_gate;
    a.colvec_stride = 0;
    a.out = p.dgate_hidden;
    a.part = p.dw_gate != nullptr ? ws + lay.gpart : nullptr;
    a.L = N;
    a.C = Dg;
    const cudaError_t e = launch_rowscale_colreduce<T>(a, lay.gplan, st);
    if (e != cudaSuccess) return to_int(e);
    if (p.dw_gate != nullptr) {
      launch_seg_colsum<1>(ws + lay.gpart, 0, 1, lay.gplan.slots(), Dg, Store1Epi{p.dw_gate, Dg}, st);
    }
  }
  return to_int(cudaGetLastError());
}

}  // namespace
}  // namespace cuda
}  // namespace umm

using namespace umm::cuda;

extern "C" {

int umm_cuda_gated_detail(const umm::GatedDetailParams* p, int dtype, void* stream) {
  if (!valid_dtype(dtype)) return to_int(cudaErrorInvalidValue);
  if (p->N <= 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return gd_fwd_launch<T>(*p, st);
  });
}

int64_t umm_cuda_gated_detail_bwd_workspace(int64_t N, int64_t C, int64_t Dg) { return gd_layout(N, C, Dg).total; }

int umm_cuda_gated_detail_bwd(const umm::GatedDetailBwdParams* p, int dtype, void* stream) {
  if (!valid_dtype(dtype)) return to_int(cudaErrorInvalidValue);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (p->N <= 0) {  // parameter gradients are sums over an empty range
    cudaError_t e = zero_floats(p->dw_gate, p->Dg, st);
    if (e == cudaSuccess) e = zero_floats(p->db_gate, 1, st);
    if (e == cudaSuccess) e = zero_floats(p->dln_w, p->C, st);
    if (e == cudaSuccess) e = zero_floats(p->dln_b, p->C, st);
    return to_int(e);
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return gd_bwd_launch<T>(*p, st);
  });
}

}  // extern "C"
