"""MMD-Bench degradation throughput: images/s of umm_ops.data.degrade per type, at 256 and 512 px, on the CPU and,
when there is one, the GPU.

    python bench/bench_degradations.py --quick     # small batches, 3 timed repeats
    python bench/bench_degradations.py             # larger batches, 7 timed repeats

Inputs are synthetic-world scenes (uint8 RGB batches, what `umm mmd-bench build` feeds degrade()), degraded at
the "mid" level.  Each (type, size, device) is run once to warm up, then timed `repeats` times (CUDA synchronised);
the median gives images/s.  Writes bench/results/<device>-degradations.json (devices named as bench/run.py names
them; with a GPU the file is named after the GPU and holds both devices) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from run import device_name, slug  # noqa: E402  (bench/run.py: one way to name devices)

import umm_ops  # noqa: E402
from umm_ops.data.degradations import DEGRADATIONS, LEVELS, degrade  # noqa: E402
from umm_ops.data.synthetic import SyntheticWorld  # noqa: E402


def scenes(size: int, batch: int) -> torch.Tensor:
    world = SyntheticWorld(size=size, seed=0, max_objects=6)
    return torch.stack([world[i].image for i in range(batch)])


def time_kind(images: torch.Tensor, kind: str, repeats: int) -> list:
    cuda = images.is_cuda
    degrade(images, kind, "mid", seed=0)  # warm-up (kernel caches, Pillow, cuDNN choice)
    times = []
    for r in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        degrade(images, kind, "mid", seed=r + 1)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batches, 3 repeats")
    ap.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                    help="devices to time (default: cpu, and cuda when available)")
    ap.add_argument("-k", default=None, help="only degradation types whose name contains this")
    ap.add_argument("--out", default=None, help="results file (default bench/results/<device>-degradations.json)")
    args = ap.parse_args(argv)

    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else \
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    kinds = [k for k in DEGRADATIONS if args.k is None or args.k in k]
    if not kinds:
        ap.error(f"-k {args.k!r} matches no degradation type ({', '.join(DEGRADATIONS)})")
    repeats = 3 if args.quick else 7
    batches = {256: 4, 512: 2} if args.quick else {256: 16, 512: 8}
    cuda_batches = {256: 32, 512: 16} if args.quick else {256: 128, 512: 64}

    rows = []
    for dev in devices:
        for size, batch in (cuda_batches if dev == "cuda" else batches).items():
            images = scenes(size, batch).to(dev)
            for kind in kinds:
                ts = time_kind(images, kind, repeats)
                med = statistics.median(ts)
                rows.append({"kind": kind, "category": DEGRADATIONS[kind][0], "device": dev,
                             "device_name": device_name(dev), "size": size, "batch": batch, "intensity": LEVELS["mid"],
                             "median_s": med, "min_s": min(ts), "images_per_s": batch / med,
                             "ms_per_image": med / batch * 1e3})
                print(f"{dev:4s} {size}px x{batch:<3d} {kind:24s} {batch / med:9.1f} images/s", flush=True)

    main_dev = "cuda" if "cuda" in devices else "cpu"
    res = {
        "benchmark": "degradations", "device": device_name(main_dev), "device_kind": main_dev,
        "devices": {d: device_name(d) for d in devices}, "mode": "quick" if args.quick else "full",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "cuda": torch.version.cuda, "umm_ops": umm_ops.__version__, "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(), "repeats": repeats,
        "note": "uint8 RGB synthetic-world batches degraded at the 'mid' level (0.45); images/s = batch / median "
                "time of one degrade() call after a warm-up call; includes the per-image CPU generators and, for "
                "jpeg and graffiti, the CPU round trip through Pillow.",
        "results": rows,
    }
    out = args.out or os.path.join(HERE, "results", f"{slug(res['device'])}-degradations.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)

    print(f"\nMMD-Bench degradations, images/s at intensity 'mid' ({res['mode']})")
    cols = [(d, s) for d in devices for s in (256, 512)]
    head = f"{'type':24s}" + "".join(f"{d + ' ' + str(s) + 'px':>14s}" for d, s in cols)
    print(head)
    print("-" * len(head))
    for kind in kinds:
        cells = []
        for d, s in cols:
            r = [x for x in rows if x["kind"] == kind and x["device"] == d and x["size"] == s]
            cells.append(f"{r[0]['images_per_s']:14.1f}" if r else f"{'-':>14s}")
        print(f"{kind:24s}" + "".join(cells))
    print(f"\nwrote {os.path.relpath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
