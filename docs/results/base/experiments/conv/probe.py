"""Does the head's input know the prompt's shape?  Linear probes (multinomial logistic regression, 300 train / 100
test prompts) of the first object's kind (4 classes) and colour (8) from the mean over an image's tokens of
(a) the LLM hidden states the head reads, (b) HiGate's output tokens (what the conv stage reads), at fixed t.
Usage: probe.py CKPT"""
import sys, json, torch, dataclasses
from umm_ops.cli import _run_world
from umm_ops.train.export import load_checkpoint_model
from umm_ops.data.synthetic import SyntheticWorld, to_samples
from umm_ops.data.packing import pack
from umm_ops.train.policy import flow_noise

ck = sys.argv[1]
model = load_checkpoint_model(ck); model.eval()
first, size, wk = _run_world(ck)
world = SyntheticWorld(size=size, **wk)
recs = [world[first + i] for i in range(400)]
samples = [to_samples(r, tasks=("generate",))[0] for r in recs]
kinds = sorted({o["kind"] for r in recs for o in r.prompt["objects"]}); colors = sorted({o["color"] for r in recs for o in r.prompt["objects"]})
yk = torch.tensor([kinds.index(r.prompt["objects"][0]["kind"]) for r in recs])
yc = torch.tensor([colors.index(r.prompt["objects"][0]["color"]) for r in recs])
cap = {}
model.head.register_forward_pre_hook(lambda m, a: cap.setdefault("h", []).append(a[0].mean(1)))
model.head.hi_gate.register_forward_hook(lambda m, a, o: cap.setdefault("x", []).append(o.mean(1)))

def probe(X, y, k):
    X = (X - X[:300].mean(0)) / (X[:300].std(0) + 1e-6)
    W = torch.zeros(X.shape[1], k, requires_grad=True); b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=200)
    def closure():
        opt.zero_grad(); l = torch.nn.functional.cross_entropy(X[:300] @ W + b, y[:300]) + 1e-3 * W.square().sum(); l.backward(); return l
    opt.step(closure)
    return float(((X[300:] @ W + b).argmax(1) == y[300:]).float().mean())

out = {}
for tval in (0.05, 0.3):
    class Fixed:
        def __call__(self, k, g): return torch.full((k,), tval)
    spec = dataclasses.replace(model.pack_spec(budget=1 << 30), timestep_sampler=Fixed())
    cap.clear()
    b = pack(samples, spec, seed=1)[0]
    with torch.no_grad():
        model(b, noise=flow_noise(model, b, 7))
    H, X = torch.cat(cap["h"]), torch.cat(cap["x"])
    row = {f"{name}_{what}": round(probe(F, y, len(lab)), 3) for name, F in (("llm_h", H), ("higate", X))
           for what, y, lab in (("kind", yk, kinds), ("color", yc, colors))}
    out[tval] = row
    print(tval, row, flush=True)
print(json.dumps({"ckpt": ck, "chance_kind": round(float(torch.bincount(yk[300:]).max()) / 100, 2), "probes": out}))
