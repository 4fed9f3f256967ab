"""Built-in recipes (registered by name on import): ``sft``."""
from . import sft  # noqa: F401

__all__ = ["sft"]
