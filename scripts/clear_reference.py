"""Run CLEAR's released MMD-Bench degradations (add_degradation.py) as the reference for umm_ops' exact path, and
record them as test fixtures.

CLEAR's code is not part of this project: fetch a copy at record time, outside the repository, e.g.

    git clone https://github.com/haoxiangzhao12138/CLEAR /tmp/CLEAR     # or any copy of that repository
    cp /tmp/CLEAR/data/corruption_datasets_create/add_degradation.py /tmp/clear_ref/
    python scripts/clear_reference.py --clear /tmp/clear_ref/add_degradation.py --commit <its commit>

This writes tests/fixtures/mmd_bench_clear.npz: small test images (real photographs found on this machine, when
there are any, and a synthetic-world picture), and CLEAR's output for each of the 16 types at the three levels,
each image seeded the way umm_ops.data.degradations_cv seeds it (``random.seed(s); np.random.seed(s)`` with
``s = clear_seed(0, index, kind)``).  bench/bench_mmd_bench.py uses the same helpers at 512 px.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import random
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "mmd_bench_clear.npz")

# umm_ops' type names -> CLEAR's function names (only jpeg differs)
CLEAR_NAMES = {"jpeg": "jpeg_compression"}

# Real photographs that packages on this machine ship (no downloads): matplotlib's sample data, the Rust book's
# photographs.  Missing ones are skipped.
PHOTO_GLOBS = (
    "**/matplotlib/mpl-data/sample_data/grace_hopper.jpg",
    "/root/.rustup/toolchains/*/share/doc/rust/html/embedded-book/assets/f3.jpg",
    "/root/.rustup/toolchains/*/share/doc/rust/html/embedded-book/assets/verify.jpeg",
)


def load_clear(path: str):
    """CLEAR's add_degradation.py, imported from `path` (a copy outside this repository)."""
    if not os.path.isfile(path):
        raise SystemExit(f"--clear {path!r}: no such file; fetch CLEAR's add_degradation.py first (see the docstring)")
    spec = importlib.util.spec_from_file_location("clear_add_degradation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_clear(mod, kind: str, rgb: np.ndarray, intensity: float, s: int) -> np.ndarray:
    """CLEAR's function for `kind` on one RGB uint8 image (BGR inside, as CLEAR reads images with cv2), its global
    random sources seeded with s; an exception keeps the image, as CLEAR's apply_degradation_Benchmark does."""
    fn = getattr(mod, CLEAR_NAMES.get(kind, kind))
    random.seed(s)
    np.random.seed(s)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    try:
        out = fn(bgr.copy(), intensity)
    except Exception:
        out = bgr
    return np.ascontiguousarray(out[..., ::-1])


def find_photos() -> list:
    paths = []
    for pat in PHOTO_GLOBS:
        if pat.startswith("**"):
            for base in sys.path:
                if base and os.path.isdir(base):
                    paths += glob.glob(os.path.join(base, pat[3:]))
        else:
            paths += glob.glob(pat)
    seen, out = set(), []
    for p in paths:
        name = os.path.basename(p)
        if name not in seen:
            seen.add(name)
            out.append(p)
    return out  # in PHOTO_GLOBS order: the portrait first


def photo_crops(h: int, w: int, limit: int | None = None) -> list:
    """(name, (h, w, 3) uint8 RGB) centre crops of the photographs found, resized with area averaging."""
    from PIL import Image

    out = []
    for p in find_photos()[:limit]:
        im = Image.open(p).convert("RGB")
        W, H = im.size
        scale = max(w / W, h / H)
        im = im.resize((max(w, round(W * scale)), max(h, round(H * scale))), Image.BOX)
        W, H = im.size
        left, top = (W - w) // 2, (H - h) // 2
        out.append((os.path.basename(p), np.asarray(im.crop((left, top, left + w, top + h))).copy()))
    return out


def world_pictures(size: int, n: int, seed: int = 0) -> list:
    from umm_ops.data.synthetic import SyntheticWorld

    world = SyntheticWorld(size=size, seed=seed, max_objects=6)
    return [(f"synthetic_world_{k}", world[k].image.permute(1, 2, 0).contiguous().numpy()) for k in range(n)]


def main(argv=None) -> int:
    sys.path.insert(0, ROOT)
    from umm_ops.data.degradations import DEGRADATIONS, LEVELS
    from umm_ops.data.degradations_cv import clear_seed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clear", required=True, help="path of a copy of CLEAR's add_degradation.py")
    ap.add_argument("--commit", default="", help="the CLEAR commit the copy comes from (recorded)")
    ap.add_argument("--out", default=FIXTURE)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=96)
    args = ap.parse_args(argv)

    import cv2

    mod = load_clear(args.clear)
    photos = photo_crops(args.height, args.width, limit=2)
    world = world_pictures(max(args.height, args.width), 1)
    world = [(n, im[:args.height, :args.width]) for n, im in world]
    images = photos + world
    names = [n for n, _ in images]
    x = np.stack([im for _, im in images])
    arrays = {"inputs": x}
    for kind in DEGRADATIONS:
        for lv, i in LEVELS.items():
            arrays[f"{kind}/{lv}"] = np.stack([run_clear(mod, kind, x[b], i, clear_seed(0, b, kind))
                                               for b in range(len(x))])
    meta = {"clear_commit": args.commit, "clear_file": "data/corruption_datasets_create/add_degradation.py",
            "opencv": cv2.__version__, "numpy": np.__version__, "seed": 0, "index": list(range(len(x))),
            "images": names, "levels": LEVELS,
            "how": "random.seed(s); np.random.seed(s); s = clear_seed(0, index, kind); CLEAR's function on the "
                   "BGR image; output stored RGB"}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

    from umm_ops.utils import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(args.out, write=write, suffix=".npz")
    print(f"wrote {os.path.relpath(args.out)} ({os.path.getsize(args.out) / 1e6:.2f} MB): {len(x)} images "
          f"{names}, {len(arrays) - 2} outputs, OpenCV {cv2.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
