// Torch-facing side of the tokenizer-compression ops (umm/tokens.h): kernel op schemas, input checks, the
// GEMMs (at::mm: MKL / oneDNN on the CPU, cuBLAS on CUDA) and the calls of the fused memory passes.
//
// compress forward, CPU (and CUDA when the fused GEMM does not cover the case):
//   gather (LayerNorm + space-to-depth -> A, one pass) ; pre = A W^T (at::mm) ; bias + act (one pass).
// compress forward, CUDA bf16/fp16 on sm80+: statistics pass ; one CuTe GEMM gathering and normalising A
//   on the fly with the bias + act epilogue (A is never written).
// compress backward: dpre = grad act'(pre) (one pass; pre recomputed by GEMM when the forward did not keep
//   it) ; dbias = column sums of dpre ; dA = dpre W (at::mm) ; LayerNorm backward fused with the
//   depth-to-space scatter of dA (one pass) ; dW = dpre^T A with A RECOMPUTED from x and the saved
//   statistics (CPU: written by that LayerNorm-backward pass, which reads x and the statistics anyway, so A
//   costs one write; otherwise one separate gather pass: a read of x and a write of A, the traffic of
//   reading a saved A back), and keeping A alive from forward to backward would cost a whole extra
//   activation (N L f f C elements, as big as x) per layer.
// expand: Z = y W^T (at::mm) ; depth-to-space scatter + bias (one pass; CUDA bf16/fp16: the scatter is the
//   GEMM's epilogue).  Backward: dZ = space-to-depth gather of grad ; dy = dZ W, dW = dZ^T y, db = sums.
// pack / unpack: one pass each, the running statistics folded into a per-channel (scale, shift).
#include <ATen/DeviceAccelerator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "cpu/kernels.h"
#include "torch/checks.h"
#include "umm/tokens.h"
#ifdef UMM_WITH_CUDA
#include "umm/cuda_api.h"
#endif

namespace umm::torch_ops {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;
constexpr const char* kWho = "umm_ops.tokens";

#ifdef UMM_WITH_CUDA
void* stream_of(const Tensor& t) { return at::accelerator::getCurrentStream(t.device().index()).native_handle(); }
void cuda_check(int err, const char* what) {
  TORCH_CHECK(err == 0, kWho, ": CUDA kernel ", what, " failed: ", umm_cuda_error_string(err));
}
#define UMM_TOK_CALL(DEVT, NAME, P, DT)                                   \
  do {                                                                    \
    if ((DEVT).is_cuda()) {                                               \
      cuda_check(umm_cuda_##NAME(&(P), int(DT), stream_of(DEVT)), #NAME); \
    } else {                                                              \
      ::umm::cpu::NAME((P), (DT));                                        \
    }                                                                     \
  } while (0)
#else
#define UMM_TOK_CALL(DEVT, NAME, P, DT)                                                         \
  do {                                                                                          \
    TORCH_CHECK(!(DEVT).is_cuda(), kWho, ": this build has no CUDA kernels (rebuild with nvcc)"); \
    ::umm::cpu::NAME((P), (DT));                                                                \
  } while (0)
#endif

const void* cptr(const OptT& t) { return t.has_value() ? t->data_ptr() : nullptr; }

int act_code(const std::string& a) {
  if (a == "gelu") return int(TokenAct::kGelu);
  if (a == "gelu_tanh") return int(TokenAct::kGeluTanh);
  if (a == "none") return int(TokenAct::kNone);
  TORCH_CHECK(false, kWho, ": activation must be one of ('gelu', 'gelu_tanh', 'none'), got '", a, "'");
}

void check_same(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), kWho, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), kWho, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), kWho, ": ", name, " must be contiguous (the public ops make it so), got strides ",
              t.strides());
}

void check_shape(const Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, kWho, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_stats(const Tensor& t, int64_t n, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, kWho, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), kWho, ": ", name, " must be on ", ref.device(), ", got ", t.device());
  check_shape(t, {n}, name);
  TORCH_CHECK(t.is_contiguous(), kWho, ": ", name, " must be contiguous");
}

// Fine grid (H, W), factor f: the geometry of (N, H W, C) tokens.
TokensGeom grid(const Tensor& fine, int64_t H, int64_t W, int64_t f, const char* name) {
  TORCH_CHECK(f >= 1, kWho, ": factor must be >= 1, got ", f);
  TORCH_CHECK(H >= 1 && W >= 1, kWho, ": grid_hw must be positive, got (", H, ", ", W, ")");
  TORCH_CHECK(H % f == 0 && W % f == 0, kWho, ": grid_hw (", H, ", ", W, ") must be divisible by factor ", f);
  TORCH_CHECK(fine.dim() == 3 && fine.size(1) == H * W, kWho, ": ", name, " must be (N, H*W, C) with H*W = ", H * W,
              ", got shape ", fine.sizes());
  return TokensGeom{fine.size(0), H, W, f, fine.size(2)};
}

inline int64_t coarse_per_image(const TokensGeom& g) { return (g.H / g.f) * (g.W / g.f); }
inline int64_t coarse_rows(const TokensGeom& g) { return g.N * coarse_per_image(g); }

// A = space_to_depth(LayerNorm(x)) (M, K) in x's dtype; statistics computed (given == false) or read.
Tensor gather_a(const Tensor& x, const OptT& lw, const OptT& lb, Tensor& mean, Tensor& rstd, const TokensGeom& g,
                double eps, bool given, DType dt) {
  const int64_t M = coarse_rows(g), K = g.f * g.f * g.C;
  Tensor a = at::empty({M, K}, x.options());
  TokensGatherParams p{x.data_ptr(), cptr(lw), cptr(lb), a.data_ptr(), mean.data_ptr<float>(),
                       rstd.data_ptr<float>(), g, float(eps), given};
  if (M * K > 0) UMM_TOK_CALL(x, tokens_gather, p, dt);
  return a;
}

void check_ln_params(const OptT& lw, const OptT& lb, const Tensor& x, int64_t C) {
  if (lw) {
    check_same(*lw, x, "ln_weight", "x");
    check_shape(*lw, {C}, "ln_weight");
  }
  if (lb) {
    check_same(*lb, x, "ln_bias", "x");
    check_shape(*lb, {C}, "ln_bias");
  }
}

// ------------------------------------------------------------------------------------ compress_tokens
std::tuple<Tensor, Tensor, Tensor, Tensor> compress_tokens(const Tensor& x, const OptT& ln_weight,
                                                           const OptT& ln_bias, const Tensor& weight,
                                                           const OptT& bias, int64_t H, int64_t W, int64_t factor,
                                                           std::string activation, double eps, bool save_pre) {
  UMM_NO_AUTOCAST;
  const DType dt = dtype_code(x, "x", kWho);
  const TokensGeom g = grid(x, H, W, factor, "x");
  TORCH_CHECK(x.is_contiguous(), kWho, ": x must be contiguous, got strides ", x.strides());
  const int act = act_code(activation);
  const int64_t K = g.f * g.f * g.C, M = coarse_rows(g);
  check_ln_params(ln_weight, ln_bias, x, g.C);
  check_same(weight, x, "weight", "x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, kWho, ": weight must be (C_out, f*f*C) = (C_out, ", K,
              "), got shape ", weight.sizes());
  const int64_t Co = weight.size(0);
  if (bias) {
    check_same(*bias, x, "bias", "x");
    check_shape(*bias, {Co}, "bias");
  }
  c10::DeviceGuard guard(x.device());
  const int64_t T = g.N * g.H * g.W;
  Tensor mean = at::empty({T}, x.options().dtype(at::kFloat)), rstd = at::empty({T}, x.options().dtype(at::kFloat));
  const std::array<int64_t, 3> out_shape{g.N, coarse_per_image(g), Co};
  Tensor out;
  const bool keep = save_pre && act != int(TokenAct::kNone);
  Tensor pre;
  bool stats_done = false;
#ifdef UMM_WITH_CUDA
  if (x.is_cuda() && M * Co > 0) {
    TokensGatherParams sp{x.data_ptr(), cptr(ln_weight), cptr(ln_bias), nullptr, mean.data_ptr<float>(),
                          rstd.data_ptr<float>(), g, float(eps), false};
    if (T > 0) cuda_check(umm_cuda_tokens_gather(&sp, int(dt), stream_of(x)), "tokens_gather (statistics)");
    stats_done = true;
    out = at::empty(out_shape, x.options());
    pre = keep ? at::empty({M, Co}, x.options()) : at::empty({0}, x.options());
    TokensGemmParams gp{x.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), cptr(ln_weight),
                        cptr(ln_bias), weight.data_ptr(), cptr(bias), out.data_ptr(), keep ? pre.data_ptr() : nullptr,
                        g, M, K, Co, act, true, false};
    const int err = umm_cuda_tokens_gemm(&gp, int(dt), stream_of(x));
    if (err == 0) return {out, pre, mean, rstd};
    TORCH_CHECK(err == umm_cuda_error_not_supported(), kWho, ": CUDA kernel tokens_gemm failed: ",
                umm_cuda_error_string(err));
  }
#endif
  Tensor a = gather_a(x, ln_weight, ln_bias, mean, rstd, g, eps, /*given=*/stats_done, dt);
  // CPU, nothing kept for a backward: the GEMM writes straight into the output and the epilogue runs in
  // place there (no second (M, Cout) buffer)
  const bool inplace = !keep && !x.is_cuda();
  out = at::empty(out_shape, x.options());
  if (inplace) {
    pre = out.view({M, Co});
    at::mm_out(pre, a, weight.t());
  } else {
    pre = a.mm(weight.t());
  }
  a = Tensor();  // A's memory goes back to the allocator before the epilogue
  TokensBiasActParams bp{pre.data_ptr(), cptr(bias), out.data_ptr(), M, Co, act, keep};
  if (M * Co > 0) UMM_TOK_CALL(x, tokens_bias_act, bp, dt);
  if (!keep) pre = at::empty({0}, x.options());
  return {out, pre, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> compress_tokens_backward(
    const Tensor& grad, const Tensor& x, const OptT& ln_weight, const OptT& ln_bias, const Tensor& weight,
    const OptT& bias, const Tensor& pre, const Tensor& mean, const Tensor& rstd, int64_t H, int64_t W, int64_t factor,
    std::string activation, double eps, std::array<bool, 5> mask) {
  UMM_NO_AUTOCAST;
  const DType dt = dtype_code(x, "x", kWho);
  const TokensGeom g = grid(x, H, W, factor, "x");
  TORCH_CHECK(x.is_contiguous(), kWho, ": x must be contiguous, got strides ", x.strides());
  const int act = act_code(activation);
  const int64_t K = g.f * g.f * g.C, M = coarse_rows(g), T = g.N * g.H * g.W;
  check_ln_params(ln_weight, ln_bias, x, g.C);
  check_same(weight, x, "weight", "x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, kWho, ": weight must be (C_out, ", K, "), got shape ",
              weight.sizes());
  const int64_t Co = weight.size(0);
  if (bias) {
    check_same(*bias, x, "bias", "x");
    check_shape(*bias, {Co}, "bias");
  }
  check_same(grad, x, "grad", "x");
  check_shape(grad, {g.N, coarse_per_image(g), Co}, "grad");
  check_stats(mean, T, x, "mean");
  check_stats(rstd, T, x, "rstd");
  const bool have_pre = pre.numel() > 0;
  if (have_pre) {
    check_same(pre, x, "pre", "x");
    check_shape(pre, {M, Co}, "pre");
  }
  c10::DeviceGuard guard(x.device());
  Tensor mean_c = mean, rstd_c = rstd;  // read by the gather (stats_given), not written
  const bool want_dx = mask[0], want_lw = mask[1] && ln_weight, want_lb = mask[2] && ln_bias;
  const bool want_w = mask[3], want_b = mask[4] && bias;
  const bool want_ln = want_dx || want_lw || want_lb;
  const bool a_first = act != int(TokenAct::kNone) && !have_pre;  // pre is recomputed from A
  // CPU: when the LayerNorm backward runs anyway, it re-writes A for dW on its way (it reads x and the
  // statistics already): one pass fewer than a separate gather.
  const bool a_in_ln = want_w && want_ln && !a_first && !x.is_cuda();
  Tensor a;  // recomputed A, when dW or pre needs it
  if ((want_w && !a_in_ln) || a_first) a = gather_a(x, ln_weight, ln_bias, mean_c, rstd_c, g, 0.0, true, dt);
  Tensor g2 = grad.reshape({M, Co});
  Tensor dpre = g2;
  Tensor db32;  // the bias gradient, when the CPU activation backward sums it on the way
  if (act != int(TokenAct::kNone)) {
    Tensor p2 = have_pre ? pre : (bias ? a.mm(weight.t()).add_(*bias) : a.mm(weight.t()));
    dpre = at::empty_like(g2);
    const bool fuse_db = want_b && !x.is_cuda() && M * Co > 0;
    if (fuse_db) db32 = at::empty({Co}, x.options().dtype(at::kFloat));
    TokensActBwdParams ap{g2.data_ptr(), p2.data_ptr(), dpre.data_ptr(), M, Co, act,
                          fuse_db ? db32.data_ptr<float>() : nullptr};
    if (M * Co > 0) UMM_TOK_CALL(x, tokens_act_bwd, ap, dt);
  }
  auto e = [&] { return at::empty({0}, x.options()); };  // one fresh empty per masked-out gradient (no aliasing)
  Tensor dx = e(), dlw = e(), dlb = e(), dw = e(), db = e();
  if (want_b) db = (db32.defined() ? db32 : dpre.sum({0}, false, at::kFloat)).to(x.scalar_type());
  if (want_w && !a_in_ln) dw = dpre.t().mm(a);
  if (want_ln) {
    Tensor da = dpre.mm(weight);
    auto f32 = x.options().dtype(at::kFloat);
    Tensor lwf = want_lw ? at::empty({g.C}, f32) : e();
    Tensor lbf = want_lb ? at::empty({g.C}, f32) : e();
    if (want_dx) dx = at::empty_like(x);
    TokensLnScatterBwdParams lp{da.data_ptr(), x.data_ptr(), cptr(ln_weight), mean.data_ptr<float>(),
                                rstd.data_ptr<float>(), want_dx ? dx.data_ptr() : nullptr,
                                want_lw ? lwf.data_ptr<float>() : nullptr, want_lb ? lbf.data_ptr<float>() : nullptr,
                                g};
    if (a_in_ln) {
      a = at::empty({M, K}, x.options());
      lp.a = a.data_ptr();
      lp.ln_b = cptr(ln_bias);
    }
    if (M * K > 0) {
      UMM_TOK_CALL(x, tokens_ln_scatter_bwd, lp, dt);
    } else {
      if (want_lw) lwf.zero_();
      if (want_lb) lbf.zero_();
    }
    if (want_lw) dlw = lwf.to(x.scalar_type());
    if (want_lb) dlb = lbf.to(x.scalar_type());
  }
  if (a_in_ln) dw = dpre.t().mm(a);
  return {dx, dlw, dlb, dw, db};
}

// ------------------------------------------------------------------------------------ expand_tokens
TokensGeom expand_geom(const Tensor& y, const Tensor& weight, int64_t H, int64_t W, int64_t f) {
  TORCH_CHECK(f >= 1, kWho, ": factor must be >= 1, got ", f);
  TORCH_CHECK(H >= 1 && W >= 1, kWho, ": grid_hw must be positive, got (", H, ", ", W, ")");
  TORCH_CHECK(H % f == 0 && W % f == 0, kWho, ": grid_hw (", H, ", ", W, ") must be divisible by factor ", f);
  const int64_t L = (H / f) * (W / f);
  TORCH_CHECK(y.dim() == 3 && y.size(1) == L, kWho, ": y must be (N, (H/f)*(W/f), C_in) with (H/f)*(W/f) = ", L,
              ", got shape ", y.sizes());
  TORCH_CHECK(y.is_contiguous(), kWho, ": y must be contiguous, got strides ", y.strides());
  check_same(weight, y, "weight", "y");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == y.size(2) && weight.size(0) % (f * f) == 0, kWho,
              ": weight must be (f*f*C, C_in) with C_in = ", y.size(2), " and f*f = ", f * f,
              " dividing its rows, got shape ", weight.sizes());
  return TokensGeom{y.size(0), H, W, f, weight.size(0) / (f * f)};
}

Tensor expand_tokens(const Tensor& y, const Tensor& weight, const OptT& bias, int64_t H, int64_t W, int64_t factor) {
  UMM_NO_AUTOCAST;
  const DType dt = dtype_code(y, "y", kWho);
  const TokensGeom g = expand_geom(y, weight, H, W, factor);
  const int64_t K = weight.size(0), M = coarse_rows(g), Ci = y.size(2);
  if (bias) {
    check_same(*bias, y, "bias", "y");
    check_shape(*bias, {K}, "bias");
  }
  c10::DeviceGuard guard(y.device());
  Tensor out = at::empty({g.N, H * W, g.C}, y.options());
  if (M * K == 0) return out;
#ifdef UMM_WITH_CUDA
  if (y.is_cuda()) {
    TokensGemmParams gp{y.data_ptr(), nullptr, nullptr, nullptr, nullptr, weight.data_ptr(), cptr(bias),
                        out.data_ptr(), nullptr, g, M, Ci, K, int(TokenAct::kNone), false, true};
    const int err = umm_cuda_tokens_gemm(&gp, int(dt), stream_of(y));
    if (err == 0) return out;
    TORCH_CHECK(err == umm_cuda_error_not_supported(), kWho, ": CUDA kernel tokens_gemm failed: ",
                umm_cuda_error_string(err));
  }
#endif
  // fp32: plain GEMM, bias added in the scatter pass.  bf16 / fp16: the bias goes into the GEMM (oneDNN adds it
  // to the fp32 accumulator: one rounding instead of two, and its epilogue is cheaper than converting in the
  // scatter), which is then a pure permutation.
  const bool bias_in_gemm = bias && y.scalar_type() != at::kFloat;
  Tensor z = bias_in_gemm ? bias->addmm(y.reshape({M, Ci}), weight.t()) : y.reshape({M, Ci}).mm(weight.t());
  TokensDepthScatterParams p{z.data_ptr(), bias_in_gemm ? nullptr : cptr(bias), out.data_ptr(), g};
  UMM_TOK_CALL(y, tokens_depth_scatter, p, dt);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> expand_tokens_backward(const Tensor& grad, const Tensor& y, const Tensor& weight,
                                                          int64_t H, int64_t W, int64_t factor,
                                                          std::array<bool, 3> mask) {
  UMM_NO_AUTOCAST;
  const DType dt = dtype_code(y, "y", kWho);
  const TokensGeom g = expand_geom(y, weight, H, W, factor);
  const int64_t K = weight.size(0), M = coarse_rows(g), Ci = y.size(2);
  check_same(grad, y, "grad", "y");
  check_shape(grad, {g.N, H * W, g.C}, "grad");
  c10::DeviceGuard guard(y.device());
  Tensor dz = at::empty({M, K}, y.options());
  const bool fuse_db = mask[2] && !y.is_cuda() && M * K > 0;  // the CPU gather sums the bias gradient on the way
  Tensor db32 = fuse_db ? at::empty({K}, y.options().dtype(at::kFloat)) : Tensor();
  TokensSpaceGatherParams p{grad.data_ptr(), dz.data_ptr(), g, fuse_db ? db32.data_ptr<float>() : nullptr};
  if (M * K > 0) UMM_TOK_CALL(y, tokens_space_gather, p, dt);
  auto e = [&] { return at::empty({0}, y.options()); };
  Tensor dy = mask[0] ? dz.mm(weight).reshape(y.sizes()) : e();
  Tensor dw = mask[1] ? dz.t().mm(y.reshape({M, Ci})) : e();
  Tensor db = mask[2] ? (fuse_db ? db32 : dz.sum({0}, false, at::kFloat)).to(y.scalar_type()) : e();
  return {dy, dw, db};
}

// ------------------------------------------------------------------------------------ latents
void check_latent_stats(const Tensor& t, int64_t n, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, kWho, ": ", name, " must be float32 (the public ops convert), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), kWho, ": ", name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, kWho, ": ", name, " must have shape (C*f*f,) = (", n, "), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), kWho, ": ", name, " must be contiguous");
}

Tensor run_latent(const Tensor& src, Tensor dst, const Tensor& scale, const OptT& shift, int64_t B, int64_t C,
                  int64_t H, int64_t W, int64_t f, bool to_tokens, DType dt) {
  Tensor sc = scale.contiguous();
  OptT sh = shift ? OptT(shift->contiguous()) : std::nullopt;
  LatentPackParams p{src.data_ptr(), dst.data_ptr(), sc.data_ptr<float>(), sh ? sh->data_ptr<float>() : nullptr,
                     B, C, H, W, f, to_tokens};
  if (dst.numel() > 0) UMM_TOK_CALL(src, latent_pack, p, dt);
  return dst;
}

void check_factor_grid(int64_t H, int64_t W, int64_t f) {
  TORCH_CHECK(f >= 1, kWho, ": factor must be >= 1, got ", f);
  TORCH_CHECK(H % f == 0 && W % f == 0, kWho, ": the latent grid (", H, ", ", W, ") must be divisible by factor ", f);
}

void check_latent_z(const Tensor& z, const char* name) {
  TORCH_CHECK(z.dim() == 4, kWho, ": ", name, " must be (B, C, H, W), got shape ", z.sizes());
  TORCH_CHECK(z.is_contiguous(), kWho, ": ", name, " must be contiguous, got strides ", z.strides());
}

void check_latent_tokens(const Tensor& t, int64_t H, int64_t W, int64_t f, const char* name) {
  check_factor_grid(H, W, f);
  TORCH_CHECK(t.dim() == 3 && t.size(1) == (H / f) * (W / f) && t.size(2) % (f * f) == 0, kWho, ": ", name,
              " must be (B, (H/f)*(W/f), C*f*f) with (H/f)*(W/f) = ", (H / f) * (W / f), " and f*f = ", f * f,
              ", got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kWho, ": ", name, " must be contiguous, got strides ", t.strides());
}

Tensor pack_latents(const Tensor& z, const Tensor& running_mean, const Tensor& running_var, int64_t factor,
                    double eps) {
  const DType dt = dtype_code(z, "z", kWho);
  check_latent_z(z, "z");
  const int64_t B = z.size(0), C = z.size(1), H = z.size(2), W = z.size(3), f = factor;
  check_factor_grid(H, W, f);
  check_latent_stats(running_mean, C * f * f, z, "running_mean");
  check_latent_stats(running_var, C * f * f, z, "running_var");
  c10::DeviceGuard guard(z.device());
  Tensor rstd = running_var.add(eps).rsqrt();
  Tensor shift = running_mean.mul(rstd).neg_();
  Tensor out = at::empty({B, (H / f) * (W / f), C * f * f}, z.options());
  return run_latent(z, out, rstd, shift, B, C, H, W, f, true, dt);
}

Tensor pack_latents_backward(const Tensor& grad, const Tensor& running_var, int64_t H, int64_t W, int64_t factor,
                             double eps) {
  const DType dt = dtype_code(grad, "grad", kWho);
  check_latent_tokens(grad, H, W, factor, "grad");
  const int64_t f = factor, B = grad.size(0), C = grad.size(2) / (f * f);
  check_latent_stats(running_var, C * f * f, grad, "running_var");
  c10::DeviceGuard guard(grad.device());
  Tensor out = at::empty({B, C, H, W}, grad.options());
  return run_latent(grad, out, running_var.add(eps).rsqrt(), std::nullopt, B, C, H, W, f, false, dt);
}

Tensor unpack_latents(const Tensor& tokens, const Tensor& running_mean, const Tensor& running_var, int64_t H,
                      int64_t W, int64_t factor, double eps) {
  const DType dt = dtype_code(tokens, "tokens", kWho);
  check_latent_tokens(tokens, H, W, factor, "tokens");
  const int64_t f = factor, B = tokens.size(0), C = tokens.size(2) / (f * f);
  check_latent_stats(running_mean, C * f * f, tokens, "running_mean");
  check_latent_stats(running_var, C * f * f, tokens, "running_var");
  c10::DeviceGuard guard(tokens.device());
  Tensor out = at::empty({B, C, H, W}, tokens.options());
  return run_latent(tokens, out, running_var.add(eps).sqrt(), running_mean, B, C, H, W, f, false, dt);
}

Tensor unpack_latents_backward(const Tensor& grad, const Tensor& running_var, int64_t factor, double eps) {
  const DType dt = dtype_code(grad, "grad", kWho);
  check_latent_z(grad, "grad");
  const int64_t B = grad.size(0), C = grad.size(1), H = grad.size(2), W = grad.size(3), f = factor;
  check_factor_grid(H, W, f);
  check_latent_stats(running_var, C * f * f, grad, "running_var");
  c10::DeviceGuard guard(grad.device());
  Tensor out = at::empty({B, (H / f) * (W / f), C * f * f}, grad.options());
  return run_latent(grad, out, running_var.add(eps).sqrt(), std::nullopt, B, C, H, W, f, true, dt);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(umm_ops, m) {
  m.def("kernel_compress_tokens(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, Tensor? bias, "
        "int H, int W, int factor, str activation, float eps, bool save_pre) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("kernel_compress_tokens_backward(Tensor grad, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, "
        "Tensor? bias, Tensor pre, Tensor mean, Tensor rstd, int H, int W, int factor, str activation, float eps, "
        "bool[5] mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("kernel_expand_tokens(Tensor y, Tensor weight, Tensor? bias, int H, int W, int factor) -> Tensor");
  m.def("kernel_expand_tokens_backward(Tensor grad, Tensor y, Tensor weight, int H, int W, int factor, "
        "bool[3] mask) -> (Tensor, Tensor, Tensor)");
  m.def("kernel_pack_latents(Tensor z, Tensor running_mean, Tensor running_var, int factor, float eps) -> Tensor");
  m.def("kernel_pack_latents_backward(Tensor grad, Tensor running_var, int H, int W, int factor, float eps) "
        "-> Tensor");
  m.def("kernel_unpack_latents(Tensor tokens, Tensor running_mean, Tensor running_var, int H, int W, int factor, "
        "float eps) -> Tensor");
  m.def("kernel_unpack_latents_backward(Tensor grad, Tensor running_var, int factor, float eps) -> Tensor");
}

#define UMM_TOKENS_IMPLS(m)                                               \
  m.impl("kernel_compress_tokens", &compress_tokens);                     \
  m.impl("kernel_compress_tokens_backward", &compress_tokens_backward);   \
  m.impl("kernel_expand_tokens", &expand_tokens);                         \
  m.impl("kernel_expand_tokens_backward", &expand_tokens_backward);       \
  m.impl("kernel_pack_latents", &pack_latents);                           \
  m.impl("kernel_pack_latents_backward", &pack_latents_backward);         \
  m.impl("kernel_unpack_latents", &unpack_latents);                       \
  m.impl("kernel_unpack_latents_backward", &unpack_latents_backward);

TORCH_LIBRARY_IMPL(umm_ops, CPU, m) { UMM_TOKENS_IMPLS(m) }
#ifdef UMM_WITH_CUDA
TORCH_LIBRARY_IMPL(umm_ops, CUDA, m) { UMM_TOKENS_IMPLS(m) }
#endif

}  // namespace umm::torch_ops
