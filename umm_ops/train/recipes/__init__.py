"""Built-in recipes (registered by name on import): ``sft`` (and ``clear-sft``), ``vae``, ``flow-grpo``, ``r3``, ``sgt``,
``clear-grpo``."""
from . import clear_grpo, flow_grpo, r3, sft, sgt, vae  # noqa: F401

__all__ = ["sft", "vae", "flow_grpo", "r3", "sgt", "clear_grpo"]
