// CPU row pass of the LM-head ops (formulas: umm/lm_head.h).
//
// The GEMMs are not here: the torch glue (csrc/torch/lm_head_ops.cpp) writes a block of rows of logits with at::mm
// and this pass does everything between that GEMM and the gradient GEMMs, one row at a time, in float32 buffers
// of V floats per thread (the row is read once and written once):
//   z' (scale, soft cap) -> max -> e = exp(z' - max) with the row sums -> lse, the target logit, the loss / log-prob /
//   entropy -> (when a gradient is wanted) dz written over the logits in their dtype.
// Rows are independent (any split across threads gives the same bits); the bias-gradient column sums run over
// columns in parallel and over rows in order.
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"
#include "umm/lm_head.h"

namespace umm::cpu::UMM_CPU_NS {
namespace {

// exp and tanh that vectorise under `omp simd` (glibc's expf / tanhf are scalar calls: one exp per logit is the
// pass's main cost).  exp: 2^n p(r), |r| <= ln2 / 2, degree-6 Taylor polynomial, relative error ~1.5e-7 (the
// tokens kernels' vexp); NaN propagates (the clamp alone would turn it into a finite value); below -87 it returns
// ~1e-38 instead of 0 (never more than a 1e-38 share of a row sum that is >= 1).  This file is built with
// -fno-trapping-math so that the clamps and selects if-convert (no value changes).
__attribute__((always_inline)) inline float vexp(float x) {
  const float xc = std::min(88.f, std::max(-87.f, x));
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = xc - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(float));
  return x != x ? x : p * s;
}

// tanh(u) = sign(u) (1 - 2 / (exp(2 |u|) + 1)): no cancellation error beyond ~1e-7 absolute (the soft cap
// multiplies it by the cap: an absolute error of the logits, which softmax sees as such).
__attribute__((always_inline)) inline float vtanh(float u) {
  const float a = 1.f - 2.f / (vexp(2.f * std::fabs(u)) + 1.f);
  return u != u ? u : std::copysign(a, u);
}

template <typename T>
void rows_impl(const LmHeadRowsParams& p) {
  const int64_t V = p.V;
  const bool ce = p.loss == int(LmHeadLoss::kCrossEntropy);
  const bool cap = p.softcap > 0.f;
  const float scale = p.scale, softcap = p.softcap, inv_cap = cap ? 1.f / p.softcap : 0.f;
  const bool want_entropy = !ce && p.entropy != nullptr && !p.backward;
  T* z = static_cast<T*>(p.z);
  at::parallel_for(0, p.rows, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(2 * V);
    float* zp = buf.data();      // z' (scaled, capped logits)
    float* ep = zp + V;          // exp(z' - max) (forward) / p (backward)
    for (int64_t i = lo; i < hi; ++i) {
      T* row = z + i * V;
      load_f32(row, zp, V);
      if (cap) {
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) zp[j] = softcap * vtanh(scale * zp[j] * inv_cap);
      } else if (scale != 1.f) {
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) zp[j] *= scale;
      }
      const int64_t t = p.targets[i];
      const bool has_t = t >= 0 && t < V && !(ce && t == p.ignore_index);
      const float zt = has_t ? zp[t] : 0.f;
      float lse, S = 0.f, inv_sum;
      if (!p.backward) {
        // max: a NaN is never selected here, but it reaches the sum through exp below (NaN in, NaN out)
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < V; ++j) m = std::max(m, zp[j]);
        float s = 0.f, sz = 0.f, sez = 0.f;
#pragma omp simd reduction(+ : s, sz, sez)
        for (int64_t j = 0; j < V; ++j) {
          const float e = vexp(zp[j] - m);
          ep[j] = e;
          s += e;
          sz += zp[j];
          sez += e * zp[j];
        }
        lse = m + std::log(s);
        inv_sum = 1.f / s;
        p.lse[i] = lse;
        if (ce) {
          const bool valid = t != p.ignore_index;
          p.out[i] = valid ? lse - (1.f - p.label_smoothing) * zt - p.label_smoothing * (sz / float(V)) +
                                 p.z_loss * lse * lse
                           : 0.f;
        } else {
          p.out[i] = zt - lse;
          S = sez * inv_sum;
          if (want_entropy) p.entropy[i] = lse - S;
        }
        if (!p.fused_grad) continue;  // statistics only
      } else {
        lse = p.lse[i];
        inv_sum = 1.f;
        // S = sum_j p_j z'_j recomputed from the probabilities, not as lse - entropy: that difference of two rounded
        // O(|z'|) numbers cost up to 4x PyTorch's float32 error in the entropy's gradient at temperature 0.7
        float sez = 0.f;
#pragma omp simd reduction(+ : sez)
        for (int64_t j = 0; j < V; ++j) {
          const float e = vexp(zp[j] - lse);
          ep[j] = e;
          sez += e * zp[j];
        }
        if (!ce && p.grad_entropy) S = sez;
      }
      // the gradient of the raw logits
      LmHeadCoef c;
      if (ce) {
        const bool valid = t != p.ignore_index;
        const float g = !valid ? 0.f : (p.backward ? p.grad[i] : p.grad_scale);
        c = lm_head_ce_coef(g, lse, p.label_smoothing, p.z_loss, V);
      } else {
        c = lm_head_logprob_coef(p.grad[i], p.grad_entropy ? p.grad_entropy[i] : 0.f, S);
      }
      const float A = c.A * inv_sum, Cc = c.C, E = c.E * inv_sum;
      float* dz = ep;  // p (times 1 / sum in the forward) becomes dz' in place
      if (cap) {
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) {
          const float q = zp[j] * inv_cap;
          dz[j] = (A * dz[j] + Cc + E * dz[j] * zp[j]) * (1.f - q * q) * scale;
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) dz[j] = (A * dz[j] + Cc + E * dz[j] * zp[j]) * scale;
      }
      if (has_t) {
        const float q = zp[t] * inv_cap;
        dz[t] += c.B * (cap ? 1.f - q * q : 1.f) * scale;
      }
      store_f32(dz, row, V);
    }
  });
}

template <typename T>
void colsum_impl(const LmHeadColsumParams& p) {
  const T* z = static_cast<const T*>(p.z);
  at::parallel_for(0, ceil_div(p.V, int64_t(256)), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * 256, j1 = std::min(p.V, j0 + 256);
      float* acc = p.acc;
      for (int64_t i = 0; i < p.rows; ++i) {
        const T* row = z + i * p.V;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) acc[j] += ld(row, j);
      }
    }
  });
}

}  // namespace

void lm_head_rows(const LmHeadRowsParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { rows_impl<T>(p); });
}

void lm_head_colsum(const LmHeadColsumParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { colsum_impl<T>(p); });
}

}  // namespace umm::cpu::UMM_CPU_NS
