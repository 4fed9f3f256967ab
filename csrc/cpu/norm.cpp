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

namespace umm::cpu::UMM_CPU_NS {
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

inline constexpr int64_t kMinChunkRows = 64;  // chunked_rows' smallest row chunk here (common.h)

// ------------------------------------------------------------------ gated detail residual
// sum_i a[i] b[i] in double (exact float products).  A function of its own with restrict pointers: written
// inline in the row loop below, GCC left this reduction scalar (a serial chain of vaddsd: 43% of the forward).
template <typename T>
__attribute__((always_inline)) inline double dot_double(const T* __restrict a, const float* __restrict b,
                                                        int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += double(ld(a, i)) * double(b[i]);
  return acc;
}

// u = low + g * high, written as fmaf-free float ops (the build uses -ffp-contract=off) so that forward and
// backward recompute bit-identical values.
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
  const float* wp = w.data();
  const float* lwp = lw.data();
  const float* lbp = lb.data();
  at::parallel_for(0, p.N, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> ubuf(C);
    float* u = ubuf.data();
    for (int64_t n = lo; n < hi; ++n) {
      const T* ghr = gh + n * Dg;
      // The gate and the row statistics are summed in double: the backward's gate gradient is a sum of C
      // terms that cancel, and it inherits any error of g, mean and rstd amplified by ~C (a float sum of
      // C = 1152 terms put it ~10x over PyTorch's error, which sums in cascades).
      const float g = float(dot_double(ghr, wp, Dg) + double(bg));
      const T* lr = low + n * C;
      const T* hr = high + n * C;
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < C; ++i) {
        u[i] = ld(lr, i) + g * ld(hr, i);
        s += double(u[i]);
      }
      const double meand = s / double(C);
      const float mean = float(meand);
      double q = 0.0;
#pragma omp simd reduction(+ : q)
      for (int64_t i = 0; i < C; ++i) {
        const double d = double(u[i]) - meand;
        q += d * d;
      }
      const float rstd = float(1.0 / std::sqrt(q / double(C) + double(p.eps)));
      T* orow = out + n * C;
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) st(orow, i, (u[i] - mean) * rstd * lwp[i] + lbp[i]);
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
  const float* wp = w.data();
  const float* lwp = lw.data();
  // column sums per chunk of rows: [dln_w (C) | dln_b (C) | dw_gate (Dg) | db_gate (1)]
  const int64_t width = 2 * C + Dg + 1;
  std::vector<float> tot(width);
  chunked_rows(N, kMinChunkRows, width, tot.data(), [&](int64_t r0, int64_t r1, float* acc) {
    std::vector<float> ubuf(C), dbuf(C), hbuf(C);
    float* __restrict uh = ubuf.data();
    float* __restrict dyw = dbuf.data();
    float* __restrict hb = hbuf.data();
    float* __restrict acc_lw = acc;
    float* __restrict acc_lb = acc_lw + C;
    float* __restrict acc_w = acc_lw + 2 * C;
    float acc_b = 0.f;
    for (int64_t n = r0; n < r1; ++n) {
      const float g = p.gate[n], mean = p.mean[n], rstd = p.rstd[n];
      const T* __restrict lr = low + n * C;
      const T* __restrict hr = high + n * C;
      const T* __restrict dyr = dy_p + n * C;
      // dg = sum_c du_c * high_c with du_c = rstd * (dyw_c - m1 - uhat_c * m2): its terms cancel to a total
      // much smaller than their size, so dg is not summed from the fp32 du_c (whose rounding, relative to the
      // O(1) terms, would dominate it) but expanded into double sums of exact products:
      // dg = rstd * (sum dyw h - m1 sum h - m2 sum uhat h), with m1, m2 in double too.
      // Two loops: the float work first, then the five double sums alone (one loop doing both ran scalar:
      // GCC vectorised it only with a runtime check that failed, 4.1 ms for 1024 x 1152 fp32).
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) {
        const float h = ld(hr, i);
        const float u = ld(lr, i) + g * h;
        const float uhat = (u - mean) * rstd;
        const float dy = ld(dyr, i);
        const float dw = dy * lwp[i];
        uh[i] = uhat;
        dyw[i] = dw;
        hb[i] = h;
        acc_lw[i] += dy * uhat;
        acc_lb[i] += dy;
      }
      double s1 = 0.0, s2 = 0.0, sdh = 0.0, sh = 0.0, suh = 0.0;
#pragma omp simd reduction(+ : s1, s2, sdh, sh, suh)
      for (int64_t i = 0; i < C; ++i) {
        const double dw = dyw[i], u = uh[i], h = hb[i];
        s1 += dw;
        s2 += dw * u;
        sdh += dw * h;
        sh += h;
        suh += u * h;
      }
      const double m1d = s1 / double(C), m2d = s2 / double(C);
      const float m1 = float(m1d), m2 = float(m2d);
      const float dg = float(double(rstd) * (sdh - m1d * sh - m2d * suh));
      T* __restrict dlr = dlow + n * C;
      T* __restrict dhr = dhigh + n * C;
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) {
        const float du = rstd * (dyw[i] - m1 - uh[i] * m2);
        st(dlr, i, du);
        st(dhr, i, g * du);
      }
      const T* __restrict ghr = gh + n * Dg;
      T* __restrict dghr = dgh + n * Dg;
#pragma omp simd
      for (int64_t i = 0; i < Dg; ++i) {
        acc_w[i] += dg * ld(ghr, i);
        st(dghr, i, dg * wp[i]);
      }
      acc_b += dg;
    }
    acc[2 * C + Dg] = acc_b;
  });
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
    std::vector<float> abuf(C), sbuf(C);
    float* a = abuf.data();
    float* s = sbuf.data();
    int64_t loaded_b = -1;
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / L;
      if (b != loaded_b) {  // fold the norm's affine into the modulation once per sample
        const T* scr = sc + b * p.scale_stride;
        const T* shr = sh + b * p.shift_stride;
        for (int64_t i = 0; i < C; ++i) {
          const float m = 1.f + ld(scr, i);
          a[i] = w[i] * m;                    // multiplies xhat
          s[i] = bias[i] * m + ld(shr, i);    // added
        }
        loaded_b = b;
      }
      const T* xr = x + r * C;
      float mean = 0.f, q = 0.f;
      if (p.rms) {
#pragma omp simd reduction(+ : q)
        for (int64_t i = 0; i < C; ++i) {
          const float xv = ld(xr, i);
          q += xv * xv;
        }
      } else {
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < C; ++i) sum += ld(xr, i);
        mean = sum / float(C);
#pragma omp simd reduction(+ : q)
        for (int64_t i = 0; i < C; ++i) {
          const float d = ld(xr, i) - mean;
          q += d * d;
        }
      }
      const float rstd = 1.f / std::sqrt(q / float(C) + p.eps);
      T* orow = out + r * C;
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) st(orow, i, (ld(xr, i) - mean) * rstd * a[i] + s[i]);
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
  const float* wp = w.data();
  const float* bp = bias.data();
  const T* dy_p = static_cast<const T*>(p.grad);
  const T* x = static_cast<const T*>(p.x);
  const T* sc = static_cast<const T*>(p.scale);
  T* dx = static_cast<T*>(p.dx);
  const int64_t lpc = std::max<int64_t>(64, ceil_div(L, 8)), ncl = ceil_div(L, lpc), nch = B * ncl;
  // Per chunk, two per-channel sums suffice: A = sum dy, Q = sum dy * xhat.  Then
  //   dshift = A, dscale = w Q + bias A, dweight = sum_b (1 + scale) Q, dbias = sum_b (1 + scale) A.
  const int64_t width = 2 * C;
  std::vector<float> part(nch * width, 0.f);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> xbuf(C), dbuf(C), mbuf(C);
    float* xh = xbuf.data();
    float* dn = dbuf.data();
    float* m1p = mbuf.data();
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t b = ch / ncl, l0 = (ch % ncl) * lpc, l1 = std::min(L, l0 + lpc);
      float* accA = part.data() + ch * width;
      float* accQ = accA + C;
      const T* scr = sc + b * p.scale_stride;
      for (int64_t i = 0; i < C; ++i) m1p[i] = (1.f + ld(scr, i)) * wp[i];  // dxhat = dy * (1 + scale) * w
      for (int64_t l = l0; l < l1; ++l) {
        const int64_t r = b * L + l;
        const float mean = p.rms ? 0.f : p.mean[r], rstd = p.rstd[r];
        const T* xr = x + r * C;
        const T* dyr = dy_p + r * C;
        float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t i = 0; i < C; ++i) {
          xh[i] = (ld(xr, i) - mean) * rstd;
          const float dy = ld(dyr, i);
          accA[i] += dy;
          accQ[i] += dy * xh[i];
          dn[i] = dy * m1p[i];
          s1 += dn[i];
          s2 += dn[i] * xh[i];
        }
        if (dx) {
          const float a1 = p.rms ? 0.f : s1 / float(C), a2 = s2 / float(C);
          T* dxr = dx + r * C;
#pragma omp simd
          for (int64_t i = 0; i < C; ++i) st(dxr, i, rstd * (dn[i] - a1 - xh[i] * a2));
        }
      }
    }
  });
  std::vector<double> dw(p.dweight ? C : 0, 0.0), db(p.dbias ? C : 0, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    const T* scr = sc + b * p.scale_stride;
    for (int64_t i = 0; i < C; ++i) {
      double A = 0.0, Q = 0.0;
      for (int64_t c = 0; c < ncl; ++c) {
        const float* acc = part.data() + (b * ncl + c) * width;
        A += acc[i];
        Q += acc[C + i];
      }
      if (p.dshift) p.dshift[b * C + i] = float(A);
      if (p.dscale) p.dscale[b * C + i] = float(double(wp[i]) * Q + double(bp[i]) * A);
      const double m = 1.0 + double(ld(scr, i));
      if (p.dweight) dw[i] += m * Q;
      if (p.dbias) db[i] += m * A;
    }
  }
  for (int64_t i = 0; i < C; ++i) {
    if (p.dweight) p.dweight[i] = float(dw[i]);
    if (p.dbias) p.dbias[i] = float(db[i]);
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
    for (int64_t r = lo; r < hi; ++r) {
      const T* gr = g + (r / L) * p.gate_stride;
      const T* xr = x + r * C;
      const T* yr = y + r * C;
      T* orow = out + r * C;
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) st(orow, i, ld(xr, i) + ld(gr, i) * ld(yr, i));
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
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t b = ch / ncl, l0 = (ch % ncl) * lpc, l1 = std::min(L, l0 + lpc);
      const T* gr = g + b * p.gate_stride;
      float* acc = p.dgate ? part.data() + ch * C : nullptr;
      for (int64_t l = l0; l < l1; ++l) {
        const int64_t off = (b * L + l) * C;
        const T* dr = dy_p + off;
        const T* yr = y + off;
        if (acc) {
#pragma omp simd
          for (int64_t i = 0; i < C; ++i) acc[i] += ld(dr, i) * ld(yr, i);
        }
        if (dyo) {
          T* orow = dyo + off;
#pragma omp simd
          for (int64_t i = 0; i < C; ++i) st(orow, i, ld(dr, i) * ld(gr, i));
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

}  // namespace umm::cpu::UMM_CPU_NS
