// Input checks shared by the torch-facing translation units (csrc/torch/*.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include "umm/params.h"

// First statement of a glue function whose own ATen calls (the tokens GEMMs) must run in the dtype the kernel sized
// its buffers for: an autocast region of the caller would otherwise return bf16 products into float32 passes (a heap
// overrun, found by bf16 autocast training).  The public Python ops apply their autocast policy before this.
#define UMM_NO_AUTOCAST c10::impl::ExcludeDispatchKeyGuard umm_no_autocast_guard_(c10::autocast_dispatch_keyset)

namespace umm::torch_ops {

// The kernels' dtype code of an activation tensor; a clear error for anything else.  `who` prefixes the
// message ("umm_ops", "umm_ops.span_attention").
inline DType dtype_code(const at::Tensor& t, const char* name, const char* who = "umm_ops") {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK(false, who, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

}  // namespace umm::torch_ops
