"""umm_ops: fused kernels, models and post-training recipes for unified multimodal models.

Public ops (torch.compile-traceable custom ops with autograd; the backend is chosen per call, see
umm_ops.backend):
    flow_step, flow_logprob, flow_kl, time_shift, SigmaSchedule     - flow-matching transitions (RL-ready)
    gated_detail_residual, adaln_modulate, gated_residual           - Cheers head fusions
    span_attention, SpanLayout, span_mask                           - packed causal/full/noise span attention
    compress_tokens, expand_tokens, pack_latents, unpack_latents    - fused tokenizer compression / latent packing
    linear_cross_entropy, linear_logprob                            - LM head + loss / token log-probs, no logits
"""
from . import _lib  # noqa: F401  (loads the compiled kernels if present)
from .attention import SpanLayout, span_attention, span_mask
from .backend import BackendUnavailableError, backends, use_backend, value_checks
from .ops import (
    SigmaSchedule,
    adaln_modulate,
    flow_kl,
    flow_logprob,
    flow_step,
    gated_detail_residual,
    compress_tokens,
    expand_tokens,
    gated_residual,
    linear_cross_entropy,
    linear_logprob,
    pack_latents,
    time_shift,
    unpack_latents,
)

__version__ = "0.1.0"
__all__ = [
    "backends", "use_backend", "value_checks", "BackendUnavailableError",
    "flow_step", "flow_logprob", "flow_kl", "time_shift", "SigmaSchedule",
    "gated_detail_residual", "adaln_modulate", "gated_residual",
    "span_attention", "SpanLayout", "span_mask",
    "compress_tokens", "expand_tokens", "pack_latents", "unpack_latents",
    "linear_cross_entropy", "linear_logprob",
]
