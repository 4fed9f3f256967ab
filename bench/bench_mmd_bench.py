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
                   (degrade(..., backend="opencv"): a thread pool over the batch) and of the torch path
                   (degrade(..., backend="torch")), median of --repeats timed runs after a warm-up run.
Outputs: bench/results/<cpu>-mmd-bench.json (speed + exactness, machine, load) and, with --docs,
docs/results/mmd_bench/exactness.json (the exactness part).
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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from clear_reference import load_clear, photo_crops, run_clear, world_pictures  # noqa: E402
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
    return {"max_abs": int(d.max()), "frac_gt2": float((d > 2).mean()), "frac_ne": float((d > 0).mean()),
            "mean_abs": float(d.mean()), "psnr_got": float(np.mean(pg)), "psnr_ref": float(np.mean(pr)),
            "psnr_diff_db": float(np.mean(np.subtract(pg, pr)))}


def timed(fn, repeats: int, slow_s: float = 10.0) -> list:
    """Times of `repeats` calls after a warm-up call; a single timed call when the warm-up took over slow_s
    (mean_shift: CLEAR takes seconds per 512 px image)."""
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > slow_s:
        repeats = 1
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def loadavg() -> list:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def markdown(res: dict) -> str:
    """The README's tables from a results dict (exactness; speed when measured)."""
    rows = res["results"]
    out = ["| type | level | exact vs CLEAR: max abs | > 2 levels | != | dPSNR (dB) | torch vs exact: > 2 levels "
           "| mean abs | dPSNR (dB) | PSNR CLEAR / exact / torch (dB) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, t = r["exact_vs_clear"], r["torch_vs_exact"]
        star = "*" if r["stochastic"] else ""
        out.append(f"| {r['kind']}{star} | {r['level']} | {e['max_abs']} | {e['frac_gt2']:.1e} | {e['frac_ne']:.1e} "
                   f"| {e['psnr_diff_db']:+.3f} | {t['frac_gt2']:.3f} | {t['mean_abs']:.2f} | {t['psnr_diff_db']:+.2f} "
                   f"| {e['psnr_ref']:.2f} / {e['psnr_got']:.2f} / {t['psnr_got']:.2f} |")
    if all("speed" in r for r in rows):
        out += ["", "| type | level | CLEAR (sequential) | CLEAR (2-thread pool) | exact | torch | exact / CLEAR "
                "| exact / best CLEAR |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            sp = r["speed"]
            out.append(f"| {r['kind']} | {r['level']} | {sp['clear']['images_per_s']:.1f} "
                       f"| {sp['clear_pool2']['images_per_s']:.1f} | {sp['exact']['images_per_s']:.1f} "
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
    kinds = [k for k in DEGRADATIONS if args.k is None or args.k in k]
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    photos = photo_crops(args.size, args.size, limit=args.batch)
    imgs = photos + world_pictures(args.size, max(0, args.batch - len(photos)))
    names = [n for n, _ in imgs]
    x = np.stack([im for _, im in imgs])                      # (B, H, W, 3) uint8 RGB
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
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
                def clear_seq():
                    for b in range(B):
                        run_clear(mod, kind, x[b], i, seeds[b])

                def clear_pool():
                    with ThreadPoolExecutor(2) as pool:
                        list(pool.map(lambda b: run_clear(mod, kind, x[b], i, seeds[b]), range(B)))

                speed = {}
                for name, fn in (("clear", clear_seq), ("clear_pool2", clear_pool),
                                 ("exact", lambda: degrade(xt, kind, i, seed=0, backend="opencv")),
                                 ("torch", lambda: degrade(xt, kind, i, seed=0, backend="torch"))):
                    ts = timed(fn, args.repeats)
                    speed[name] = {"median_s": statistics.median(ts), "min_s": min(ts),
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
                     f" exact {sp['exact']['images_per_s']:7.1f} torch {sp['torch']['images_per_s']:7.1f}"
                     if sp else ""), flush=True)

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
