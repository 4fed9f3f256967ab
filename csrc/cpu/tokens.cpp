// CPU kernels of the tokenizer-compression ops (formulas and geometry: umm/tokens.h).
//
// The GEMMs are not here: the torch glue (csrc/torch/tokens_ops.cpp) runs them with at::mm, and these
// kernels are the memory passes around them, each fused so that a tensor is read and written once:
//   gather (LayerNorm + space-to-depth into the GEMM's A operand), bias + activation, activation backward,
//   LayerNorm backward + depth-to-space scatter, the expand scatter (+ bias) and gather, latent (un)packing.
// Parallel work is cut by rows; column reductions go through per-chunk partials summed in chunk order
// (chunk sizes depend only on the shape: results do not depend on the thread count).
#include <cmath>
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"

namespace umm::cpu::UMM_CPU_NS {
namespace {

template <typename T>
std::vector<float> param_or(const void* p, int64_t n, float fill) {
  std::vector<float> out(n, fill);
  if (p) {
    const T* s = static_cast<const T*>(p);
    for (int64_t i = 0; i < n; ++i) out[i] = ld(s, i);
  }
  return out;
}

// ------------------------------------------------------------------ vectorisable activations
// glibc's erff / expf / tanhf are scalar calls that the loops below cannot vectorise (they cost ~10x the GEMM's
// epilogue budget on this CPU); these float versions compile to AVX2 / AVX-512 under `omp simd` (this file is built with
// -fno-trapping-math so that the clamps and selects if-convert; no value changes).
//   exp: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, degree-6 Taylor polynomial: relative error ~1.5e-7.
//   erf: Abramowitz & Stegun 7.1.26 (the formula PyTorch's vectorised erf uses): |error| <= 1.5e-7.
__attribute__((always_inline)) inline float vexp(float x) {
  x = std::min(88.f, std::max(-87.f, x));
  // round to nearest with the 1.5 * 2^23 trick (std::nearbyint is a library call that blocks vectorisation)
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // ln2 split hi / lo
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}
__attribute__((always_inline)) inline float verf(float x) {
  const float ax = std::fabs(x);
  const float t = 1.f / (1.f + 0.3275911f * ax);
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  const float y = 1.f - q * t * vexp(-ax * ax);
  return std::copysign(y, x);
}
__attribute__((always_inline)) inline float vtanh(float u) { return 1.f - 2.f / (vexp(2.f * u) + 1.f); }

__attribute__((always_inline)) inline float act_fwd(float v, int act) {
  if (act == int(TokenAct::kGelu)) return 0.5f * v * (1.f + verf(v * 0.70710678118654752f));
  if (act == int(TokenAct::kGeluTanh))
    return 0.5f * v * (1.f + vtanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
  return v;
}
__attribute__((always_inline)) inline float act_grad(float v, int act) {
  if (act == int(TokenAct::kGelu))
    return 0.5f * (1.f + verf(v * 0.70710678118654752f)) + v * 0.39894228040143268f * vexp(-0.5f * v * v);
  if (act == int(TokenAct::kGeluTanh)) {
    const float th = vtanh(0.79788456080286536f * (v + 0.044715f * v * v * v));
    return 0.5f * (1.f + th) + 0.5f * v * (1.f - th * th) * 0.79788456080286536f * (1.f + 3.f * 0.044715f * v * v);
  }
  return 1.f;
}

// Coarse rows per parallel task (row passes) and per reduction chunk (shape-only).
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)); }
inline constexpr int64_t kMinChunkRows = 16;  // chunked_rows' smallest row chunk here (common.h)

// ------------------------------------------------------------------ compress: gather
template <typename T>
void gather_impl(const TokensGatherParams& p) {
  const TokensGeom g = p.g;
  const int64_t C = g.C, ff = g.f * g.f, K = ff * C;
  const int64_t M = g.N * (g.H / g.f) * (g.W / g.f);
  const std::vector<float> lw = param_or<T>(p.ln_w, C, 1.f), lb = param_or<T>(p.ln_b, C, 0.f);
  const float* lwp = lw.data();
  const float* lbp = lb.data();
  const T* x = static_cast<const T*>(p.x);
  T* a = static_cast<T*>(p.a);
  at::parallel_for(0, M, row_grain(K), [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(C);
    float* xr = buf.data();
    for (int64_t m = lo; m < hi; ++m) {
      for (int64_t s = 0; s < ff; ++s) {
        const int64_t t = fine_token(g, m, s);
        const T* src = x + t * C;
        for (int64_t i0 = 0; i0 < C; i0 += kRun) load_f32(src + i0, xr + i0, std::min(kRun, C - i0));
        float mean, rstd;
        if (p.stats_given) {
          mean = p.mean[t];
          rstd = p.rstd[t];
        } else {
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t i = 0; i < C; ++i) sum += xr[i];
          mean = sum / float(C);
          float q = 0.f;
#pragma omp simd reduction(+ : q)
          for (int64_t i = 0; i < C; ++i) {
            const float d = xr[i] - mean;
            q += d * d;
          }
          rstd = 1.f / std::sqrt(q / float(C) + p.eps);
          p.mean[t] = mean;
          p.rstd[t] = rstd;
        }
        if (!a) continue;
        T* dst = a + m * K + s * C;
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) st(dst, i, (xr[i] - mean) * rstd * lwp[i] + lbp[i]);
      }
    }
  });
}

// ------------------------------------------------------------------ compress: bias + activation
// One row; the activation and keep_pre are template parameters so that every loop is branch-free and vectorises.
// 16-bit rows go through float runs (load_f32 / store_f32 vectorise the conversions; element-wise bf16 / fp16
// loads and stores inside the activation loop kept it scalar: 2.7x slower than float at 384 -> 1536).
template <typename T, int ACT, bool KEEP>
inline void bias_act_row(T* __restrict pr, const float* __restrict bp, T* __restrict orow, int64_t Co) {
  if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
    for (int64_t i = 0; i < Co; ++i) {
      const float v = pr[i] + bp[i];
      if constexpr (KEEP) pr[i] = v;
      orow[i] = act_fwd(v, ACT);
    }
  } else {
    float vb[kRun], ob[kRun];
    for (int64_t i0 = 0; i0 < Co; i0 += kRun) {
      const int64_t n = std::min(kRun, Co - i0);
      load_f32(pr + i0, vb, n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        vb[i] += bp[i0 + i];
        ob[i] = act_fwd(vb[i], ACT);
      }
      if constexpr (KEEP) store_f32(vb, pr + i0, n);
      store_f32(ob, orow + i0, n);
    }
  }
}

// dr = g * act'(pr) (ACT = kNone: dr = g); with acc != nullptr also acc[i] += the float value before rounding to T.
template <typename T, int ACT>
inline void act_bwd_row(const T* __restrict g, const T* __restrict pr, T* __restrict dr, int64_t Co,
                        float* __restrict acc) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (ACT == int(TokenAct::kNone)) {
      std::memcpy(dr, g, Co * sizeof(float));
    } else {
#pragma omp simd
      for (int64_t i = 0; i < Co; ++i) dr[i] = g[i] * act_grad(pr[i], ACT);
    }
    if (acc) {
#pragma omp simd
      for (int64_t i = 0; i < Co; ++i) acc[i] += dr[i];
    }
  } else {
    float gb[kRun], pb[kRun];
    for (int64_t i0 = 0; i0 < Co; i0 += kRun) {
      const int64_t n = std::min(kRun, Co - i0);
      load_f32(g + i0, gb, n);
      if constexpr (ACT != int(TokenAct::kNone)) {
        load_f32(pr + i0, pb, n);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) gb[i] *= act_grad(pb[i], ACT);
      }
      if (acc) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) acc[i0 + i] += gb[i];
      }
      store_f32(gb, dr + i0, n);
    }
  }
}

// In place (out == pre, nothing kept): pr = act(pr + bias).
template <typename T, int ACT>
inline void bias_act_row_inplace(T* __restrict pr, const float* __restrict bp, int64_t Co) {
  if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
    for (int64_t i = 0; i < Co; ++i) pr[i] = act_fwd(pr[i] + bp[i], ACT);
  } else {
    float vb[kRun];
    for (int64_t i0 = 0; i0 < Co; i0 += kRun) {
      const int64_t n = std::min(kRun, Co - i0);
      load_f32(pr + i0, vb, n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) vb[i] = act_fwd(vb[i] + bp[i0 + i], ACT);
      store_f32(vb, pr + i0, n);
    }
  }
}

template <typename T>
void bias_act_impl(const TokensBiasActParams& p) {
  const int64_t Co = p.Cout;
  const std::vector<float> b = param_or<T>(p.bias, Co, 0.f);
  const float* bp = b.data();
  T* pre = static_cast<T*>(p.pre);
  T* out = static_cast<T*>(p.out);
  constexpr int kNone = int(TokenAct::kNone), kGelu = int(TokenAct::kGelu), kTanh = int(TokenAct::kGeluTanh);
  const int act = p.act;
  const bool keep = p.keep_pre && act != kNone;
  const bool inplace = out == pre;
  TORCH_CHECK(!(inplace && keep), "umm_ops.tokens: tokens_bias_act with out == pre needs keep_pre == false");
  at::parallel_for(0, p.M, row_grain(Co), [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) {
      T* pr = pre + m * Co;
      T* orow = out + m * Co;
      if (inplace) {
        if (act == kNone) {
          bias_act_row_inplace<T, kNone>(pr, bp, Co);
        } else if (act == kGelu) {
          bias_act_row_inplace<T, kGelu>(pr, bp, Co);
        } else {
          bias_act_row_inplace<T, kTanh>(pr, bp, Co);
        }
      } else if (act == kNone) {
        bias_act_row<T, kNone, false>(pr, bp, orow, Co);
      } else if (act == kGelu) {
        keep ? bias_act_row<T, kGelu, true>(pr, bp, orow, Co) : bias_act_row<T, kGelu, false>(pr, bp, orow, Co);
      } else {
        keep ? bias_act_row<T, kTanh, true>(pr, bp, orow, Co) : bias_act_row<T, kTanh, false>(pr, bp, orow, Co);
      }
    }
  });
}

template <typename T>
void act_bwd_impl(const TokensActBwdParams& p) {
  const int64_t Co = p.Cout;
  const T* gr = static_cast<const T*>(p.grad);
  const T* pre = static_cast<const T*>(p.pre);
  T* d = static_cast<T*>(p.dpre);
  const int act = p.act;
  chunked_rows(p.M, kMinChunkRows, Co, p.dbias, [&](int64_t r0, int64_t r1, float* acc) {
    for (int64_t m = r0; m < r1; ++m) {
      const T *g = gr + m * Co, *pr = pre + m * Co;
      T* dr = d + m * Co;
      if (act == int(TokenAct::kNone)) {
        act_bwd_row<T, int(TokenAct::kNone)>(g, pr, dr, Co, acc);
      } else if (act == int(TokenAct::kGelu)) {
        act_bwd_row<T, int(TokenAct::kGelu)>(g, pr, dr, Co, acc);
      } else {
        act_bwd_row<T, int(TokenAct::kGeluTanh)>(g, pr, dr, Co, acc);
      }
    }
  });
}

// ------------------------------------------------------------------ compress: LayerNorm backward + scatter
// (+ the re-gathered A when p.a is set: this pass reads x and the statistics anyway, so A costs its write only)
template <typename T, bool WRITE_A>
void ln_scatter_bwd_rows(const TokensLnScatterBwdParams& p, const float* __restrict lwp, const float* __restrict lbp,
                         int64_t r0, int64_t r1, float* acc) {
  const TokensGeom g = p.g;
  const int64_t C = g.C, ff = g.f * g.f, K = ff * C;
  const T* da = static_cast<const T*>(p.da);
  const T* x = static_cast<const T*>(p.x);
  T* dx = static_cast<T*>(p.dx);
  T* a = static_cast<T*>(p.a);
  std::vector<float> b1(C), b2(C);
  float* __restrict xh = b1.data();
  float* __restrict gy = b2.data();
  float* __restrict acc_w = acc;
  float* __restrict acc_b = acc ? acc + C : nullptr;
  for (int64_t m = r0; m < r1; ++m) {
    for (int64_t s = 0; s < ff; ++s) {
      const int64_t t = fine_token(g, m, s);
      const float mean = p.mean[t], rstd = p.rstd[t];
      const T* __restrict xr = x + t * C;
      const T* __restrict dr = da + m * K + s * C;
      float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
      for (int64_t i = 0; i < C; ++i) {
        const float xv = (ld(xr, i) - mean) * rstd;
        const float dv = ld(dr, i);
        const float gv = dv * lwp[i];
        xh[i] = xv;
        gy[i] = gv;
        s1 += gv;
        s2 += gv * xv;
      }
      if constexpr (WRITE_A) {
        // the gather's expression, ((x - mean) rstd) lnw + lnb
        T* __restrict ar = a + m * K + s * C;
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) st(ar, i, xh[i] * lwp[i] + lbp[i]);
      }
      if (acc) {
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) {
          const float dv = ld(dr, i);
          acc_w[i] += dv * xh[i];
          acc_b[i] += dv;
        }
      }
      if (dx) {
        const float m1 = s1 / float(C), m2 = s2 / float(C);
        T* __restrict dxr = dx + t * C;
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) st(dxr, i, rstd * (gy[i] - m1 - xh[i] * m2));
      }
    }
  }
}

template <typename T>
void ln_scatter_bwd_impl(const TokensLnScatterBwdParams& p) {
  const TokensGeom g = p.g;
  const int64_t C = g.C;
  const int64_t M = g.N * (g.H / g.f) * (g.W / g.f);
  const std::vector<float> lw = param_or<T>(p.ln_w, C, 1.f), lb = param_or<T>(p.ln_b, C, 0.f);
  const bool want_params = p.dln_w || p.dln_b;
  std::vector<float> tot(want_params ? 2 * C : 0);  // [dln_w (C) | dln_b (C)]
  chunked_rows(M, kMinChunkRows, 2 * C, want_params ? tot.data() : nullptr, [&](int64_t r0, int64_t r1, float* acc) {
    if (p.a)
      ln_scatter_bwd_rows<T, true>(p, lw.data(), lb.data(), r0, r1, acc);
    else
      ln_scatter_bwd_rows<T, false>(p, lw.data(), lb.data(), r0, r1, acc);
  });
  if (!want_params) return;
  if (p.dln_w) std::memcpy(p.dln_w, tot.data(), C * sizeof(float));
  if (p.dln_b) std::memcpy(p.dln_b, tot.data() + C, C * sizeof(float));
}

// ------------------------------------------------------------------ expand: scatter (+ bias) and gather
template <typename T>
void depth_scatter_impl(const TokensDepthScatterParams& p) {
  const TokensGeom g = p.g;
  const int64_t C = g.C, ff = g.f * g.f, K = ff * C;
  const int64_t M = g.N * (g.H / g.f) * (g.W / g.f);
  const std::vector<float> b = param_or<T>(p.bias, K, 0.f);
  const float* bp = b.data();
  const T* z = static_cast<const T*>(p.z);
  T* out = static_cast<T*>(p.out);
  if (p.bias == nullptr) {  // a pure permutation of rows of C elements
    at::parallel_for(0, M, row_grain(K), [&](int64_t lo, int64_t hi) {
      for (int64_t m = lo; m < hi; ++m)
        for (int64_t s = 0; s < ff; ++s) std::memcpy(out + fine_token(g, m, s) * C, z + m * K + s * C, C * sizeof(T));
    });
    return;
  }
  at::parallel_for(0, M, row_grain(K), [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) {
      for (int64_t s = 0; s < ff; ++s) {
        const T* zr = z + m * K + s * C;
        const float* br = bp + s * C;
        T* orow = out + fine_token(g, m, s) * C;
#pragma omp simd
        for (int64_t i = 0; i < C; ++i) st(orow, i, ld(zr, i) + br[i]);
      }
    }
  });
}

template <typename T>
void space_gather_impl(const TokensSpaceGatherParams& p) {
  const TokensGeom g = p.g;
  const int64_t C = g.C, ff = g.f * g.f, K = ff * C;
  const int64_t M = g.N * (g.H / g.f) * (g.W / g.f);
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  chunked_rows(M, kMinChunkRows, K, p.dbias, [&](int64_t r0, int64_t r1, float* acc) {
    float buf[kRun];
    for (int64_t m = r0; m < r1; ++m)
      for (int64_t s = 0; s < ff; ++s) {
        const T* sr = src + fine_token(g, m, s) * C;
        std::memcpy(dst + m * K + s * C, sr, C * sizeof(T));
        if (acc == nullptr) continue;
        for (int64_t c0 = 0; c0 < C; c0 += kRun) {
          const int64_t n = std::min(kRun, C - c0);
          load_f32(sr + c0, buf, n);
          float* a = acc + s * C + c0;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) a[i] += buf[i];
        }
      }
  });
}

// ------------------------------------------------------------------ latent (un)packing
template <typename T>
void latent_pack_impl(const LatentPackParams& p) {
  const int64_t B = p.B, C = p.C, H = p.H, W = p.W, f = p.f, ff = f * f, K = C * ff;
  const int64_t Hc = H / f, Wc = W / f;
  const float* sc = p.scale;
  const float* sh = p.shift;
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  // one task per (image, coarse row i): it owns Wc tokens and f latent rows of every channel
  at::parallel_for(0, B * Hc, std::max<int64_t>(1, 4096 / std::max<int64_t>(Wc * K, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t bi = lo; bi < hi; ++bi) {
      const int64_t b = bi / Hc, i = bi - b * Hc;
      const int64_t tok0 = (b * Hc + i) * Wc;  // first token of this coarse row
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t di = 0; di < f; ++di) {
          const int64_t lat = ((b * C + c) * H + f * i + di) * W;  // latent row offset
          const int64_t k0 = c * ff + di * f;
          // latent column w = j f + dj <-> token tok0 + j, packed channel k0 + dj (no division per element)
          for (int64_t dj = 0; dj < f; ++dj) {
            const int64_t k = k0 + dj;
            const float a = sc[k], o = sh ? sh[k] : 0.f;
            if (p.to_tokens) {
              const T* sr = src + lat + dj;
              T* dr = dst + tok0 * K + k;
              for (int64_t j = 0; j < Wc; ++j) st(dr, j * K, ld(sr, j * f) * a + o);
            } else {
              const T* sr = src + tok0 * K + k;
              T* dr = dst + lat + dj;
              for (int64_t j = 0; j < Wc; ++j) st(dr, j * f, ld(sr, j * K) * a + o);
            }
          }
        }
      }
    }
  });
}

}  // namespace

void tokens_gather(const TokensGatherParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { gather_impl<T>(p); });
}
void tokens_bias_act(const TokensBiasActParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { bias_act_impl<T>(p); });
}
void tokens_act_bwd(const TokensActBwdParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { act_bwd_impl<T>(p); });
}
void tokens_ln_scatter_bwd(const TokensLnScatterBwdParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { ln_scatter_bwd_impl<T>(p); });
}
void tokens_depth_scatter(const TokensDepthScatterParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { depth_scatter_impl<T>(p); });
}
void tokens_space_gather(const TokensSpaceGatherParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { space_gather_impl<T>(p); });
}
void latent_pack(const LatentPackParams& p, DType dt) {
  UMM_CPU_DISPATCH(dt, T, [&] { latent_pack_impl<T>(p); });
}

}  // namespace umm::cpu::UMM_CPU_NS
