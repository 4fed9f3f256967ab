"""Built-in recipes (registered by name on import): ``sft`` (and ``clear-sft``), ``clear-bridge``, ``clear-grpo``,
``vae``, ``vit``, ``flow-grpo``, ``r3``, ``sgt``."""
from . import clear_bridge, clear_grpo, flow_grpo, r3, sft, sgt, vae, vit  # noqa: F401

__all__ = ["sft", "clear_bridge", "clear_grpo", "vae", "vit", "flow_grpo", "r3", "sgt"]
