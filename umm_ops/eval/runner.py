"""``umm eval``: one evaluation harness for every recipe.

    from umm_ops.eval.runner import evaluate, render_markdown
    res = evaluate(model, ["vqa", "geneval"], n=256, seed=0, out_dir="eval/")
    print(render_markdown(res))

Held-out records only: records ``first .. first + n - 1`` of the synthetic world (``first`` defaults to the SFT
recipe's ``train_records``, the end of its training split; ``umm eval`` takes it from the run's saved config).
Deterministic: every draw (question picks, sampler noise, degradations, bootstrap resamples) is seeded through
:func:`umm_ops.utils.seed_of` from ``seed``, and models are decoded greedily; the same model, arguments and seed
give the same JSON.  Each task (:mod:`umm_ops.eval.tasks`) returns per-item results; this module aggregates them:
the mean score with a 95% confidence interval (Wilson for exact-match proportions, a seeded percentile bootstrap
for mean scores, :mod:`umm_ops.eval.stats`), the same per type (and the task's other breakdowns), secondary
metrics, and a sample grid per task (PNG in ``out_dir``).

Result (JSON-serialisable)::

    {"model": ..., "seed": 0, "n": 256, "first": 50000, "records": [50000, 50256], "image_size": 64,
     "steps": null, "world": {"seed": 0, "max_objects": 3, "size": 64}, "data": null,
     "tasks": {"vqa": {"score": 0.71, "ci95": [0.65, 0.77], "n": 256, "ci_method": "wilson",
                       "per_type": {"color": {"score", "ci95", "n"}, ...}, "metrics": {...}, "needs": "...",
                       "items": [{"index", "score", "type", ...}, ...], "grid_png": "eval/vqa.png"}, ...}}
"""
from __future__ import annotations

import json
from pathlib import Path

from ..utils import atomic_write, optional_import
from .stats import summarize
from .tasks import TASKS, EvalContext, get_task

__all__ = ["evaluate", "aggregate", "render_markdown", "save_grid", "default_world_kwargs", "default_first",
           "DEFAULT_TASKS"]

DEFAULT_TASKS = ("vqa", "caption", "geneval", "segment", "vae-recon", "mmd-bench")


def _sft_defaults():
    from ..train.recipes.sft import SFTRecipeConfig

    return SFTRecipeConfig()


def default_world_kwargs() -> dict:
    """The world the SFT recipe trains on by default (seed 0 = the default job seed, its world arguments)."""
    return {"seed": 0, **_sft_defaults().world_kwargs()}


def default_first() -> int:
    """The end of the SFT recipe's default training split (records [0, train_records) are trained on)."""
    return _sft_defaults().train_records


def _parse_tasks(tasks) -> list:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise ValueError(f"evaluate: unknown task(s) {bad}; tasks: {', '.join(TASKS)}" if bad
                         else "evaluate: no tasks given")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"evaluate: a task is named twice in {tasks}")
    return tasks


def aggregate(task, out, seed: int) -> dict:
    """Per-item results of `task` -> {"score", "ci95", "n", "ci_method", "per_type", "per_<key>", "metrics",
    ..., "items"}."""
    items = out.items
    res = summarize([it["score"] for it in items], task.ci, (seed, task.name))
    for b in task.breakdowns:
        groups: dict = {}
        for it in items:
            groups.setdefault(str(it[b]), []).append(it["score"])
        res["per_type" if b == "type" else f"per_{b}"] = {
            k: {key: v for key, v in summarize(vals, task.ci, (seed, task.name, b, k)).items() if key != "ci_method"}
            for k, vals in sorted(groups.items())}
    if task.metrics:
        res["metrics"] = {m: summarize([it[key] for it in items], method, (seed, task.name, m))
                          for m, (key, method) in task.metrics.items()}
    res.update(out.extra)
    res["needs"] = task.needs
    res["items"] = items
    return res


def _tile(img, size: int):
    """uint8 (3, H, W) or float (3, H, W) in [-1, 1] -> PIL image of size x size (nearest neighbour)."""
    import torch
    Image = optional_import("PIL", "Image")

    t = img.detach().cpu()
    if t.dtype != torch.uint8:
        t = ((t.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    im = Image.fromarray(t.permute(1, 2, 0).contiguous().numpy())
    return im if im.size == (size, size) else im.resize((size, size), Image.NEAREST)


def save_grid(grid: dict, path, tile: int | None = None, labels: bool = True) -> str:
    """Write a task's sample grid as PNG: rows of images, one column per item, a label (lines split on newlines)
    under each column."""
    Image, ImageDraw = optional_import("PIL", "Image", "ImageDraw")

    cols, rows = grid["columns"], grid["rows"]
    if not cols:
        return ""
    if tile is None:
        tile = max(64, max(int(c["images"][0].shape[-1]) for c in cols))
    pad, left = 4, (90 if labels else 0)
    n_lines = max(len(str(c["label"]).split("\n")) for c in cols)
    lab = 12 * n_lines + 2 if labels else 0
    W = left + len(cols) * (tile + pad)
    H = len(rows) * (tile + pad) + lab
    im = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(im)
    for r, name in enumerate(rows):
        if labels:
            draw.text((4, r * (tile + pad) + tile // 2 - 6), str(name)[:14], fill="black")
        for c, col in enumerate(cols):
            im.paste(_tile(col["images"][r], tile), (left + c * (tile + pad), r * (tile + pad)))
    if labels:
        for c, col in enumerate(cols):
            for j, line in enumerate(str(col["label"]).split("\n")):
                draw.text((left + c * (tile + pad), len(rows) * (tile + pad) + 12 * j), line[:max(4, tile // 6)],
                          fill="black")
    atomic_write(path, write=lambda p: im.save(p, format="PNG"), suffix=".png")
    return str(path)


def evaluate(model, tasks=DEFAULT_TASKS, n: int = 256, seed: int = 0, image_size: int | None = None, out_dir=None,
             world_kwargs: dict | None = None, *, first: int | None = None, steps: int | None = None,
             batch_size: int = 16, grid_items: int = 8, model_name: str | None = None, data: str | None = None,
             progress=None, refine_rounds: int = 3, cfg_scale: float | None = None, image_cfg_scale: float = 1.0,
             cfg_renorm: str = "none", cfg_interval=None) -> dict:
    """Evaluate `model` on `tasks` (names or "a,b") over held-out records ``first .. first + n - 1``.

    world_kwargs: SyntheticWorld arguments of the world the model was trained on (default
    :func:`default_world_kwargs`; its ``size`` is `image_size`).  image_size: default the model's
    ``config.image_size``.  steps: sampler steps of generated images (default the model's).  out_dir: sample grids
    ``<task>.png`` go there (``eval.json`` / ``eval.md`` too).  data: a user's multiple-choice benchmark
    (MMBench-style TSV or JSONL manifest) read by vqa and mmd-bench instead of the world (its first n records).
    progress(name, result, seconds) is called after each task.  cfg_scale / image_cfg_scale / cfg_renorm /
    cfg_interval: the
    guidance of edits (tasks edit and refine; two-scale CFG, ``umm_ops.model.generate.guide``; cfg_scale also
    guides geneval's images and refine's first drawing).  Returns the result dict (module docstring)."""
    import time

    from ..data.synthetic import SyntheticWorld

    names = _parse_tasks(tasks)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"evaluate: n must be a positive int, got {n!r}")
    if data is not None:
        bad = [t for t in names if not TASKS[t].reads_data]
        if bad:
            raise ValueError(f"evaluate: {', '.join(bad)} read(s) the synthetic world only; a data file is read by "
                             f"{', '.join(t for t in TASKS if TASKS[t].reads_data)}")
    if first is None:
        first = default_first()
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ValueError(f"evaluate: first must be a non-negative int, got {first!r}")
    wk = {**default_world_kwargs(), **(world_kwargs or {})}
    wk.pop("length", None)
    size = wk.pop("size", None)
    if image_size is None:
        image_size = size or getattr(getattr(model, "config", None), "image_size", None) or 64
    world = SyntheticWorld(size=int(image_size), length=first + n, **wk)
    if isinstance(refine_rounds, bool) or not isinstance(refine_rounds, int) or refine_rounds < 1:
        raise ValueError(f"evaluate: refine_rounds must be an int >= 1, got {refine_rounds!r}")
    from ..model.generate import CFG_RENORMS, check_cfg_interval

    cfg_interval = check_cfg_interval(cfg_interval, "evaluate")

    if cfg_renorm not in CFG_RENORMS:
        raise ValueError(f"evaluate: cfg_renorm must be one of {', '.join(CFG_RENORMS)}, got {cfg_renorm!r}")
    import math

    for k, v in (("cfg_scale", cfg_scale), ("image_cfg_scale", image_cfg_scale)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"evaluate: {k} must be a finite number, got {v!r}")
    ctx = EvalContext(world, first, n, int(seed), int(image_size), steps, batch_size, grid_items, data,
                      refine_rounds, None if cfg_scale is None else float(cfg_scale), float(image_cfg_scale),
                      cfg_renorm, cfg_interval)
    out_dir = Path(out_dir) if out_dir is not None else None
    result = {"model": model_name or type(model).__name__, "seed": int(seed), "n": n, "first": first,
              "records": [first, first + n], "image_size": int(image_size), "steps": steps,
              "guidance": {"cfg_scale": ctx.cfg_scale, "image_cfg_scale": ctx.image_cfg_scale,
                           "cfg_renorm": ctx.cfg_renorm,
                           "cfg_interval": list(cfg_interval) if cfg_interval else None},
              "world": {**{k: list(v) if isinstance(v, tuple) else v for k, v in wk.items()},
                        "size": int(image_size)}, "data": data, "tasks": {}}
    if data is not None:
        result.update(first=0, records=[0, len(ctx.data_records())], world=None)
    for name in names:
        task = get_task(name)
        t0 = time.perf_counter()
        out = task.run(model, ctx)
        res = aggregate(task, out, int(seed))
        if out_dir is not None and out.grid:
            res["grid_png"] = save_grid(out.grid, out_dir / f"{name}.png")
        result["tasks"][name] = res
        if progress is not None:
            progress(name, res, time.perf_counter() - t0)
    if out_dir is not None:
        write_json(result, out_dir / "eval.json")
        atomic_write(out_dir / "eval.md", render_markdown(result))
    return result


def write_json(result: dict, path) -> str:
    return atomic_write(path, json.dumps(result, indent=1) + "\n")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ci(ci) -> str:
    return "-" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def render_markdown(result: dict, breakdowns: bool = True) -> str:
    """A markdown report: one table row per task (and per secondary metric), then the per-type breakdowns."""
    a, b = result["records"]
    what = f"{result['data']}: records {a}..{b - 1}" if result.get("data") else f"held-out records {a}..{b - 1}"
    lines = [f"**{result['model']}**: {what} (n = {b - a}), {result['image_size']} px, seed {result['seed']}", "",
             "| task | score | 95% CI | n | CI method |", "|---|---|---|---|---|"]
    for name, r in result["tasks"].items():
        lines.append(f"| {name} | {_fmt(r['score'])} | {_ci(r['ci95'])} | {r['n']} | {r['ci_method']} |")
        for m, s in r.get("metrics", {}).items():
            lines.append(f"| {name}: {m} | {_fmt(s['score'])} | {_ci(s['ci95'])} | {s['n']} | {s['ci_method']} |")
    if breakdowns:
        for name, r in result["tasks"].items():
            for key in [k for k in r if k.startswith("per_")]:
                lines += ["", f"{name} {key.replace('_', ' ')}:", "", "| | score | 95% CI | n |", "|---|---|---|---|"]
                lines += [f"| {k} | {_fmt(s['score'])} | {_ci(s['ci95'])} | {s['n']} |" for k, s in r[key].items()]
    return "\n".join(lines) + "\n"
