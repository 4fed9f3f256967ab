"""From a run to a model: load a checkpoint's weights into a bare model (``umm generate``), or write the consolidated
save_pretrained folder (``umm export``: config.json + safetensors, one process, whatever world size trained it)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["resolve_checkpoint", "load_checkpoint_model", "export", "read_run", "write_part"]


def resolve_checkpoint(path) -> Path:
    """A checkpoint-{step} folder from a run folder (its newest intact checkpoint) or that folder itself."""
    from .engine.checkpoint import STATE_FILE, latest_checkpoint

    p = Path(path)
    if not p.is_dir():
        what = "is a file, not a folder" if p.exists() else "no such folder"
        raise FileNotFoundError(f"{p}: {what} (expected a run folder, a checkpoint-<step> folder or a "
                                f"save_pretrained folder)")
    if (p / STATE_FILE).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"{p}: holds neither config.json, {STATE_FILE} nor a complete checkpoint-<step> "
                                f"folder")
    return latest


def load_checkpoint_model(path, device=None, ema: bool = False):
    """The model (eval mode) of a run folder (its newest checkpoint), a checkpoint-{step} folder, or a
    save_pretrained folder; ``ema=True`` loads the checkpoint's EMA weights."""
    from ..model.checkpoint import from_pretrained
    from .config import Config, building_config
    from .engine.checkpoint import load_model_state, read_trainer_state
    from .spec import build_model, get_recipe

    p = Path(path)
    if (p / "config.json").is_file():
        if ema:
            raise ValueError(f"{p}: a save_pretrained folder holds one set of weights (no EMA)")
        return from_pretrained(p, device=device)
    folder = resolve_checkpoint(p)
    st = read_trainer_state(folder)
    cfg = Config.from_dict(st["config"], where=f"{folder}/trainer_state.json")
    init = getattr(cfg.recipe, "init", "")
    if "model_config" not in st and init and not Path(init).exists():
        raise FileNotFoundError(
            f"{folder}: this checkpoint was written before checkpoints recorded their architecture, so its model is "
            f"rebuilt from the run's recipe.init {init!r}, which is not there (relative paths are read from the "
            f"current directory, {os.getcwd()}): run from the directory the run was started in, or put the init "
            f"back")
    torch.manual_seed(0)
    # the checkpoint's weights fill it; its recorded architecture (checkpoints since stop 40) spares reading
    # recipe.init, which older checkpoints need
    model = build_model(get_recipe(cfg.recipe_name), building_config(cfg, st.get("model_config")))
    model.to(dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype])
    load_model_state(folder, model, ema=ema)
    if device is not None:
        model.to(device)
    return model.eval()


def export(path, out, ema: bool = False) -> Path:
    """Write what a run / checkpoint trained where users load it from, as its recipe says (the SFT recipe: the
    consolidated save_pretrained folder, atomically; the vae recipe: the autoencoder's safetensors file)."""
    from .spec import get_recipe

    folder, _, cfg = read_run(path)
    return Path(get_recipe(cfg.recipe_name).export(folder, cfg, out, ema=ema))


def read_run(run_or_checkpoint, recipe: str | None = None):
    """(checkpoint folder, its trainer state, the run's Config) of a run (its newest checkpoint, or the checkpoint
    given); with `recipe`, another recipe's run is refused by name."""
    from .config import Config
    from .engine.checkpoint import read_trainer_state

    folder = resolve_checkpoint(run_or_checkpoint)
    st = read_trainer_state(folder)
    cfg = Config.from_dict(st["config"], where=f"{folder}/trainer_state.json")
    if recipe is not None and cfg.recipe_name != recipe:
        raise ValueError(f"{folder}: a {cfg.recipe_name!r} run, not a {recipe} run")
    return folder, st, cfg


def write_part(state: dict, out_file, folder, st, cfg, **info) -> dict:
    """Write a trained part (a vae run's autoencoder, a vit run's tower) as one float32 safetensors file, and beside it
    ``<out_file>.json``: the checkpoint, its step, the run's config (what reruns it), `info`, and the run's own
    evaluation when it is of this checkpoint.  Both written atomically.  Returns that dict."""
    import json

    from ..utils import atomic_write, optional_import

    save_file = optional_import("safetensors.torch", "save_file")
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    meta = {"recipe": cfg.recipe_name, "step": str(st["step"]), "preset": cfg.model.preset, "seed": str(cfg.job.seed)}
    atomic_write(out_file, write=lambda p: save_file(state, p, metadata=meta), suffix=".safetensors")
    info = {"checkpoint": str(folder), "step": st["step"], "config": st["config"], **info}
    summary = Path(folder).parent / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        if s.get("steps") == st["step"] and "eval" in s:
            info["eval"] = s["eval"]
    atomic_write(Path(str(out_file) + ".json"), json.dumps(info, indent=1))
    return info
