"""What the convolutional stage does in a trained model: flow loss at fixed t with the stage on and off (its output
zeroed), and the size of its correction against the detail stage's velocity.  Usage: conv_share.py CKPT [N]"""
import sys, json, torch, dataclasses
from umm_ops.cli import _run_world
from umm_ops.train.export import load_checkpoint_model
from umm_ops.data.synthetic import SyntheticWorld, to_samples
from umm_ops.data.packing import pack
from umm_ops.train.policy import flow_noise

ck = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 48
model = load_checkpoint_model(ck); model.eval()
first, size, wk = _run_world(ck)
world = SyntheticWorld(size=size, **wk)
samples = [to_samples(world[first + i], tasks=("generate",))[0] for i in range(n)]
stage = model.head.conv_stage
orig = stage.forward
sizes = []
def spy(*a, **k):
    out = orig(*a, **k)
    sizes.append((float(out.norm()), float(a[1].norm())))
    return out
out = {}
for tval in (0.1, 0.3, 0.5, 0.7, 0.9):
    class Fixed:
        def __call__(self, k, g): return torch.full((k,), tval)
    spec = dataclasses.replace(model.pack_spec(budget=4096), timestep_sampler=Fixed())
    row = {}
    for name in ("on", "off"):
        stage.forward = spy if name == "on" else (lambda *a, **k: torch.zeros_like(a[1]))
        sizes.clear()
        tot, cnt = 0.0, 0
        for b in pack(samples, spec, seed=1):
            noise = flow_noise(model, b, 7)
            with torch.no_grad():
                o = model(b, noise=noise, return_outputs=True)
            for vp, vt in zip(o["v_pred"], o["v_target"]):
                tot += float(((vp - vt) ** 2).mean(dim=(1, 2)).sum()); cnt += vp.shape[0]
        row[name] = round(tot / cnt, 4)
        if name == "on":
            row["|conv| / |v_detail|"] = round(sum(a for a, _ in sizes) / sum(b for _, b in sizes), 3)
    out[tval] = row
    print(tval, row, flush=True)
print(json.dumps(out))
