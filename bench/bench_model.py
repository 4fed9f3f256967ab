"""End-to-end CheersModel benchmark: training step (forward + backward) tokens/s and peak memory, and image
generation latency per sampling step, with the fused ops vs the same model on the reference ops.

    python bench/bench_model.py --quick                 # tiny preset on CPU, a few steps (~2-4 min on 2 busy cores)
    python bench/bench_model.py --preset small          # on a GPU: small (or cheers-1.5b) preset

"fused": umm_ops' automatic backend choice (CUDA / Triton / C++ CPU kernels); "reference": the same model under
``umm_ops.use_backend("reference")`` (plain PyTorch: dense (L, L) mask attention, eager norms).

Timing: one process, the backends interleaved step by step (fused, reference, fused, ...) so that both see the same
load on a shared machine; each number is the minimum over the timed steps (the least disturbed), the median and every
raw time are kept in the results file.  Generation: best of 3 runs of 1 and 1 + gen_steps sampling steps, the
difference divided by gen_steps (prompt prefill excluded).
Peak memory: each backend in its own process, two training steps: on CUDA ``torch.cuda.max_memory_allocated``
minus what was allocated before; on CPU the growth of the process's peak resident set (ru_maxrss) from just before
the first step (model and batch built) - the step's working memory, allocator caching included.

Batch: ``--samples`` synthetic chat samples packed into one batch, alternating text-to-image (prompt + image to
generate) and image understanding (image + question + answer with loss), images ``--image-size`` px.
Writes bench/results/<device>-model.json (device named as bench/run.py names it) and prints a table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _samples(n, size, seed=0):
    import torch

    from umm_ops.data.packing import ImageItem, Sample, TextItem

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = torch.rand(3, size, size, generator=g) * 2 - 1
        if i % 2 == 0:
            out.append(Sample([TextItem(f"<|im_start|>user\nDraw picture number {i}, a small scene.<|im_end|>\n"
                                        "<|im_start|>assistant\n"), ImageItem(img, "generate")]))
        else:
            out.append(Sample([TextItem("<|im_start|>user\n"), ImageItem(img, "understand"),
                               TextItem("What is in this picture?<|im_end|>\n<|im_start|>assistant\n"),
                               TextItem(f"A small scene with {i} things in it.<|im_end|>", loss=True)]))
    return out


BACKENDS = {"fused": "auto", "reference": "reference"}


def _setup(args):
    import torch

    from umm_ops.data.packing import pack
    from umm_ops.model.cheers import CheersModel

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = CheersModel(args.preset).to(dev)
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.train()
    batch = pack(_samples(args.samples, args.image_size), model.pack_spec(budget=1 << 30))[0].to(dev)
    # the training step's drawn inputs (flow noise, CFG dropout at the preset's rate), once: the same every step
    from umm_ops.train import policy

    inputs = policy.training_inputs(model, batch, seed=0, cfg_dropout_p=model.config.cfg_dropout)
    inputs["noise"] = [None if z is None else z.to(dev) for z in inputs["noise"]]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(batch, **inputs)
        out["loss"].backward()
        return out["loss"].item()

    return dev, model, batch, sync, step


def worker_memory(args) -> dict:
    """Peak memory of one training step of one backend (own process)."""
    import torch

    import umm_ops

    dev, model, batch, sync, step = _setup(args)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # model + batch built, nothing run yet
    with umm_ops.use_backend(BACKENDS[args.backend]):
        for _ in range(2):
            step()
        sync()
    if dev.type == "cuda":
        return dict(peak_mem_bytes=torch.cuda.max_memory_allocated() - base,
                    peak_mem_kind="cuda max allocated during 2 steps - allocated before")
    return dict(peak_mem_bytes=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024,
                peak_mem_kind="growth of the process peak RSS over 2 steps (CPU)")


def worker_timing(args) -> dict:
    """Step and generation times of every backend, interleaved step by step in one process (same load for all)."""
    import torch

    import umm_ops

    dev, model, batch, sync, step = _setup(args)
    names = args.backends.split(",")
    res = {be: dict(backend=be, preset=args.preset, tokens=batch.num_tokens, docs=batch.num_docs,
                    images=len(batch.images), image_size=args.image_size, dtype=args.dtype,
                    params=sum(p.numel() for p in model.parameters()),
                    trainable=sum(p.numel() for p in model.trainable_parameters()), step_s_all=[])
           for be in names}
    for _ in range(args.warmup):
        for be in names:
            with umm_ops.use_backend(BACKENDS[be]):
                step()
    for _ in range(args.steps):
        for be in names:
            with umm_ops.use_backend(BACKENDS[be]):
                sync()
                t = time.perf_counter()
                step()
                sync()
                res[be]["step_s_all"].append(time.perf_counter() - t)
    for be in names:
        times = res[be]["step_s_all"]
        best = min(times)    # shared machines: the minimum is the least disturbed measurement
        res[be].update(step_s=best, step_s_median=statistics.median(times), tokens_per_s=batch.num_tokens / best)
    # generation latency per sampling step (CFG on: conditional + null prompt in one packed batch)
    model.eval()
    model.zero_grad(set_to_none=True)
    prompts = [f"<|im_start|>user\nDraw picture {i}.<|im_end|>\n<|im_start|>assistant\n"
               for i in range(args.gen_batch)]
    kw = dict(height=args.image_size, width=args.image_size, cfg_scale=4.0, seed=0)
    lat = {be: {1: [], 1 + args.gen_steps: []} for be in names}
    for be in names:
        with umm_ops.use_backend(BACKENDS[be]):
            model.generate_image(prompts, steps=1, **kw)              # warm-up
    for _ in range(3):
        for n in (1, 1 + args.gen_steps):
            for be in names:
                with umm_ops.use_backend(BACKENDS[be]):
                    sync()
                    t = time.perf_counter()
                    model.generate_image(prompts, steps=n, **kw)
                    sync()
                    lat[be][n].append(time.perf_counter() - t)
    for be in names:
        lo, hi = min(lat[be][1]), min(lat[be][1 + args.gen_steps])
        res[be].update(gen_batch=args.gen_batch, gen_step_s=(hi - lo) / args.gen_steps, gen_total_1step_s=lo)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps (what a CPU session can afford)")
    ap.add_argument("--preset", default=None, help="tiny (default on CPU) | small (default on GPU) | cheers-1.5b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: float32 CPU, bf16 GPU")
    ap.add_argument("--samples", type=int, default=None, help="samples in the packed batch")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--gen-steps", type=int, default=None)
    ap.add_argument("--gen-batch", type=int, default=2)
    ap.add_argument("--backends", default="fused,reference")
    ap.add_argument("--out", default=None, help="results file (default bench/results/<device>-model.json)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    args.preset = args.preset or ("small" if gpu else "tiny")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.samples = args.samples or (16 if gpu else (4 if args.quick else 8))
    args.image_size = args.image_size or (256 if gpu else 128)
    args.steps = args.steps or (3 if args.quick else 10)
    args.gen_steps = args.gen_steps or (3 if args.quick else 8)
    if args.worker:
        args.backend = args.worker
        out = worker_timing(args) if args.worker == "timing" else worker_memory(args)
        print("RESULT " + json.dumps(out))
        return 0

    from run import device_name, slug  # bench/run.py: one way to name devices

    from umm_ops.utils import atomic_write

    base = [sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--device", args.device, "--dtype",
            args.dtype, "--samples", str(args.samples), "--image-size", str(args.image_size), "--steps",
            str(args.steps), "--warmup", str(args.warmup), "--gen-steps", str(args.gen_steps), "--gen-batch",
            str(args.gen_batch), "--backends", args.backends]

    def run(mode):
        p = subprocess.run(base + ["--worker", mode], capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not line:
            sys.stderr.write(p.stdout + p.stderr)
            raise SystemExit(f"[bench_model] the {mode} worker failed (exit {p.returncode})")
        return json.loads(line[0][len("RESULT "):])

    print(f"[bench_model] {args.backends} interleaved: {args.preset} on {args.device}, {args.samples} samples @ "
          f"{args.image_size} px, {args.steps} steps each ...", flush=True)
    timing = run("timing")
    rows = []
    for be in args.backends.split(","):
        print(f"[bench_model] peak memory, {be} ...", flush=True)
        rows.append({**timing[be], **run(be)})

    dev_name = device_name("cuda" if gpu else "cpu")
    by = {r["backend"]: r for r in rows}
    if "fused" in by and "reference" in by:
        f, r = by["fused"], by["reference"]
        speed = dict(train_speedup=f["tokens_per_s"] / r["tokens_per_s"],
                     gen_step_speedup=r["gen_step_s"] / f["gen_step_s"] if f["gen_step_s"] > 0 else None,
                     peak_mem_ratio=f["peak_mem_bytes"] / r["peak_mem_bytes"] if r["peak_mem_bytes"] else None)
    else:
        speed = {}
    res = dict(device=dev_name, date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, threads=torch.get_num_threads(), quick=args.quick,
               load_average=os.getloadavg(), results=rows, summary=speed)
    out = args.out or os.path.join(HERE, "results", f"{slug(dev_name)}-model.json")
    atomic_write(out, json.dumps(res, indent=2))

    print(f"\n{dev_name}  preset={args.preset}  {rows[0]['tokens']} tokens/batch, {rows[0]['images']} images "
          f"@ {args.image_size} px, {rows[0]['params'] / 1e6:.1f}M params")
    print(f"{'backend':<10} {'step ms':>9} {'tokens/s':>10} {'peak MB':>9} {'gen step ms':>12}")
    for r in rows:
        print(f"{r['backend']:<10} {r['step_s'] * 1e3:9.1f} {r['tokens_per_s']:10.1f} "
              f"{r['peak_mem_bytes'] / 2**20:9.1f} {r['gen_step_s'] * 1e3:12.1f}")
    if speed:
        print(f"fused vs reference: training {speed['train_speedup']:.2f}x tokens/s, generation step "
              f"{speed['gen_step_speedup']:.2f}x, peak memory {speed['peak_mem_ratio'] or float('nan'):.2f}x")
    print(f"[bench_model] results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
