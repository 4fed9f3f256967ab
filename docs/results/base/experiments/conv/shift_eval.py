"""geneval of a checkpoint with other sampler settings: the model config's time_shift (the preset's 0.5) and
cfg_scale (the preset's 4).  Usage: shift_eval.py CKPT N SHIFT:CFG [SHIFT:CFG ...]"""
import sys, json
from umm_ops.cli import _run_world
from umm_ops.train.export import load_checkpoint_model
from umm_ops.eval.runner import evaluate

ck, n = sys.argv[1], int(sys.argv[2])
model = load_checkpoint_model(ck)
first, size, wk = _run_world(ck)
for arg in sys.argv[3:]:
    s, c = map(float, arg.split(":"))
    model.config.time_shift, model.config.cfg_scale = s, c
    r = evaluate(model, tasks="geneval", n=n, steps=12, first=first, image_size=size, world_kwargs=wk)
    g = r["tasks"]["geneval"]
    print(json.dumps({"ckpt": ck, "time_shift": s, "cfg_scale": c, "score": g["score"], "ci95": g["ci95"], "n": g["n"]}), flush=True)
