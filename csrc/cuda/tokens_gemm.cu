// The fused gather-GEMM of compress_tokens / expand_tokens (umm/tokens.h, TokensGemmParams).
// Work in progress: not implemented yet, every call answers cudaErrorNotSupported (the torch glue then
// runs gather + at::mm + epilogue).
#include "common.cuh"
#include "umm/tokens.h"

extern "C" int umm_cuda_tokens_gemm(const umm::TokensGemmParams* p, int dtype, void* stream) {
  return static_cast<int>(cudaErrorNotSupported);
}
