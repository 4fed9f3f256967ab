// CPU kernels of the normalisation fusions: gated detail residual (Cheers' HiGate), adaLN modulation and
// the gated residual (formulas: umm/params.h).
//
// Rows are processed whole in a per-thread float buffer (two-pass mean/variance).  Column reductions over
// rows (parameter gradients, per-sample dshift/dscale/dgate) are accumulated per chunk of rows into a
// partial buffer and summed in chunk order: chunk sizes depend only on the shape, so results are
// reproducible across thread counts.
#include <cmath>
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"

namespace umm::cpu {
namespace {

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t i0 = 0; i0 < n; i0 += kRun) load_f32(src + i0, dst + i0, std::min(kRun, n - i0));
}
template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t i0 = 0; i0 < n; i0 += kRun) store_f32(src + i0, dst + i0, std::min(kRun, n - i0));
}
template <typename T>
std::vector<float> to_float_vec(const void* p, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (p) load_row(static_cast<const T*>(p), out.data(), n);
  return out;
}

// Sum partial rows [nchunks, width] in order into out[width].
inline void sum_partials(const std::vector<float>& part, int64_t nchunks, int64_t width, float* out) {
  std::vector<double> acc(width, 0.0);
  for (int64_t c = 0; c < nchunks; ++c) {
    const float* row = part.data() + c * width;
    for (int64_t j = 0; j < width; ++j) acc[j] += row[j];
  }
  for (int64_t j = 0; j < width; ++j) out[j] = float(acc[j]);
}

inline int64_t rows_per_chunk(int64_t rows) { return std::max<int64_t>(64, ceil_div(rows, 256)); }

// mean / rstd of a float row (two passes).
inline void row_stats(const float* u, int64_t C, float eps, bool rms, float& mean, float& rstd) {
  if (rms) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < C; ++i) s += double(u[i]) * double(u[i]);
    mean = 0.f;
    rstd = float(1.0 / std::sqrt(s / double(C) + double(eps)));
    return;
  }
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < C; ++i) s += u[i];
  mean = float(s / double(C));
  double q = 0.0;
#pragma omp simd reduction(+ : q)
  for (int64_t i = 0; i < C; ++i) {
    const double d = double(u[i]) - double(mean);
    q += d * d;
  }
  rstd = float(1.0 / std::sqrt(q / double(C) + double(eps)));
}

// ------------------------------------------------------------------ gated detail residual
template <typename T>
void gated_detail_impl(const GatedDetailParams& p) {
  const int64_t C = p.C, Dg = p.Dg;
  const std::vector<float> w = to_float_vec<T>(p.w_gate, Dg, 0.f);
  const std::vector<float> lw = to_float_vec<T>(p.ln_w, C, 1.f);
  const std::vector<float> lb = to_float_vec<T>(p.ln_b, C, 0.f);
  const float bg = to_float_vec<T>(p.b_gate, 1, 0.f)[0];
  const T* low = static_cast<const T*>(p.low);
  const T* high = static_cast<const T*>(p.high);
  const T* gh = static_cast<const T*>(p.gate_hidden);
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.N, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> u(C), h(C), gb(Dg);
    for (int64_t n = lo; n < hi; ++n) {
      load_row(gh + n * Dg, gb.data(), Dg);
      double gd = 0.0;
#pragma omp simd reduction(+ : gd)
      for (int64_t i = 0; i < Dg; ++i) gd += double(gb[i]) * double(w[i]);
      const float g = float(gd + double(bg));
      load_row(low + n * C, u.data(), C);
      load_row(high + n * C, h.data(), C);
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) u[i] += g * h[i];
      float mean, rstd;
      row_stats(u.data(), C, p.eps, false, mean, rstd);
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) u[i] = (u[i] - mean) * rstd * lw[i] + lb[i];
      store_row(u.data(), out + n * C, C);
      p.gate[n] = g;
      p.mean[n] = mean;
      p.rstd[n] = rstd;
    }
  });
}

template <typename T>
void gated_detail_bwd_impl(const GatedDetailBwdParams& p) {
  const int64_t N = p.N, C = p.C, Dg = p.Dg;
  const std::vector<float> w = to_float_vec<T>(p.w_gate, Dg, 0.f);
  const std::vector<float> lw = to_float_vec<T>(p.ln_w, C, 1.f);
  const T* dy_p = static_cast<const T*>(p.grad);
  const T* low = static_cast<const T*>(p.low);
  const T* high = static_cast<const T*>(p.high);
  const T* gh = static_cast<const T*>(p.gate_hidden);
  T* dlow = static_cast<T*>(p.dlow);
  T* dhigh = static_cast<T*>(p.dhigh);
  T* dgh = static_cast<T*>(p.dgate_hidden);
  const int64_t rpc = rows_per_chunk(N), nch = ceil_div(N, rpc);
  // partial layout per chunk: [dln_w (C) | dln_b (C) | dw_gate (Dg) | db_gate (1)]
  const int64_t width = 2 * C + Dg + 1;
  std::vector<float> part(nch * width, 0.f);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> u(C), h(C), dy(C), dyw(C), gb(Dg);
    for (int64_t ch = c0; ch < c1; ++ch) {
      float* acc = part.data() + ch * width;
      float* acc_lw = acc;
      float* acc_lb = acc + C;
      float* acc_w = acc + 2 * C;
      float& acc_b = acc[2 * C + Dg];
      for (int64_t n = ch * rpc; n < std::min(N, (ch + 1) * rpc); ++n) {
        const float g = p.gate[n], mean = p.mean[n], rstd = p.rstd[n];
        load_row(low + n * C, u.data(), C);
        load_row(high + n * C, h.data(), C);
        load_row(dy_p + n * C, dy.data(), C);
        double s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t i = 0; i < C; ++i) {
          u[i] = (u[i] + g * h[i] - mean) * rstd;  // uhat
          dyw[i] = dy[i] * lw[i];
          s1 += dyw[i];
          s2 += dyw[i] * u[i];
          acc_lw[i] += dy[i] * u[i];
          acc_lb[i] += dy[i];
        }
        const float m1 = float(s1 / double(C)), m2 = float(s2 / double(C));
        double dgd = 0.0;
#pragma omp simd reduction(+ : dgd)
        for (int64_t i = 0; i < C; ++i) {
          const float du = rstd * (dyw[i] - m1 - u[i] * m2);
          dyw[i] = du;
          dgd += double(du) * double(h[i]);
        }
        const float dg = float(dgd);
        store_row(dyw.data(), dlow + n * C, C);
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) dyw[i] *= g;
        store_row(dyw.data(), dhigh + n * C, C);
        load_row(gh + n * Dg, gb.data(), Dg);
#pragma omp simd
        for (int64_t i = 0; i < Dg; ++i) {
          acc_w[i] += dg * gb[i];
          gb[i] = dg * w[i];
        }
        store_row(gb.data(), dgh + n * Dg, Dg);
        acc_b += dg;
      }
    }
  });
  std::vector<float> tot(width);
  sum_partials(part, nch, width, tot.data());
  if (p.dln_w) std::memcpy(p.dln_w, tot.data(), C * sizeof(float));
  if (p.dln_b) std::memcpy(p.dln_b, tot.data() + C, C * sizeof(float));
  if (p.dw_gate) std::memcpy(p.dw_gate, tot.data() + 2 * C, Dg * sizeof(float));
  if (p.db_gate) p.db_gate[0] = tot[2 * C + Dg];
}

// ------------------------------------------------------------------ adaLN modulation
template <typename T>
void adaln_impl(const AdaLNParams& p) {
  const int64_t B = p.B, L = p.L, C = p.C;
  const std::vector<float> w = to_float_vec<T>(p.weight, C, 1.f);
  const std::vector<float> bias = to_float_vec<T>(p.bias, C, 0.f);
  const T* x = static_cast<const T*>(p.x);
  const T* sh = static_cast<const T*>(p.shift);
  const T* sc = static_cast<const T*>(p.scale);
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, B * L, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> u(C), a(C), s(C);
    int64_t loaded_b = -1;
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / L;
      if (b != loaded_b) {  // fold weight/bias into the modulation once per sample
        load_row(sc + b * p.scale_stride, a.data(), C);
        load_row(sh + b * p.shift_stride, s.data(), C);
        for (int64_t i = 0; i < C; ++i) {
          const float m = 1.f + a[i];
          a[i] = w[i] * m;              // multiplies xhat
          s[i] = bias[i] * m + s[i];    // added
        }
        loaded_b = b;
      }
      load_row(x + r * C, u.data(), C);
      float mean, rstd;
      row_stats(u.data(), C, p.eps, p.rms, mean, rstd);
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) u[i] = (u[i] - mean) * rstd * a[i] + s[i];
      store_row(u.data(), out + r * C, C);
      if (p.mean) p.mean[r] = mean;
      p.rstd[r] = rstd;
    }
  });
}

template <typename T>
void adaln_bwd_impl(const AdaLNBwdParams& p) {
  const int64_t B = p.B, L = p.L, C = p.C;
  const std::vector<float> w = to_float_vec<T>(p.weight, C, 1.f);
  const std::vector<float> bias = to_float_vec<T>(p.bias, C, 0.f);
  const T* dy_p = static_cast<const T*>(p.grad);
  const T* x = static_cast<const T*>(p.x);
  const T* sc = static_cast<const T*>(p.scale);
  T* dx = static_cast<T*>(p.dx);
  const int64_t lpc = std::max<int64_t>(64, ceil_div(L, 8)), ncl = ceil_div(L, lpc), nch = B * ncl;
  // partial per chunk: [dshift (C) | dscale (C) | dweight (C) | dbias (C)]
  const int64_t width = 4 * C;
  std::vector<float> part(nch * width, 0.f);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> xh(C), dy(C), dn(C), m1p(C);
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t b = ch / ncl, l0 = (ch % ncl) * lpc, l1 = std::min(L, l0 + lpc);
      float* acc = part.data() + ch * width;
      load_row(sc + b * p.scale_stride, m1p.data(), C);
      for (int64_t i = 0; i < C; ++i) m1p[i] += 1.f;
      for (int64_t l = l0; l < l1; ++l) {
        const int64_t r = b * L + l;
        const float mean = p.rms ? 0.f : p.mean[r], rstd = p.rstd[r];
        load_row(x + r * C, xh.data(), C);
        load_row(dy_p + r * C, dy.data(), C);
        double s1 = 0.0, s2 = 0.0;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t i = 0; i < C; ++i) {
          xh[i] = (xh[i] - mean) * rstd;
          const float dni = dy[i] * m1p[i];
          acc[i] += dy[i];                                 // dshift
          acc[C + i] += dy[i] * (xh[i] * w[i] + bias[i]);  // dscale
          acc[2 * C + i] += dni * xh[i];                   // dweight
          acc[3 * C + i] += dni;                           // dbias
          dn[i] = dni * w[i];                              // dxhat
          s1 += dn[i];
          s2 += dn[i] * xh[i];
        }
        if (dx) {
          const float a1 = p.rms ? 0.f : float(s1 / double(C)), a2 = float(s2 / double(C));
#pragma omp simd
          for (int64_t i = 0; i < C; ++i) dn[i] = rstd * (dn[i] - a1 - xh[i] * a2);
          store_row(dn.data(), dx + r * C, C);
        }
      }
    }
  });
  // per-sample sums for dshift / dscale, global sums for dweight / dbias, all in chunk order
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < C; ++i) {
      double s = 0.0, q = 0.0;
      for (int64_t c = 0; c < ncl; ++c) {
        const float* acc = part.data() + (b * ncl + c) * width;
        s += acc[i];
        q += acc[C + i];
      }
      if (p.dshift) p.dshift[b * C + i] = float(s);
      if (p.dscale) p.dscale[b * C + i] = float(q);
    }
  }
  if (p.dweight || p.dbias) {
    for (int64_t i = 0; i < C; ++i) {
      double s = 0.0, q = 0.0;
      for (int64_t c = 0; c < nch; ++c) {
        s += part[c * width + 2 * C + i];
        q += part[c * width + 3 * C + i];
      }
      if (p.dweight) p.dweight[i] = float(s);
      if (p.dbias) p.dbias[i] = float(q);
    }
  }
}

// ------------------------------------------------------------------ gated residual
template <typename T>
void gated_residual_impl(const GatedResidualParams& p) {
  const int64_t L = p.L, C = p.C;
  const T* x = static_cast<const T*>(p.x);
  const T* g = static_cast<const T*>(p.gate);
  const T* y = static_cast<const T*>(p.y);
  T* out = static_cast<T*>(p.out);
  at::parallel_for(0, p.B * L, 1, [&](int64_t lo, int64_t hi) {
    float xb[kRun], yb[kRun], gb[kRun];
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / L;
      for (int64_t i0 = 0; i0 < C; i0 += kRun) {
        const int64_t n = std::min(kRun, C - i0);
        load_f32(x + r * C + i0, xb, n);
        load_f32(y + r * C + i0, yb, n);
        load_f32(g + b * p.gate_stride + i0, gb, n);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) xb[i] += gb[i] * yb[i];
        store_f32(xb, out + r * C + i0, n);
      }
    }
  });
}

template <typename T>
void gated_residual_bwd_impl(const GatedResidualBwdParams& p) {
  const int64_t B = p.B, L = p.L, C = p.C;
  const T* dy_p = static_cast<const T*>(p.grad);
  const T* g = static_cast<const T*>(p.gate);
  const T* y = static_cast<const T*>(p.y);
  T* dyo = static_cast<T*>(p.dy);
  const int64_t lpc = std::max<int64_t>(64, ceil_div(L, 8)), ncl = ceil_div(L, lpc), nch = B * ncl;
  std::vector<float> part(p.dgate ? nch * C : 0, 0.f);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    float db[kRun], yb[kRun], gb[kRun];
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t b = ch / ncl, l0 = (ch % ncl) * lpc, l1 = std::min(L, l0 + lpc);
      for (int64_t i0 = 0; i0 < C; i0 += kRun) {
        const int64_t n = std::min(kRun, C - i0);
        load_f32(g + b * p.gate_stride + i0, gb, n);
        float* acc = p.dgate ? part.data() + ch * C + i0 : nullptr;
        for (int64_t l = l0; l < l1; ++l) {
          const int64_t off = (b * L + l) * C + i0;
          load_f32(dy_p + off, db, n);
          if (acc) {
            load_f32(y + off, yb, n);
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) acc[i] += db[i] * yb[i];
          }
          if (dyo) {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) db[i] *= gb[i];
            store_f32(db, dyo + off, n);
          }
        }
      }
    }
  });
  if (p.dgate) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < C; ++i) {
        double s = 0.0;
        for (int64_t c = 0; c < ncl; ++c) s += part[(b * ncl + c) * C + i];
        p.dgate[b * C + i] = float(s);
      }
  }
}

}  // namespace

void gated_detail(const GatedDetailParams& p, DType dt) { UMM_CPU_DISPATCH(dt, T, [&] { gated_detail_impl<T>(p); }); }
void gated_detail_bwd(const GatedDetailBwdParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { gated_detail_bwd_impl<T>(p); });
}
void adaln(const AdaLNParams& p, DType dt) { UMM_CPU_DISPATCH(dt, T, [&] { adaln_impl<T>(p); }); }
void adaln_bwd(const AdaLNBwdParams& p, DType dt) { UMM_CPU_DISPATCH(dt, T, [&] { adaln_bwd_impl<T>(p); }); }
void gated_residual(const GatedResidualParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { gated_residual_impl<T>(p); });
}
void gated_residual_bwd(const GatedResidualBwdParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { gated_residual_bwd_impl<T>(p); });
}

}  // namespace umm::cpu
