"""Training recipes.  ``sft``: supervised fine-tuning of CheersModel on packed span batches (the built-in demo job
trains the tiny preset on the synthetic world), with exact resume from atomic checkpoints.

    from umm_ops.train import SFTConfig, train
    summary = train(SFTConfig(steps=200, out="runs/demo"))
"""
from .sft import SFTConfig, SyntheticSFTDataset, evaluate, latest_checkpoint, load_checkpoint_model, train

__all__ = ["SFTConfig", "SyntheticSFTDataset", "train", "evaluate", "latest_checkpoint", "load_checkpoint_model"]
