"""Flow loss at fixed t with each image's own prompt vs another record's prompt (same images, same noise), and with
the null prompt.  If the prompt matters, the wrong prompt scores worse.  Usage: cond_loss.py CKPT [N]"""
import sys, json, torch, dataclasses
from umm_ops.cli import _run_world
from umm_ops.train.export import load_checkpoint_model
from umm_ops.data.synthetic import SyntheticWorld, to_samples
from umm_ops.data.packing import pack, Sample, TextItem
from umm_ops.train.policy import flow_noise

ck = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 48
model = load_checkpoint_model(ck); model.eval()
first, size, wk = _run_world(ck)
world = SyntheticWorld(size=size, **wk)
recs = [world[first + i] for i in range(n)]
right = [to_samples(r, tasks=("generate",))[0] for r in recs]
perm = [(i + n // 2) % n for i in range(n)]
wrong = [Sample([TextItem(recs[perm[i]].prompt["text"]), right[i].items[1]], meta=right[i].meta) for i in range(n)]
print(recs[0].prompt["text"], "|", recs[perm[0]].prompt["text"])
out = {}
for tval in (0.02, 0.1, 0.3, 0.5, 0.7):
    class Fixed:
        def __call__(self, k, g): return torch.full((k,), tval)
    spec = dataclasses.replace(model.pack_spec(budget=4096), timestep_sampler=Fixed())
    row = {}
    for name, samples in (("right", right), ("wrong", wrong), ("null", right)):
        tot, cnt = 0.0, 0
        for b in pack(samples, spec, seed=1):
            noise = flow_noise(model, b, 7)
            ids = model.null_prompt_ids(b.input_ids) if name == "null" else None
            with torch.no_grad():
                o = model(b, noise=noise, input_ids=ids, return_outputs=True)
            for vp, vt in zip(o["v_pred"], o["v_target"]):
                tot += float(((vp - vt) ** 2).mean(dim=(1, 2)).sum()); cnt += vp.shape[0]
        row[name] = round(tot / cnt, 4)
    out[tval] = row
    print(tval, row, flush=True)
print(json.dumps(out))
