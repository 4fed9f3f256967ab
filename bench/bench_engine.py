"""Training-engine benchmark: the engine's overhead per step against a bare loop on the same model and batches,
checkpoint save / load time against size, and tokens/s on 1 and 2 ranks.

    python bench/bench_engine.py --quick          # CPU: tiny preset, ~4 min on 2 cores
    python bench/bench_engine.py                  # more steps and rounds; add --presets tiny,small for sizes

Overhead: the SFT recipe through ``umm_ops.train.train`` vs ``umm_ops.train.recipes.sft.bare_loop`` (PackedLoader,
the same policy draws, AdamW, schedule, clipping, no engine: the computation the tests prove bitwise equal), in alternating rounds (engine, bare,
engine, bare, ...) in one process.  Per-step time = the interval between consecutive step ends (data, forward,
backward, optimizer, and for the engine its metrics reduction, JSONL line and console), the first steps (warm-up)
and the last (final checkpoint) excluded; the result is the ratio of medians, with every raw interval kept.
Checkpoints: ``Checkpointer.save`` / ``load_latest`` on the preset's model and a stepped AdamW (model + moments),
one process, BLAKE2b verification on (the default) and the hash time alone.
Ranks: ``torchrun --nproc-per-node 2`` (DDP, gloo, one thread per rank) vs one process (all threads), the same
global batch of 2 micro-batches per step; median tokens/s over the steps after the first.
Writes bench/results/<device>-engine.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _cfg(out, steps, image_size, budget, extra=()):
    from umm_ops.train import Config

    return Config.build("sft", overrides=[f"job.out={out}", f"job.steps={steps}", "job.device=cpu",
                                          "job.progress=false", f"recipe.image_size={image_size}",
                                          f"data.budget={budget}", "recipe.evaluate=false", "checkpoint.every=0",
                                          "metrics.log_every=100000", "metrics.plot=false", "job.resume=false",
                                          *extra])


def _engine_intervals(steps, image_size, budget) -> list:
    from umm_ops.train import train

    marks = []
    with tempfile.TemporaryDirectory() as tmp:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            train(_cfg(Path(tmp) / "run", steps, image_size, budget), on_step=lambda s, r: marks.append(
                time.perf_counter()))
    return [b - a for a, b in zip(marks, marks[1:])]


def _bare_intervals(steps, image_size, budget) -> list:
    from umm_ops.train.recipes.sft import bare_loop

    marks = []
    bare_loop(_cfg("unused", steps, image_size, budget), on_step=lambda s, loss: marks.append(time.perf_counter()))
    return [b - a for a, b in zip(marks, marks[1:])]


def overhead(rounds, steps, image_size, budget) -> dict:
    eng, bare = [], []
    for r in range(rounds):
        e = _engine_intervals(steps, image_size, budget)
        b = _bare_intervals(steps, image_size, budget)
        eng += e[2:-1]   # warm-up steps and the last (final checkpoint) excluded
        bare += b[2:-1]
        print(f"[bench_engine] overhead round {r + 1}/{rounds}: engine {statistics.median(e[2:-1]) * 1e3:.1f} ms, "
              f"bare {statistics.median(b[2:-1]) * 1e3:.1f} ms per step", flush=True)
    me, mb = statistics.median(eng), statistics.median(bare)
    return {"image_size": image_size, "budget": budget, "steps_per_round": steps, "rounds": rounds,
            "engine_median_step_s": me, "bare_median_step_s": mb, "overhead": me / mb - 1,
            "engine_step_s": eng, "bare_step_s": bare}


def checkpoint_cost(preset, image_size) -> dict:
    import torch

    from umm_ops.train.engine import distributed
    from umm_ops.train.engine.checkpoint import Checkpointer, file_hash
    from umm_ops.train.engine.optim import build_optimizer
    from umm_ops.train.recipes.sft import SFTRecipe

    cfg = _cfg("unused", 1, image_size, 1024, extra=[f"model.preset={preset}"])
    model = SFTRecipe().build_model(cfg)
    opt = build_optimizer(model, cfg.optim)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    d = distributed.init("cpu")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(HERE)) as tmp:
        ck = Checkpointer(Path(tmp), d, keep_last=2, log=lambda s: None)
        t0 = time.perf_counter()
        folder = ck.save(1, model, opt, None, {"config": cfg.to_dict(), "loader": {}, "schedule": {}})
        save_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        t0 = time.perf_counter()
        for p in folder.rglob("*"):
            if p.is_file():
                file_hash(p)
        hash_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ck.load_latest(model, opt, None)
        load_s = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    return {"preset": preset, "parameters": n, "bytes": size, "save_s": save_s, "load_s": load_s,
            "hash_s": hash_s, "save_MBps": size / save_s / 1e6, "load_MBps": size / load_s / 1e6}


def ranks(steps, image_size, budget) -> dict:
    out = {}
    worker = os.path.join(os.path.dirname(HERE), "tests", "helpers", "train_worker.py")
    for nproc in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            args = [f"job.out={tmp}/run", f"job.steps={steps}", "job.device=cpu", "job.progress=false",
                    f"recipe.image_size={image_size}", f"data.budget={budget}", f"data.global_tokens={2 * budget}",
                    "recipe.evaluate=false", "checkpoint.every=0", "metrics.log_every=100000", "job.resume=false"]
            env = dict(os.environ)
            if nproc == 1:
                cmd = [sys.executable, worker]
            else:
                env["OMP_NUM_THREADS"] = "1"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", worker]
            t0 = time.perf_counter()
            p = subprocess.run(cmd + args, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode:
                sys.stderr.write(p.stdout[-2000:] + p.stderr[-4000:])
                raise SystemExit(f"[bench_engine] the {nproc}-rank run failed")
            rows = [json.loads(ln) for ln in open(f"{tmp}/run/metrics.jsonl") if ln.strip()]
            tps = [r["tokens_per_s"] for r in rows[1:]]
            out[f"{nproc}_rank"] = {"median_tokens_per_s": statistics.median(tps), "tokens_per_s": tps,
                                    "wall_s": wall, "steps": steps}
        print(f"[bench_engine] {nproc} rank(s): {out[f'{nproc}_rank']['median_tokens_per_s']:.0f} tokens/s",
              flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--presets", default="tiny", help="checkpoint cost for these presets (comma-separated)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from run import device_name, slug

    from umm_ops.utils import atomic_write

    rounds, steps = (2, 10) if args.quick else (3, 20)
    res = {"device": device_name("cpu"), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
           "load_average_start": os.getloadavg()}
    res["overhead"] = overhead(rounds, steps, args.image_size, args.budget)
    res["checkpoint"] = [checkpoint_cost(p, args.image_size) for p in args.presets.split(",")]
    res["ranks"] = ranks(8 if args.quick else 15, args.image_size, args.budget)
    res["load_average_end"] = os.getloadavg()
    out = args.out or os.path.join(HERE, "results", f"{slug(res['device'])}-engine.json")
    atomic_write(out, json.dumps(res, indent=2))
    o = res["overhead"]
    print(f"\n{res['device']}, torch {res['torch']}, {res['threads']} threads")
    print(f"engine overhead: {o['engine_median_step_s'] * 1e3:.1f} vs {o['bare_median_step_s'] * 1e3:.1f} ms per "
          f"step = {o['overhead'] * 100:+.1f}% (tiny, {args.image_size} px, {args.budget} tokens, "
          f"{len(o['engine_step_s'])} steps each)")
    for c in res["checkpoint"]:
        print(f"checkpoint {c['preset']}: {c['bytes'] / 1e6:.0f} MB, save {c['save_s']:.2f} s "
              f"({c['save_MBps']:.0f} MB/s), load {c['load_s']:.2f} s ({c['load_MBps']:.0f} MB/s, hash check "
              f"{c['hash_s']:.2f} s of it)")
    r = res["ranks"]
    print(f"tokens/s: 1 rank {r['1_rank']['median_tokens_per_s']:.0f}, 2 ranks (DDP, gloo) "
          f"{r['2_rank']['median_tokens_per_s']:.0f}")
    print(f"[bench_engine] results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
