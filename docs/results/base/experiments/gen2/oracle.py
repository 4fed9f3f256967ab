"""How much the prompt determines the latent: E|x1 - m|^2 per element for m = 0, the data mean, and the mean latent of
the scenes with the same prompt text (training scenes, held-out scenes scored).  Usage: oracle.py CKPT NTRAIN NTEST"""
import sys, json, torch, collections
from umm_ops.cli import _run_world
from umm_ops.train.export import load_checkpoint_model
from umm_ops.data.synthetic import SyntheticWorld

ck, ntr, nte = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = load_checkpoint_model(ck); model.eval()
first, size, wk = _run_world(ck)
world = SyntheticWorld(size=size, **wk)

def enc(idx):
    out, texts = [], []
    for s in range(0, len(idx), 256):
        recs = [world[i] for i in idx[s:s + 256]]
        px = torch.stack([r.image.float() / 127.5 - 1 for r in recs])
        with torch.no_grad():
            out.append(model.vae.encode(px)); texts += [r.prompt["text"] for r in recs]
    return torch.cat(out), texts
xtr, ttr = enc(list(range(ntr)))
xte, tte = enc(list(range(first, first + nte)))
mean = xtr.mean(0)
by = collections.defaultdict(list)
for x, t in zip(xtr, ttr): by[t].append(x)
pm = {t: torch.stack(v).mean(0) for t, v in by.items()}
cov = [t in pm for t in tte]
cond = torch.stack([xte[i] - pm.get(t, mean) for i, t in enumerate(tte)])
res = {"n_prompts_train": len(pm), "test_prompts_seen": sum(cov) / len(cov),
       "E|x1|^2": float((xte ** 2).mean()), "E|x1 - mean|^2": float(((xte - mean) ** 2).mean()),
       "E|x1 - mean_prompt|^2": float((cond ** 2).mean()),
       "examples": collections.Counter(tte).most_common(5)}
print(json.dumps(res, indent=1))
