// Torch-facing side of span attention (docs/span-attention-contract.md): schemas of the kernel ops, input and
// layout checks, params filling, CPU dispatch; the CUDA dispatch (bf16/fp16, csrc/cuda/span_attention.cu) at the end,
// built when the CUDA kernels are built with the CUTLASS/CuTe headers (UMM_WITH_SPAN_CUDA).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "torch/checks.h"
#include "cpu/kernels.h"
#include "umm/span.h"

namespace umm::torch_ops {
namespace {

using at::Tensor;

void check_act(const Tensor& t, const Tensor& q, const char* name) {
  TORCH_CHECK(t.dim() == 3, "umm_ops.span_attention: ", name, " must be 3-D (tokens, heads, head_dim), got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "umm_ops.span_attention: ", name, " must have the dtype of q (",
              q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "umm_ops.span_attention: ", name, " must be on the device of q (", q.device(),
              "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "umm_ops.span_attention: ", name, " must be contiguous, got strides ", t.strides());
}

// A layout tensor: int32, 1-D, contiguous, on the device of q (the CPU kernel reads it on the host, the CUDA
// kernels on the device).
void check_layout_tensor(const Tensor& t, const Tensor& q, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "umm_ops.span_attention: ", name, " must be int32, got ", t.scalar_type());
  if (q.device().is_cpu()) {
    TORCH_CHECK(t.device().is_cpu(), "umm_ops.span_attention: ", name,
                " must be a CPU tensor for the CPU kernel (the layout lives on the device of q), got ", t.device());
  } else {
    TORCH_CHECK(t.device() == q.device(), "umm_ops.span_attention: ", name, " must be on the device of q (",
                q.device(), "), got ", t.device(), " (use layout.to(q.device) once, outside the training step)");
  }
  TORCH_CHECK(t.dim() == 1, "umm_ops.span_attention: ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "umm_ops.span_attention: ", name, " must be contiguous");
}

struct Checked {
  DType dt;
  int64_t Lq, Lk, Hq, Hkv, Dh, D, S;
};

// Shapes, dtypes, devices and the lengths of the layout tensors (no layout VALUE is read): shared by the CPU and
// CUDA dispatch.
Checked check_shapes(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                     const Tensor& so, const Tensor& ss, const Tensor& se, const Tensor& sm) {
  Checked c;
  TORCH_CHECK(q.dim() == 3, "umm_ops.span_attention: q must be 3-D (tokens, heads, head_dim), got shape ", q.sizes());
  c.dt = dtype_code(q, "q", "umm_ops.span_attention");
  check_act(q, q, "q");
  check_act(k, q, "k");
  check_act(v, q, "v");
  c.Lq = q.size(0);
  c.Hq = q.size(1);
  c.Dh = q.size(2);
  c.Lk = k.size(0);
  c.Hkv = k.size(1);
  TORCH_CHECK(c.Dh >= 1, "umm_ops.span_attention: head_dim must be >= 1, got ", c.Dh);
  TORCH_CHECK(c.Hq >= 1 && c.Hkv >= 1, "umm_ops.span_attention: head counts must be >= 1, got Hq=", c.Hq,
              " Hkv=", c.Hkv);
  TORCH_CHECK(c.Hq % c.Hkv == 0, "umm_ops.span_attention: the query heads (", c.Hq,
              ") must be a multiple of the kv heads (", c.Hkv, ")");
  TORCH_CHECK(k.size(2) == c.Dh, "umm_ops.span_attention: k must have the head_dim of q (", c.Dh, "), got ",
              k.size(2));
  TORCH_CHECK(v.sizes() == k.sizes(), "umm_ops.span_attention: v must have the shape of k ", k.sizes(), ", got ",
              v.sizes());

  check_layout_tensor(cu_q, q, "cu_seqlens_q");
  check_layout_tensor(cu_k, q, "cu_seqlens_k");
  check_layout_tensor(so, q, "seg_offsets");
  check_layout_tensor(ss, q, "seg_start");
  check_layout_tensor(se, q, "seg_end");
  check_layout_tensor(sm, q, "seg_mode");
  TORCH_CHECK(cu_q.numel() >= 1, "umm_ops.span_attention: cu_seqlens_q must have length num_docs + 1 >= 1");
  c.D = cu_q.numel() - 1;
  c.S = ss.numel();
  TORCH_CHECK(cu_k.numel() == c.D + 1, "umm_ops.span_attention: cu_seqlens_k must have length num_docs + 1 = ",
              c.D + 1, " (that of cu_seqlens_q), got ", cu_k.numel());
  TORCH_CHECK(so.numel() == c.D + 1, "umm_ops.span_attention: seg_offsets must have length num_docs + 1 = ", c.D + 1,
              ", got ", so.numel());
  TORCH_CHECK(se.numel() == c.S && sm.numel() == c.S,
              "umm_ops.span_attention: seg_start, seg_end and seg_mode must have the same length, got ", c.S, ", ",
              se.numel(), ", ", sm.numel());
  return c;
}

// The CPU kernel: the shapes plus the whole segment table (O(D + S) on the host; the values are right there).
Checked check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                     const Tensor& so, const Tensor& ss, const Tensor& se, const Tensor& sm, int64_t max_q,
                     int64_t max_k) {
  TORCH_CHECK(q.device().is_cpu(), "umm_ops.span_attention: the kernel op runs on CPU tensors only, got ", q.device());
  const Checked c = check_shapes(q, k, v, cu_q, cu_k, so, ss, se, sm);
  const int32_t* pq = cu_q.data_ptr<int32_t>();
  const int32_t* pk = cu_k.data_ptr<int32_t>();
  const int32_t* po = so.data_ptr<int32_t>();
  const int32_t* ps = ss.data_ptr<int32_t>();
  const int32_t* pe = se.data_ptr<int32_t>();
  const int32_t* pm = sm.data_ptr<int32_t>();
  TORCH_CHECK(pq[0] == 0 && pk[0] == 0 && po[0] == 0,
              "umm_ops.span_attention: cu_seqlens_q, cu_seqlens_k and seg_offsets must start at 0, got ", pq[0], ", ",
              pk[0], ", ", po[0]);
  TORCH_CHECK(pq[c.D] == c.Lq, "umm_ops.span_attention: cu_seqlens_q[-1] (", pq[c.D],
              ") must equal the number of query tokens q.size(0) (", c.Lq, ")");
  TORCH_CHECK(pk[c.D] == c.Lk, "umm_ops.span_attention: cu_seqlens_k[-1] (", pk[c.D],
              ") must equal the number of key tokens k.size(0) (", c.Lk, ")");
  TORCH_CHECK(po[c.D] == c.S, "umm_ops.span_attention: seg_offsets[-1] (", po[c.D],
              ") must equal the number of segments (", c.S, ")");
  int64_t mq = 0, mk = 0;
  for (int64_t d = 0; d < c.D; ++d) {
    const int64_t lq = int64_t(pq[d + 1]) - pq[d], lk = int64_t(pk[d + 1]) - pk[d];
    TORCH_CHECK(lq >= 0 && lk >= 0 && po[d + 1] >= po[d], "umm_ops.span_attention: document ", d,
                " has negative length (cu_seqlens_q / cu_seqlens_k / seg_offsets must be non-decreasing)");
    TORCH_CHECK(lq <= lk, "umm_ops.span_attention: document ", d, " has more queries (", lq, ") than keys (", lk,
                "); queries are the last len_q of the document's tokens");
    mq = std::max(mq, lq);
    mk = std::max(mk, lk);
    int64_t pos = pk[d];
    for (int64_t s = po[d]; s < po[d + 1]; ++s) {
      TORCH_CHECK(ps[s] == pos, "umm_ops.span_attention: segment ", s, " of document ", d, " starts at ", ps[s],
                  " but must start at ", pos,
                  " (a document's segments are sorted, contiguous and cover its key range, global coordinates)");
      TORCH_CHECK(pe[s] > ps[s], "umm_ops.span_attention: segment ", s, " is empty or reversed: [", ps[s], ", ", pe[s],
                  ")");
      TORCH_CHECK(pm[s] >= 0 && pm[s] <= 2, "umm_ops.span_attention: segment ", s, " has mode ", pm[s],
                  "; modes are 0 (causal), 1 (full), 2 (noise)");
      pos = pe[s];
    }
    TORCH_CHECK(pos == pk[d + 1], "umm_ops.span_attention: the segments of document ", d, " end at ", pos,
                " but the document's keys end at ", pk[d + 1]);
  }
  TORCH_CHECK(max_q >= mq && max_k >= mk, "umm_ops.span_attention: max_seqlen_q / max_seqlen_k (", max_q, ", ", max_k,
              ") must be at least the longest document's query / key length (", mq, ", ", mk, ")");
  return c;
}

SpanParams make_params(const Checked& c, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                       const Tensor& cu_k, const Tensor& so, const Tensor& ss, const Tensor& se, const Tensor& sm,
                       int64_t max_q, int64_t max_k, double scale) {
  SpanParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.seg_offsets = so.data_ptr<int32_t>();
  p.seg_start = ss.data_ptr<int32_t>();
  p.seg_end = se.data_ptr<int32_t>();
  p.seg_mode = sm.data_ptr<int32_t>();
  p.total_q = c.Lq;
  p.total_k = c.Lk;
  p.Hq = c.Hq;
  p.Hkv = c.Hkv;
  p.Dh = c.Dh;
  p.num_docs = c.D;
  p.num_segments = c.S;
  p.max_seqlen_q = max_q;
  p.max_seqlen_k = max_k;
  p.q_row_stride = c.Hq * c.Dh;
  p.k_row_stride = c.Hkv * c.Dh;
  p.v_row_stride = c.Hkv * c.Dh;
  p.o_row_stride = c.Hq * c.Dh;
  p.softmax_scale = float(scale);
  return p;
}

std::tuple<Tensor, Tensor> span_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                                              const Tensor& cu_k, const Tensor& so, const Tensor& ss, const Tensor& se,
                                              const Tensor& sm, int64_t max_q, int64_t max_k, double scale) {
  const Checked c = check_inputs(q, k, v, cu_q, cu_k, so, ss, se, sm, max_q, max_k);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({c.Hq, c.Lq}, q.options().dtype(at::kFloat));
  SpanParams p = make_params(c, q, k, v, cu_q, cu_k, so, ss, se, sm, max_q, max_k, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (c.Lq > 0) cpu::span_attention_fwd(p, c.dt);
  return {out, lse};
}

// The backward's extra inputs: dout and out like q, lse float32 (Hq, Lq_total) on q's device.
void check_bwd_inputs(const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& q, const Checked& c) {
  check_act(dout, q, "dout");
  check_act(out, q, "out");
  TORCH_CHECK(dout.sizes() == q.sizes(), "umm_ops.span_attention: dout must have the shape of q ", q.sizes(),
              ", got ", dout.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "umm_ops.span_attention: out must have the shape of q ", q.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "umm_ops.span_attention: lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), "umm_ops.span_attention: lse must be on the device of q (", q.device(),
              "), got ", lse.device());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == c.Hq && lse.size(1) == c.Lq,
              "umm_ops.span_attention: lse must have shape (Hq, Lq_total) = (", c.Hq, ", ", c.Lq, "), got ",
              lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), "umm_ops.span_attention: lse must be contiguous");
}

// Outputs and workspace of a backward call, and its params.
struct BwdCall {
  Tensor dq, dk, dv, delta;
  SpanParams p;
};

BwdCall make_bwd_call(const Checked& c, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& out, const Tensor& lse, const Tensor& cu_q, const Tensor& cu_k, const Tensor& so,
                      const Tensor& ss, const Tensor& se, const Tensor& sm, int64_t max_q, int64_t max_k,
                      double scale) {
  BwdCall b{at::empty_like(q), at::empty_like(k), at::empty_like(v),
            at::empty({std::max<int64_t>(c.Hq * c.Lq, 1)}, q.options().dtype(at::kFloat)),
            make_params(c, q, k, v, cu_q, cu_k, so, ss, se, sm, max_q, max_k, scale)};
  b.p.out = const_cast<void*>(out.data_ptr());
  b.p.lse = const_cast<float*>(lse.data_ptr<float>());
  b.p.dout = dout.data_ptr();
  b.p.dq = b.dq.data_ptr();
  b.p.dk = b.dk.data_ptr();
  b.p.dv = b.dv.data_ptr();
  b.p.delta = b.delta.data_ptr<float>();
  return b;
}

std::tuple<Tensor, Tensor, Tensor> span_attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor& out, const Tensor& lse,
                                                      const Tensor& cu_q, const Tensor& cu_k, const Tensor& so,
                                                      const Tensor& ss, const Tensor& se, const Tensor& sm,
                                                      int64_t max_q, int64_t max_k, double scale) {
  const Checked c = check_inputs(q, k, v, cu_q, cu_k, so, ss, se, sm, max_q, max_k);
  check_bwd_inputs(dout, out, lse, q, c);
  BwdCall b = make_bwd_call(c, dout, q, k, v, out, lse, cu_q, cu_k, so, ss, se, sm, max_q, max_k, scale);
  if (c.Lk > 0) cpu::span_attention_bwd(b.p, c.dt);  // every key lies in a segment: dk / dv fully written
  return {b.dq, b.dk, b.dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(umm_ops, m) {
  m.def("kernel_span_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "Tensor seg_offsets, Tensor seg_start, Tensor seg_end, Tensor seg_mode, int max_seqlen_q, int max_seqlen_k, "
        "float softmax_scale) -> (Tensor, Tensor)");
  m.def("kernel_span_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor seg_offsets, Tensor seg_start, Tensor seg_end, "
        "Tensor seg_mode, int max_seqlen_q, int max_seqlen_k, float softmax_scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(umm_ops, CPU, m) {
  m.impl("kernel_span_attention_fwd", &span_attention_fwd);
  m.impl("kernel_span_attention_bwd", &span_attention_bwd);
}

}  // namespace umm::torch_ops

// ----------------------------------------------------------------------------------------- CUDA dispatch
// kernel_span_attention_fwd / _bwd on CUDA tensors: the checks above plus the tensor-core kernel's own
// requirements (bf16/fp16, head dim % 8 == 0 and <= 128, 16-byte aligned rows), then the launchers of
// csrc/cuda/span_attention.cu.  Built when the CUDA kernels are built with the CUTLASS/CuTe headers.
#if defined(UMM_WITH_CUDA) && defined(UMM_WITH_SPAN_CUDA)
#include <ATen/DeviceAccelerator.h>
#include <c10/core/DeviceGuard.h>

#include <cstdint>

#include "umm/cuda_api.h"

namespace umm::torch_ops {
namespace {

void* span_stream_of(const Tensor& t) {
  return at::accelerator::getCurrentStream(t.device().index()).native_handle();
}

void span_cuda_check(int err, const char* what) {
  TORCH_CHECK(err == 0, "umm_ops.span_attention: CUDA kernel ", what, " failed: ", umm_cuda_error_string(err));
}

// The kernels read 128-bit chunks: a tensor whose data pointer is not 16-byte aligned (a contiguous view with an
// odd storage offset) is copied once into a fresh (aligned) allocation.
Tensor span_aligned(const Tensor& t) {
  return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u) == 0 ? t : t.clone();
}

// Shapes, dtypes, devices and the sizes of the layout tensors.  The layout's VALUES are not read: that would copy
// them to the host and synchronise on every call.  They are trusted (SpanLayout validates them when it is built,
// or its caller vouched for them with validate=False), as FlashAttention trusts cu_seqlens.
Checked check_inputs_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                          const Tensor& so, const Tensor& ss, const Tensor& se, const Tensor& sm, int64_t max_q,
                          int64_t max_k) {
  TORCH_CHECK(q.is_cuda(), "umm_ops.span_attention: the CUDA kernel runs CUDA tensors, got q on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "umm_ops.span_attention: the CUDA kernel (sm80 tensor cores) takes bfloat16 or float16, got ",
              q.scalar_type(), " (float32 CUDA tensors run on the triton or reference backend)");
  const Checked c = check_shapes(q, k, v, cu_q, cu_k, so, ss, se, sm);
  TORCH_CHECK(c.Dh >= 8 && c.Dh <= 128 && c.Dh % 8 == 0,
              "umm_ops.span_attention: the CUDA kernel takes head dims that are multiples of 8 up to 128 (64, 72, 80, "
              "96, 128, ...), got ", c.Dh);
  TORCH_CHECK(c.Hq <= 65535 && c.Hkv <= 65535, "umm_ops.span_attention: at most 65535 heads, got Hq=", c.Hq);
  TORCH_CHECK(c.Lk == 0 || c.S >= 1, "umm_ops.span_attention: ", c.Lk, " key tokens but no segment");
  TORCH_CHECK(max_q >= 0 && max_k >= 0 && max_q <= c.Lq && max_k <= c.Lk && max_q <= max_k,
              "umm_ops.span_attention: max_seqlen_q / max_seqlen_k (", max_q, ", ", max_k,
              ") must lie in [0, Lq_total] / [0, Lk_total] = [0, ", c.Lq, "] / [0, ", c.Lk, "] with max_seqlen_q <= "
              "max_seqlen_k (each document has at most as many queries as keys)");
  TORCH_CHECK(c.Lq == 0 || max_q >= 1, "umm_ops.span_attention: max_seqlen_q is 0 but there are ", c.Lq,
              " queries");
  TORCH_CHECK(c.Lk == 0 || max_k >= 1, "umm_ops.span_attention: max_seqlen_k is 0 but there are ", c.Lk, " keys");
  return c;
}

std::tuple<Tensor, Tensor> span_attention_fwd_cuda(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                                   const Tensor& cu_q, const Tensor& cu_k, const Tensor& so,
                                                   const Tensor& ss, const Tensor& se, const Tensor& sm, int64_t max_q,
                                                   int64_t max_k, double scale) {
  const Checked c = check_inputs_cuda(q_, k_, v_, cu_q, cu_k, so, ss, se, sm, max_q, max_k);
  c10::DeviceGuard guard(q_.device());
  const Tensor q = span_aligned(q_), k = span_aligned(k_), v = span_aligned(v_);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({c.Hq, c.Lq}, q.options().dtype(at::kFloat));
  SpanParams p = make_params(c, q, k, v, cu_q, cu_k, so, ss, se, sm, max_q, max_k, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (c.Lq > 0) span_cuda_check(umm_cuda_span_attention_fwd(&p, int(c.dt), span_stream_of(q)), "span_attention_fwd");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> span_attention_bwd_cuda(const Tensor& dout_, const Tensor& q_, const Tensor& k_,
                                                           const Tensor& v_, const Tensor& out_, const Tensor& lse,
                                                           const Tensor& cu_q, const Tensor& cu_k, const Tensor& so,
                                                           const Tensor& ss, const Tensor& se, const Tensor& sm,
                                                           int64_t max_q, int64_t max_k, double scale) {
  const Checked c = check_inputs_cuda(q_, k_, v_, cu_q, cu_k, so, ss, se, sm, max_q, max_k);
  check_bwd_inputs(dout_, out_, lse, q_, c);
  c10::DeviceGuard guard(q_.device());
  const Tensor q = span_aligned(q_), k = span_aligned(k_), v = span_aligned(v_);
  const Tensor dout = span_aligned(dout_), out = span_aligned(out_);
  BwdCall b = make_bwd_call(c, dout, q, k, v, out, lse, cu_q, cu_k, so, ss, se, sm, max_q, max_k, scale);
  // Every key lies in a segment, hence in a key block of the dk/dv kernel: dk / dv are fully written (zeros for
  // keys no query sees, e.g. all of them when Lq == 0).
  if (c.Lk > 0)
    span_cuda_check(umm_cuda_span_attention_bwd(&b.p, int(c.dt), span_stream_of(q)), "span_attention_bwd");
  return {b.dq, b.dk, b.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(umm_ops, CUDA, m) {
  m.impl("kernel_span_attention_fwd", &span_attention_fwd_cuda);
  m.impl("kernel_span_attention_bwd", &span_attention_bwd_cuda);
}

}  // namespace umm::torch_ops
#endif  // UMM_WITH_CUDA && UMM_WITH_SPAN_CUDA
