// C interface of the CUDA kernels (csrc/cuda).  Torch-free: the torch wrapper fills the params structs of
// params.h and passes the current stream as a void* (cudaStream_t).  Every launcher returns a cudaError_t
// as int (0 = success); umm_cuda_error_string turns it into text.
#pragma once
#include <cstdint>

#include "umm/lm_head.h"
#include "umm/params.h"
#include "umm/span.h"
#include "umm/tokens.h"

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

// Tokenizer compression (umm/tokens.h).  The memory passes mirror csrc/cpu/tokens.cpp; the GEMMs of the
// backward are cuBLAS calls made by the torch glue.  umm_cuda_tokens_gemm returns cudaErrorNotSupported
// (without launching) when the fused kernel does not cover the case (float32, no CUTLASS headers at build
// time, a device below sm80, or a shape it does not tile): the caller then runs gather + at::mm + epilogue.
int umm_cuda_tokens_gather(const umm::TokensGatherParams* p, int dtype, void* stream);
int umm_cuda_tokens_bias_act(const umm::TokensBiasActParams* p, int dtype, void* stream);
int umm_cuda_tokens_act_bwd(const umm::TokensActBwdParams* p, int dtype, void* stream);
int umm_cuda_tokens_ln_scatter_bwd(const umm::TokensLnScatterBwdParams* p, int dtype, void* stream);
int umm_cuda_tokens_depth_scatter(const umm::TokensDepthScatterParams* p, int dtype, void* stream);
int umm_cuda_tokens_space_gather(const umm::TokensSpaceGatherParams* p, int dtype, void* stream);
int umm_cuda_latent_pack(const umm::LatentPackParams* p, int dtype, void* stream);
int umm_cuda_tokens_gemm(const umm::TokensGemmParams* p, int dtype, void* stream);
int umm_cuda_error_not_supported();

// Span attention (umm/span.h, csrc/cuda/span_attention.cu; built only with the CUTLASS/CuTe headers).
// Forward: reads p->q, k, v and the layout, writes p->out (Lq, Hq, Dh) and p->lse (Hq, Lq) float32.
// Backward: reads p->dout, q, k, v, out, lse and the layout, writes p->dq, dk, dv; p->delta is a workspace of
// Hq * total_q floats.  dtype: 1 = bfloat16, 2 = float16 (tensor-core kernels; float32 -> cudaErrorInvalidValue).
// Requirements (cudaErrorInvalidValue otherwise): 1 <= Dh <= 128 and Dh % 8 == 0; Hq % Hkv == 0; every activation
// pointer 16-byte aligned and every row stride a multiple of 8 elements (128-bit cp.async / stores).
// The layout tensors are device pointers and are trusted (no host copy, no sync): max_seqlen_q / max_seqlen_k
// must be at least the longest document's query / key length.
// Empty problems launch nothing (the backward still writes dk = dv = 0 for keys no query sees).
// LM head (umm/lm_head.h, csrc/cuda/lm_head.cu): the row pass between the glue's cuBLAS GEMMs, one block per row
// of the (rows, V) logits block (in place), and the bias-gradient column sums (acc += column sums of the block).
// targets are device pointers; a target outside [0, V) has no target term (the public op checks them).
int umm_cuda_lm_head_rows(const umm::LmHeadRowsParams* p, int dtype, void* stream);
int umm_cuda_lm_head_colsum(const umm::LmHeadColsumParams* p, int dtype, void* stream);

int umm_cuda_span_attention_fwd(const umm::SpanParams* p, int dtype, void* stream);
int umm_cuda_span_attention_bwd(const umm::SpanParams* p, int dtype, void* stream);

}  // extern "C"
