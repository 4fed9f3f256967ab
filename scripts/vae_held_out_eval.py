"""Held-out evaluation of the tiny preset's shipped autoencoder (umm_ops/assets/tiny-world-vae.safetensors).

    python scripts/vae_held_out_eval.py --n 256 --out docs/results/vae/run-7000/held-out-eval-256.json
    python scripts/vae_held_out_eval.py --n 256 --weights vae.safetensors --out eval.json   # an exported run

For 64 and 128 px and two worlds (the vae recipe's: up to 4 objects, 7 shapes, 8 colours, two-tone backgrounds;
the base SFT world: up to 2 objects, circle / square / triangle / cross, plain backgrounds), on the records after
the training split (the seed and split recorded beside the weights): the pixel checker's score of the
reconstructions against each record's prompt (the issue's metric), the mean absolute error in grey levels, and per
shape and size the fraction of objects the checker finds in the reconstruction (colour and shape right).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="held-out pictures per size and world")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--weights", default=None,
                    help="an exported autoencoder (.safetensors, `umm export` of a vae run) instead of the shipped one")
    args = ap.parse_args(argv)

    from umm_ops.data.synthetic import SyntheticWorld
    from umm_ops.eval.checker import check, find_objects
    from umm_ops.model.cheers import CheersModel
    from umm_ops.model.vae import SHIPPED_WEIGHTS
    from umm_ops.utils import atomic_write

    from pathlib import Path

    weights = Path(args.weights) if args.weights else SHIPPED_WEIGHTS / "tiny-world-vae.safetensors"
    info = json.loads(weights.with_name(weights.name + ".json").read_text())
    first, seed, n = info["config"]["recipe"]["train_records"], info["config"]["job"]["seed"], args.n
    vae = CheersModel("tiny").vae.eval()
    if args.weights:
        vae.load_autoencoder(weights)
    worlds = (("full world (max 4 objects, 7 shapes, 8 colours)", dict(max_objects=4)),
              ("base world (max 2 objects, circle/square/triangle/cross, plain backgrounds)",
               dict(max_objects=2, kinds=("circle", "square", "triangle", "cross"), two_tone=0.0)))
    res = {"weights": str(args.weights or "shipped tiny-world-vae"), "n": n, "first_record": first, "seed": seed}
    for size in (64, 128):
        for label, kw in worlds:
            t0 = time.time()
            w = SyntheticWorld(size=size, seed=seed, length=first + n, **kw)
            recs = [w[first + k] for k in range(n)]
            scores, found_by, err = [], {}, 0.0
            for i in range(0, n, 32):
                pix = torch.stack([r.image.float() / 127.5 - 1 for r in recs[i:i + 32]])
                with torch.no_grad():
                    rec = vae.decode(vae.encode(pix), (size, size))
                err += float((rec - pix).abs().sum()) * 127.5
                for r, x in zip(recs[i:i + 32], rec):
                    scores.append(check(r.prompt, x, value_range=(-1, 1))["score"])
                    found = {(o["color"], o["kind"]) for o in find_objects(x, value_range=(-1, 1))}
                    for o in r.scene["objects"]:
                        found_by.setdefault(f'{o["kind"]}-{o["size"]}', []).append((o["color"], o["kind"]) in found)
            res[f"{size}px {label}"] = {
                "checker_score_of_prompt": sum(scores) / n,
                "mean_abs_error_grey_levels": err / (n * 3 * size * size),
                "found_rate_by_shape_and_size": {k: round(sum(v) / len(v), 3) for k, v in sorted(found_by.items())},
                "seconds": round(time.time() - t0, 1)}
            print(f"{size} px, {label}: checker {sum(scores) / n:.3f}", flush=True)
    atomic_write(args.out, json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
