"""Held-out scores of every checkpoint of a run: the learning curve of skills, not of the loss.

    python scripts/eval_curve.py runs/base --tasks vqa,caption,geneval --n 64

Runs ``umm eval`` (umm_ops.eval.runner.evaluate, the run's own world and held-out split) on each complete
checkpoint-<step> of RUN in step order and writes RUN/eval_curve.json (per step: each task's score, 95% interval
and per-type breakdown, and the seconds it took) and RUN/eval_curve.png (score vs step with the intervals).
Checkpoints already in eval_curve.json with the same tasks / n / seed are not evaluated again.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run folder (holding checkpoint-<step> folders)")
    ap.add_argument("--tasks", default="vqa,caption,geneval")
    ap.add_argument("--n", type=int, default=64, help="held-out records per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="sampler steps of generated images (default: the model's)")
    args = ap.parse_args(argv)

    from umm_ops.cli import _run_world
    from umm_ops.eval.runner import evaluate
    from umm_ops.train.engine.checkpoint import complete_checkpoints
    from umm_ops.train.export import load_checkpoint_model
    from umm_ops.utils import atomic_write

    run = Path(args.run)
    ckpts = complete_checkpoints(run)
    if not ckpts:
        print(f"eval_curve: no complete checkpoint in {run}", file=sys.stderr)
        return 2
    out_json = run / "eval_curve.json"
    key = {"tasks": args.tasks, "n": args.n, "seed": args.seed, "steps": args.steps}
    done = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if done.get("settings") != key:
        done = {"settings": key, "points": []}
    have = {p["step"] for p in done["points"]}
    for step, folder in ckpts:
        if step in have:
            continue
        first, size, world = _run_world(folder)
        model = load_checkpoint_model(folder)
        t0 = time.perf_counter()
        res = evaluate(model, args.tasks, n=args.n, seed=args.seed, image_size=size, world_kwargs=world,
                       first=first, steps=args.steps)
        point = {"step": step, "seconds": round(time.perf_counter() - t0, 1), "tasks": {}}
        for name, r in res["tasks"].items():
            point["tasks"][name] = {"score": r["score"], "ci95": r["ci95"],
                                    "per_type": {t: v["score"] for t, v in r.get("per_type", {}).items()}}
        done["points"].append(point)
        done["points"].sort(key=lambda p: p["step"])
        atomic_write(out_json, json.dumps(done, indent=1))
        print(f"step {step}: " + ", ".join(f"{t} {v['score']:.3f}" for t, v in point["tasks"].items())
              + f" ({point['seconds']:.0f} s)", flush=True)
    _plot(done, run / "eval_curve.png", run.name)
    print(f"wrote {out_json} and {run / 'eval_curve.png'}")
    return 0


def _plot(done: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from umm_ops.utils import atomic_write

    pts = done["points"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in pts[0]["tasks"]:
        xs = [p["step"] for p in pts if name in p["tasks"]]
        ys = [p["tasks"][name]["score"] for p in pts if name in p["tasks"]]
        lo = [p["tasks"][name]["ci95"][0] for p in pts if name in p["tasks"]]
        hi = [p["tasks"][name]["ci95"][1] for p in pts if name in p["tasks"]]
        ax.plot(xs, ys, marker="o", label=name)
        ax.fill_between(xs, lo, hi, alpha=0.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"held-out score (n = {done['settings']['n']}, 95% CI)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{title}: skills vs steps")
    fig.tight_layout()
    atomic_write(path, write=lambda p: fig.savefig(p, format="png", dpi=110), suffix=".png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
