"""The training engine: the loop (trainer), process group and mesh (distributed), DDP / FSDP2 / activation
checkpointing / compile (parallelize), checkpoints and the run lock (checkpoint), optimizer / schedule / EMA (optim),
reporting (metrics) and rank-sharded loading (data).  It imports neither the model nor the data package: recipes
bring those (umm_ops.train.spec)."""
from .trainer import train

__all__ = ["train"]
