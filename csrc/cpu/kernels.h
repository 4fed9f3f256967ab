// CPU kernels: one function per op direction, taking the params structs of umm/params.h.
#pragma once
#include "umm/params.h"
#include "umm/tokens.h"

namespace umm::cpu {

void flow_step(const FlowStepParams& p, DType dt);
void flow_step_bwd(const FlowStepBwdParams& p, DType dt);
void flow_logprob(const FlowLogprobParams& p, DType dt);
void flow_logprob_bwd(const FlowLogprobBwdParams& p, DType dt);
void flow_kl(const FlowKlParams& p, DType dt);
void flow_kl_bwd(const FlowKlBwdParams& p, DType dt);

void gated_detail(const GatedDetailParams& p, DType dt);
void gated_detail_bwd(const GatedDetailBwdParams& p, DType dt);
void adaln(const AdaLNParams& p, DType dt);
void adaln_bwd(const AdaLNBwdParams& p, DType dt);
void gated_residual(const GatedResidualParams& p, DType dt);
void gated_residual_bwd(const GatedResidualBwdParams& p, DType dt);

void tokens_gather(const TokensGatherParams& p, DType dt);
void tokens_bias_act(const TokensBiasActParams& p, DType dt);
void tokens_act_bwd(const TokensActBwdParams& p, DType dt);
void tokens_ln_scatter_bwd(const TokensLnScatterBwdParams& p, DType dt);
void tokens_depth_scatter(const TokensDepthScatterParams& p, DType dt);
void tokens_space_gather(const TokensSpaceGatherParams& p, DType dt);
void latent_pack(const LatentPackParams& p, DType dt);

}  // namespace umm::cpu
