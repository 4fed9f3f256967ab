"""The two per-step costs of the base SFT schedule that its defaults changed in stop 42: the frozen VAE (encoder and
decoder copy, Cheers' understanding path, run on every picture) in float32 or bf16 (``VAEConfig.compute_dtype``),
and the AdamW step over the tiny preset's trainable parameters with each of PyTorch's kernels
(``optim.implementation``).

    python bench/bench_train_parts.py [--quick]          # ~1 min on 2 CPU cores

Frozen VAE: batches of 30-45 pictures at 64 px (the base schedule's range; each size new to the process, as in
training, where every packed batch brings its own count), encoder then decoder copy, no gradient; the same sizes in
each dtype, in alternating rounds, per-batch minimum over the rounds.  Also the error of the bf16 latents and pixels
against float32 (mean absolute, the latents' relative to their standard deviation).  AdamW: the tiny preset's
trainable parameters (the recipe's: the VAE and its decoder copy frozen) with random gradients, median of the timed
steps after warm-up, plus ``clip_grad_norm_`` (which the engine runs every step).  Writes
bench/results/<device>-train-parts.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def bench_vae(rounds: int) -> dict:
    import torch

    from umm_ops.model import CheersModel

    torch.manual_seed(0)
    model = CheersModel("tiny")
    vae = model.vae
    vae.requires_grad_(False)
    sizes = [31, 37, 42, 45, 33, 40, 44, 35]
    times = {"float32": {}, "bfloat16": {}}
    for r in range(rounds):
        for dt in ("float32", "bfloat16"):
            vae.cfg.compute_dtype = None if dt == "float32" else "bfloat16"
            for n in sizes:
                x = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(n)) * 2 - 1
                t0 = time.perf_counter()
                z = vae.encode(x)
                t1 = time.perf_counter()
                vae.decode_trainable(z, x.shape[-2:])
                t2 = time.perf_counter()
                best = times[dt].setdefault(n, [float("inf"), float("inf")])
                best[0], best[1] = min(best[0], t1 - t0), min(best[1], t2 - t1)
    x = torch.rand(40, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = {}
    for dt in ("float32", "bfloat16"):
        vae.cfg.compute_dtype = None if dt == "float32" else "bfloat16"
        z = vae.encode(x)
        out[dt] = (z, vae.decode_trainable(z, x.shape[-2:]))
    vae.cfg.compute_dtype = None
    (z32, p32), (zb, pb) = out["float32"], out["bfloat16"]
    per_pic = {dt: {"encoder_ms_per_picture": 1e3 * sum(v[0] for v in t.values()) / sum(t),
                    "decoder_copy_ms_per_picture": 1e3 * sum(v[1] for v in t.values()) / sum(t)}
               for dt, t in times.items()}
    f, b = per_pic["float32"], per_pic["bfloat16"]
    return dict(sizes=sizes, rounds=rounds, per_picture=per_pic,
                speedup_encoder=f["encoder_ms_per_picture"] / b["encoder_ms_per_picture"],
                speedup_decoder_copy=f["decoder_copy_ms_per_picture"] / b["decoder_copy_ms_per_picture"],
                latent_mean_abs_err_over_std=float((zb - z32).abs().mean() / z32.std()),
                pixel_mean_abs_err=float((pb - p32).abs().mean()),
                raw_seconds={dt: {str(n): v for n, v in t.items()} for dt, t in times.items()})


def bench_adamw(steps: int) -> dict:
    import torch

    from umm_ops.model import CheersModel
    from umm_ops.train import Config
    from umm_ops.train.engine.optim import build_optimizer

    torch.manual_seed(0)
    model = CheersModel("tiny")
    model.vae.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {"parameters": sum(p.numel() for p in params)}
    for impl in ("for-loop", "foreach", "fused"):
        cfg = Config.build("sft", overrides=[f"optim.implementation={impl}"])
        opt = build_optimizer(model, cfg.optim)
        for _ in range(3):
            opt.step()
        ts = []
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.step()
            ts.append(time.perf_counter() - t0)
        out[impl] = {"step_ms_median": 1e3 * statistics.median(ts), "raw_s": ts}
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        ts.append(time.perf_counter() - t0)
    out["clip_grad_norm_ms_median"] = 1e3 * statistics.median(ts)
    out["fused_speedup_over_for_loop"] = out["for-loop"]["step_ms_median"] / out["fused"]["step_ms_median"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    ap.add_argument("--out", default=None, help="results file (default bench/results/<device>-train-parts.json)")
    args = ap.parse_args(argv)

    import torch

    from run import device_name, slug  # bench/run.py: one way to name devices

    from umm_ops.utils import atomic_write

    vae = bench_vae(2 if args.quick else 4)
    adamw = bench_adamw(10 if args.quick else 30)
    dev = device_name("cpu")
    res = dict(device=dev, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, threads=torch.get_num_threads(), load_average=os.getloadavg(),
               quick=args.quick, frozen_vae=vae, adamw=adamw)
    out = args.out or os.path.join(HERE, "results", f"{slug(dev)}-train-parts.json")
    atomic_write(out, json.dumps(res, indent=2))
    pp = vae["per_picture"]
    print(f"{dev}, {res['threads']} threads")
    for dt in ("float32", "bfloat16"):
        print(f"  frozen VAE {dt:8s}: encoder {pp[dt]['encoder_ms_per_picture']:.2f} ms / picture, decoder copy "
              f"{pp[dt]['decoder_copy_ms_per_picture']:.2f} ms / picture")
    print(f"  bf16 speed-up: encoder {vae['speedup_encoder']:.2f}x, decoder copy {vae['speedup_decoder_copy']:.2f}x; "
          f"bf16 error: latents {vae['latent_mean_abs_err_over_std']:.4f} of their std, pixels "
          f"{vae['pixel_mean_abs_err']:.4f} (mean abs)")
    for impl in ("for-loop", "foreach", "fused"):
        print(f"  AdamW {impl:8s}: {adamw[impl]['step_ms_median']:.1f} ms per step "
              f"({adamw['parameters'] / 1e6:.1f}M parameters)")
    print(f"  clip_grad_norm_: {adamw['clip_grad_norm_ms_median']:.1f} ms; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
