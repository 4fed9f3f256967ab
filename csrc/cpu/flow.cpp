// CPU kernels of the flow-matching transition ops (formulas: umm/params.h).
//
// Work unit: (sample b, chunk of kChunk elements).  Per-sample sums (log-prob, KL) are accumulated per chunk
// in double and added in chunk order, so they do not depend on the thread count.
#include <cmath>
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"

namespace umm::cpu {
namespace {

constexpr int64_t kChunk = 16384;

inline FlowCoef coef_of(const float* t, const float* tn, const float* sigma, int64_t b) {
  return flow_coef(t[b], tn[b], sigma ? sigma[b] : 0.f);
}

// Runs fn(b, begin, end) over every (sample, chunk) in parallel; returns nothing.
template <typename F>
void for_chunks(int64_t B, int64_t N, F&& fn) {
  const int64_t nc = ceil_div(N, kChunk);
  at::parallel_for(0, B * nc, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / nc, c = task % nc;
      fn(b, task, c * kChunk, std::min(N, (c + 1) * kChunk));
    }
  });
}

// Sum the per-chunk partials of each sample in order.
inline void finish_sums(const std::vector<double>& part, int64_t B, int64_t N, std::vector<double>& out) {
  const int64_t nc = ceil_div(N, kChunk);
  out.assign(B, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < nc; ++c) out[b] += part[b * nc + c];
}

template <typename T>
void flow_step_impl(const FlowStepParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* v = static_cast<const T*>(p.v);
  const T* z = static_cast<const T*>(p.noise);
  T* out = static_cast<T*>(p.x_next);
  const bool want_lp = p.logprob != nullptr && z != nullptr;
  std::vector<double> part(want_lp ? p.B * ceil_div(p.N, kChunk) : 0, 0.0);
  for_chunks(p.B, p.N, [&](int64_t b, int64_t task, int64_t begin, int64_t end) {
    const FlowCoef c = z ? coef_of(p.t, p.t_next, p.sigma, b) : flow_coef(p.t[b], p.t_next[b], 0.f);
    float xb[kRun], vb[kRun], zb[kRun], ob[kRun];
    double acc = 0.0;
    for (int64_t i0 = begin; i0 < end; i0 += kRun) {
      const int64_t n = std::min(kRun, end - i0);
      const int64_t off = b * p.N + i0;
      load_f32(x + off, xb, n);
      load_f32(v + off, vb, n);
      if (z) {
        load_f32(z + off, zb, n);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) ob[i] = c.ax * xb[i] + c.av * vb[i] + c.std * zb[i];
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) ob[i] = xb[i] + c.av * vb[i];
      }
      store_f32(ob, out + off, n);
      if (want_lp) {
        round_trip<T>(ob, n);
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; ++i) {
          const float r = ob[i] - (c.ax * xb[i] + c.av * vb[i]);
          s += r * r;
        }
        acc += s;
      }
    }
    if (want_lp) part[task] = acc;
  });
  if (want_lp) {
    std::vector<double> sums;
    finish_sums(part, p.B, p.N, sums);
    for (int64_t b = 0; b < p.B; ++b) {
      const FlowCoef c = coef_of(p.t, p.t_next, p.sigma, b);
      const double var = double(c.std) * double(c.std);
      p.logprob[b] = p.N == 0 ? 0.f
                              : float(-sums[b] / (2.0 * var * double(p.N)) - std::log(double(c.std)) -
                                      double(kHalfLog2Pi));
    }
  }
}

template <typename T>
void flow_step_bwd_impl(const FlowStepBwdParams& p) {
  const T* g = static_cast<const T*>(p.grad);
  T* outs[3] = {static_cast<T*>(p.dx), static_cast<T*>(p.dv), static_cast<T*>(p.dnoise)};
  for_chunks(p.B, p.N, [&](int64_t b, int64_t, int64_t begin, int64_t end) {
    const FlowCoef c = coef_of(p.t, p.t_next, p.sigma, b);
    const float k[3] = {c.ax, c.av, c.std};
    float gb[kRun], ob[kRun];
    for (int64_t i0 = begin; i0 < end; i0 += kRun) {
      const int64_t n = std::min(kRun, end - i0);
      const int64_t off = b * p.N + i0;
      load_f32(g + off, gb, n);
      for (int j = 0; j < 3; ++j) {
        if (!outs[j]) continue;
        const float kj = k[j];
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) ob[i] = kj * gb[i];
        store_f32(ob, outs[j] + off, n);
      }
    }
  });
}

template <typename T>
void flow_logprob_impl(const FlowLogprobParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* xn = static_cast<const T*>(p.x_next);
  const T* v = static_cast<const T*>(p.v);
  std::vector<double> part(p.B * ceil_div(p.N, kChunk), 0.0);
  for_chunks(p.B, p.N, [&](int64_t b, int64_t task, int64_t begin, int64_t end) {
    const FlowCoef c = coef_of(p.t, p.t_next, p.sigma, b);
    float xb[kRun], vb[kRun], nb[kRun];
    double acc = 0.0;
    for (int64_t i0 = begin; i0 < end; i0 += kRun) {
      const int64_t n = std::min(kRun, end - i0);
      const int64_t off = b * p.N + i0;
      load_f32(x + off, xb, n);
      load_f32(v + off, vb, n);
      load_f32(xn + off, nb, n);
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < n; ++i) {
        const float r = nb[i] - (c.ax * xb[i] + c.av * vb[i]);
        s += r * r;
      }
      acc += s;
    }
    part[task] = acc;
  });
  std::vector<double> sums;
  finish_sums(part, p.B, p.N, sums);
  for (int64_t b = 0; b < p.B; ++b) {
    const FlowCoef c = coef_of(p.t, p.t_next, p.sigma, b);
    const double var = double(c.std) * double(c.std);
    p.logprob[b] = p.N == 0 ? 0.f
                            : float(-sums[b] / (2.0 * var * double(p.N)) - std::log(double(c.std)) -
                                    double(kHalfLog2Pi));
  }
}

template <typename T>
void flow_logprob_bwd_impl(const FlowLogprobBwdParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* xn = static_cast<const T*>(p.x_next);
  const T* v = static_cast<const T*>(p.v);
  T* dx = static_cast<T*>(p.dx);
  T* dxn = static_cast<T*>(p.dx_next);
  T* dv = static_cast<T*>(p.dv);
  for_chunks(p.B, p.N, [&](int64_t b, int64_t, int64_t begin, int64_t end) {
    const FlowCoef c = coef_of(p.t, p.t_next, p.sigma, b);
    const float w = float(double(p.grad[b]) / (double(c.std) * double(c.std) * double(p.N)));
    float xb[kRun], vb[kRun], nb[kRun], rb[kRun], ob[kRun];
    for (int64_t i0 = begin; i0 < end; i0 += kRun) {
      const int64_t n = std::min(kRun, end - i0);
      const int64_t off = b * p.N + i0;
      load_f32(x + off, xb, n);
      load_f32(v + off, vb, n);
      load_f32(xn + off, nb, n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) rb[i] = w * (nb[i] - (c.ax * xb[i] + c.av * vb[i]));
      if (dx) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) ob[i] = c.ax * rb[i];
        store_f32(ob, dx + off, n);
      }
      if (dv) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) ob[i] = c.av * rb[i];
        store_f32(ob, dv + off, n);
      }
      if (dxn) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) ob[i] = -rb[i];
        store_f32(ob, dxn + off, n);
      }
    }
  });
}

template <typename T>
void flow_kl_impl(const FlowKlParams& p) {
  const T* v = static_cast<const T*>(p.v);
  const T* vr = static_cast<const T*>(p.v_ref);
  std::vector<double> part(p.B * ceil_div(p.N, kChunk), 0.0);
  for_chunks(p.B, p.N, [&](int64_t b, int64_t task, int64_t begin, int64_t end) {
    float vb[kRun], rb[kRun];
    double acc = 0.0;
    for (int64_t i0 = begin; i0 < end; i0 += kRun) {
      const int64_t n = std::min(kRun, end - i0);
      const int64_t off = b * p.N + i0;
      load_f32(v + off, vb, n);
      load_f32(vr + off, rb, n);
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < n; ++i) {
        const float d = vb[i] - rb[i];
        s += d * d;
      }
      acc += s;
    }
    part[task] = acc;
  });
  std::vector<double> sums;
  finish_sums(part, p.B, p.N, sums);
  for (int64_t b = 0; b < p.B; ++b) {
    const FlowCoef c = coef_of(p.t, p.t_next, p.sigma, b);
    const double k = double(c.av) * double(c.av) / (2.0 * double(c.std) * double(c.std));
    p.kl[b] = p.N == 0 ? 0.f : float(k * sums[b] / double(p.N));
  }
}

template <typename T>
void flow_kl_bwd_impl(const FlowKlBwdParams& p) {
  const T* v = static_cast<const T*>(p.v);
  const T* vr = static_cast<const T*>(p.v_ref);
  T* dv = static_cast<T*>(p.dv);
  T* dvr = static_cast<T*>(p.dv_ref);
  for_chunks(p.B, p.N, [&](int64_t b, int64_t, int64_t begin, int64_t end) {
    const FlowCoef c = coef_of(p.t, p.t_next, p.sigma, b);
    const float w = float(double(p.grad[b]) * double(c.av) * double(c.av) /
                          (double(c.std) * double(c.std) * double(p.N)));
    float vb[kRun], rb[kRun], ob[kRun];
    for (int64_t i0 = begin; i0 < end; i0 += kRun) {
      const int64_t n = std::min(kRun, end - i0);
      const int64_t off = b * p.N + i0;
      load_f32(v + off, vb, n);
      load_f32(vr + off, rb, n);
      if (dv) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) ob[i] = w * (vb[i] - rb[i]);
        store_f32(ob, dv + off, n);
      }
      if (dvr) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) ob[i] = -w * (vb[i] - rb[i]);
        store_f32(ob, dvr + off, n);
      }
    }
  });
}

}  // namespace

void flow_step(const FlowStepParams& p, DType dt) { UMM_CPU_DISPATCH(dt, T, [&] { flow_step_impl<T>(p); }); }
void flow_step_bwd(const FlowStepBwdParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { flow_step_bwd_impl<T>(p); });
}
void flow_logprob(const FlowLogprobParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { flow_logprob_impl<T>(p); });
}
void flow_logprob_bwd(const FlowLogprobBwdParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { flow_logprob_bwd_impl<T>(p); });
}
void flow_kl(const FlowKlParams& p, DType dt) { UMM_CPU_DISPATCH(dt, T, [&] { flow_kl_impl<T>(p); }); }
void flow_kl_bwd(const FlowKlBwdParams& p, DType dt) { UMM_CPU_DISPATCH(dt, T, [&] { flow_kl_bwd_impl<T>(p); }); }

}  // namespace umm::cpu
