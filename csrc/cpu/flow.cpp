// CPU kernels of the flow-matching transition ops (formulas: umm/params.h).
//
// Work unit: (sample b, chunk of kChunk elements).  Per-sample sums (log-prob, KL) are accumulated per chunk
// in double and added in chunk order, so they do not depend on the thread count.
#include <cmath>
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"

namespace umm::cpu::UMM_CPU_NS {
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

constexpr int64_t kSub = 1024;  // float partial sums over kSub elements, then double

// Per-sample log-prob from the sum of squared residuals.
inline float logprob_of(double sumsq, const FlowCoef& c, int64_t N) {
  if (N == 0) return 0.f;
  const double var = double(c.std) * double(c.std);
  return float(-sumsq / (2.0 * var * double(N)) - std::log(double(c.std)) - double(kHalfLog2Pi));
}

template <typename T, bool kSde, bool kLogprob>
double flow_step_range(const T* x, const T* v, const T* z, T* out, const FlowCoef c, int64_t begin, int64_t end) {
  double acc = 0.0;
  for (int64_t s0 = begin; s0 < end; s0 += kSub) {
    const int64_t s1 = std::min(end, s0 + kSub);
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = s0; i < s1; ++i) {
      const float mean = c.ax * ld(x, i) + c.av * ld(v, i);
      const float o = kSde ? mean + c.std * ld(z, i) : mean;
      st(out, i, o);
      if constexpr (kLogprob) {
        const float r = rt<T>(o) - mean;
        s += r * r;
      }
    }
    acc += s;
  }
  return acc;
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
    const int64_t o = b * p.N;
    if (!z) {
      flow_step_range<T, false, false>(x + o, v + o, nullptr, out + o, flow_coef(p.t[b], p.t_next[b], 0.f), begin,
                                       end);
    } else if (!want_lp) {
      flow_step_range<T, true, false>(x + o, v + o, z + o, out + o, coef_of(p.t, p.t_next, p.sigma, b), begin, end);
    } else {
      part[task] =
          flow_step_range<T, true, true>(x + o, v + o, z + o, out + o, coef_of(p.t, p.t_next, p.sigma, b), begin, end);
    }
  });
  if (want_lp) {
    std::vector<double> sums;
    finish_sums(part, p.B, p.N, sums);
    for (int64_t b = 0; b < p.B; ++b) p.logprob[b] = logprob_of(sums[b], coef_of(p.t, p.t_next, p.sigma, b), p.N);
  }
}

template <typename T>
void flow_step_bwd_impl(const FlowStepBwdParams& p) {
  const T* g = static_cast<const T*>(p.grad);
  T* outs[3] = {static_cast<T*>(p.dx), static_cast<T*>(p.dv), static_cast<T*>(p.dnoise)};
  for_chunks(p.B, p.N, [&](int64_t b, int64_t, int64_t begin, int64_t end) {
    const FlowCoef c = coef_of(p.t, p.t_next, p.sigma, b);
    const float k[3] = {c.ax, c.av, c.std};
    const T* gb = g + b * p.N;
    for (int j = 0; j < 3; ++j) {
      if (!outs[j]) continue;
      T* ob = outs[j] + b * p.N;
      const float kj = k[j];
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) st(ob, i, kj * ld(gb, i));
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
    const int64_t o = b * p.N;
    const T *xb = x + o, *nb = xn + o, *vb = v + o;
    double acc = 0.0;
    for (int64_t s0 = begin; s0 < end; s0 += kSub) {
      const int64_t s1 = std::min(end, s0 + kSub);
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = s0; i < s1; ++i) {
        const float r = ld(nb, i) - (c.ax * ld(xb, i) + c.av * ld(vb, i));
        s += r * r;
      }
      acc += s;
    }
    part[task] = acc;
  });
  std::vector<double> sums;
  finish_sums(part, p.B, p.N, sums);
  for (int64_t b = 0; b < p.B; ++b) p.logprob[b] = logprob_of(sums[b], coef_of(p.t, p.t_next, p.sigma, b), p.N);
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
    const int64_t o = b * p.N;
    const T *xb = x + o, *nb = xn + o, *vb = v + o;
    T *dxb = dx ? dx + o : nullptr, *dnb = dxn ? dxn + o : nullptr, *dvb = dv ? dv + o : nullptr;
    if (dxb && dvb && !dnb) {  // GRPO's case (x and v), one pass
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float r = w * (ld(nb, i) - (c.ax * ld(xb, i) + c.av * ld(vb, i)));
        st(dxb, i, c.ax * r);
        st(dvb, i, c.av * r);
      }
      return;
    }
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float r = w * (ld(nb, i) - (c.ax * ld(xb, i) + c.av * ld(vb, i)));
      if (dxb) st(dxb, i, c.ax * r);
      if (dvb) st(dvb, i, c.av * r);
      if (dnb) st(dnb, i, -r);
    }
  });
}

template <typename T>
void flow_kl_impl(const FlowKlParams& p) {
  const T* v = static_cast<const T*>(p.v);
  const T* vr = static_cast<const T*>(p.v_ref);
  std::vector<double> part(p.B * ceil_div(p.N, kChunk), 0.0);
  for_chunks(p.B, p.N, [&](int64_t b, int64_t task, int64_t begin, int64_t end) {
    const T *vb = v + b * p.N, *rb = vr + b * p.N;
    double acc = 0.0;
    for (int64_t s0 = begin; s0 < end; s0 += kSub) {
      const int64_t s1 = std::min(end, s0 + kSub);
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = s0; i < s1; ++i) {
        const float d = ld(vb, i) - ld(rb, i);
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
    const int64_t o = b * p.N;
    const T *vb = v + o, *rb = vr + o;
    T *dvb = dv ? dv + o : nullptr, *drb = dvr ? dvr + o : nullptr;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float d = w * (ld(vb, i) - ld(rb, i));
      if (dvb) st(dvb, i, d);
      if (drb) st(drb, i, -d);
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

}  // namespace umm::cpu::UMM_CPU_NS
