// C interface of the CUDA kernels (csrc/cuda).  Torch-free: the torch wrapper fills the params structs of
// params.h and passes the current stream as a void* (cudaStream_t).  Every launcher returns a cudaError_t
// as int (0 = success); umm_cuda_error_string turns it into text.
#pragma once
#include <cstdint>

#include "umm/params.h"

extern "C" {

const char* umm_cuda_error_string(int err);
// The architectures this library's device code was compiled for, e.g. "80;90a".
const char* umm_cuda_archs();
// Number of visible CUDA devices as seen by the CUDA runtime linked into this library (0 on failure).
int umm_cuda_device_count();

int umm_cuda_flow_step(const umm::FlowStepParams* p, int dtype, void* stream);
int umm_cuda_flow_step_bwd(const umm::FlowStepBwdParams* p, int dtype, void* stream);
int umm_cuda_flow_logprob(const umm::FlowLogprobParams* p, int dtype, void* stream);
int umm_cuda_flow_logprob_bwd(const umm::FlowLogprobBwdParams* p, int dtype, void* stream);
int umm_cuda_flow_kl(const umm::FlowKlParams* p, int dtype, void* stream);
int umm_cuda_flow_kl_bwd(const umm::FlowKlBwdParams* p, int dtype, void* stream);

int umm_cuda_gated_detail(const umm::GatedDetailParams* p, int dtype, void* stream);
int64_t umm_cuda_gated_detail_bwd_workspace(int64_t N, int64_t C, int64_t Dg);
int umm_cuda_gated_detail_bwd(const umm::GatedDetailBwdParams* p, int dtype, void* stream);

int umm_cuda_adaln(const umm::AdaLNParams* p, int dtype, void* stream);
int64_t umm_cuda_adaln_bwd_workspace(int64_t B, int64_t L, int64_t C);
int umm_cuda_adaln_bwd(const umm::AdaLNBwdParams* p, int dtype, void* stream);

int umm_cuda_gated_residual(const umm::GatedResidualParams* p, int dtype, void* stream);
int64_t umm_cuda_gated_residual_bwd_workspace(int64_t B, int64_t L, int64_t C);
int umm_cuda_gated_residual_bwd(const umm::GatedResidualBwdParams* p, int dtype, void* stream);

}  // extern "C"
