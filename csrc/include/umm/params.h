// Torch-free parameter structs and shared math for the umm_ops kernels.
//
// Every kernel family (CPU C++ in csrc/cpu, CUDA in csrc/cuda) takes exactly these structs; the torch
// wrapper (csrc/torch) validates tensors and fills them.  The Triton kernels (umm_ops/triton) and the
// reference (umm_ops/reference/kernels.py) implement the same contract in Python.
//
// Conventions (see umm_ops/reference/kernels.py for the executable definition):
//  * Activations ("void*") share one dtype: float32, bfloat16 or float16 (DType below).
//  * Per-sample scalars (t, t_next, sigma) and saved statistics are float32.
//  * Arithmetic is float32; every reduction is done in float32 (or wider) in a fixed order, so results
//    do not depend on the number of threads.
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define UMM_HD __host__ __device__ __forceinline__
#else
#define UMM_HD inline
#endif

namespace umm {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// ---------------------------------------------------------------------------------------------
// Flow matching (Cheers convention: x_t = t * x_data + (1 - t) * noise, t = 1 is clean, v = x_data - noise).
// One transition x -> x_next from t to t_next (dt = t_next - t):
//   Euler (sigma == 0):  x_next = x + dt * v
//   SDE   (sigma  > 0):  the Flow-GRPO transition rewritten in t = 1 - s:
//     mean   = x + [v + sigma^2/(2 s) (x + (1 - s) v_fg)] ds   with v_fg = -v, s = 1 - t, ds = -dt
//            = ax * x + av * v,  k = sigma^2 / (2 (1 - t)),  ax = 1 - k dt,  av = dt (1 + k t)
//     std    = sigma * sqrt(dt)
//     x_next = mean + std * z
struct FlowCoef {
  float ax, av, std;
};

UMM_HD FlowCoef flow_coef(float t, float t_next, float sigma) {
  const float dt = t_next - t;
  FlowCoef c;
  if (sigma == 0.f) {
    c.ax = 1.f;
    c.av = dt;
    c.std = 0.f;
  } else {
    const float k = sigma * sigma / (2.f * (1.f - t));
    c.ax = 1.f - k * dt;
    c.av = dt * (1.f + k * t);
    c.std = sigma * sqrtf(dt);
  }
  return c;
}

constexpr float kHalfLog2Pi = 0.918938533204672741780329736f;  // 0.5 * log(2 pi)

// x, v, noise, x_next: (B, N) contiguous.  t, t_next: (B,).  sigma: (B,) or nullptr (Euler).
// noise == nullptr means Euler (sigma ignored).  logprob: (B,) or nullptr:
//   logprob[b] = mean_n( -(x_next_stored - mean)^2 / (2 std^2) ) - log(std) - 0.5 log(2 pi)
// computed from x_next *after* rounding to the activation dtype (the sample a rollout records).
struct FlowStepParams {
  const void* x;
  const void* v;
  const void* noise;
  const float* t;
  const float* t_next;
  const float* sigma;
  void* x_next;
  float* logprob;
  int64_t B, N;
};

// dx = ax * g, dv = av * g, dnoise = std * g (each output nullptr when not wanted).
struct FlowStepBwdParams {
  const void* grad;  // (B, N), activation dtype
  const float* t;
  const float* t_next;
  const float* sigma;  // nullptr: Euler
  void* dx;
  void* dv;
  void* dnoise;
  int64_t B, N;
};

// logprob[b] as in FlowStepParams for a *given* x_next; sigma required (> 0).
struct FlowLogprobParams {
  const void* x;
  const void* x_next;
  const void* v;
  const float* t;
  const float* t_next;
  const float* sigma;
  float* logprob;
  int64_t B, N;
};

// With r = x_next - (ax x + av v) and w = grad[b] / (std^2 N):
//   dx = w r ax,  dv = w r av,  dx_next = -w r      (each nullptr when not wanted)
struct FlowLogprobBwdParams {
  const float* grad;  // (B,)
  const void* x;
  const void* x_next;
  const void* v;
  const float* t;
  const float* t_next;
  const float* sigma;
  void* dx;
  void* dx_next;
  void* dv;
  int64_t B, N;
};

// KL between the policy transition (velocity v) and the reference one (v_ref), same x and sigma:
//   kl[b] = mean_n( (av (v - v_ref))^2 ) / (2 std^2)
struct FlowKlParams {
  const void* v;
  const void* v_ref;
  const float* t;
  const float* t_next;
  const float* sigma;
  float* kl;
  int64_t B, N;
};

// dv = grad[b] * av^2 / (std^2 N) * (v - v_ref),  dv_ref = -dv   (each nullptr when not wanted)
struct FlowKlBwdParams {
  const float* grad;
  const void* v;
  const void* v_ref;
  const float* t;
  const float* t_next;
  const float* sigma;
  void* dv;
  void* dv_ref;
  int64_t B, N;
};

// ---------------------------------------------------------------------------------------------
// Cheers' gated detail residual, per token n:
//   g[n]   = dot(gate_hidden[n, :], w_gate) + b_gate      (unbounded scalar)
//   u      = low[n, :] + g[n] * high[n, :]
//   out    = (u - mean) * rstd * ln_w + ln_b               (LayerNorm over C, biased variance)
// low, high, out: (N, C) contiguous; gate_hidden: (N, Dg) contiguous; w_gate: (Dg,); b_gate: (1,);
// ln_w, ln_b: (C,).  gate, mean, rstd: (N,) float32 outputs saved for backward.
struct GatedDetailParams {
  const void* low;
  const void* high;
  const void* gate_hidden;
  const void* w_gate;
  const void* b_gate;
  const void* ln_w;
  const void* ln_b;
  void* out;
  float* gate;
  float* mean;
  float* rstd;
  int64_t N, C, Dg;
  float eps;
};

// Standard LayerNorm backward on u (recomputed), then through the gate:
//   du = rstd * (dy w - mean_c(dy w) - uhat mean_c(dy w uhat)),  uhat = (u - mean) rstd
//   dlow = du;  dhigh = g du;  dg = sum_c du * high;  dgate_hidden = dg * w_gate
//   dw_gate = sum_n dg * gate_hidden;  db_gate = sum_n dg;  dln_w = sum_n dy uhat;  dln_b = sum_n dy
// Per-token outputs are in the activation dtype; the parameter gradients are float32 (the wrapper casts).
struct GatedDetailBwdParams {
  const void* grad;
  const void* low;
  const void* high;
  const void* gate_hidden;
  const void* w_gate;
  const void* ln_w;
  const float* gate;
  const float* mean;
  const float* rstd;
  void* dlow;
  void* dhigh;
  void* dgate_hidden;
  float* dw_gate;  // (Dg,)
  float* db_gate;  // (1,)
  float* dln_w;    // (C,)
  float* dln_b;    // (C,)
  float* workspace;
  int64_t workspace_elems;
  int64_t N, C, Dg;
};

// ---------------------------------------------------------------------------------------------
// adaLN modulation, per sample b and token l:
//   n   = norm(x[b, l, :]) * weight + bias     (weight / bias optional; norm = RMSNorm or LayerNorm)
//   out = n * (1 + scale[b, :]) + shift[b, :]
// x, out: (B, L, C) contiguous.  shift, scale: (B, C) with unit column stride and row strides
// shift_stride / scale_stride (so chunks of one (B, k*C) modulation tensor are taken without copies).
// mean (LayerNorm only), rstd: (B*L,) float32.
struct AdaLNParams {
  const void* x;
  const void* shift;
  const void* scale;
  const void* weight;  // nullable
  const void* bias;    // nullable (LayerNorm only)
  void* out;
  float* mean;  // nullptr for RMSNorm
  float* rstd;
  int64_t B, L, C, shift_stride, scale_stride;
  float eps;
  bool rms;
};

// With xhat = (x - mean) rstd (RMS: x rstd) and dn = dy (1 + scale):
//   dx      = norm backward of dn * weight
//   dshift  = sum_l dy;   dscale = sum_l dy * n
//   dweight = sum_{b,l} dn * xhat;   dbias = sum_{b,l} dn
// dshift / dscale: (B, C) float32; dweight / dbias: (C,) float32; each nullptr when not wanted.
struct AdaLNBwdParams {
  const void* grad;
  const void* x;
  const void* scale;
  const void* weight;
  const void* bias;
  const float* mean;
  const float* rstd;
  void* dx;
  float* dshift;
  float* dscale;
  float* dweight;
  float* dbias;
  float* workspace;
  int64_t workspace_elems;
  int64_t B, L, C, scale_stride;
  bool rms;
};

// out = x + gate[b, :] * y.  x, y, out: (B, L, C) contiguous; gate: (B, C), unit column stride.
struct GatedResidualParams {
  const void* x;
  const void* gate;
  const void* y;
  void* out;
  int64_t B, L, C, gate_stride;
};

// dy = gate * grad (activation dtype);  dgate = sum_l grad * y  ((B, C) float32).  Each nullable.
struct GatedResidualBwdParams {
  const void* grad;
  const void* gate;
  const void* y;
  void* dy;
  float* dgate;
  float* workspace;
  int64_t workspace_elems;
  int64_t B, L, C, gate_stride;
};

}  // namespace umm
