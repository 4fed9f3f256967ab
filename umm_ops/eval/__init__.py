"""Evaluation: scoring of model outputs (the synthetic world's pixel checker, ``check``)."""
from .checker import check

__all__ = ["check"]
