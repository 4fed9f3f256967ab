"""Plot the mean reward of RL runs against steps (a rolling mean over `--window` steps) from their metrics.jsonl.

    python scripts/plot_rl_runs.py runs/fgrpo1 runs/fgrpo2 --key reward --out docs/results/flow-grpo/reward.png
"""
import argparse
import json
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--key", default="reward")
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in args.runs:
        rows = [json.loads(ln) for ln in open(Path(run) / "metrics.jsonl") if ln.strip()]
        pts = [(r["step"], r[args.key]) for r in rows if args.key in r]
        if not pts:
            continue
        xs, ys = zip(*pts)
        w = args.window
        smooth = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, ys, alpha=0.25)
        ax.plot(xs, smooth, label=f"{Path(run).name} (mean of {w})", color=ax.lines[-1].get_color())
    ax.set_xlabel("step")
    ax.set_ylabel(args.key)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
