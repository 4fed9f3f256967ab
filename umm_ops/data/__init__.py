"""Data: MMD-Bench degradations (CLEAR)."""
from .degradations import CATEGORIES, DEGRADATIONS, LEVELS, WEIGHTS, degrade, psnr, sample_kind

__all__ = ["DEGRADATIONS", "LEVELS", "CATEGORIES", "WEIGHTS", "degrade", "sample_kind", "psnr"]
