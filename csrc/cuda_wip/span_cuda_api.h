// Span attention launchers (csrc/cuda_wip/span_attention.cu).  WIP header: on integration these two declarations
// move into csrc/include/umm/cuda_api.h (inside its extern "C" block) and this file is deleted.
#pragma once
#include <cstdint>

#include "umm/span.h"

extern "C" {

// Forward: reads p->q, k, v and the layout, writes p->out (Lq, Hq, Dh) and p->lse (Hq, Lq) float32.
// Backward: reads p->dout, q, k, v, out, lse and the layout, writes p->dq, dk, dv; p->delta is a workspace of
// Hq * total_q floats.  dtype: 1 = bfloat16, 2 = float16 (tensor-core kernels; float32 -> cudaErrorInvalidValue).
// Requirements (cudaErrorInvalidValue otherwise): 1 <= Dh <= 128 and Dh % 8 == 0; Hq % Hkv == 0; every activation
// pointer 16-byte aligned and every row stride a multiple of 8 elements (128-bit cp.async / stores).
// The layout tensors are device pointers and are trusted (no host copy, no sync): max_seqlen_q / max_seqlen_k
// must be at least the longest document's query / key length.
// Empty problems launch nothing (the backward still writes dk = dv = 0 for keys no query sees).
int umm_cuda_span_attention_fwd(const umm::SpanParams* p, int dtype, void* stream);
int umm_cuda_span_attention_bwd(const umm::SpanParams* p, int dtype, void* stream);

}  // extern "C"
