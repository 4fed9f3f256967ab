"""The longer fuzz run of the public ops (issue 20; the suite runs 600 cases in tests/test_fuzz_ops.py).

    .venv/bin/python scripts/fuzz_ops.py --cases 20000 --workers 2 [--backend reference|cpu|triton] [--json out.json]

Every case is one valid call with one argument spoiled (umm_ops.fuzz); batches run in subprocesses, so a crash or
a hang is reported with its case (seed, op, argument, spoiling) and the run goes on.  Exit status 1 when any
case crashed, hung or refused unclearly; rerun one case with --only SEED to see it alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from umm_ops import fuzz as F


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0, help="first case seed")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=250, help="cases per subprocess")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per batch before it counts as a hang")
    ap.add_argument("--backend", default=None, help="force a backend (default: the automatic choice)")
    ap.add_argument("--json", default=None, help="write every result here")
    ap.add_argument("--only", type=int, default=None, help="run case SEED in this process and print it")
    args = ap.parse_args()
    if args.only is not None:
        print(json.dumps(F.run_case(args.only), indent=1))
        return 0
    t0 = time.time()
    last = [0.0]

    def log(msg):
        if time.time() - last[0] > 10:
            last[0] = time.time()
            print(msg, flush=True)

    results, problems = F.fuzz(args.cases, seed=args.seed, workers=args.workers, timeout=args.timeout,
                               backend=args.backend, batch=args.batch, log=log)
    print(f"{F.summary(results)} in {time.time() - t0:.0f} s; {len(problems)} problems")
    for p in problems:
        print("  " + json.dumps(p))
    if args.json:
        from umm_ops.utils import atomic_write

        atomic_write(args.json, json.dumps(dict(results=results, problems=problems), indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
