"""Built-in recipes (registered by name on import): ``sft`` (and ``clear-sft``), ``clear-bridge``, ``vae``,
``flow-grpo``, ``r3``, ``sgt``."""
from . import clear_bridge, flow_grpo, r3, sft, sgt, vae  # noqa: F401

__all__ = ["sft", "clear_bridge", "vae", "flow_grpo", "r3", "sgt"]
