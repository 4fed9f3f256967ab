"""Inference time of CLEAR's two ways for a restoration to join the context, on the same clear-short items
(the eval harness' items, seed 0; batches of 16 as `umm eval`): decode -> re-encode (generate_then_answer) and the
latent bridge (generate_then_answer(bridge=True)).  Each batch runs both paths in turn (the order alternating), and
also times the parts the bridge leaves out: the VAE decode of the restored latents and the VAE encode of the
decoded pictures.  Writes the per-path wall times and how often the two paths give the same answer.

    OMP_NUM_THREADS=1 python docs/results/clear/bridge1/timing.py runs/bridge1 64 OUT.json
"""
import json
import sys
import time

import torch

from umm_ops.cli import _run_world
from umm_ops.data.clear_data import clear_question
from umm_ops.data.degradations import degrade
from umm_ops.data.synthetic import SyntheticWorld
from umm_ops.eval.tasks import EvalContext, pixels
from umm_ops.eval.tasks.mmd_bench import pairs
from umm_ops.eval.tasks.vqa import questions, score_short_answer
from umm_ops.train.export import load_checkpoint_model
from umm_ops.utils import atomic_write

run, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = load_checkpoint_model(run).eval()
first, size, world = _run_world(run)
w = SyntheticWorld(size=size, length=first + n, **world)
ctx = EvalContext(w, first, n, 0, size, None)
qa = questions(ctx)
ps = pairs()
offset = ctx.seed_for("mmd-bench", "offset") % len(ps)
times = {"decode_reencode": 0.0, "bridge": 0.0, "vae_decode": 0.0, "vae_encode": 0.0}
same, score, restored = 0, {"decode_reencode": 0, "bridge": 0}, {"decode_reencode": 0, "bridge": 0}
for s in range(0, n, 16):
    b = qa[s:s + 16]
    deg = [pixels(degrade(im[None], *ps[(s + k + offset) % len(ps)], seed=0, index=[i])[0])
           for k, (i, im, _) in enumerate(b)]
    texts = [clear_question(q, False) for _, _, q in b]
    seed = ctx.seed_for("clear-short", b[0][0])
    res = {}
    order = ("decode_reencode", "bridge") if (s // 16) % 2 == 0 else ("bridge", "decode_reencode")
    for path in order:
        t0 = time.perf_counter()
        res[path] = model.generate_then_answer(deg, texts, seed=seed, bridge=path == "bridge")
        times[path] += time.perf_counter() - t0
    lat = torch.stack([r["latent"] for r in res["bridge"] if r.get("latent") is not None])
    with torch.no_grad():
        t0 = time.perf_counter()
        pix = model.vae.decode(lat.to(model.dtype), (size, size), clamp=tuple(model.profile.pixel_range))
        times["vae_decode"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        model.vae.encode(pix)
        times["vae_encode"] += time.perf_counter() - t0
    for k, (_, _, q) in enumerate(b):
        same += res["bridge"][k]["answer"] == res["decode_reencode"][k]["answer"]
        for path in res:
            score[path] += score_short_answer(res[path][k]["answer"], q["answer"])
            restored[path] += res[path][k]["restored"]
    print(s + len(b), {k: round(v, 2) for k, v in times.items()}, flush=True)
result = {"run": run, "n": n, "image_size": size, "threads": torch.get_num_threads(),
          "seconds": {k: round(v, 3) for k, v in times.items()},
          "seconds_per_item": {k: round(v / n, 4) for k, v in times.items()},
          "bridge_saves": round(1 - times["bridge"] / times["decode_reencode"], 4),
          "same_answer": same / n, "accuracy": {k: v / n for k, v in score.items()},
          "restored": {k: v / n for k, v in restored.items()}}
print(json.dumps(result, indent=1))
atomic_write(out, json.dumps(result, indent=1) + "\n")
