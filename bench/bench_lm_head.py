"""The LM head with its loss (issue 19): time and peak memory of umm_ops.linear_cross_entropy / linear_logprob
against the plain path (``hidden @ weight.T`` then ``F.cross_entropy`` / ``log_softmax`` + gather) and
torch.compile of the same.

    python bench/bench_lm_head.py --quick       # the tiny preset's head and N=2048, D=512, V=32768 (CPU: ~5 min)
    python bench/bench_lm_head.py               # + Cheers' head at its full vocabulary (D=1536, V=151,936)
    python bench/bench_lm_head.py --sizes 8192x1536x151936 --impls eager,umm --cases ce-fwd+bwd   # issue's target

Cases per size (N tokens, hidden D, vocabulary V, float32 unless --dtype):
  ce-fwd+bwd   loss = cross-entropy (mean), then loss.backward() into hidden and weight (a training step's head)
  ce-fwd       the loss under torch.no_grad()
  logprob-fwd  per-token log-probs under torch.no_grad() (RL: old policy / reference)
Implementations: eager (the plain path), compile (torch.compile of the plain path; fwd+bwd only: compiling takes
~10-30 s per size on a small CPU), umm (the op, automatic backend: the C++ CPU kernel here).

Timing: one process per size, the implementations interleaved round by round (the same load on a shared machine);
the median of the rounds is reported (at least 25 rounds for the cases whose eager call takes < 0.5 s), every raw time is kept.  Peak memory: each (implementation, case, size) in its
own process, the growth of the peak resident set over one call from just after the inputs were built (Linux VmHWM,
reset before the call, so that torch.compile's warm-up call does not count; the gradients' buffers are allocated
before, alike for every implementation); on CUDA
torch.cuda.max_memory_allocated minus what was allocated before.  CPU runs keep freed memory in the process as
bench/run.py does (MALLOC_ENV), so that first-touch page faults do not decide the timing.
Writes bench/results/<device>-lm-head.json (device named as bench/run.py names it) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

QUICK_SIZES = ["1024x256x512", "2048x512x32768"]      # the tiny preset's head; a mid-size vocabulary
FULL_SIZES = QUICK_SIZES + ["1024x1536x151936"]       # Cheers' head (D = 1536, V = 151,936) at 1k tokens
CASES = ("ce-fwd+bwd", "ce-fwd", "logprob-fwd")


def _inputs(N, D, V, dtype, device, grad):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, D, generator=g).to(device, dtype)
    w = (torch.randn(V, D, generator=g) * (2.0 / D**0.5)).to(device, dtype)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    if grad:
        h.requires_grad_(True)
        w.requires_grad_(True)
    return h, w, t


def _fn(impl, case):
    import torch
    import torch.nn.functional as F

    import umm_ops

    if case.startswith("ce"):
        def eager(h, w, t):
            return F.cross_entropy(h @ w.t(), t)

        def umm(h, w, t):
            return umm_ops.linear_cross_entropy(h, w, t)
    else:
        def eager(h, w, t):
            return torch.log_softmax(h @ w.t(), -1).gather(1, t[:, None])[:, 0]

        def umm(h, w, t):
            return umm_ops.linear_logprob(h, w, t)
    if impl == "eager":
        return eager
    if impl == "umm":
        return umm
    if impl == "compile":
        return torch.compile(eager, dynamic=False)
    raise ValueError(impl)


def _call(fn, case, h, w, t):
    import torch

    if case == "ce-fwd+bwd":
        h.grad = w.grad = None
        loss = fn(h, w, t)
        loss.backward()
        return loss.item()
    with torch.no_grad():
        out = fn(h, w, t)
        return float(out.sum())


def worker_memory(args) -> dict:
    import torch

    N, D, V = map(int, args.size.split("x"))
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    grad = args.case == "ce-fwd+bwd"
    h, w, t = _inputs(N, D, V, dtype, dev, grad)
    fn = _fn(args.impl, args.case)
    if args.impl == "compile":   # compile (and its own memory) outside the measured call
        _call(fn, args.case, h, w, t)
    if grad:  # the gradients' memory counts for every implementation alike: allocate them before the baseline
        h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        rss0 = _reset_peak_rss()
    if grad:
        loss = fn(h, w, t)
        loss.backward()   # accumulates into the preallocated .grad
    else:
        with torch.no_grad():
            fn(h, w, t)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        return dict(peak_mem_bytes=torch.cuda.max_memory_allocated() - base, peak_mem_kind="cuda max allocated - before")
    return dict(peak_mem_bytes=_status_kb("VmHWM") * 1024 - rss0,
                peak_mem_kind="growth of the process peak RSS (VmHWM, reset before the call) over one call (CPU)")


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the peak RSS (Linux: 5 > /proc/self/clear_refs) and return the current RSS in bytes: the peak of the
    next call is measured from here, whatever ran before (torch.compile's warm-up call raised it)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def worker_timing(args) -> dict:
    import torch

    N, D, V = map(int, args.size.split("x"))
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out = {}
    for case in args.cases.split(","):
        grad = case == "ce-fwd+bwd"
        h, w, t = _inputs(N, D, V, dtype, dev, grad)
        impls = [i for i in args.impls.split(",") if not (i == "compile" and not grad)]
        fns = {i: _fn(i, case) for i in impls}
        values = {}
        for i in impls:  # warm-up (compiles)
            values[i] = _call(fns[i], case, h, w, t)
        t0 = time.perf_counter()
        _call(fns[impls[0]], case, h, w, t)
        rounds = args.rounds
        if time.perf_counter() - t0 < 0.5:
            rounds = max(rounds, 25)   # small sizes: more rounds against the noise of a shared machine
        times = {i: [] for i in impls}
        for _ in range(rounds):
            for i in impls:
                sync()
                t0 = time.perf_counter()
                _call(fns[i], case, h, w, t)
                sync()
                times[i].append(time.perf_counter() - t0)
        out[case] = {i: dict(median_s=statistics.median(times[i]), times_s=times[i], value=values[i]) for i in impls}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default=None, help="comma-separated NxDxV (default: the quick / full set)")
    ap.add_argument("--impls", default="eager,compile,umm")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.rounds = args.rounds or (3 if args.quick else 5)
    if args.worker:
        res = worker_timing(args) if args.worker == "timing" else worker_memory(args)
        print("RESULT " + json.dumps(res))
        return 0

    from run import MALLOC_ENV, device_name, slug

    from umm_ops.utils import atomic_write

    sizes = args.sizes.split(",") if args.sizes else (QUICK_SIZES if args.quick else FULL_SIZES)
    env = dict(os.environ)
    if args.device == "cpu":
        env.update(MALLOC_ENV)
    bad = [c for c in args.cases.split(",") if c not in CASES]
    if bad:
        raise SystemExit(f"--cases: unknown {bad}, expected some of {CASES}")
    base = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--dtype", args.dtype, "--rounds",
            str(args.rounds), "--impls", args.impls, "--cases", args.cases]

    def run(extra):
        p = subprocess.run(base + extra, capture_output=True, text=True, env=env)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
            raise SystemExit(f"[bench_lm_head] worker {extra} failed (exit {p.returncode})")
        return json.loads(line[0][len("RESULT "):])

    rows = []
    for size in sizes:
        print(f"[bench_lm_head] {size}: timing ({args.impls}, {args.rounds} rounds, interleaved) ...", flush=True)
        timing = run(["--worker", "timing", "--size", size])
        for case in args.cases.split(","):
            for impl, r in timing[case].items():
                print(f"[bench_lm_head] {size} {case} {impl}: peak memory ...", flush=True)
                mem = run(["--worker", "memory", "--size", size, "--case", case, "--impl", impl])
                rows.append(dict(size=size, case=case, impl=impl, **r, **mem))

    dev_name = device_name(args.device)
    summary = []
    for size in sizes:
        for case in args.cases.split(","):
            by = {r["impl"]: r for r in rows if r["size"] == size and r["case"] == case}
            if "eager" in by and "umm" in by:
                e, u = by["eager"], by["umm"]
                summary.append(dict(size=size, case=case, speedup_vs_eager=e["median_s"] / u["median_s"],
                                    peak_mem_ratio_vs_eager=(u["peak_mem_bytes"] / e["peak_mem_bytes"]
                                                             if e["peak_mem_bytes"] else None),
                                    speedup_vs_compile=(by["compile"]["median_s"] / u["median_s"]
                                                        if "compile" in by else None)))
    import umm_ops

    res = dict(device=dev_name, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, threads=torch.get_num_threads(), dtype=args.dtype, rounds=args.rounds,
               cpu_isa=umm_ops.backends()["cpu"].get("isa"), malloc_env=MALLOC_ENV if args.device == "cpu" else None,
               load_average=os.getloadavg(), results=rows, summary=summary)
    out = args.out or os.path.join(HERE, "results", f"{slug(dev_name)}-lm-head.json")
    atomic_write(out, json.dumps(res, indent=2))
    print(f"\n{dev_name}  {args.dtype}")
    print(f"{'N x D x V':<18} {'case':<12} {'impl':<8} {'median ms':>10} {'peak MB':>9}")
    for r in rows:
        print(f"{r['size']:<18} {r['case']:<12} {r['impl']:<8} {r['median_s'] * 1e3:10.1f} "
              f"{r['peak_mem_bytes'] / 2**20:9.1f}")
    for s in summary:
        extra = f", {s['speedup_vs_compile']:.2f}x compile" if s["speedup_vs_compile"] else ""
        print(f"{s['size']:<18} {s['case']:<12} umm vs eager: {s['speedup_vs_eager']:.2f}x time{extra}, "
              f"peak memory {s['peak_mem_ratio_vs_eager'] or float('nan'):.2f}x")
    print(f"[bench_lm_head] results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
