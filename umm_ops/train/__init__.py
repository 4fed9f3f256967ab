"""Training: the engine (umm_ops.train.engine: the loop, DDP / FSDP2, DCP checkpoints, exact resume), the config
tree (umm_ops.train.config), recipes registered by name (umm_ops.train.spec, umm_ops.train.recipes: ``sft``), and
the training policy of CheersModel (umm_ops.train.policy: flow noise, CFG dropout).

    from umm_ops.train import Config, train
    summary = train(Config.build("sft", overrides=["job.steps=200", "job.out=runs/demo"]))
"""
from .config import Config, ConfigError
from .engine import train
from .export import export, load_checkpoint_model
from .spec import Recipe, get_recipe, recipe_names, register

__all__ = ["Config", "ConfigError", "train", "export", "load_checkpoint_model", "Recipe", "register", "get_recipe",
           "recipe_names"]
