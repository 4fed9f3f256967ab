"""Built-in recipes (registered by name on import): ``sft``, ``vae``, ``flow-grpo``."""
from . import flow_grpo, sft, vae  # noqa: F401

__all__ = ["sft", "vae", "flow_grpo"]
