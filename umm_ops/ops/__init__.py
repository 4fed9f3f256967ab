"""Public fused ops: one module per op family (custom op + fake kernel + autograd + backend choice)."""
from .flow import SigmaSchedule, flow_kl, flow_logprob, flow_step, time_shift
from .norm import adaln_modulate, gated_detail_residual, gated_residual
from .tokens import compress_tokens, expand_tokens, pack_latents, unpack_latents
from .lm_head import linear_cross_entropy, linear_logprob

__all__ = [
    "flow_step", "flow_logprob", "flow_kl", "time_shift", "SigmaSchedule",
    "gated_detail_residual", "adaln_modulate", "gated_residual",
    "compress_tokens", "expand_tokens", "pack_latents", "unpack_latents",
    "linear_cross_entropy", "linear_logprob",
]
