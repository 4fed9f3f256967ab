"""`umm train` and `umm export`: the command line of the training engine, generated from the config dataclasses.

    umm train [--recipe sft] [--config run.toml] [--set optim.lr=3e-4 ...] [shorthands such as --steps 300]
    torchrun --nproc-per-node 2 -m umm_ops train --set parallel.mode=fsdp ...   # the same code on 2 ranks
    umm train --list-recipes          umm train --print-config [...]          umm export RUN --out DIR [--ema]

Precedence: the dataclasses' defaults < the recipe's engine_defaults() < --config FILE < shorthands < --set.  The
shorthands' defaults are those (shown in --help), so nothing is repeated here.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_parsers", "ENGINE_SHORTHANDS"]

# flag -> (config key, kind, help); kind: "value", "true" (store_true -> True), "false" (store_true -> False),
# "append" (repeatable, collected into a tuple)
ENGINE_SHORTHANDS = {
    "--out": ("job.out", "value", "run folder"),
    "--steps": ("job.steps", "value", "optimizer steps in total"),
    "--seed": ("job.seed", "value", "run seed"),
    "--device": ("job.device", "value", "cpu, cuda or auto"),
    "--no-resume": ("job.resume", "false", "start over (removes the run folder's checkpoints and metrics)"),
    "--progress": ("job.progress", "true", "force a progress bar"),
    "--no-progress": ("job.progress", "false", "no progress bar"),
    "--preset": ("model.preset", "value", "CheersModel preset"),
    "--dtype": ("model.dtype", "value", "parameter dtype: float32 or bfloat16"),
    "--budget": ("data.budget", "value", "tokens per packed micro-batch"),
    "--global-tokens": ("data.global_tokens", "value", "tokens per optimizer step across ranks (0: = budget)"),
    "--num-workers": ("data.num_workers", "value", "loader worker processes per rank"),
    "--lr": ("optim.lr", "value", "peak learning rate"),
    "--weight-decay": ("optim.weight_decay", "value", "AdamW weight decay (matrices only)"),
    "--grad-clip": ("optim.grad_clip", "value", "max global grad norm (0: off)"),
    "--ema": ("optim.ema", "value", "EMA decay of the weights (0: off)"),
    "--warmup": ("schedule.warmup", "value", "warmup steps"),
    "--parallel": ("parallel.mode", "value", "auto, none, ddp or fsdp"),
    "--mixed-precision": ("parallel.mixed_precision", "value", "none or bf16"),
    "--activation-checkpointing": ("parallel.activation_checkpointing", "true", "recompute blocks in backward"),
    "--compile": ("parallel.compile", "true", "torch.compile each block"),
    "--save-every": ("checkpoint.every", "value", "steps between checkpoints (0: only at the end)"),
    "--keep-last": ("checkpoint.keep_last", "value", "checkpoints kept"),
    "--log-every": ("metrics.log_every", "value", "console line period"),
    "--tensorboard": ("metrics.tensorboard", "true", "write TensorBoard events to out/tensorboard"),
}


def _default_of(cfg, key: str):
    sec, name = key.split(".", 1)
    return getattr(cfg.sections()[sec], name)


def _add_shorthands(p, table: dict, cfg) -> None:
    for flag, (key, kind, text) in table.items():
        dest = "sh:" + flag
        if kind == "value":
            p.add_argument(flag, dest=dest, default=None, metavar=key.split(".")[-1].upper(),
                           help=f"{text} [{key}, default {_default_of(cfg, key)!r}]")
        elif kind == "append":
            p.add_argument(flag, dest=dest, action="append", default=None, metavar="TEXT", help=f"{text} [{key}]")
        else:
            p.add_argument(flag, dest=dest, action="store_true", default=None, help=f"{text} [{key}]")


def _values(args, table: dict) -> dict:
    from .config import parse_value

    out = {}
    for flag, (key, kind, _) in table.items():
        v = getattr(args, "sh:" + flag, None)
        if v is None:
            continue
        if kind == "value":
            out[key] = parse_value(v)
        elif kind == "append":
            out[key] = tuple(v)
        elif kind == "true":
            out[key] = True
        else:
            out[key] = False
    return out


def _recipe_from_argv(argv) -> str:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default="sft")
    known, _ = pre.parse_known_args(argv)
    return known.recipe


def add_parsers(sub, argv) -> None:
    from .config import Config, set_value
    from .spec import get_recipe

    name = _recipe_from_argv([a for a in (argv or sys.argv[1:])])
    try:
        recipe = get_recipe(name)
        base = Config(recipe_name=name, recipe=recipe.config_class())
        for key, v in recipe.engine_defaults().items():   # --help shows the defaults this recipe runs with
            set_value(base, key, v, where=f"recipe {name}'s defaults")
    except ValueError:   # an unknown recipe: _train says so (after argparse accepted the engine's flags)
        recipe, base = None, Config(recipe_name=name, recipe=None)
    tr = sub.add_parser("train", help="train with a recipe on the engine (resumes from out/checkpoint-*)",
                        description="Train a model with a recipe (default: sft, the tiny model on the synthetic "
                                    "world). Checkpoints, metrics.jsonl, loss_curve.png, eval/ and summary.json go "
                                    "to the run folder. Config: dataclass defaults < --config < shorthands < --set.")
    tr.add_argument("--recipe", default="sft", help="recipe name (umm train --list-recipes)")
    tr.add_argument("--config", default=None, help="a TOML file of config sections ([job], [optim], [recipe], ...)")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override one config key, e.g. --set optim.lr=3e-4 (repeatable)")
    tr.add_argument("--list-recipes", action="store_true", help="print the recipe names and exit")
    tr.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    _add_shorthands(tr, ENGINE_SHORTHANDS, base)
    if recipe is not None:
        _add_shorthands(tr, recipe.shorthands(), base)
    tr.set_defaults(fn=_train, _recipe_obj=recipe)

    ex = sub.add_parser("export", help="write a run's (or checkpoint's) consolidated save_pretrained folder")
    ex.add_argument("checkpoint", help="a run folder (its newest intact checkpoint) or a checkpoint-<step> folder")
    ex.add_argument("--out", required=True, help="where to write: the save_pretrained folder (config.json + "
                    "safetensors) of an sft run, the .safetensors file of a vae run")
    ex.add_argument("--ema", action="store_true", help="export the EMA weights (runs with optim.ema > 0)")
    ex.set_defaults(fn=_export)


def _train(args) -> int:
    from .config import Config, ConfigError
    from .engine.checkpoint import CorruptCheckpoint, RunFolderBusy
    from .spec import recipe_names

    if args.list_recipes:
        for n in recipe_names():
            print(n)
        return 0
    recipe = args._recipe_obj
    if recipe is None:
        print(f"train: unknown recipe {args.recipe!r}; recipes: {recipe_names()}", file=sys.stderr)
        return 2
    try:
        values = _values(args, ENGINE_SHORTHANDS)
        values.update(_values(args, recipe.shorthands()))
        cfg = Config.build(args.recipe, toml=args.config, overrides=args.overrides, values=values)
    except ConfigError as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_toml())
        return 0
    from .engine import train

    try:
        train(cfg)
    except (RunFolderBusy, CorruptCheckpoint, ConfigError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    except ValueError as e:   # e.g. a run folder started with other settings
        print(f"train: {e}", file=sys.stderr)
        return 2
    return 0


def _export(args) -> int:
    from .export import export

    try:
        out = export(args.checkpoint, args.out, ema=args.ema)
    except (FileNotFoundError, ValueError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}{' (EMA weights)' if args.ema else ''}")
    return 0

