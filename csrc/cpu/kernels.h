// CPU kernels: one function per op direction, taking the params structs of umm/params.h, umm/tokens.h and
// umm/span.h.
//
// Every kernel source in csrc/cpu is compiled once per instruction-set variant (CMakeLists.txt): "base" with
// -march=${UMM_CPU_ARCH} (x86-64-v3: AVX2 + FMA) and, on x86-64, "v4" with -march=x86-64-v4 (AVX-512), each
// into its own namespace umm::cpu::<variant> (UMM_CPU_NS), so no inline helper or template instantiation of
// one variant can stand in for the other's.  The functions in umm::cpu itself (csrc/torch/cpu_dispatch.cpp,
// compiled for the base architecture) pick a variant at run time: the widest the CPU supports, or the one
// named by the UMM_CPU_ISA environment variable / umm_ops.backend.set_cpu_isa.
#pragma once
#include <string>
#include <vector>

#include "umm/lm_head.h"
#include "umm/params.h"
#include "umm/span.h"
#include "umm/tokens.h"

// X(name, params type) for every CPU kernel entry point.
#define UMM_CPU_KERNELS(X)                         \
  X(flow_step, FlowStepParams)                     \
  X(flow_step_bwd, FlowStepBwdParams)              \
  X(flow_logprob, FlowLogprobParams)               \
  X(flow_logprob_bwd, FlowLogprobBwdParams)        \
  X(flow_kl, FlowKlParams)                         \
  X(flow_kl_bwd, FlowKlBwdParams)                  \
  X(gated_detail, GatedDetailParams)               \
  X(gated_detail_bwd, GatedDetailBwdParams)        \
  X(adaln, AdaLNParams)                            \
  X(adaln_bwd, AdaLNBwdParams)                     \
  X(gated_residual, GatedResidualParams)           \
  X(gated_residual_bwd, GatedResidualBwdParams)    \
  X(tokens_gather, TokensGatherParams)             \
  X(tokens_bias_act, TokensBiasActParams)          \
  X(tokens_act_bwd, TokensActBwdParams)            \
  X(tokens_ln_scatter_bwd, TokensLnScatterBwdParams) \
  X(tokens_depth_scatter, TokensDepthScatterParams) \
  X(tokens_space_gather, TokensSpaceGatherParams)  \
  X(latent_pack, LatentPackParams)                 \
  X(lm_head_rows, LmHeadRowsParams)                \
  X(lm_head_colsum, LmHeadColsumParams)            \
  /* span attention: forward writes out and lse; backward reads out, lse, dout and writes dq, dk, dv (p.delta \
     is workspace).  The layout is trusted: the torch wrapper validates it. */ \
  X(span_attention_fwd, SpanParams)                \
  X(span_attention_bwd, SpanParams)

#define UMM_CPU_DECLARE(NAME, P) void NAME(const P& p, DType dt);

namespace umm::cpu {

// The dispatching entry points (csrc/torch/cpu_dispatch.cpp).
UMM_CPU_KERNELS(UMM_CPU_DECLARE)

// The variants (csrc/cpu/*.cpp compiled with UMM_CPU_NS = base / v4).
namespace base {
UMM_CPU_KERNELS(UMM_CPU_DECLARE)
}
namespace v4 {
UMM_CPU_KERNELS(UMM_CPU_DECLARE)
}

// Instruction-set variants: names are the -march levels ("x86-64-v3", "x86-64-v4"; the base variant of a build
// with another UMM_CPU_ARCH carries that name, or "generic").
std::string cpu_isa();                     // the variant in use
std::vector<std::string> cpu_isas_built();  // the variants compiled into this module
std::vector<std::string> cpu_isas();        // the built variants this CPU can run, narrowest first
void set_cpu_isa(const std::string& name);  // "" or "auto": back to the widest supported; errors name the options

}  // namespace umm::cpu
