"""Run reporting, on rank 0: console lines (through rich above a progress bar when stdout is a terminal),
``metrics.jsonl`` (one JSON line per optimizer step, flushed), optional TensorBoard events, and the loss plot."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ...utils import atomic_write, optional_import

__all__ = ["Reporter", "read_metrics", "plot_losses"]


class Reporter:
    def __init__(self, out, is_main: bool, total: int, start: int, progress: bool | None, tensorboard: bool = False,
                 log_every: int = 10):
        self.out, self.is_main, self.log_every = Path(out), is_main, log_every
        self.progress = self.task = self.tb = self.file = None
        if not is_main:
            return
        use = sys.stdout.isatty() if progress is None else progress
        if use:
            try:   # rich is optional here (umm_ops[train] installs it): without it, plain lines
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                           TimeRemainingColumn)
            except ImportError:
                use = False
        if use:
            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()
        if tensorboard:
            # metrics.tensorboard = true needs the tensorboard package (umm_ops[tensorboard])
            SummaryWriter = optional_import("torch.utils.tensorboard", "SummaryWriter")
            self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def open_log(self, rows: list) -> None:
        """Rewrite metrics.jsonl with the rows kept from before a resume, then append."""
        if not self.is_main:
            return
        path = self.out / "metrics.jsonl"
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
        self.file = open(path, "a")

    def line(self, text: str) -> None:
        if not self.is_main:
            return
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    def record(self, rec: dict) -> None:
        if not self.is_main:
            return
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])
        if self.progress is not None:
            self.progress.update(self.task, advance=1, info=f"loss {rec['loss']:.3f}")

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(path, upto: int | None = None) -> list:
    """The rows of a metrics.jsonl (a line cut short by a crash is skipped), up to step `upto`."""
    rows = []
    path = Path(path)
    if path.is_file():
        with open(path) as f:
            for ln in f:
                ln = ln.strip()
                if not ln:
                    continue
                try:
                    r = json.loads(ln)
                except ValueError:
                    continue
                if upto is None or r.get("step", 0) <= upto:
                    rows.append(r)
    return rows


def plot_losses(rows: list, path, keys=("loss", "text_loss", "flow_loss"), title: str = "training loss") -> None:
    """Raw (faint) and EMA-smoothed curves of the loss keys against the step; a key whose value is missing or
    which a step did not compute (``<key>_n`` == 0) is left out at that step."""
    matplotlib = optional_import("matplotlib")

    matplotlib.use("Agg")
    plt = optional_import("matplotlib.pyplot")

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = ("black", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
    for key, color in zip(keys, colors):
        rs = [r for r in rows if isinstance(r.get(key), (int, float)) and r.get(f"{key}_n", 1) != 0]
        if not rs:
            continue
        steps, ys = [r["step"] for r in rs], [r[key] for r in rs]
        ema, smooth = None, []
        for y in ys:
            ema = y if ema is None else 0.9 * ema + 0.1 * y
            smooth.append(ema)
        ax.plot(steps, ys, color=color, alpha=0.25, lw=0.8)
        ax.plot(steps, smooth, color=color, lw=1.8, label=f"{key} (EMA 0.9)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, write=lambda p: fig.savefig(p, dpi=110, format="png"), suffix=".png")
    plt.close(fig)
