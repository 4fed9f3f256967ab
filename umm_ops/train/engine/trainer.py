"""The training loop of every recipe: batch -> step -> backward -> clip -> optimizer -> metrics -> checkpoint.

    from umm_ops.train import Config, train
    summary = train(Config.build("sft", overrides=["job.steps=300", "job.out=runs/mine"]))

One process or many (``torchrun --nproc-per-node N -m umm_ops train ...`` runs this same function on every rank).
An optimizer step takes ``data.global_tokens / data.budget`` = M packed micro-batches from the global stream
(:mod:`.data`), M / W on each of the W ranks; each micro-batch's loss is scaled by W / M before backward and DDP /
FSDP2 average the gradients over ranks, so the step's gradient is the mean of the M micro-batch gradients whatever
the world size.  Metrics are averaged over the step's micro-batches (counts summed) across ranks.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

from ...utils import atomic_write, seed_of
from ..config import Config, building_config
from ..spec import StepContext, build_model, get_recipe
from . import distributed
from .checkpoint import Checkpointer, RunFolderBusy, RunLock, complete_checkpoints
from .data import PhasedLoader
from .metrics import Reporter, plot_losses, read_metrics
from .optim import EMA, LRSchedule, build_optimizer
from .parallelize import autocast_context, parallelize, resolve_mode

__all__ = ["train", "RUN_DEFINING"]

# engine keys that fix what a run computes: resuming with another value would not continue that run
RUN_DEFINING = ("job.seed", "model.preset", "model.dtype", "model.latent_input", "model.prediction",
                "model.latent_to_llm", "model.vae_weights", "model.vit_weights", "model.conv_widths",
                "model.conv_context",
                "model.conv_inputs", "model.conv_context_embeddings", "model.conv_repa", "model.embedding_multiplier",
                "model.vae_compute_dtype",
                "data.budget", "data.global_tokens", "optim.betas", "optim.eps", "optim.weight_decay", "optim.ema",
                "optim.lr_scales", "recipe_name")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_OUTPUTS = ("metrics.jsonl", "loss_curve.png", "summary.json", "config.toml")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _config_changes(saved: dict, cfg: Config, recipe) -> tuple:
    """(run-defining differences, other differences) between a checkpoint's config and this run's.  A key the
    saved config does not have (added to the engine or recipe after the run was made) counts as its default, so a
    new option does not lock older runs out of resuming."""
    fresh = type(cfg)(recipe_name=cfg.recipe_name, recipe=type(cfg.recipe)())
    a, b = {**_flat(fresh.to_dict()), **_flat(saved)}, _flat(cfg.to_dict())
    defining = set(RUN_DEFINING) | {f"recipe.{k}" for k in recipe.run_defining}
    hard, soft = [], []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            (hard if k in defining else soft).append((k, a.get(k), b.get(k)))
    return hard, soft


def _clear_outputs(out: Path, is_main: bool) -> None:
    """job.resume = false: remove this engine's outputs from the run folder (checkpoints, metrics, plots, eval)."""
    if not is_main or not out.is_dir():
        return
    for _, p in complete_checkpoints(out):
        shutil.rmtree(p, ignore_errors=True)
    for name in _OUTPUTS:
        if (out / name).is_file():
            (out / name).unlink()
    for name in ("eval", "tensorboard"):
        if (out / name).is_dir():
            shutil.rmtree(out / name, ignore_errors=True)


def train(cfg: Config, on_step=None) -> dict:
    """Run (or resume) the job `cfg` describes; returns the summary (rank 0: also out/summary.json).

    on_step(step, record): called on every rank after each optimizer step (step counts from 1) and its checkpoint;
    an exception there stops the run as a crash would (the tests use it)."""
    if not isinstance(cfg, Config):
        raise TypeError(f"train: expected a umm_ops.train.Config, got {type(cfg).__name__}")
    cfg.validate()
    recipe = get_recipe(cfg.recipe_name)
    d = distributed.init(cfg.job.device, cfg.parallel.backend)
    try:
        out = Path(cfg.job.out)
        lock, err = None, None
        if d.is_main:
            try:
                lock = RunLock(out).acquire()
            except RunFolderBusy as e:
                err = str(e)
        err = d.broadcast_object(err)
        if err:
            raise RunFolderBusy(err)
        try:
            return _run(cfg, recipe, d, out, lock, on_step)
        finally:
            if lock is not None:
                lock.release()
    finally:
        distributed.shutdown(d)


def _no_sync(model, mode: str, sync: bool):
    if sync:
        return contextlib.nullcontext()
    if mode == "ddp":
        return model.no_sync()
    if mode == "fsdp":
        model.set_requires_gradient_sync(False)

        @contextlib.contextmanager
        def back_on():
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return back_on()
    return contextlib.nullcontext()


def _run(cfg: Config, recipe, d, out: Path, lock, on_step) -> dict:
    t_start = time.perf_counter()
    is_main = d.is_main
    ck = Checkpointer(out, d, keep_last=cfg.checkpoint.keep_last, verify=cfg.checkpoint.verify,
                      log=lambda s: print(s, flush=True) if is_main else None)
    if is_main and lock is not None and lock.previous:
        p = lock.previous
        print(f"note: took over the stale lock of a run that is no longer running (pid {p.get('pid')} on "
              f"{p.get('host')})", flush=True)
    ck.clean_leftovers()
    if not cfg.job.resume:
        _clear_outputs(out, is_main)
    d.barrier()

    # ---------------------------------------------------------------- model, optimizer, data
    torch.manual_seed(seed_of(cfg.job.seed, "model-init"))
    # resuming: a model.vae_weights / vit_weights file that is gone is not needed (the checkpoint holds it)
    resuming = cfg.job.resume and bool(complete_checkpoints(out))
    build_cfg = building_config(cfg) if resuming else cfg
    bare = build_model(recipe, build_cfg)
    recorded = _recorded(recipe, cfg, bare)
    bare.to(device=d.device, dtype=_DTYPES[cfg.model.dtype])
    bare.train()
    mode = resolve_mode(cfg.parallel.mode, d.world_size)
    model = parallelize(bare, cfg.parallel, d, fsdp_units=recipe.fsdp_units(bare))
    opt = build_optimizer(model, cfg.optim)
    sched = LRSchedule.from_config(cfg)
    ema = EMA(model, cfg.optim.ema) if cfg.optim.ema > 0 else None
    M = cfg.micro_per_step()
    if M % d.world_size:
        raise ValueError(f"data.global_tokens / data.budget = {M} micro-batches per step cannot be split over "
                         f"{d.world_size} ranks: make it a multiple of the world size (e.g. data.global_tokens = "
                         f"{d.world_size * cfg.data.budget})")
    source = recipe.build_data(cfg, bare)
    loader = PhasedLoader(source, cfg.data.budget, M, d.rank, d.world_size, seed=cfg.job.seed,
                           num_workers=cfg.data.num_workers)

    # ---------------------------------------------------------------- resume
    start, ckpt = 0, None
    if cfg.job.resume:
        def check(st):
            hard, soft = _config_changes(st["config"], cfg, recipe)
            if hard:
                raise ValueError(f"{out}: cannot resume: the run was started with " +
                                 ", ".join(f"{k}={a!r}" for k, a, _ in hard) + " but this config has " +
                                 ", ".join(f"{k}={b!r}" for k, _, b in hard) +
                                 " (use the same settings, another --out folder, or --no-resume)")
            return soft
        ckpt, st = ck.load_latest(model, opt, ema, check=check)
        if ckpt is not None:
            start = int(st["step"])
            loader.load_state_dict(st["loader"])
            sched.load_state_dict(st["schedule"])
            soft = [c for c in _config_changes(st["config"], cfg, recipe)[1]]
            if soft and is_main:
                print("note: settings changed since the checkpoint (accepted): " +
                      ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in soft), flush=True)
    rows = read_metrics(out / "metrics.jsonl", upto=start) if ckpt is not None else []
    rep = Reporter(out, is_main, cfg.job.steps, min(start, cfg.job.steps), cfg.job.progress,
                   cfg.metrics.tensorboard, cfg.metrics.log_every)
    rep.open_log(rows)
    if is_main:
        atomic_write(out / "config.toml", cfg.to_toml())
    n_params = sum(p.numel() for p in bare.parameters() if p.requires_grad)   # global sizes, FSDP2 shards too
    rep.line(f"{cfg.recipe_name}: {cfg.model.preset} ({n_params / 1e6:.1f}M trainable parameters) on "
             f"{d.world_size} x {d.device.type}, {cfg.model.dtype}"
             + (" + bf16 mixed precision" if cfg.parallel.mixed_precision == "bf16" else "")
             + (", the frozen VAE in bf16" if getattr(getattr(getattr(bare, "config", None), "vae", None),
                                                      "compute_dtype", None) == "bfloat16" else "")
             + f", parallel {mode}; {M} micro-batch(es) of {cfg.data.budget} tokens per step; "
             + "".join(f"{x}; " for x in [recipe.describe(cfg)] if x)
             + (f"resumed from {ckpt.name}" if ckpt is not None else "new run") + f"; out {out}")

    # ---------------------------------------------------------------- the loop
    params = [p for p in model.parameters() if p.requires_grad]
    # Every trainable parameter gets a (zero) gradient from the start and keeps it (zero_grad without set_to_none):
    # a parameter a step does not use (the flow head in a batch without an image to generate) is then updated with a
    # zero gradient like under DDP / FSDP2, and the optimizer state covers every parameter from the first step, so
    # every checkpoint has the same keys.  (After the resume above: DCP initialises a fresh optimizer's state only
    # while no parameter has a gradient.)
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    local = M // d.world_size
    E = int(recipe.updates_per_batch(cfg))
    if E < 1 or start % E:
        raise ValueError(f"{cfg.recipe_name}: {E} update(s) per batch; cannot resume at step {start}, which is not "
                         f"a multiple of it (the batch of that step is gone)")
    tokens_run, last_saved, micro = 0, ckpt, None
    t_train = time.perf_counter()
    try:
        for step in range(start, cfg.job.steps):
            t0 = time.perf_counter()
            if micro is None or step % E == 0:
                micro = loader.next_step(step)
            t_data = time.perf_counter() - t0
            lr = sched.apply(opt, step)
            opt.zero_grad(set_to_none=False)
            sums: dict = {"loss": 0.0}
            counts: dict = {"tokens": 0, "docs": 0}
            for k, batch in enumerate(micro):
                batch = batch.to(d.device)
                ctx = StepContext(step=step, seed=cfg.job.seed, micro_index=d.rank + k * d.world_size,
                                  micro_per_step=M, device=d.device, rank=d.rank, world_size=d.world_size,
                                  module=bare, config=cfg)
                with _no_sync(model, mode, k == local - 1), autocast_context(cfg.parallel, mode, d.device):
                    res = recipe.step(model, batch, ctx)
                    (res.loss / local).backward()
                sums["loss"] += float(res.loss.detach())
                for name, v in res.metrics.items():
                    sums[name] = sums.get(name, 0.0) + float(v)
                for name, v in res.counts.items():
                    counts[name] = counts.get(name, 0) + int(v)
                counts["tokens"] += int(batch.num_tokens)
                counts["docs"] += int(getattr(batch, "num_docs", 0))
            keys = sorted(sums)
            means = dict(zip(keys, d.all_reduce_mean([sums[k] / local for k in keys])))
            ckeys = sorted(counts)
            totals = dict(zip(ckeys, (int(v) for v in d.all_reduce_sum([counts[k] for k in ckeys]))))
            if not math.isfinite(means["loss"]):
                raise FloatingPointError(
                    f"{cfg.recipe_name}: non-finite loss {means['loss']} at step {step + 1} (" +
                    ", ".join(f"{k} {v:.4g}" for k, v in means.items() if k != "loss") +
                    f"); lower optim.lr (now {lr:.2e}) or check the data")
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
            opt.step()
            if ema is not None:
                ema.update()
            dt = time.perf_counter() - t0
            tokens_run += totals["tokens"]
            rec = {"step": step + 1, **{k: means[k] for k in keys}, **totals, "lr": lr, "grad_norm": gnorm,
                   "step_s": dt, "data_s": t_data, "tokens_per_s": totals["tokens"] / dt, "micro_batches": M,
                   "world_size": d.world_size, "epoch": loader.epoch,
                   **({"phase": loader.phase} if len(loader.phases) > 1 else {})}
            rows.append(rec)
            rep.record(rec)
            if (step + 1) % cfg.metrics.log_every == 0 or step + 1 == cfg.job.steps or step == start:
                recent = rows[-cfg.metrics.log_every:]
                tps = sum(r["tokens"] for r in recent) / sum(r["step_s"] for r in recent)
                extra = " | ".join(f"{k} {means[k]:.4f}" for k in keys if k != "loss")
                rep.line(f"step {step + 1:>5}/{cfg.job.steps} | loss {means['loss']:.4f}"
                         + (f" | {extra}" if extra else "") + f" | lr {lr:.2e} | gnorm {gnorm:.2f}"
                         + (f" | {tps:,.0f} tok/s" if tps > 0 else
                            f" | {sum(r['step_s'] for r in recent) / len(recent):.1f} s/step"))
            if (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or step + 1 == cfg.job.steps:
                state = {"config": cfg.to_dict(), "loader": loader.state_dict(), "schedule": sched.state_dict(),
                         "train": {"tokens_this_run": tokens_run, "epoch": loader.epoch}, **recorded}
                last_saved = ck.save(step + 1, model, opt, ema, state)
                rep.line(f"saved {last_saved}")
            if on_step is not None:
                on_step(step + 1, rec)
    finally:
        rep.close()
        loader.close()
    train_s = time.perf_counter() - t_train

    # ---------------------------------------------------------------- summary and evaluation (rank 0)
    eval_model = _gather_for_eval(recipe, cfg, model, bare, mode, d, build_cfg)
    if not is_main:
        return {}
    summary = {"out": str(out), "recipe": cfg.recipe_name, "steps": cfg.job.steps, "resumed_from_step": start,
               "steps_this_run": cfg.job.steps - start, "world_size": d.world_size, "parallel": mode,
               "micro_batches_per_step": M,
               "checkpoint": str(last_saved) if last_saved is not None else None, "trainable_parameters": n_params,
               "train_s": train_s, "tokens_per_s": tokens_run / train_s if tokens_run else None}
    if rows:
        ts = sorted(r["step_s"] for r in rows)
        summary["median_step_s"] = ts[len(ts) // 2]   # robust to the first steps' warm-up and to a shared machine
        summary["median_tokens_per_s"] = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
        k = max(1, min(10, len(rows) // 4))
        for key in [x for x in rows[-1] if x == "loss" or x.endswith("_loss")]:
            vals = [r[key] for r in rows if key in r]
            summary[f"{key}_first{k}"] = sum(vals[:k]) / len(vals[:k])
            summary[f"{key}_last{k}"] = sum(vals[-k:]) / len(vals[-k:])
        if cfg.metrics.plot:
            keys = ["loss"] + [x for x in rows[-1] if x.endswith("_loss")]
            plot_losses(rows, out / "loss_curve.png", keys=keys, title=f"{cfg.recipe_name} ({cfg.model.preset})")
            summary["loss_curve"] = str(out / "loss_curve.png")
    if eval_model is not None:
        t_eval = time.perf_counter()
        eval_model.eval()
        summary["eval"] = recipe.evaluate(eval_model, cfg, out)
        summary["eval_s"] = time.perf_counter() - t_eval
        for ln in recipe.report(summary["eval"]):
            rep.line(ln)
    summary["wall_s"] = time.perf_counter() - t_start
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    if rows:
        k = max(1, min(10, len(rows) // 4))
        losses = ", ".join(f"{key} {summary[f'{key}_first{k}']:.3f} -> {summary[f'{key}_last{k}']:.3f}"
                           for key in [x for x in rows[-1] if x == "loss" or x.endswith("_loss")])
        rep.line(f"mean of the first / last {k} steps: {losses}; wall {summary['wall_s']:.1f} s; "
                 f"{out / 'summary.json'}")
    return summary


def _recorded(recipe, cfg: Config, bare) -> dict:
    """What every checkpoint records so that loading it needs nothing outside the run folder: the architecture of
    the saved model (a Cheers-family model's CheersConfig, ``model_config``: with recipe.init it is the init's, which
    the run's own config does not name) and the world a recipe reads from recipe.init (flow-grpo's
    ``world_kwargs``: where `umm eval` draws its held-out records)."""
    from ...model.config import CheersConfig

    out = {}
    c = getattr(bare, "config", None)
    if isinstance(c, CheersConfig):
        out["model_config"] = c.to_dict()
    world = getattr(recipe, "world_kwargs", None)
    if callable(world):
        out["world"] = {k: list(v) if isinstance(v, tuple) else v for k, v in world(cfg).items()}
    return out


def _gather_for_eval(recipe, cfg: Config, model, bare, mode: str, d, build_cfg: Config):
    """The model rank 0 evaluates (unsharded), or None when the recipe evaluates nothing.  Under FSDP2 the full
    weights are gathered (a collective) into a fresh copy of the model on rank 0."""
    if not recipe.wants_eval(cfg):
        return None
    if mode != "fsdp":
        return bare if d.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return None
    copy = build_model(recipe, build_cfg)
    copy.load_state_dict(full)
    return copy.to(device=d.device, dtype=_DTYPES[cfg.model.dtype])
