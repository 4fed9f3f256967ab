"""Tokenizer-compression ops against eager PyTorch and torch.compile, timed in INTERLEAVED rounds (issue 4's CPU
target: "not slower than eager").

bench/run.py times each implementation's rounds back to back (pytest-benchmark); on a shared VM whose speed drifts
by 5-10% from minute to minute that cannot resolve a few percent.  Here every round runs umm_ops, eager and
compile once each, in a fresh random order, and the verdict is the median over rounds of the per-round time
ratio (eager / umm_ops), with the 25th-75th percentile range of that ratio.  Same cases as bench/tokens_cases.py
(the GEMM-bound ones).

    python bench/bench_tokens_paired.py [--quick] [--dtype float32 bfloat16] [--rounds N]
        -> bench/results/<device>-tokens-paired.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import umm_ops  # noqa: E402
from run import device_name, slug  # noqa: E402
from tokens_cases import make_tokens_cases  # noqa: E402


def _q(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_case(case, rounds: int, rng: random.Random) -> dict:
    impls = {k: v for k, v in case.impls.items() if k in ("umm_ops", "eager", "compile")}
    inputs = case.make()
    sync = torch.cuda.synchronize if case.device == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up (compiles torch.compile's graph on the first call)
        for fn in impls.values():
            fn(*inputs)
    times = {k: [] for k in impls}
    # rounds scaled so that a case takes ~2 s at most beyond the minimum
    t0 = time.perf_counter()
    for fn in impls.values():
        fn(*inputs)
    one = time.perf_counter() - t0
    n = max(rounds, min(4 * rounds, int(2.0 / max(one, 1e-6))))
    order = list(impls)
    for _ in range(n):
        rng.shuffle(order)
        for k in order:
            sync()
            t = time.perf_counter()
            impls[k](*inputs)
            sync()
            times[k].append(time.perf_counter() - t)
    row = {"op": case.op, "dir": case.direction, "images": case.images, "dtype": str(case.dtype).replace("torch.", ""),
           "shape": case.shape, "rounds": n}
    for k, ts in times.items():
        row[f"{k}_ms"] = statistics.median(ts) * 1e3
    for peer in ("eager", "compile"):
        r = [p / u for p, u in zip(times[peer], times["umm_ops"])]
        row[f"x_{peer}"] = statistics.median(r)
        row[f"x_{peer}_iqr"] = (_q(r, 0.25), _q(r, 0.75))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", default=None, help="float32 / bfloat16 / float16 (default: the suite's)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("-k", dest="select", default=None, help="substring of the case id")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
    cases = [c for c in make_tokens_cases(args.device, args.quick, dtypes)
             if "umm_ops" in c.impls and c.op.startswith(("compress", "expand"))]
    if args.select:
        cases = [c for c in cases if args.select in c.id]
    rng = random.Random(0)
    rows = []
    print(f"{'case':58s} {'umm ms':>9s} {'eager ms':>9s} {'compile':>9s} {'x eager (IQR)':>20s} {'x compile':>9s}")
    for c in cases:
        r = run_case(c, args.rounds, rng)
        rows.append(r)
        lo, hi = r["x_eager_iqr"]
        print(f"{c.id:58s} {r['umm_ops_ms']:9.3f} {r['eager_ms']:9.3f} {r['compile_ms']:9.3f} "
              f"{r['x_eager']:7.3f} ({lo:.2f}-{hi:.2f}) {r['x_compile']:9.3f}", flush=True)
    info = umm_ops.backends()
    res = {"benchmark": "tokens-paired", "device": device_name(args.device), "device_kind": args.device,
           "mode": "quick" if args.quick else "full", "torch": torch.__version__, "umm_ops": umm_ops.__version__,
           "cpu_isa": info["cpu"].get("isa"), "cpu_threads": torch.get_num_threads(),
           "note": "interleaved rounds in random order; x_<peer> = median over rounds of peer time / umm_ops time",
           "rows": rows}
    out = args.out or os.path.join(HERE, "results", ("quick/" if args.quick else "") +
                                   f"{slug(res['device'])}-tokens-paired.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
