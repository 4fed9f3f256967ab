import sys, json, time, itertools, torch
from umm_ops.cli import _run_world
from umm_ops.train.export import load_checkpoint_model
from umm_ops.eval.runner import evaluate
ck = sys.argv[1]; n = int(sys.argv[2]); grid = json.loads(sys.argv[3])
model = load_checkpoint_model(ck); model.eval()
first, size, world = _run_world(ck)
print("defaults", model.config.cfg_scale, model.config.sample_steps, model.config.time_shift, flush=True)
for cfg, steps, a in grid:
    model.config.cfg_scale = cfg; model.config.time_shift = a
    t0 = time.time()
    r = evaluate(model, "geneval", n=n, world_kwargs=world, first=first, image_size=size, steps=steps)
    g = r["tasks"]["geneval"]
    print(json.dumps({"cfg": cfg, "steps": steps, "shift": a, "score": g["score"], "ci": g.get("ci95"),
                      "per_type": {k: round(v["score"], 3) for k, v in g.get("per_type", {}).get("type", {}).items()} if isinstance(g.get("per_type"), dict) else None,
                      "s": round(time.time() - t0, 1)}), flush=True)
