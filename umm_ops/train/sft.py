"""Supervised fine-tuning of CheersModel on packed span batches, and the built-in demo job on the synthetic world.

    from umm_ops.train import SFTConfig, train
    summary = train(SFTConfig(preset="tiny", image_size=64, steps=150, out="runs/demo"))

The loop, top to bottom: CheersModel(preset) -> a map-style dataset over SyntheticWorld records (index i ->
record i // len(tasks), task tasks[i % len(tasks)]; a VQA index picks one of the record's questions by a hash of
(seed, record)) -> PackedLoader (greedy packing under ``budget`` tokens) -> AdamW (no weight decay on 1-d
parameters) with linear warmup and cosine decay to ``min_lr_ratio * lr`` -> grad-norm clipping.  The flow noise and
the CFG dropout of step s are drawn from generators seeded by (seed, s) (CheersModel.forward's ``seed``), the
timesteps by the loader from (seed, epoch, sample id): a step's randomness depends on nothing but its number.

Checkpoints: ``out/checkpoint-{step}/`` holds ``model/`` (save_pretrained: config.json + safetensors),
``optimizer.pt`` (a dict of tensors and numbers, written by torch.save and read back with weights_only=True, so no
arbitrary object is ever unpickled), ``rng.safetensors`` (torch's generator states) and ``trainer_state.json``
(step, config, the loader's position, the LR schedule's state, Python's random state), written last.  The folder
is assembled under a temporary name and moved into place with os.replace, so a checkpoint folder either is complete
or does not exist; the last ``keep_last`` are kept.  ``train(config, resume=True)`` continues from the newest
complete checkpoint and reproduces an uninterrupted run bit for bit (same machine, same thread count):
parameters, optimizer moments, the loader's batch stream and the per-step seeds all restart where they were.

After training: ``metrics.jsonl`` (one line per step), ``loss_curve.png``, and an evaluation on held-out records
(never trained on: indices >= train_records): greedy VQA answer accuracy, generated images scored by the synthetic
world's GenEval-like pixel checker (PNGs in ``out/eval/``), next to two references: the checker's score of the
frozen VAE's reconstruction of the true picture (an upper bound for anything decoded by that VAE) and the
majority-letter baseline of the VQA answers.  ``summary.json`` gathers it all.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["SFTConfig", "SyntheticSFTDataset", "train", "evaluate", "latest_checkpoint", "load_checkpoint_model",
           "lr_at"]

CHECKPOINT_FORMAT = "umm_ops-sft-checkpoint"
CHECKPOINT_VERSION = 1
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
_TASKS = ("caption", "vqa", "generate", "segment", "degraded_vqa")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Fields that fix what an existing run computes: resuming with another value would not continue that run.
_RUN_DEFINING = ("preset", "image_size", "budget", "seed", "tasks", "train_records", "max_objects", "dtype",
                 "weight_decay", "betas")


def _hash(*parts) -> int:
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------- config
@dataclass
class SFTConfig:
    """One object that defines a run (saved in every checkpoint).

    preset: CheersModel preset; image_size: side of the synthetic pictures (a multiple of 32, the pixels per LLM
    token); steps: optimizer steps; budget: tokens per packed batch; lr, warmup (steps), min_lr_ratio (cosine decay
    floor as a fraction of lr), weight_decay (matrices only), betas, grad_clip (max global grad norm, 0 = off);
    seed: model init, data order, timesteps, noise; num_workers: DataLoader workers; out: run folder; save_every /
    keep_last: checkpoint period (steps, 0 = only at the end) and how many to keep; log_every: log period;
    tasks: the synthetic task mix; train_records: records 0 .. train_records-1 are trained on, later ones held out;
    max_objects: objects per scene; evaluate: run the evaluation after training; eval_vqa / eval_images /
    eval_captions: held-out questions / image prompts / captions to evaluate; eval_steps: sampler steps of the
    evaluation images; eval_prompts: extra free-text image prompts (generated and saved, not scored);
    dtype: "float32", or "bfloat16" (pure bf16: parameters and AdamW moments in bf16); device: "cpu", "cuda" or
    "auto"; progress: a progress bar (None: when stdout is a terminal).
    """

    preset: str = "tiny"
    image_size: int = 64
    steps: int = 150
    budget: int = 1024
    lr: float = 1e-3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 0
    out: str = "runs/demo"
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 10
    tasks: tuple = ("caption", "vqa", "generate")
    train_records: int = 50_000
    max_objects: int = 3
    evaluate: bool = True
    eval_vqa: int = 32
    eval_images: int = 4
    eval_captions: int = 2
    eval_steps: int = 12
    eval_prompts: tuple = ()
    dtype: str = "float32"
    device: str = "cpu"
    progress: bool | None = None

    def validate(self) -> "SFTConfig":
        def need(ok, what):
            if not ok:
                raise ValueError(f"SFTConfig: {what}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        self.tasks = tuple(self.tasks)
        self.betas = tuple(float(b) for b in self.betas)
        self.eval_prompts = tuple(self.eval_prompts)
        need(isinstance(self.preset, str), f"preset must be a preset name, got {self.preset!r}")
        need(is_int(self.image_size) and self.image_size >= 32 and self.image_size % 32 == 0,
             f"image_size must be a multiple of 32 (pixels per LLM token), >= 32, got {self.image_size!r}")
        for name in ("steps", "budget", "log_every", "keep_last"):
            v = getattr(self, name)
            need(is_int(v) and v >= 1, f"{name} must be an int >= 1, got {v!r}")
        for name in ("warmup", "save_every", "num_workers", "seed", "eval_vqa", "eval_images", "eval_captions"):
            v = getattr(self, name)
            need(is_int(v) and v >= 0, f"{name} must be an int >= 0, got {v!r}")
        need(is_int(self.eval_steps) and self.eval_steps >= 1,
             f"eval_steps must be an int >= 1, got {self.eval_steps!r}")
        need(is_int(self.train_records) and self.train_records >= 1,
             f"train_records must be an int >= 1, got {self.train_records!r}")
        need(is_int(self.max_objects) and 1 <= self.max_objects <= 8,
             f"max_objects must be an int in [1, 8], got {self.max_objects!r}")
        need(isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr),
             f"lr must be a positive number, got {self.lr!r}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
             f"betas must be two numbers in [0, 1), got {self.betas!r}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip!r}")
        need(len(self.tasks) >= 1 and set(self.tasks) <= set(_TASKS) and len(set(self.tasks)) == len(self.tasks),
             f"tasks must be distinct names from {_TASKS}, got {self.tasks!r}")
        need(all(isinstance(p, str) and p for p in self.eval_prompts),
             f"eval_prompts must be non-empty strings, got {self.eval_prompts!r}")
        need(self.dtype in _DTYPES, f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        need(self.device in ("cpu", "cuda", "auto"), f"device must be 'cpu', 'cuda' or 'auto', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("SFTConfig: device='cuda' but torch sees no CUDA device (use 'cpu' or 'auto')")
        need(bool(str(self.out)), "out must name a folder")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SFTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"SFTConfig.from_dict: unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d).validate()


def lr_at(cfg: SFTConfig, step: int) -> float:
    """Learning rate of (0-based) step: linear warmup to lr over `warmup` steps, then cosine to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _device(cfg: SFTConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


# ----------------------------------------------------------------------------------------------- data
class SyntheticSFTDataset:
    """Map-style dataset of Samples over SyntheticWorld records ``first .. first + records - 1``.

    Index i -> record ``first + i // len(tasks)``, task ``tasks[i % len(tasks)]``; a task giving several samples
    per record (vqa: one per question) yields the one picked by a hash of (seed, record): a fixed, deterministic
    mix, the same sample for the same index in any process."""

    def __init__(self, size: int, seed: int, records: int, tasks=("caption", "vqa", "generate"), max_objects: int = 3,
                 first: int = 0):
        from ..data.synthetic import SyntheticWorld

        self.world = SyntheticWorld(size=size, seed=seed, max_objects=max_objects, length=first + records)
        self.tasks, self.records, self.first, self.seed = tuple(tasks), records, first, seed

    def __len__(self) -> int:
        return self.records * len(self.tasks)

    def __getitem__(self, i):
        from ..data.synthetic import to_samples

        if isinstance(i, bool) or not isinstance(i, int) or not (0 <= i < len(self)):
            raise IndexError(f"SyntheticSFTDataset: index {i!r} out of range [0, {len(self)})")
        r = self.first + i // len(self.tasks)
        samples = to_samples(self.world[r], (self.tasks[i % len(self.tasks)],))
        return samples[_hash(self.seed, r, "pick") % len(samples)]

    def images(self, n: int) -> torch.Tensor:
        """The first n records' pictures as (n, 3, H, W) in [-1, 1] (VAE calibration)."""
        return torch.stack([self.world[self.first + k].image.float() / 127.5 - 1.0 for k in range(n)])


# ----------------------------------------------------------------------------------------------- checkpoints
def _checkpoints(out: Path) -> list:
    """[(step, folder)] of the complete checkpoints in `out`, oldest first.  Complete: named checkpoint-{step}
    and holding a trainer_state.json (written last) that names that step."""
    found = []
    if not out.is_dir():
        return found
    for p in out.iterdir():
        m = _CKPT_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        try:
            with open(p / "trainer_state.json") as f:
                st = json.load(f)
        except (OSError, ValueError):
            continue
        if st.get("format") == CHECKPOINT_FORMAT and st.get("step") == int(m.group(1)):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out) -> Path | None:
    """The newest complete checkpoint folder of a run folder, or None."""
    ck = _checkpoints(Path(out))
    return ck[-1][1] if ck else None


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [folder] + [p for p in folder.rglob("*") if p.is_dir()]:
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _write_optimizer(opt, path: Path) -> None:
    torch.save(opt.state_dict(), path)


def _rng_state(device: torch.device) -> tuple:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def _set_rng_state(tensors: dict, plain: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(out: Path, step: int, model, opt, loader, cfg: SFTConfig, keep_last: int) -> Path:
    """Write out/checkpoint-{step} atomically (temp folder + os.replace), then drop all but the last keep_last."""
    from safetensors.torch import save_file

    from ..model.checkpoint import save_pretrained

    final = out / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step}-", dir=out))
    try:
        save_pretrained(model, tmp / "model")
        _write_optimizer(opt, tmp / "optimizer.pt")
        rng_tensors, rng_plain = _rng_state(_device(cfg))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, "config": cfg.to_dict(),
                 "loader": loader.state_dict(), "scheduler": {"step": step, "next_lr": lr_at(cfg, step)},
                 "rng": rng_plain, "torch": torch.__version__, "time": time.time()}
        with open(tmp / "trainer_state.json", "w") as f:   # last: its presence marks the folder complete
            json.dump(state, f, indent=1)
        _fsync_tree(tmp)
        if final.exists():   # the same step saved again (a resumed run): set the old copy aside, then replace
            old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-{step}-", dir=out))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, p in _checkpoints(out)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _load_checkpoint(folder: Path, model, opt, loader, cfg: SFTConfig) -> int:
    from safetensors.torch import load_file

    from ..model.checkpoint import load_state, read_safetensors_folder

    with open(folder / "trainer_state.json") as f:
        state = json.load(f)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{folder}: checkpoint version {state.get('version')!r}, this trainer reads "
                         f"version {CHECKPOINT_VERSION}")
    saved = state["config"]
    mine = cfg.to_dict()
    diff = [(k, saved.get(k), mine[k]) for k in _RUN_DEFINING if saved.get(k) != mine[k]]
    if diff:
        raise ValueError(f"{folder}: cannot resume: the run was started with " +
                         ", ".join(f"{k}={a!r}" for k, a, _ in diff) + " but this config has " +
                         ", ".join(f"{k}={b!r}" for k, _, b in diff) +
                         " (use the same settings, another --out folder, or --no-resume)")
    load_state(model, read_safetensors_folder(folder / "model"), who=str(folder / "model"))
    opt.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    loader.load_state_dict(state["loader"])
    _set_rng_state(load_file(str(folder / "rng.safetensors")), state["rng"], _device(cfg))
    return int(state["step"])


def load_checkpoint_model(path, device=None):
    """A CheersModel (eval mode) from a run folder (its newest checkpoint), a checkpoint-{step} folder, or a
    save_pretrained folder."""
    from ..model.checkpoint import from_pretrained

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such folder (expected a run folder, a checkpoint-<step> folder or a "
                                f"save_pretrained folder)")
    if (p / "config.json").is_file():
        return from_pretrained(p, device=device)
    if (p / "model" / "config.json").is_file():
        return from_pretrained(p / "model", device=device)
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"{p}: holds neither config.json, model/config.json nor a complete "
                                f"checkpoint-<step> folder")
    return from_pretrained(latest / "model", device=device)


# ----------------------------------------------------------------------------------------------- logging
class _Reporter:
    """Log lines on stdout (through rich's console above a progress bar when stdout is a terminal)."""

    def __init__(self, total: int, start: int, enabled: bool | None):
        use = sys.stdout.isatty() if enabled is None else enabled
        self.progress = self.task = None
        if use:
            try:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                           TimeRemainingColumn)
            except ImportError:
                use = False
        if use:
            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    def advance(self, info: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _read_metrics(path: Path, upto: int | None = None) -> list:
    rows = []
    if path.is_file():
        with open(path) as f:
            for ln in f:
                ln = ln.strip()
                if not ln:
                    continue
                try:
                    r = json.loads(ln)
                except ValueError:   # a line cut short by a crash
                    continue
                if upto is None or r.get("step", 0) <= upto:
                    rows.append(r)
    return rows


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _plot_losses(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    gen = [r for r in rows if r.get("flow_images", 1) > 0]   # a batch with no image to generate has flow loss 0
    for key, color, rs in (("loss", "black", rows), ("text_loss", "tab:blue", rows), ("flow_loss", "tab:orange", gen)):
        steps, ys = [r["step"] for r in rs], [r[key] for r in rs]
        ema, smooth = None, []
        for y in ys:
            ema = y if ema is None else 0.9 * ema + 0.1 * y
            smooth.append(ema)
        ax.plot(steps, ys, color=color, alpha=0.25, lw=0.8)
        ax.plot(steps, smooth, color=color, lw=1.8, label=f"{key} (EMA 0.9)" + (" (batches with an image to "
                                                                                 "generate)" if rs is gen else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("SFT on the synthetic world")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- evaluation
def _to_pil(img: torch.Tensor):
    """(3, H, W) in [-1, 1] -> PIL image."""
    from PIL import Image

    x = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().cpu().numpy())


@torch.no_grad()
def evaluate(model, cfg: SFTConfig, out_dir=None) -> dict:
    """Held-out evaluation (records train_records, train_records + 1, ...): VQA accuracy (greedy, exact match of the
    answer letter), captions, and checker scores of generated images.  PNGs go to out_dir/eval/ when given."""
    from ..data.packing import ImageItem, Sample, TextItem
    from ..data.synthetic import SyntheticWorld, check, format_question

    world = SyntheticWorld(size=cfg.image_size, seed=cfg.seed, max_objects=cfg.max_objects,
                           length=cfg.train_records + max(cfg.eval_vqa, cfg.eval_images, cfg.eval_captions, 1))
    first = cfg.train_records
    tok = model.tokenizer
    res: dict = {"held_out_records": [first, first + max(cfg.eval_vqa, cfg.eval_images, cfg.eval_captions)]}
    edir = None
    if out_dir is not None:
        edir = Path(out_dir) / "eval"
        edir.mkdir(parents=True, exist_ok=True)

    def pix(rec):
        return rec.image.float() / 127.5 - 1.0

    if cfg.eval_vqa:
        prompts, answers, types = [], [], []
        for k in range(cfg.eval_vqa):
            rec = world[first + k]
            q = rec.vqa[_hash(cfg.seed, first + k, "eval-q") % len(rec.vqa)]
            prompts.append(Sample([ImageItem(pix(rec), "understand"), TextItem(format_question(q))]))
            answers.append(q["answer_letter"])
            types.append(q["type"])
        n_new = max(len(tok.encode(a)) for a in answers)
        preds = []
        for i in range(0, len(prompts), 16):
            preds += model.generate_text(prompts[i:i + 16], max_new_tokens=n_new, temperature=0.0)
        ok = [p.strip() == a for p, a in zip(preds, answers)]
        per_type: dict = {}
        for t, o in zip(types, ok):
            per_type.setdefault(t, []).append(o)
        majority = max(answers.count(a) for a in set(answers)) / len(answers)
        res["vqa"] = {"n": len(ok), "accuracy": sum(ok) / len(ok), "chance": 0.25, "majority_letter": majority,
                      "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
                      "examples": [{"answer": a, "predicted": p} for a, p in list(zip(answers, preds))[:8]]}
    if cfg.eval_captions:
        recs = [world[first + k] for k in range(cfg.eval_captions)]
        prompts = [Sample([ImageItem(pix(r), "understand"), TextItem("Describe the image.")]) for r in recs]
        outs = model.generate_text(prompts, max_new_tokens=80, temperature=0.0)
        res["captions"] = [{"truth": r.caption, "generated": o} for r, o in zip(recs, outs)]
    if cfg.eval_images:
        recs = [world[first + k] for k in range(cfg.eval_images)]
        S = cfg.image_size
        gen = model.generate_image([r.prompt["text"] for r in recs], height=S, width=S, steps=cfg.eval_steps,
                                   seed=cfg.seed)["images"].float().cpu()
        dev = model.device
        real = torch.stack([pix(r) for r in recs]).to(dev, model.dtype)
        recon = model.vae.decode(model.vae.encode(real), (S, S)).float().cpu()
        scores = [check(r.prompt, g, value_range=(-1.0, 1.0)) for r, g in zip(recs, gen)]
        rscores = [check(r.prompt, x, value_range=(-1.0, 1.0)) for r, x in zip(recs, recon)]
        items = []
        for k, (r, s, rs) in enumerate(zip(recs, scores, rscores)):
            item = {"prompt": r.prompt["text"], "tag": r.prompt["tag"], "score": s["score"], "correct": s["correct"],
                    "vae_reconstruction_score": rs["score"]}
            if edir is not None:
                _to_pil(gen[k]).save(edir / f"generated-{k}.png")
                item["png"] = str(edir / f"generated-{k}.png")
            items.append(item)
        n = len(items)
        res["images"] = {"n": n, "mean_score": sum(i["score"] for i in items) / n,
                         "correct": sum(i["correct"] for i in items) / n,
                         "vae_reconstruction_mean_score": sum(i["vae_reconstruction_score"] for i in items) / n,
                         "items": items}
        if edir is not None:   # rows: truth, frozen-VAE reconstruction, generated
            from PIL import Image

            grid = Image.new("RGB", (len(recs) * (S + 4), 3 * (S + 4)), "white")
            for k in range(len(recs)):
                for row, im in enumerate((pix(recs[k]), recon[k], gen[k])):
                    grid.paste(_to_pil(im), (k * (S + 4), row * (S + 4)))
            grid.save(edir / "grid.png")
            res["images"]["grid_png"] = str(edir / "grid.png")
    if cfg.eval_prompts:
        S = cfg.image_size
        gen = model.generate_image(list(cfg.eval_prompts), height=S, width=S, steps=cfg.eval_steps,
                                   seed=cfg.seed)["images"]
        extra = []
        for k, (p, g) in enumerate(zip(cfg.eval_prompts, gen)):
            item = {"prompt": p}
            if edir is not None:
                _to_pil(g).save(edir / f"prompt-{k}.png")
                item["png"] = str(edir / f"prompt-{k}.png")
            extra.append(item)
        res["prompts"] = extra
    return res


# ----------------------------------------------------------------------------------------------- training
def _mean(rows, key, sl):
    vals = [r[key] for r in rows[sl]]
    return sum(vals) / len(vals) if vals else float("nan")


def _build(cfg: SFTConfig):
    from ..data.loader import PackedLoader
    from ..model.cheers import CheersModel

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    dev = _device(cfg)
    model = CheersModel(cfg.preset)
    model.config.image_size = cfg.image_size   # the checkpoint's default generation size: the size trained at
    ds = SyntheticSFTDataset(cfg.image_size, cfg.seed, cfg.train_records, cfg.tasks, cfg.max_objects)
    # a fresh VAE needs its latent statistics (a pretrained one brings them; a resumed run loads them)
    model.vae.calibrate(ds.images(min(64, cfg.train_records)))
    model.to(device=dev, dtype=_DTYPES[cfg.dtype])
    model.train()
    decay = [p for p in model.trainable_parameters() if p.dim() >= 2]
    no_decay = [p for p in model.trainable_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
    loader = PackedLoader(ds, model.pack_spec(budget=cfg.budget), shuffle=True, seed=cfg.seed,
                          num_workers=cfg.num_workers)
    return model, opt, loader, dev


def _clear_run(out: Path) -> None:
    """--no-resume: remove this trainer's outputs from `out` (checkpoints, metrics, plots, eval, summary)."""
    for p in out.iterdir():
        if (_CKPT_RE.match(p.name) or p.name.startswith(_TMP_PREFIX) or p.name == "eval") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name in ("metrics.jsonl", "loss_curve.png", "summary.json", "sft_config.json") and p.is_file():
            p.unlink()


def train(config: SFTConfig, resume: bool = True, on_step=None) -> dict:
    """Run (or continue) the SFT job described by `config`; returns the summary (also written to out/summary.json).

    resume: continue from the newest complete checkpoint in config.out (else start over, removing that folder's
    previous checkpoints and metrics).  on_step(step, record): called after every optimizer step (step counts from
    1; an exception there stops the run like a crash would, which the tests use)."""
    if not isinstance(config, SFTConfig):
        raise TypeError(f"train: expected an SFTConfig, got {type(config).__name__}")
    cfg = config.validate()
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob(_TMP_PREFIX + "*"):   # left by a run killed mid-save: never complete, never read
        shutil.rmtree(p, ignore_errors=True)
    if not resume:
        _clear_run(out)
    model, opt, loader, dev = _build(cfg)
    params = model.trainable_parameters()
    ckpt = latest_checkpoint(out) if resume else None
    start = _load_checkpoint(ckpt, model, opt, loader, cfg) if ckpt is not None else 0
    mpath = out / "metrics.jsonl"
    rows = _read_metrics(mpath, upto=start)   # steps after the checkpoint were lost with the crash: redone below
    _write_text_atomic(mpath, "".join(json.dumps(r) + "\n" for r in rows))
    _write_text_atomic(out / "sft_config.json", json.dumps(cfg.to_dict(), indent=1))

    rep = _Reporter(cfg.steps, min(start, cfg.steps), cfg.progress)
    n_params = sum(p.numel() for p in params)
    rep.line(f"sft: {cfg.preset} ({n_params / 1e6:.1f}M trainable parameters) on {dev}, {cfg.dtype}; "
             f"{cfg.image_size} px synthetic world, tasks {'/'.join(cfg.tasks)}, {cfg.budget} tokens per batch; "
             + (f"resumed from {ckpt.name}" if ckpt is not None else "from scratch") + f"; out {out}")
    t_train = time.perf_counter()
    tokens_run, last_saved = 0, (ckpt if ckpt is not None else None)
    it = None
    try:
        with open(mpath, "a") as mfile:
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                if it is None:
                    it = iter(loader)
                try:
                    batch = next(it)
                except StopIteration:   # end of an epoch: the loader moves on to the next
                    it = iter(loader)
                    batch = next(it)
                t_data = time.perf_counter() - t0
                lr = lr_at(cfg, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                res = model(batch, seed=_hash(cfg.seed, step, "step"))
                loss = res["loss"]
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"sft: non-finite loss {loss.item()} at step {step + 1} (text "
                                             f"{res['text_loss'].item()}, flow {res['flow_loss'].item()}); lower lr "
                                             f"(now {lr:.2e}) or check the data")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                opt.step()
                dt = time.perf_counter() - t0
                ntok = int(batch.input_ids.numel())
                tokens_run += ntok
                rec = {"step": step + 1, "loss": float(loss.detach()), "text_loss": float(res["text_loss"]),
                       "flow_loss": float(res["flow_loss"]), "lr": lr, "grad_norm": gnorm, "tokens": ntok,
                       "docs": int(batch.num_docs), "text_tokens": int(res["text_tokens"]),
                       "flow_images": int(res["flow_images"]), "step_s": dt, "data_s": t_data,
                       "tokens_per_s": ntok / dt}
                rows.append(rec)
                mfile.write(json.dumps(rec) + "\n")
                mfile.flush()
                rep.advance(f"loss {rec['loss']:.3f}")
                if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or step == start:
                    recent = rows[-cfg.log_every:]
                    tps = sum(r["tokens"] for r in recent) / sum(r["step_s"] for r in recent)
                    rep.line(f"step {step + 1:>5}/{cfg.steps} | loss {rec['loss']:.4f} | text {rec['text_loss']:.4f}"
                             f" | flow {rec['flow_loss']:.4f} | lr {lr:.2e} | gnorm {gnorm:.2f} | {tps:,.0f} tok/s")
                if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps:
                    last_saved = save_checkpoint(out, step + 1, model, opt, loader, cfg, cfg.keep_last)
                    rep.line(f"saved {last_saved}")
                if on_step is not None:
                    on_step(step + 1, rec)
    finally:
        rep.close()
    train_s = time.perf_counter() - t_train

    summary = {"out": str(out), "steps": cfg.steps, "resumed_from_step": start, "steps_this_run": cfg.steps - start,
               "checkpoint": str(last_saved) if last_saved is not None else None,
               "trainable_parameters": n_params, "train_s": train_s,
               "tokens_per_s": tokens_run / train_s if tokens_run else None}
    if rows:
        ts = sorted(r["step_s"] for r in rows)
        summary["median_step_s"] = ts[len(ts) // 2]   # robust to the first steps' warm-up and to a shared machine
        summary["median_tokens_per_s"] = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
        k = max(1, min(10, len(rows) // 4))
        gen = [r for r in rows if r["flow_images"] > 0] or rows   # batches without an image to generate report 0
        for key, rs in (("loss", rows), ("text_loss", rows), ("flow_loss", gen)):
            summary[f"{key}_first{k}"] = _mean(rs, key, slice(0, k))
            summary[f"{key}_last{k}"] = _mean(rs, key, slice(-k, None))
        _plot_losses(rows, out / "loss_curve.png")
        summary["loss_curve"] = str(out / "loss_curve.png")
    if cfg.evaluate:
        t_eval = time.perf_counter()
        model.eval()
        summary["eval"] = evaluate(model, cfg, out)
        model.train()
        summary["eval_s"] = time.perf_counter() - t_eval
        _report_eval(rep, summary["eval"])
    summary["wall_s"] = time.perf_counter() - t_start
    _write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
    if rows:
        k = max(1, min(10, len(rows) // 4))
        rep.line(f"loss (mean of the first / last {k} steps; flow: of those with an image to generate): "
                 f"{summary[f'loss_first{k}']:.3f} -> {summary[f'loss_last{k}']:.3f} "
                 f"(text {summary[f'text_loss_first{k}']:.3f} -> {summary[f'text_loss_last{k}']:.3f}, flow "
                 f"{summary[f'flow_loss_first{k}']:.3f} -> {summary[f'flow_loss_last{k}']:.3f}); "
                 f"wall {summary['wall_s']:.1f} s; {out / 'summary.json'}")
    return summary


def _report_eval(rep: _Reporter, ev: dict) -> None:
    if "vqa" in ev:
        v = ev["vqa"]
        rep.line(f"eval vqa: {v['accuracy']:.3f} exact-match on {v['n']} held-out questions (chance {v['chance']}, "
                 f"always-the-commonest-letter {v['majority_letter']:.3f})")
    for c in ev.get("captions", []):
        rep.line(f"eval caption: {c['generated']!r}\n        truth: {c['truth']!r}")
    if "images" in ev:
        im = ev["images"]
        rep.line(f"eval images: checker score {im['mean_score']:.3f}, all-correct {im['correct']:.3f} on {im['n']} "
                 f"held-out prompts (the frozen VAE's reconstruction of the true pictures scores "
                 f"{im['vae_reconstruction_mean_score']:.3f}); {im.get('grid_png', '')}")
