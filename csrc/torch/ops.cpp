// The only translation unit family that includes torch: op schemas (TORCH_LIBRARY(umm_ops)), input checks,
// and the CPU / CUDA implementations that fill the params structs of umm/params.h and call the kernels.
//
// These "kernel_*" ops are the contract of umm_ops/reference/kernels.py; the public ops (umm_ops.ops) add
// autograd, fake kernels and backend selection on top.  CUDA kernels are reached through the torch-free
// C interface of umm/cuda_api.h with the current stream taken from the device-generic accelerator API, so
// this file compiles against a CPU-only torch.
#include <ATen/DeviceAccelerator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>

#include "cpu/kernels.h"
#include "torch/checks.h"
#include "umm/params.h"
#ifdef UMM_WITH_CUDA
#include "umm/cuda_api.h"
#endif

namespace umm::torch_ops {
namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

void check_like(const Tensor& t, const Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "umm_ops: ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "umm_ops: ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

void check_contig(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "umm_ops: ", name, " must be contiguous (the public ops make it so), got strides ",
              t.strides());
}

void check_shape(const Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "umm_ops: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// (B,) float32 per-sample scalars on the device of `ref`.
void check_per_sample(const Tensor& t, int64_t B, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "umm_ops: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "umm_ops: ", name, " must be on ", ref.device(), ", got ", t.device());
  check_shape(t, {B}, name);
  check_contig(t, name);
}

// (B, C) modulation with unit column stride; returns the row stride.
int64_t check_modulation(const Tensor& t, int64_t B, int64_t C, const Tensor& ref, const char* name) {
  check_like(t, ref, name, "x");
  check_shape(t, {B, C}, name);
  TORCH_CHECK(C <= 1 || t.stride(1) == 1, "umm_ops: ", name, " must have unit stride along its last dim, got strides ",
              t.strides());
  TORCH_CHECK(B <= 1 || t.stride(0) >= C, "umm_ops: ", name, " rows must not overlap (row stride >= ", C, "), got ",
              t.stride(0));
  return B <= 1 ? C : t.stride(0);
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.numel() ? static_cast<T*>(t.data_ptr()) : nullptr;
}
const void* cptr(const OptT& t) { return t.has_value() ? t->data_ptr() : nullptr; }
const float* fptr(const OptT& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

Tensor empty0(const Tensor& like) { return at::empty({0}, like.options()); }
Tensor maybe_empty_like(bool want, const Tensor& like) { return want ? at::empty_like(like) : empty0(like); }
Tensor f32_empty(at::IntArrayRef shape, const Tensor& like) {
  return at::empty(shape, like.options().dtype(at::kFloat));
}

#ifdef UMM_WITH_CUDA
void* stream_of(const Tensor& t) { return at::accelerator::getCurrentStream(t.device().index()).native_handle(); }
void cuda_check(int err, const char* what) {
  TORCH_CHECK(err == 0, "umm_ops: CUDA kernel ", what, " failed: ", umm_cuda_error_string(err));
}
#define UMM_CALL(DEVT, NAME, P, DT)                                               \
  do {                                                                            \
    if ((DEVT).is_cuda()) {                                                       \
      cuda_check(umm_cuda_##NAME(&(P), int(DT), stream_of(DEVT)), #NAME);         \
    } else {                                                                      \
      ::umm::cpu::NAME((P), (DT));                                                \
    }                                                                             \
  } while (0)
#else
#define UMM_CALL(DEVT, NAME, P, DT)                                                              \
  do {                                                                                           \
    TORCH_CHECK(!(DEVT).is_cuda(), "umm_ops: this build has no CUDA kernels (rebuild with nvcc)"); \
    ::umm::cpu::NAME((P), (DT));                                                                 \
  } while (0)
#endif

Tensor workspace(const Tensor& like, int64_t elems) {
  return at::empty({std::max<int64_t>(elems, 1)}, like.options().dtype(at::kFloat));
}

// ------------------------------------------------------------------------------------------ flow
void check_flow_pair(const Tensor& a, const Tensor& x, const char* name) {
  check_like(a, x, name, "x");
  check_shape(a, x.sizes(), name);
  check_contig(a, name);
}

void check_flow_x(const Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "umm_ops: x must be (B, N), got shape ", x.sizes());
  check_contig(x, "x");
}

std::tuple<Tensor, Tensor> flow_step(const Tensor& x, const Tensor& v, const OptT& noise, const Tensor& t,
                                     const Tensor& t_next, const OptT& sigma, bool want_logprob) {
  check_flow_x(x);
  const DType dt = dtype_code(x, "x");
  check_flow_pair(v, x, "v");
  const int64_t B = x.size(0), N = x.size(1);
  check_per_sample(t, B, x, "t");
  check_per_sample(t_next, B, x, "t_next");
  if (noise) check_flow_pair(*noise, x, "noise");
  if (sigma) check_per_sample(*sigma, B, x, "sigma");
  TORCH_CHECK(!want_logprob || (noise && sigma), "umm_ops: the log-prob needs noise and sigma (an SDE step)");
  c10::DeviceGuard guard(x.device());
  Tensor out = at::empty_like(x);
  Tensor lp = want_logprob ? f32_empty({B}, x) : f32_empty({0}, x);
  FlowStepParams p{x.data_ptr(), v.data_ptr(), cptr(noise), t.data_ptr<float>(), t_next.data_ptr<float>(),
                   fptr(sigma), out.data_ptr(), want_logprob ? lp.data_ptr<float>() : nullptr, B, N};
  if (B > 0) UMM_CALL(x, flow_step, p, dt);
  return {out, lp};
}

std::tuple<Tensor, Tensor, Tensor> flow_step_backward(const Tensor& grad, const Tensor& t, const Tensor& t_next,
                                                      const OptT& sigma, std::array<bool, 3> mask) {
  check_flow_x(grad);
  const DType dt = dtype_code(grad, "grad");
  const int64_t B = grad.size(0), N = grad.size(1);
  check_per_sample(t, B, grad, "t");
  check_per_sample(t_next, B, grad, "t_next");
  if (sigma) check_per_sample(*sigma, B, grad, "sigma");
  c10::DeviceGuard guard(grad.device());
  Tensor dx = maybe_empty_like(mask[0], grad), dv = maybe_empty_like(mask[1], grad),
         dz = maybe_empty_like(mask[2], grad);
  FlowStepBwdParams p{grad.data_ptr(), t.data_ptr<float>(), t_next.data_ptr<float>(), fptr(sigma),
                      mask[0] ? dx.data_ptr() : nullptr, mask[1] ? dv.data_ptr() : nullptr,
                      mask[2] ? dz.data_ptr() : nullptr, B, N};
  if (B > 0) UMM_CALL(grad, flow_step_bwd, p, dt);
  return {dx, dv, dz};
}

Tensor flow_logprob(const Tensor& x, const Tensor& x_next, const Tensor& v, const Tensor& t, const Tensor& t_next,
                    const Tensor& sigma) {
  check_flow_x(x);
  const DType dt = dtype_code(x, "x");
  check_flow_pair(x_next, x, "x_next");
  check_flow_pair(v, x, "v");
  const int64_t B = x.size(0), N = x.size(1);
  check_per_sample(t, B, x, "t");
  check_per_sample(t_next, B, x, "t_next");
  check_per_sample(sigma, B, x, "sigma");
  c10::DeviceGuard guard(x.device());
  Tensor lp = f32_empty({B}, x);
  FlowLogprobParams p{x.data_ptr(), x_next.data_ptr(), v.data_ptr(), t.data_ptr<float>(), t_next.data_ptr<float>(),
                      sigma.data_ptr<float>(), lp.data_ptr<float>(), B, N};
  if (B > 0) UMM_CALL(x, flow_logprob, p, dt);
  return lp;
}

std::tuple<Tensor, Tensor, Tensor> flow_logprob_backward(const Tensor& grad, const Tensor& x, const Tensor& x_next,
                                                         const Tensor& v, const Tensor& t, const Tensor& t_next,
                                                         const Tensor& sigma, std::array<bool, 3> mask) {
  check_flow_x(x);
  const DType dt = dtype_code(x, "x");
  check_flow_pair(x_next, x, "x_next");
  check_flow_pair(v, x, "v");
  const int64_t B = x.size(0), N = x.size(1);
  check_per_sample(grad, B, x, "grad");
  check_per_sample(t, B, x, "t");
  check_per_sample(t_next, B, x, "t_next");
  check_per_sample(sigma, B, x, "sigma");
  c10::DeviceGuard guard(x.device());
  Tensor dx = maybe_empty_like(mask[0], x), dxn = maybe_empty_like(mask[1], x), dv = maybe_empty_like(mask[2], x);
  FlowLogprobBwdParams p{grad.data_ptr<float>(), x.data_ptr(), x_next.data_ptr(), v.data_ptr(), t.data_ptr<float>(),
                         t_next.data_ptr<float>(), sigma.data_ptr<float>(), mask[0] ? dx.data_ptr() : nullptr,
                         mask[1] ? dxn.data_ptr() : nullptr, mask[2] ? dv.data_ptr() : nullptr, B, N};
  if (B > 0) UMM_CALL(x, flow_logprob_bwd, p, dt);
  return {dx, dxn, dv};
}

Tensor flow_kl(const Tensor& v, const Tensor& v_ref, const Tensor& t, const Tensor& t_next, const Tensor& sigma) {
  check_flow_x(v);
  const DType dt = dtype_code(v, "v");
  check_flow_pair(v_ref, v, "v_ref");
  const int64_t B = v.size(0), N = v.size(1);
  check_per_sample(t, B, v, "t");
  check_per_sample(t_next, B, v, "t_next");
  check_per_sample(sigma, B, v, "sigma");
  c10::DeviceGuard guard(v.device());
  Tensor kl = f32_empty({B}, v);
  FlowKlParams p{v.data_ptr(), v_ref.data_ptr(), t.data_ptr<float>(), t_next.data_ptr<float>(),
                 sigma.data_ptr<float>(), kl.data_ptr<float>(), B, N};
  if (B > 0) UMM_CALL(v, flow_kl, p, dt);
  return kl;
}

std::tuple<Tensor, Tensor> flow_kl_backward(const Tensor& grad, const Tensor& v, const Tensor& v_ref, const Tensor& t,
                                            const Tensor& t_next, const Tensor& sigma, std::array<bool, 2> mask) {
  check_flow_x(v);
  const DType dt = dtype_code(v, "v");
  check_flow_pair(v_ref, v, "v_ref");
  const int64_t B = v.size(0), N = v.size(1);
  check_per_sample(grad, B, v, "grad");
  check_per_sample(t, B, v, "t");
  check_per_sample(t_next, B, v, "t_next");
  check_per_sample(sigma, B, v, "sigma");
  c10::DeviceGuard guard(v.device());
  Tensor dv = maybe_empty_like(mask[0], v), dvr = maybe_empty_like(mask[1], v);
  FlowKlBwdParams p{grad.data_ptr<float>(), v.data_ptr(), v_ref.data_ptr(), t.data_ptr<float>(),
                    t_next.data_ptr<float>(), sigma.data_ptr<float>(), mask[0] ? dv.data_ptr() : nullptr,
                    mask[1] ? dvr.data_ptr() : nullptr, B, N};
  if (B > 0) UMM_CALL(v, flow_kl_bwd, p, dt);
  return {dv, dvr};
}

// ------------------------------------------------------------------------------------------ norms
void check_param(const Tensor& t, int64_t n, const Tensor& ref, const char* name) {
  check_like(t, ref, name, "the activations");
  check_shape(t, {n}, name);
  check_contig(t, name);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_detail_residual(const Tensor& low, const Tensor& high,
                                                                 const Tensor& gate_hidden, const Tensor& w_gate,
                                                                 const Tensor& b_gate, const Tensor& ln_weight,
                                                                 const Tensor& ln_bias, double eps) {
  TORCH_CHECK(low.dim() == 2, "umm_ops: low must be (N, C), got shape ", low.sizes());
  const DType dt = dtype_code(low, "low");
  check_contig(low, "low");
  const int64_t N = low.size(0), C = low.size(1);
  check_like(high, low, "high", "low");
  check_shape(high, low.sizes(), "high");
  check_contig(high, "high");
  check_like(gate_hidden, low, "gate_hidden", "low");
  TORCH_CHECK(gate_hidden.dim() == 2 && gate_hidden.size(0) == N,
              "umm_ops: gate_hidden must be (N, Dg) with N = ", N, ", got shape ", gate_hidden.sizes());
  check_contig(gate_hidden, "gate_hidden");
  const int64_t Dg = gate_hidden.size(1);
  check_param(w_gate, Dg, low, "w_gate");
  check_param(b_gate, 1, low, "b_gate");
  check_param(ln_weight, C, low, "ln_weight");
  check_param(ln_bias, C, low, "ln_bias");
  c10::DeviceGuard guard(low.device());
  Tensor out = at::empty_like(low);
  Tensor g = f32_empty({N}, low), mean = f32_empty({N}, low), rstd = f32_empty({N}, low);
  GatedDetailParams p{low.data_ptr(), high.data_ptr(), gate_hidden.data_ptr(), w_gate.data_ptr(), b_gate.data_ptr(),
                      ln_weight.data_ptr(), ln_bias.data_ptr(), out.data_ptr(), g.data_ptr<float>(),
                      mean.data_ptr<float>(), rstd.data_ptr<float>(), N, C, Dg, float(eps)};
  if (N > 0) UMM_CALL(low, gated_detail, p, dt);
  return {out, g, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_detail_residual_backward(
    const Tensor& grad, const Tensor& low, const Tensor& high, const Tensor& gate_hidden, const Tensor& w_gate,
    const Tensor& ln_weight, const Tensor& gate, const Tensor& mean, const Tensor& rstd, double eps) {
  TORCH_CHECK(low.dim() == 2, "umm_ops: low must be (N, C), got shape ", low.sizes());
  const DType dt = dtype_code(low, "low");
  const int64_t N = low.size(0), C = low.size(1);
  for (auto [t, name] : {std::pair{&grad, "grad"}, std::pair{&high, "high"}}) {
    check_like(*t, low, name, "low");
    check_shape(*t, low.sizes(), name);
    check_contig(*t, name);
  }
  check_contig(low, "low");
  check_like(gate_hidden, low, "gate_hidden", "low");
  TORCH_CHECK(gate_hidden.dim() == 2 && gate_hidden.size(0) == N, "umm_ops: gate_hidden must be (N, Dg), got ",
              gate_hidden.sizes());
  check_contig(gate_hidden, "gate_hidden");
  const int64_t Dg = gate_hidden.size(1);
  check_param(w_gate, Dg, low, "w_gate");
  check_param(ln_weight, C, low, "ln_weight");
  check_per_sample(gate, N, low, "gate");
  check_per_sample(mean, N, low, "mean");
  check_per_sample(rstd, N, low, "rstd");
  c10::DeviceGuard guard(low.device());
  Tensor dlow = at::empty_like(low), dhigh = at::empty_like(high), dgh = at::empty_like(gate_hidden);
  Tensor dw = at::zeros({Dg}, low.options().dtype(at::kFloat)), db = at::zeros({1}, low.options().dtype(at::kFloat));
  Tensor dlw = at::zeros({C}, low.options().dtype(at::kFloat)), dlb = at::zeros({C}, low.options().dtype(at::kFloat));
  int64_t ws_elems = 0;
#ifdef UMM_WITH_CUDA
  if (low.is_cuda()) ws_elems = umm_cuda_gated_detail_bwd_workspace(N, C, Dg);
#endif
  Tensor ws = workspace(low, ws_elems);
  GatedDetailBwdParams p{grad.data_ptr(), low.data_ptr(), high.data_ptr(), gate_hidden.data_ptr(), w_gate.data_ptr(),
                         ln_weight.data_ptr(), gate.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                         dlow.data_ptr(), dhigh.data_ptr(), dgh.data_ptr(), dw.data_ptr<float>(), db.data_ptr<float>(),
                         dlw.data_ptr<float>(), dlb.data_ptr<float>(), ws.data_ptr<float>(), ws_elems, N, C, Dg};
  if (N > 0) UMM_CALL(low, gated_detail_bwd, p, dt);
  const auto pd = w_gate.scalar_type();
  return {dlow, dhigh, dgh, dw.to(pd), db.to(pd), dlw.to(pd), dlb.to(pd)};
}

void check_x3(const Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, "umm_ops: ", name, " must be (B, L, C), got shape ", x.sizes());
  check_contig(x, name);
}

std::tuple<Tensor, Tensor, Tensor> adaln_modulate(const Tensor& x, const Tensor& shift, const Tensor& scale,
                                                  const OptT& weight, const OptT& bias, double eps, bool rms) {
  check_x3(x, "x");
  const DType dt = dtype_code(x, "x");
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  const int64_t ss = check_modulation(shift, B, C, x, "shift");
  const int64_t cs = check_modulation(scale, B, C, x, "scale");
  if (weight) check_param(*weight, C, x, "weight");
  if (bias) check_param(*bias, C, x, "bias");
  c10::DeviceGuard guard(x.device());
  Tensor out = at::empty_like(x);
  Tensor mean = rms ? f32_empty({0}, x) : f32_empty({B * L}, x);
  Tensor rstd = f32_empty({B * L}, x);
  AdaLNParams p{x.data_ptr(), shift.data_ptr(), scale.data_ptr(), cptr(weight), cptr(bias), out.data_ptr(),
                rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), B, L, C, ss, cs, float(eps), rms};
  if (B * L > 0) UMM_CALL(x, adaln, p, dt);
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adaln_modulate_backward(const Tensor& grad, const Tensor& x,
                                                                           const Tensor& scale, const OptT& weight,
                                                                           const OptT& bias, const Tensor& mean,
                                                                           const Tensor& rstd, double eps, bool rms,
                                                                           std::array<bool, 5> mask) {
  check_x3(x, "x");
  const DType dt = dtype_code(x, "x");
  check_like(grad, x, "grad", "x");
  check_shape(grad, x.sizes(), "grad");
  check_contig(grad, "grad");
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  const int64_t cs = check_modulation(scale, B, C, x, "scale");
  if (weight) check_param(*weight, C, x, "weight");
  if (bias) check_param(*bias, C, x, "bias");
  if (!rms) check_per_sample(mean, B * L, x, "mean");
  check_per_sample(rstd, B * L, x, "rstd");
  const bool want_w = mask[3] && weight.has_value(), want_b = mask[4] && bias.has_value();
  c10::DeviceGuard guard(x.device());
  Tensor dx = maybe_empty_like(mask[0], x);
  auto f32 = x.options().dtype(at::kFloat);
  Tensor dshift = mask[1] ? at::zeros({B, C}, f32) : f32_empty({0}, x);
  Tensor dscale = mask[2] ? at::zeros({B, C}, f32) : f32_empty({0}, x);
  Tensor dweight = want_w ? at::zeros({C}, f32) : f32_empty({0}, x);
  Tensor dbias = want_b ? at::zeros({C}, f32) : f32_empty({0}, x);
  int64_t ws_elems = 0;
#ifdef UMM_WITH_CUDA
  if (x.is_cuda()) ws_elems = umm_cuda_adaln_bwd_workspace(B, L, C);
#endif
  Tensor ws = workspace(x, ws_elems);
  AdaLNBwdParams p{grad.data_ptr(), x.data_ptr(), scale.data_ptr(), cptr(weight), cptr(bias),
                   rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(),
                   mask[0] ? dx.data_ptr() : nullptr, mask[1] ? dshift.data_ptr<float>() : nullptr,
                   mask[2] ? dscale.data_ptr<float>() : nullptr, want_w ? dweight.data_ptr<float>() : nullptr,
                   want_b ? dbias.data_ptr<float>() : nullptr, ws.data_ptr<float>(), ws_elems, B, L, C, cs, rms};
  if (B * L > 0) UMM_CALL(x, adaln_bwd, p, dt);
  const auto d = x.scalar_type();
  return {dx, dshift.to(d), dscale.to(d), dweight.to(d), dbias.to(d)};
}

Tensor gated_residual(const Tensor& x, const Tensor& gate, const Tensor& y) {
  check_x3(x, "x");
  const DType dt = dtype_code(x, "x");
  check_like(y, x, "y", "x");
  check_shape(y, x.sizes(), "y");
  check_contig(y, "y");
  const int64_t B = x.size(0), L = x.size(1), C = x.size(2);
  const int64_t gs = check_modulation(gate, B, C, x, "gate");
  c10::DeviceGuard guard(x.device());
  Tensor out = at::empty_like(x);
  GatedResidualParams p{x.data_ptr(), gate.data_ptr(), y.data_ptr(), out.data_ptr(), B, L, C, gs};
  if (B * L * C > 0) UMM_CALL(x, gated_residual, p, dt);
  return out;
}

std::tuple<Tensor, Tensor> gated_residual_backward(const Tensor& grad, const Tensor& gate, const Tensor& y,
                                                   std::array<bool, 2> mask) {
  check_x3(y, "y");
  const DType dt = dtype_code(y, "y");
  check_like(grad, y, "grad", "y");
  check_shape(grad, y.sizes(), "grad");
  check_contig(grad, "grad");
  const int64_t B = y.size(0), L = y.size(1), C = y.size(2);
  const int64_t gs = check_modulation(gate, B, C, y, "gate");
  c10::DeviceGuard guard(y.device());
  Tensor dgate = mask[0] ? at::zeros({B, C}, y.options().dtype(at::kFloat)) : f32_empty({0}, y);
  Tensor dy = maybe_empty_like(mask[1], y);
  int64_t ws_elems = 0;
#ifdef UMM_WITH_CUDA
  if (y.is_cuda()) ws_elems = umm_cuda_gated_residual_bwd_workspace(B, L, C);
#endif
  Tensor ws = workspace(y, ws_elems);
  GatedResidualBwdParams p{grad.data_ptr(), gate.data_ptr(), y.data_ptr(), mask[1] ? dy.data_ptr() : nullptr,
                           mask[0] ? dgate.data_ptr<float>() : nullptr, ws.data_ptr<float>(), ws_elems, B, L, C, gs};
  if (B * C > 0) UMM_CALL(y, gated_residual_bwd, p, dt);
  return {dgate.to(y.scalar_type()), dy};
}

// ------------------------------------------------------------------------------------------ info
std::string build_info() {
  std::string s = "torch=" UMM_TORCH_VERSION ";cpu=1";
#ifdef UMM_WITH_CUDA
  s += ";cuda=1;cuda_archs=";
  s += umm_cuda_archs();
  s += ";cuda_runtime_devices=" + std::to_string(umm_cuda_device_count());
#else
  s += ";cuda=0";
#endif
  return s;
}

}  // namespace

TORCH_LIBRARY(umm_ops, m) {
  m.def("build_info() -> str", &build_info);
  m.def("kernel_flow_step(Tensor x, Tensor v, Tensor? noise, Tensor t, Tensor t_next, Tensor? sigma, "
        "bool want_logprob) -> (Tensor, Tensor)");
  m.def("kernel_flow_step_backward(Tensor grad, Tensor t, Tensor t_next, Tensor? sigma, bool[3] mask) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("kernel_flow_logprob(Tensor x, Tensor x_next, Tensor v, Tensor t, Tensor t_next, Tensor sigma) -> Tensor");
  m.def("kernel_flow_logprob_backward(Tensor grad, Tensor x, Tensor x_next, Tensor v, Tensor t, Tensor t_next, "
        "Tensor sigma, bool[3] mask) -> (Tensor, Tensor, Tensor)");
  m.def("kernel_flow_kl(Tensor v, Tensor v_ref, Tensor t, Tensor t_next, Tensor sigma) -> Tensor");
  m.def("kernel_flow_kl_backward(Tensor grad, Tensor v, Tensor v_ref, Tensor t, Tensor t_next, Tensor sigma, "
        "bool[2] mask) -> (Tensor, Tensor)");
  m.def("kernel_gated_detail_residual(Tensor low, Tensor high, Tensor gate_hidden, Tensor w_gate, Tensor b_gate, "
        "Tensor ln_weight, Tensor ln_bias, float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("kernel_gated_detail_residual_backward(Tensor grad, Tensor low, Tensor high, Tensor gate_hidden, "
        "Tensor w_gate, Tensor ln_weight, Tensor gate, Tensor mean, Tensor rstd, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("kernel_adaln_modulate(Tensor x, Tensor shift, Tensor scale, Tensor? weight, Tensor? bias, float eps, "
        "bool rms) -> (Tensor, Tensor, Tensor)");
  m.def("kernel_adaln_modulate_backward(Tensor grad, Tensor x, Tensor scale, Tensor? weight, Tensor? bias, "
        "Tensor mean, Tensor rstd, float eps, bool rms, bool[5] mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("kernel_gated_residual(Tensor x, Tensor gate, Tensor y) -> Tensor");
  m.def("kernel_gated_residual_backward(Tensor grad, Tensor gate, Tensor y, bool[2] mask) -> (Tensor, Tensor)");
}

#define UMM_IMPLS(m)                                                                 \
  m.impl("kernel_flow_step", &flow_step);                                            \
  m.impl("kernel_flow_step_backward", &flow_step_backward);                          \
  m.impl("kernel_flow_logprob", &flow_logprob);                                      \
  m.impl("kernel_flow_logprob_backward", &flow_logprob_backward);                    \
  m.impl("kernel_flow_kl", &flow_kl);                                                \
  m.impl("kernel_flow_kl_backward", &flow_kl_backward);                              \
  m.impl("kernel_gated_detail_residual", &gated_detail_residual);                    \
  m.impl("kernel_gated_detail_residual_backward", &gated_detail_residual_backward);  \
  m.impl("kernel_adaln_modulate", &adaln_modulate);                                  \
  m.impl("kernel_adaln_modulate_backward", &adaln_modulate_backward);                \
  m.impl("kernel_gated_residual", &gated_residual);                                  \
  m.impl("kernel_gated_residual_backward", &gated_residual_backward);

TORCH_LIBRARY_IMPL(umm_ops, CPU, m) { UMM_IMPLS(m) }
#ifdef UMM_WITH_CUDA
TORCH_LIBRARY_IMPL(umm_ops, CUDA, m) { UMM_IMPLS(m) }
#endif

}  // namespace umm::torch_ops
