"""Flow loss of a checkpoint on held-out text-to-image samples at fixed t (t = 1 clean), and what an oracle
that knows x_t exactly and predicts E[x1] (the data mean) would score.  Usage: per_t_loss.py CKPT [N]"""
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
out = {}
for tval in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98):
    class Fixed:
        def __call__(self, k, g): return torch.full((k,), tval)
    spec = dataclasses.replace(model.pack_spec(budget=4096), timestep_sampler=Fixed())
    tot, cnt, base = 0.0, 0, 0.0
    for b in pack(samples, spec, seed=1):
        noise = flow_noise(model, b, 7)
        with torch.no_grad():
            o = model(b, noise=noise, return_outputs=True)
        for vp, vt in zip(o["v_pred"], o["v_target"]):
            tot += float(((vp - vt) ** 2).mean(dim=(1, 2)).sum()); cnt += vp.shape[0]
            base += float((vt ** 2).mean(dim=(1, 2)).sum())
    out[tval] = {"model": round(tot / cnt, 4), "predict_zero": round(base / cnt, 4)}
    print(tval, out[tval], flush=True)
print(json.dumps(out))
