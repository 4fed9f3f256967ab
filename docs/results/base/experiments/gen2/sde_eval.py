"""Checker score of a checkpoint's images on held-out prompts, ODE vs the Flow-SDE sampler at several sigma (the same
prompts and seeds).  Usage: sde_eval.py CKPT N STEPS '[["ode", 0], ["sde", 0.5], ...]'"""
import sys, json, time, torch
import umm_ops
from umm_ops.cli import _run_world
from umm_ops.train.export import load_checkpoint_model
from umm_ops.data.synthetic import SyntheticWorld
from umm_ops.eval.checker import check

ck, n, steps, grid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
model = load_checkpoint_model(ck).eval()
first, size, wk = _run_world(ck)
world = SyntheticWorld(size=size, **wk)
recs = [world[first + i] for i in range(n)]
for mode, sig in grid:
    t0 = time.time(); scores = []
    for s in range(0, n, 16):
        chunk = recs[s:s + 16]
        kw = dict(height=size, width=size, steps=steps, seed=[first + s + j for j in range(len(chunk))])
        if mode == "sde":
            kw.update(mode="sde", sigma=umm_ops.SigmaSchedule(sig))
        out = model.generate_image([r.prompt["text"] for r in chunk], **kw)
        scores += [check(r.prompt, img, value_range=(-1.0, 1.0))["score"] for r, img in zip(chunk, out["images"])]
    print(json.dumps({"mode": mode, "sigma": sig, "steps": steps, "n": n, "score": round(sum(scores) / n, 4),
                      "s": round(time.time() - t0, 1)}), flush=True)
