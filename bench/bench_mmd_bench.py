"""MMD-Bench degradations: the exact OpenCV path against CLEAR's released code, the torch path against the exact
path, and the CPU speed of all three (batch of 8, 512 px by default).

    python bench/bench_mmd_bench.py --clear /tmp/clear_ref/add_degradation.py [--clear-commit SHA]

CLEAR's add_degradation.py is not part of this project: fetch a copy first (scripts/clear_reference.py says how).
Images: the real photographs that packages on this machine ship (scripts/clear_reference.py: PHOTO_GLOBS), centre
crops resized to the size, then synthetic-world pictures up to the batch.  Image b of type k is seeded with
clear_seed(0, b, k) for CLEAR (its global random / np.random) and for the exact path, so stochastic types are
compared draw for draw; the torch path draws its own numbers (same seed, torch generators).

Per type and level it writes:
  exact vs CLEAR   max |diff|, fraction of values > 2 grey levels apart, fraction != , PSNR to the clean image of
                   both and their mean difference (dB)
  torch vs exact   the same (for random types the pixels differ by construction: compare PSNRs)
  speed            images/s of CLEAR's functions one image after another (OpenCV's own threads on), of CLEAR's
                   functions in a 2-worker thread pool (as its generator runs them), of the exact path
                   (degrade_images on the same numpy images as CLEAR, and degrade(..., backend="opencv") on a
                   (B, 3, H, W) tensor: a thread pool over the batch) and of the torch path (degrade(...,
                   backend="torch")); medians of interleaved timed runs after a warm-up run each
                   (timed_interleaved).
Outputs: bench/results/<cpu>-mmd-bench.json (speed + exactness, machine, load) and, with --docs,
docs/results/mmd_bench/exactness.json (the exactness part).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from clear_reference import CLEAR_NAMES, load_clear, photo_crops, run_clear, world_pictures  # noqa: E402
from run import device_name, slug  # noqa: E402

import umm_ops  # noqa: E402
from umm_ops.data.degradations import DEGRADATIONS, LEVELS, degrade  # noqa: E402
from umm_ops.data.degradations_cv import clear_seed, degrade_images  # noqa: E402
from umm_ops.utils import atomic_write  # noqa: E402

# types that draw random numbers at the MMD-Bench levels (CLEAR: random / np.random; color_diffusion draws only
# above i = 0.9, so not at "high" = 0.9)
STOCHASTIC = {"motion_blur", "dirty_lens", "lens_flare", "block_exchange", "gaussian_noise", "graffiti",
              "watermark_damage"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))


def compare(got: np.ndarray, ref: np.ndarray, clean: np.ndarray) -> dict:
    d = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    pg = [psnr(g, c) for g, c in zip(got, clean)]
    pr = [psnr(r, c) for r, c in zip(ref, clean)]
    # pooled PSNR: from the mean squared error over the whole batch (an unchanged image - a block swapped with
    # itself, a flat picture - has an unbounded PSNR, 168 dB here, that dominates a mean of per-image PSNRs)
    pooled = [psnr(a, clean) for a in (got, ref)]
    return {"max_abs": int(d.max()), "frac_gt2": float((d > 2).mean()), "frac_ne": float((d > 0).mean()),
            "mean_abs": float(d.mean()), "psnr_got": float(np.mean(pg)), "psnr_ref": float(np.mean(pr)),
            "psnr_diff_db": float(np.mean(np.subtract(pg, pr))),
            "psnr_pooled_got": pooled[0], "psnr_pooled_ref": pooled[1], "psnr_pooled_diff_db": pooled[0] - pooled[1]}


def timed_interleaved(fns: dict, repeats: int, budget_s: float = 1.5, slow_s: float = 10.0) -> dict:
    """Seconds per call of each function in `fns`: one warm-up call each, then rounds in which every function is
    called once (interleaved, so a change of the machine's load hits all of them alike), at least `repeats`
    rounds and more (up to 5 x repeats) until each function has run for budget_s; one round when a warm-up
    took over slow_s (mean_shift: seconds per 512 px image)."""
    warm = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        warm[name] = time.perf_counter() - t0
    slowest = max(warm.values())
    rounds = 1 if slowest > slow_s else min(5 * repeats, max(repeats, int(budget_s / max(slowest, 1e-3)) + 1))
    ts = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    return ts


def loadavg() -> list:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def markdown(res: dict) -> str:
    """The README's tables from a results dict (exactness; speed when measured)."""
    rows = res["results"]
    out = ["| type | level | exact vs CLEAR: max abs | != | dPSNR (dB) | torch vs exact: > 2 levels "
           "| mean abs | dPSNR pooled (dB) | dPSNR per image (dB) | pooled PSNR CLEAR / exact / torch (dB) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, t = r["exact_vs_clear"], r["torch_vs_exact"]
        star = "*" if r["stochastic"] else ""
        tp = t.get("psnr_pooled_diff_db")
        out.append(f"| {r['kind']}{star} | {r['level']} | {e['max_abs']} | {e['frac_ne']:.1e} "
                   f"| {e['psnr_diff_db']:+.3f} | {t['frac_gt2']:.3f} | {t['mean_abs']:.2f} "
                   f"| {'-' if tp is None else f'{tp:+.2f}'} | {t['psnr_diff_db']:+.2f} "
                   f"| {e.get('psnr_pooled_ref', e['psnr_ref']):.2f} / {e.get('psnr_pooled_got', e['psnr_got']):.2f} "
                   f"/ {t.get('psnr_pooled_got', t['psnr_got']):.2f} |")
    if all("speed" in r for r in rows):
        out += ["", "| type | level | CLEAR (sequential) | CLEAR (2-thread pool) | exact (numpy) | exact (tensor) "
                "| torch | exact / CLEAR | exact / best CLEAR |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            sp = r["speed"]
            mark = " (run of " + r["measured"][:16] + ")" if "measured" in r else ""
            out.append(f"| {r['kind']}{mark} | {r['level']} | {sp['clear']['images_per_s']:.1f} "
                       f"| {sp['clear_pool2']['images_per_s']:.1f} | {sp['exact']['images_per_s']:.1f} "
                       f"| {sp['exact_tensor']['images_per_s']:.1f} "
                       f"| {sp['torch']['images_per_s']:.1f} | {sp['exact_over_clear']:.2f}x "
                       f"| {sp['exact_over_best_clear']:.2f}x |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clear", default=None, help="path of a copy of CLEAR's add_degradation.py (required)")
    ap.add_argument("--clear-commit", default="")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-k", default=None, help="only types whose name contains this")
    ap.add_argument("--skip", default="", help="comma-separated types to leave out")
    ap.add_argument("--merge", default=None, metavar="RESULTS_JSON",
                    help="take the rows of the types left out (--skip / -k) from this earlier results file, "
                         "marked with the date they were measured")
    ap.add_argument("--levels", default="low,mid,high")
    ap.add_argument("--no-speed", action="store_true", help="exactness only")
    ap.add_argument("--docs", action="store_true", help="also write docs/results/mmd_bench/exactness.json")
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", default=None, metavar="RESULTS_JSON",
                    help="only print the README tables of an earlier results file")
    args = ap.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)), end="")
        return 0

    if not args.clear:
        ap.error("--clear PATH is required (a copy of CLEAR's add_degradation.py)")
    import cv2

    load0 = loadavg()
    mod = load_clear(args.clear)
    skip = {k.strip() for k in args.skip.split(",") if k.strip()}
    kinds = [k for k in DEGRADATIONS if (args.k is None or args.k in k) and k not in skip]
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    photos = photo_crops(args.size, args.size, limit=args.batch)
    imgs = photos + world_pictures(args.size, max(0, args.batch - len(photos)))
    names = [n for n, _ in imgs]
    x = np.stack([im for _, im in imgs])                      # (B, H, W, 3) uint8 RGB
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
    bgr = np.ascontiguousarray(x[..., ::-1])                  # what CLEAR's generator hands its functions
    B = len(x)
    print(f"{B} images at {args.size} px: {names}; load {loadavg()}; torch threads {torch.get_num_threads()}, "
          f"OpenCV threads {cv2.getNumThreads()}", flush=True)

    rows = []
    for kind in kinds:
        for lv in levels:
            i = LEVELS[lv]
            seeds = [clear_seed(0, b, kind) for b in range(B)]
            clear_out = np.stack([run_clear(mod, kind, x[b], i, seeds[b]) for b in range(B)])
            exact = degrade_images(x, kind, i, seed=0)
            tor = degrade(xt, kind, i, seed=0, backend="torch").permute(0, 2, 3, 1).numpy()
            row = {"kind": kind, "category": DEGRADATIONS[kind][0], "level": lv, "intensity": i,
                   "stochastic": kind in STOCHASTIC,
                   "exact_vs_clear": compare(exact, clear_out, x), "torch_vs_exact": compare(tor, exact, x)}
            if not args.no_speed:
                # CLEAR's code as its generator runs it: BGR images (cv2.imdecode's order, made outside the
                # timing), fn(image.copy(), intensity) per image; plus the seeding of its global RNGs
                fn = getattr(mod, CLEAR_NAMES.get(kind, kind))

                def clear_one(b):
                    random.seed(seeds[b])
                    np.random.seed(seeds[b])
                    return fn(bgr[b].copy(), i)

                def clear_seq():
                    for b in range(B):
                        clear_one(b)

                def clear_pool():
                    with ThreadPoolExecutor(2) as pool:
                        list(pool.map(clear_one, range(B)))

                fns = {"clear": clear_seq, "clear_pool2": clear_pool,
                       "exact": lambda: degrade_images(x, kind, i, seed=0),
                       "exact_tensor": lambda: degrade(xt, kind, i, seed=0, backend="opencv"),
                       "torch": lambda: degrade(xt, kind, i, seed=0, backend="torch")}
                speed = {}
                for name, ts in timed_interleaved(fns, args.repeats).items():
                    speed[name] = {"median_s": statistics.median(ts), "min_s": min(ts), "runs": len(ts),
                                   "images_per_s": B / statistics.median(ts)}
                speed["exact_over_clear"] = speed["exact"]["images_per_s"] / speed["clear"]["images_per_s"]
                speed["exact_over_best_clear"] = speed["exact"]["images_per_s"] / max(
                    speed["clear"]["images_per_s"], speed["clear_pool2"]["images_per_s"])
                row["speed"] = speed
            rows.append(row)
            e, t = row["exact_vs_clear"], row["torch_vs_exact"]
            sp = row.get("speed")
            print(f"{kind:24s} {lv:4s} exact: max {e['max_abs']:3d} >2 {e['frac_gt2']:.2e} dPSNR "
                  f"{e['psnr_diff_db']:+.3f} | torch: >2 {t['frac_gt2']:.3f} dPSNR {t['psnr_diff_db']:+.2f}"
                  + (f" | img/s clear {sp['clear']['images_per_s']:7.1f} pool {sp['clear_pool2']['images_per_s']:7.1f}"
                     f" exact {sp['exact']['images_per_s']:7.1f} (tensor {sp['exact_tensor']['images_per_s']:7.1f})"
                     f" torch {sp['torch']['images_per_s']:7.1f}"
                     if sp else ""), flush=True)

    if args.merge:
        with open(args.merge) as f:
            old = json.load(f)
        measured = {r["kind"] for r in rows}
        kept = [dict(r, measured=old["date"]) for r in old["results"] if r["kind"] not in measured]
        order = list(DEGRADATIONS)
        rows = sorted(rows + kept, key=lambda r: (order.index(r["kind"]), levels.index(r["level"])
                                                  if r["level"] in levels else 9))
    res = {"benchmark": "mmd-bench", "device": device_name("cpu"), "device_kind": "cpu",
           "machine_note": "AMD EPYC, 2 vCPUs, no GPU" if "AMD EPYC" in device_name("cpu") else "",
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "load_before": load0, "load_after": loadavg(), "size": args.size, "batch": B, "images": names,
           "repeats": args.repeats, "torch": torch.__version__, "opencv": cv2.__version__, "numpy": np.__version__,
           "python": platform.python_version(), "umm_ops": umm_ops.__version__,
           "torch_threads": torch.get_num_threads(), "opencv_threads": cv2.getNumThreads(),
           "clear_commit": args.clear_commit, "results": rows}
    out = args.out or os.path.join(HERE, "results", f"{slug(res['device'])}-mmd-bench.json")
    atomic_write(out, json.dumps(res, indent=1) + "\n")
    print(f"wrote {os.path.relpath(out)}")
    if args.docs:
        doc = {k: v for k, v in res.items() if k != "results"}
        doc["results"] = [{k: v for k, v in r.items() if k != "speed"} for r in rows]
        path = os.path.join(ROOT, "docs", "results", "mmd_bench", "exactness.json")
        atomic_write(path, json.dumps(doc, indent=1) + "\n")
        print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
