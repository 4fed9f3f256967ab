// Torch-facing side of the LM-head ops (umm/lm_head.h): kernel op schemas, input checks, the chunk loop and its
// GEMMs (at::mm: MKL / oneDNN), the calls of the fused row pass (csrc/cpu/lm_head.cpp).
//
// Per block of R rows (R = chunk_rows, or ~64 MB of logits' worth of rows, at least 512): z = h_blk W^T (+ b) into one
// reused (R, V) workspace in the activation dtype (the GEMM's output dtype, as eager's logits); the row pass; then,
// when gradients are wanted, dh_blk = dz W straight into dh, dW += dz^T h_blk (float32 accumulation across
// blocks: in place for float32, a block product added into a float32 buffer for 16-bit weights), db += the
// column sums of dz.  The full (N, V) logits never exist: the workspace is R x V.
//   linear_cross_entropy, reduction "sum" / "mean": the gradients come out of the forward (3 GEMMs per block, as
//     eager's logits / dh / dW), the backward scales them by the upstream scalar (Python, umm_ops/ops/lm_head.py).
//   reduction "none" and linear_logprob: the backward runs the same loop with the saved lse (4 GEMMs in all).
// Deterministic: the block size depends on the shapes only, rows are independent, the column sums and the
// block-by-block accumulations run in a fixed order.
#include <ATen/DeviceAccelerator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "cpu/kernels.h"
#include "torch/checks.h"
#include "umm/lm_head.h"
#ifdef UMM_WITH_CUDA
#include "umm/cuda_api.h"
#endif

namespace umm::torch_ops {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;
constexpr const char* kWho = "umm_ops.lm_head";
// Automatic block: ~64 MB of logits in the activation dtype (16M float32 / 32M bf16 logits: 16-bit blocks hold twice
// the rows, since each block costs a fixed ~50 ms of row pass and weight-gradient accumulation that the fast bf16
// GEMMs do not hide: 0.96 vs 1.09 s at 2048 x 512 x 32768), but never fewer than 512 rows: MKL / oneDNN re-pack the
// whole weight for every GEMM call, which cost +37% at 110 rows per call (D = 1536, V = 151,936: the 16M rule
// alone), +8% at 256 and nothing measurable at 512 (bench/NOTES.md, LM head).
constexpr int64_t kChunkBytes = int64_t(1) << 26;
constexpr int64_t kMinChunkRows = 512;

#ifdef UMM_WITH_CUDA
void* stream_of(const Tensor& t) { return at::accelerator::getCurrentStream(t.device().index()).native_handle(); }
void cuda_check(int err, const char* what) {
  TORCH_CHECK(err == 0, kWho, ": CUDA kernel ", what, " failed: ", umm_cuda_error_string(err));
}
#define UMM_LM_CALL(DEVT, NAME, P, DT)                                   \
  do {                                                                   \
    if ((DEVT).is_cuda()) {                                              \
      cuda_check(umm_cuda_##NAME(&(P), int(DT), stream_of(DEVT)), #NAME); \
    } else {                                                             \
      ::umm::cpu::NAME((P), (DT));                                       \
    }                                                                    \
  } while (0)
#else
#define UMM_LM_CALL(DEVT, NAME, P, DT)                                                          \
  do {                                                                                         \
    TORCH_CHECK(!(DEVT).is_cuda(), kWho, ": this build has no CUDA kernels (rebuild with nvcc)"); \
    ::umm::cpu::NAME((P), (DT));                                                               \
  } while (0)
#endif

void check_same(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), kWho, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), kWho, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), kWho, ": ", name, " must be contiguous (the public ops make it so), got strides ",
              t.strides());
}

void check_stat(const Tensor& t, int64_t n, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, kWho, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), kWho, ": ", name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, kWho, ": ", name, " must have shape (", n, ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kWho, ": ", name, " must be contiguous");
}

struct Head {
  int64_t N, D, V;
  DType dt;
};

// hidden (N, D), weight (V, D), bias (V,)?, targets (N,) int64 with every value in [0, V) (or ignore_index when
// has_ignore).  The targets are read on the CPU: the row pass indexes with them.
Head check_head(const Tensor& hidden, const Tensor& weight, const OptT& bias, const Tensor& targets, bool has_ignore,
                int64_t ignore_index) {
  Head h{};
  h.dt = dtype_code(hidden, "hidden", kWho);
  TORCH_CHECK(hidden.dim() == 2, kWho, ": hidden must be (N, D), got shape ", hidden.sizes());
  TORCH_CHECK(hidden.is_contiguous(), kWho, ": hidden must be contiguous, got strides ", hidden.strides());
  check_same(weight, hidden, "weight", "hidden");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.size(0) >= 1, kWho,
              ": weight must be (V, D) with D = ", hidden.size(1), " and V >= 1, got shape ", weight.sizes());
  h.N = hidden.size(0);
  h.D = hidden.size(1);
  h.V = weight.size(0);
  if (bias) {
    check_same(*bias, hidden, "bias", "hidden");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == h.V, kWho, ": bias must have shape (", h.V, ",), got ",
                bias->sizes());
  }
  TORCH_CHECK(targets.scalar_type() == at::kLong, kWho, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.device() == hidden.device(), kWho, ": targets must be on ", hidden.device(), ", got ",
              targets.device());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == h.N && targets.is_contiguous(), kWho,
              ": targets must be a contiguous (N,) = (", h.N, ",) tensor, got shape ", targets.sizes());
  if (!targets.is_cuda()) {  // CUDA: no host read (the kernel gives an out-of-range target no target term)
    const int64_t* tp = targets.data_ptr<int64_t>();
    for (int64_t i = 0; i < h.N; ++i) {
      const int64_t t = tp[i];
      TORCH_CHECK((t >= 0 && t < h.V) || (has_ignore && t == ignore_index), kWho, ": targets[", i, "] = ", t,
                  " is outside [0, ", h.V, ")", has_ignore ? " and is not ignore_index" : "");
    }
  }
  return h;
}

int64_t block_rows(const Head& h, int64_t chunk_rows) {
  TORCH_CHECK(chunk_rows >= 0, kWho, ": chunk_rows must be >= 0 (0: automatic), got ", chunk_rows);
  const int64_t elem = h.dt == DType::kFloat32 ? 4 : 2;
  const int64_t r = chunk_rows > 0 ? chunk_rows : std::max<int64_t>(kMinChunkRows, kChunkBytes / (h.V * elem));
  return std::max<int64_t>(1, std::min(r, h.N));
}

struct Grads {
  Tensor dh, dw, db;
};

// The chunk loop.  `base` carries the op's parameters and per-row pointers for row 0 (they are offset per block);
// want[3]: gradients of hidden / weight / bias to compute (when the pass writes dz: base.backward or
// base.fused_grad).
Grads run_blocks(const Tensor& hidden, const Tensor& weight, const OptT& bias, const Tensor& targets, const Head& h,
                 LmHeadRowsParams base, std::array<bool, 3> want, int64_t chunk_rows) {
  const bool grads = want[0] || want[1] || want[2];
  const bool f32 = hidden.scalar_type() == at::kFloat;
  auto e = [&] { return at::empty({0}, hidden.options()); };
  Grads g{e(), e(), e()};
  if (want[0]) g.dh = at::empty({h.N, h.D}, hidden.options());
  Tensor dw32, db32;
  if (want[1]) dw32 = at::zeros({h.V, h.D}, hidden.options().dtype(at::kFloat));
  if (want[2]) db32 = at::zeros({h.V}, hidden.options().dtype(at::kFloat));
  if (h.N > 0) {
    const int64_t R = block_rows(h, chunk_rows);
    Tensor work = at::empty({R, h.V}, hidden.options());
    const Tensor wt = weight.t();
    for (int64_t r0 = 0; r0 < h.N; r0 += R) {
      const int64_t r = std::min(R, h.N - r0);
      Tensor hb = hidden.narrow(0, r0, r);
      Tensor zb = work.narrow(0, 0, r);
      if (bias) {
        at::addmm_out(zb, *bias, hb, wt);
      } else {
        at::mm_out(zb, hb, wt);
      }
      LmHeadRowsParams p = base;
      p.z = zb.data_ptr();
      p.rows = r;
      p.V = h.V;
      p.targets = targets.data_ptr<int64_t>() + r0;
      p.lse += r0;
      if (p.out) p.out += r0;
      if (p.entropy) p.entropy += r0;
      if (p.grad) p.grad += r0;
      if (p.grad_entropy) p.grad_entropy += r0;
      UMM_LM_CALL(hidden, lm_head_rows, p, h.dt);
      if (!grads) continue;
      if (want[0]) {
        Tensor dhb = g.dh.narrow(0, r0, r);
        at::mm_out(dhb, zb, weight);
      }
      if (want[1]) {
        if (f32) {
          dw32.addmm_(zb.t(), hb);
        } else {
          dw32.add_(at::mm(zb.t(), hb));  // the block's product in the 16-bit dtype, summed in float32
        }
      }
      if (want[2]) {
        LmHeadColsumParams cp{zb.data_ptr(), r, h.V, db32.data_ptr<float>()};
        UMM_LM_CALL(hidden, lm_head_colsum, cp, h.dt);
      }
    }
  }
  if (want[1]) g.dw = f32 ? dw32 : dw32.to(hidden.scalar_type());
  if (want[2]) g.db = db32.to(hidden.scalar_type());
  return g;
}

// ------------------------------------------------------------------------------------ linear_cross_entropy
int reduction_code(const std::string& r) {
  if (r == "none") return 0;
  if (r == "sum") return 1;
  if (r == "mean") return 2;
  TORCH_CHECK(false, kWho, ": reduction must be one of ('mean', 'sum', 'none'), got '", r, "'");
}

LmHeadRowsParams ce_params(const Tensor& lse, double label_smoothing, double z_loss, double softcap,
                           int64_t ignore_index) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, kWho, ": label_smoothing must lie in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(z_loss >= 0.0 && std::isfinite(z_loss), kWho, ": z_loss must be a finite number >= 0, got ", z_loss);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), kWho, ": softcap must be a finite number >= 0 (0: none), got ",
              softcap);
  LmHeadRowsParams p{};
  p.ignore_index = ignore_index;
  p.loss = int(LmHeadLoss::kCrossEntropy);
  p.scale = 1.f;
  p.softcap = float(softcap);
  p.label_smoothing = float(label_smoothing);
  p.z_loss = float(z_loss);
  p.lse = lse.data_ptr<float>();
  return p;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_cross_entropy(
    const Tensor& hidden, const Tensor& weight, const OptT& bias, const Tensor& targets, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, std::string reduction, std::array<bool, 3> grad_mask,
    int64_t chunk_rows) {
  UMM_NO_AUTOCAST;
  const int red = reduction_code(reduction);
  const Head h = check_head(hidden, weight, bias, targets, true, ignore_index);
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor rows = at::empty({h.N}, f32), lse = at::empty({h.N}, f32);
  LmHeadRowsParams p = ce_params(lse, label_smoothing, z_loss, softcap, ignore_index);
  p.out = rows.data_ptr<float>();
  c10::DeviceGuard guard(hidden.device());
  int64_t n_valid = 0;
  if (targets.is_cuda()) {
    n_valid = targets.ne(ignore_index).sum().item<int64_t>();  // one sync (the mean's scale of the fused gradient)
  } else {
    const int64_t* tp = targets.data_ptr<int64_t>();
    for (int64_t i = 0; i < h.N; ++i) n_valid += tp[i] != ignore_index;
  }
  const std::array<bool, 3> want{red != 0 && grad_mask[0], red != 0 && grad_mask[1],
                                 red != 0 && grad_mask[2] && bias.has_value()};
  p.fused_grad = want[0] || want[1] || want[2];
  if (p.fused_grad) p.grad_scale = red == 1 ? 1.f : (n_valid > 0 ? 1.f / float(n_valid) : 0.f);
  Grads g = run_blocks(hidden, weight, bias, targets, h, p, want, chunk_rows);
  Tensor loss = rows;
  if (red != 0 && hidden.is_cuda()) {
    loss = rows.sum(at::kDouble);  // 0 / 0 = nan without a labelled row, as F.cross_entropy
    loss = (red == 1 ? loss : loss.div(double(n_valid))).to(at::kFloat);
  } else if (red != 0) {
    double s = 0.0;  // in row order, in double: no dependence on the thread count
    const float* rp = rows.data_ptr<float>();
    for (int64_t i = 0; i < h.N; ++i) s += rp[i];
    const double v = red == 1 ? s : s / double(n_valid);  // 0 / 0 = nan without a labelled row, as F.cross_entropy
    loss = at::scalar_tensor(v, f32);
  }
  return {loss, lse, g.dh, g.dw, g.db};
}

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_backward(
    const Tensor& grad, const Tensor& hidden, const Tensor& weight, const OptT& bias, const Tensor& targets,
    const Tensor& lse, int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    std::array<bool, 3> mask, int64_t chunk_rows) {
  UMM_NO_AUTOCAST;
  const Head h = check_head(hidden, weight, bias, targets, true, ignore_index);
  check_stat(grad, h.N, hidden, "grad");
  check_stat(lse, h.N, hidden, "lse");
  c10::DeviceGuard guard(hidden.device());
  Tensor lse_c = lse;  // read only
  LmHeadRowsParams p = ce_params(lse_c, label_smoothing, z_loss, softcap, ignore_index);
  p.backward = true;
  p.grad = grad.data_ptr<float>();
  Grads g = run_blocks(hidden, weight, bias, targets, h, p, {mask[0], mask[1], mask[2] && bias.has_value()},
                       chunk_rows);
  return {g.dh, g.dw, g.db};
}

// ------------------------------------------------------------------------------------ linear_logprob
LmHeadRowsParams lp_params(const Tensor& lse, double temperature) {
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), kWho, ": temperature must be a finite number > 0, got ",
              temperature);
  LmHeadRowsParams p{};
  p.loss = int(LmHeadLoss::kLogprob);
  p.ignore_index = std::numeric_limits<int64_t>::min();
  p.scale = float(1.0 / temperature);
  p.lse = lse.data_ptr<float>();
  return p;
}

std::tuple<Tensor, Tensor, Tensor> linear_logprob(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                                  double temperature, bool want_entropy, int64_t chunk_rows) {
  UMM_NO_AUTOCAST;
  const Head h = check_head(hidden, weight, std::nullopt, targets, false, 0);
  c10::DeviceGuard guard(hidden.device());
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor lp = at::empty({h.N}, f32), lse = at::empty({h.N}, f32);
  Tensor ent = at::empty({want_entropy ? h.N : 0}, f32);
  LmHeadRowsParams p = lp_params(lse, temperature);
  p.out = lp.data_ptr<float>();
  p.entropy = want_entropy ? ent.data_ptr<float>() : nullptr;
  run_blocks(hidden, weight, std::nullopt, targets, h, p, {false, false, false}, chunk_rows);
  return {lp, ent, lse};
}

std::tuple<Tensor, Tensor> linear_logprob_backward(const Tensor& grad_logprob, const Tensor& grad_entropy,
                                                   const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                                   const Tensor& lse, const Tensor& entropy, double temperature,
                                                   std::array<bool, 2> mask, int64_t chunk_rows) {
  UMM_NO_AUTOCAST;
  const Head h = check_head(hidden, weight, std::nullopt, targets, false, 0);
  check_stat(grad_logprob, h.N, hidden, "grad_logprob");
  check_stat(lse, h.N, hidden, "lse");
  const bool with_entropy = grad_entropy.numel() > 0;
  if (with_entropy) {
    check_stat(grad_entropy, h.N, hidden, "grad_entropy");
    check_stat(entropy, h.N, hidden, "entropy");
  }
  c10::DeviceGuard guard(hidden.device());
  Tensor lse_c = lse;
  LmHeadRowsParams p = lp_params(lse_c, temperature);
  p.backward = true;
  p.grad = grad_logprob.data_ptr<float>();
  if (with_entropy) {
    p.grad_entropy = grad_entropy.data_ptr<float>();
    p.entropy = entropy.data_ptr<float>();
  }
  Grads g = run_blocks(hidden, weight, std::nullopt, targets, h, p, {mask[0], mask[1], false}, chunk_rows);
  return {g.dh, g.dw};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(umm_ops, m) {
  m.def("kernel_linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, int ignore_index, "
        "float label_smoothing, float z_loss, float softcap, str reduction, bool[3] grad_mask, int chunk_rows) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("kernel_linear_cross_entropy_backward(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, "
        "Tensor targets, Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap, "
        "bool[3] mask, int chunk_rows) -> (Tensor, Tensor, Tensor)");
  m.def("kernel_linear_logprob(Tensor hidden, Tensor weight, Tensor targets, float temperature, bool want_entropy, "
        "int chunk_rows) -> (Tensor, Tensor, Tensor)");
  m.def("kernel_linear_logprob_backward(Tensor grad_logprob, Tensor grad_entropy, Tensor hidden, Tensor weight, "
        "Tensor targets, Tensor lse, Tensor entropy, float temperature, bool[2] mask, int chunk_rows) "
        "-> (Tensor, Tensor)");
}

#define UMM_LM_HEAD_IMPLS(m)                                                     \
  m.impl("kernel_linear_cross_entropy", &linear_cross_entropy);                  \
  m.impl("kernel_linear_cross_entropy_backward", &linear_cross_entropy_backward); \
  m.impl("kernel_linear_logprob", &linear_logprob);                              \
  m.impl("kernel_linear_logprob_backward", &linear_logprob_backward);

TORCH_LIBRARY_IMPL(umm_ops, CPU, m) { UMM_LM_HEAD_IMPLS(m) }
#ifdef UMM_WITH_CUDA
// compiled, never run (no GPU where it was written): tests/test_lm_head.py checks it when a GPU is present
TORCH_LIBRARY_IMPL(umm_ops, CUDA, m) { UMM_LM_HEAD_IMPLS(m) }
#endif

}  // namespace umm::torch_ops
