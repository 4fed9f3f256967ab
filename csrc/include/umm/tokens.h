// Torch-free params structs and shared index math of the tokenizer-compression kernels (issue 4):
// compress_tokens, expand_tokens, pack_latents, unpack_latents.  Executable contract:
// umm_ops/reference/kernels.py; conventions: umm_ops/reference/tokens.py.
//
// Geometry (TokensGeom): N images of a FINE row-major grid H x W with C channels per token, factor f.
// The coarse grid is (H/f) x (W/f), L = (H/f)(W/f) coarse tokens per image, M = N L coarse rows and
// K = f f C unfolded channels.  Coarse row m, segment s = di f + dj (the ViT-feature space-to-depth order)
// holds fine token  fine_token(g, m, s) = n H W + (f i + di) W + f j + dj  with n = m / L, (i, j) = m % L.
//
// compress (forward) is split into
//   * the gather:      A[m, s C + c] = (x[t, c] - mean[t]) rstd[t] lnw[c] + lnb[c],  t = fine_token(m, s)
//                      (writes mean / rstd per fine token unless they are given: the backward recomputes A
//                      from the saved statistics),
//   * the GEMM:        pre = A W^T  (CPU: at::mm in the torch glue; CUDA: one CuTe kernel that gathers and
//                      normalises A on the fly and applies the epilogue below),
//   * the epilogue:    pre += bias; out = act(pre)  (one pass).
// compress backward: dpre = dout act'(pre) (one pass), dA = dpre W, dW = dpre^T A (A recomputed), and the
//   LayerNorm backward fused with the depth-to-space scatter of dA (ln_scatter_bwd; on the CPU that pass
//   also re-writes A for dW, since it reads x and the statistics anyway).
// expand: Z = y W^T (GEMM), out[t, c] = Z[m, s C + c] + bias[s C + c] (depth_scatter); backward:
//   dZ = space-to-depth gather of dout (space_gather), dy = dZ W, dW = dZ^T y.
// pack / unpack (FLUX.2 patchify, channel-major k = c f f + di f + dj):
//   to_tokens:   dst[b, l, k] = src[b, c, f i + di, f j + dj] * scale[k] + shift[k]
//   from tokens: dst[b, c, f i + di, f j + dj] = src[b, l, k] * scale[k] + shift[k]
//   pack = to_tokens with (scale, shift) = (rstd, -mean rstd); unpack = from tokens with (std, mean); their
//   backwards are the other direction with (scale, shift) = (rstd | std, 0).
#pragma once
#include <cstdint>

#include "umm/params.h"

namespace umm {

enum class TokenAct : int { kNone = 0, kGelu = 1, kGeluTanh = 2 };

struct TokensGeom {
  int64_t N, H, W, f, C;
};

UMM_HD int64_t fine_token(const TokensGeom& g, int64_t m, int64_t s) {
  const int64_t Wc = g.W / g.f, L = (g.H / g.f) * Wc;
  const int64_t n = m / L, l = m - n * L;
  const int64_t i = l / Wc, j = l - i * Wc;
  const int64_t di = s / g.f, dj = s - di * g.f;
  return n * g.H * g.W + (g.f * i + di) * g.W + g.f * j + dj;
}

// Activation and its derivative, float32 (erf GELU, tanh GELU, identity).
UMM_HD float token_act(float v, int act) {
  if (act == int(TokenAct::kGelu)) return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  if (act == int(TokenAct::kGeluTanh)) {
    const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.f + tanhf(u));
  }
  return v;
}
UMM_HD float token_act_grad(float v, int act) {
  if (act == int(TokenAct::kGelu)) {
    const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
    return cdf + v * pdf;
  }
  if (act == int(TokenAct::kGeluTanh)) {
    const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
    const float th = tanhf(u);
    return 0.5f * (1.f + th) + 0.5f * v * (1.f - th * th) * 0.79788456080286536f * (1.f + 3.f * 0.044715f * v * v);
  }
  return 1.f;
}

// x (N H W, C), ln_w / ln_b (C,) or nullptr (1 / 0), a (M, K) in the activation dtype or nullptr (then only
// the statistics are computed: the CUDA GEMM gathers A itself).
// stats_given: mean / rstd are inputs (N H W floats), else they are computed and written.
struct TokensGatherParams {
  const void* x;
  const void* ln_w;
  const void* ln_b;
  void* a;
  float* mean;
  float* rstd;
  TokensGeom g;
  float eps;
  bool stats_given;
};

// pre (M, Cout) in/out: pre += bias (bias (Cout,) or nullptr); out = act(pre).  keep_pre: write the biased
// pre-activation back into pre (the backward's input), else pre is left as is.  CPU: out may equal pre when
// keep_pre is false (in place: the no-grad forward needs no second (M, Cout) buffer).
struct TokensBiasActParams {
  void* pre;
  const void* bias;
  void* out;
  int64_t M, Cout;
  int act;
  bool keep_pre;
};

// dpre = grad * act'(pre), (M, Cout) each; pre may equal nullptr when act == none (dpre = grad).
struct TokensActBwdParams {
  const void* grad;
  const void* pre;
  void* dpre;
  int64_t M, Cout;
  int act;
  // CPU only (nullptr on CUDA): also db[o] = sum_m dpre[m, o] (float32 (Cout,), from the unrounded dpre), summed
  // per shape-only chunk of rows, then over chunks in order (independent of the thread count)
  float* dbias = nullptr;
};

// LayerNorm backward through the depth-to-space scatter of dA (M, K):
//   xhat = (x - mean) rstd, gy = dA[m, s C + c] lnw[c]      for t = fine_token(m, s)
//   dx[t] = rstd (gy - mean_c(gy) - xhat mean_c(gy xhat))   (dx may be nullptr)
//   dln_w[c] = sum_t dA xhat, dln_b[c] = sum_t dA            (float32 (C,), nullptr when not wanted)
struct TokensLnScatterBwdParams {
  const void* da;
  const void* x;
  const void* ln_w;
  const float* mean;
  const float* rstd;
  void* dx;
  float* dln_w;
  float* dln_b;
  TokensGeom g;
  // CPU only (nullptr on CUDA): also write A (M, K) exactly as the gather with given statistics does,
  // A[m, s C + c] = xhat lnw[c] + lnb[c] (ln_b may be nullptr: 0) - the recomputed GEMM operand of dW
  void* a = nullptr;
  const void* ln_b = nullptr;
};

// expand forward epilogue: out[t, c] = z[m, s C + c] + bias[s C + c]  (z (M, K), out (N H W, C)).
struct TokensDepthScatterParams {
  const void* z;
  const void* bias;
  void* out;
  TokensGeom g;
};

// expand backward gather: dst[m, s C + c] = src[t, c]  (src (N H W, C), dst (M, K)).
struct TokensSpaceGatherParams {
  const void* src;
  void* dst;
  TokensGeom g;
  // CPU only (nullptr on CUDA): also db[k] = sum_m dst[m, k] (float32 (K,)), per shape-only chunk of rows, then
  // over chunks in order (independent of the thread count)
  float* dbias = nullptr;
};

// Latent patchify with a per-packed-channel affine map (see the header comment).  B images, C channels,
// H x W latent grid; scale / shift: (C f f,) float32 (shift may be nullptr = 0).
struct LatentPackParams {
  const void* src;
  void* dst;
  const float* scale;
  const float* shift;
  int64_t B, C, H, W, f;
  bool to_tokens;
};

// The fused GEMM of the CUDA backend: out = epilogue(A' W^T), W (Nout, Kdim) row-major, fp32 accumulation.
//   gather_a (compress): A'[m, k] = gather(LayerNorm(x)) as TokensGatherParams.a with the given statistics
//     (Kdim = f f C, M = N L); epilogue: pre = acc + bias, out[m, n] = act(pre) (pre stored when pre != nullptr).
//   else (expand): A' = a (M, Kdim) row-major; scatter_out: out[fine_token(m, s), c] = acc + bias[n] with
//     n = s C + c (Nout = f f C), else out[m, n] = act(acc + bias[n]).
struct TokensGemmParams {
  const void* a;
  const float* mean;
  const float* rstd;
  const void* ln_w;
  const void* ln_b;
  const void* weight;
  const void* bias;
  void* out;
  void* pre;
  TokensGeom g;
  int64_t M, Kdim, Nout;
  int act;
  bool gather_a;
  bool scatter_out;
};

}  // namespace umm
