"""Would torch.compile make the frozen VAE cheaper in the base schedule? (stop 47; a measurement, no default changed)

The frozen VAE encoder and the decoder copy in front of the ViT were 43% of a base-schedule step on the AMD EPYC
(stop 44's step_breakdown-amd.txt: 78 + 164 of 555 ms, in bf16).  Both are pure inference on every step's pictures,
batch sizes varying step to step.  This times them eager and under ``torch.compile(dynamic=True)`` (inductor, CPU)
on the shipped tiny VAE with ``compute_dtype = bfloat16`` (the default), on a sequence of batch sizes drawn like the
schedule's (pictures per step: ~29 read, ~12 generated; each size's first call, as in training, where sizes recur),
and reports the compile time, the mean per call after it, and the largest difference of the outputs.

    OMP_NUM_THREADS=2 python bench_vae_compile.py [THREADS] [CALLS]
"""
import json
import random
import sys
import time

import torch

from umm_ops.model import CheersModel, preset

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
calls = int(sys.argv[2]) if len(sys.argv) > 2 else 40
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = preset("tiny")
cfg.vae.compute_dtype = "bfloat16"
m = CheersModel(cfg).eval()
m.vae.requires_grad_(False)
vae = m.vae
rng = random.Random(0)
sizes = [rng.randint(18, 34) for _ in range(calls)]          # pictures read per step (defaults: 29 on average)
pix = {n: torch.rand(n, 3, 64, 64) * 2 - 1 for n in set(sizes)}
tok = {n: vae.encode(pix[n]) for n in set(sizes)}


def run(fn, args_of, label):
    t0 = time.perf_counter()
    first = fn(*args_of(sizes[0]))
    first_s = time.perf_counter() - t0
    times, outs = [], {}
    for n in sizes[1:]:
        t = time.perf_counter()
        with torch.no_grad():
            outs[n] = fn(*args_of(n))
        times.append(time.perf_counter() - t)
    per_pic = sum(t / n for t, n in zip(times, sizes[1:])) / len(times)
    print(f"{label:34s} first call {first_s:6.2f} s, then {1000 * sum(times) / len(times):6.1f} ms per call "
          f"({1000 * per_pic:.2f} ms per picture)", flush=True)
    return {"first_call_s": first_s, "mean_call_ms": 1000 * sum(times) / len(times), "ms_per_picture": 1000 * per_pic,
            "outs": outs}


res = {}
enc_eager = lambda x: vae.encode(x)
dec_eager = lambda t: vae.decode_trainable(t, (64, 64))
with torch.no_grad():
    res["encoder eager"] = run(enc_eager, lambda n: (pix[n],), "encoder, eager")
    res["decoder copy eager"] = run(dec_eager, lambda n: (tok[n],), "decoder copy, eager")
    enc_c = torch.compile(enc_eager, dynamic=True)
    dec_c = torch.compile(dec_eager, dynamic=True)
    res["encoder compiled"] = run(enc_c, lambda n: (pix[n],), "encoder, torch.compile(dynamic)")
    res["decoder copy compiled"] = run(dec_c, lambda n: (tok[n],), "decoder copy, torch.compile(dynamic)")
for part in ("encoder", "decoder copy"):
    e, c = res[f"{part} eager"], res[f"{part} compiled"]
    diff = max(float((e["outs"][n].float() - c["outs"][n].float()).abs().max()) for n in e["outs"])
    scale = max(float(e["outs"][n].float().abs().max()) for n in e["outs"])
    print(f"{part}: compiled / eager per call {c['mean_call_ms'] / e['mean_call_ms']:.2f}, compile cost "
          f"{c['first_call_s'] - e['first_call_s']:.1f} s, max |diff| {diff:.3g} (max |out| {scale:.3g})")
    res[part] = {"speedup": e["mean_call_ms"] / c["mean_call_ms"], "compile_extra_s": c["first_call_s"] - e["first_call_s"],
                 "max_abs_diff": diff, "max_abs_out": scale}
for k in list(res):
    res[k].pop("outs", None)
res["settings"] = {"threads": threads, "calls": calls, "sizes": sizes, "torch": torch.__version__}
print(json.dumps(res, indent=1))
