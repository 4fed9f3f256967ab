"""Built-in recipes (registered by name on import): ``sft`` (and ``clear-sft``), ``vae``, ``flow-grpo``, ``r3``, ``sgt``."""
from . import flow_grpo, r3, sft, sgt, vae  # noqa: F401

__all__ = ["sft", "vae", "flow_grpo", "r3", "sgt"]
