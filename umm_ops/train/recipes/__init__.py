"""Built-in recipes (registered by name on import): ``sft``, ``vae``."""
from . import sft, vae  # noqa: F401

__all__ = ["sft", "vae"]
