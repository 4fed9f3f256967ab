// CPU kernels: one function per op direction, taking the params structs of umm/params.h.
#pragma once
#include "umm/params.h"

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

}  // namespace umm::cpu
