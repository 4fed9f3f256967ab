"""One-step predictions x1_hat = x_t + (1 - t) v_hat of a checkpoint on held-out prompts at several t, decoded by the
frozen VAE, next to the truth and the sampler's image.  Usage: onestep.py CKPT OUT.png [N]"""
import sys, dataclasses, torch
from PIL import Image
from umm_ops.cli import _run_world
from umm_ops.train.export import load_checkpoint_model
from umm_ops.data.synthetic import SyntheticWorld, to_samples
from umm_ops.data.packing import pack
from umm_ops.train.policy import flow_noise
ck, outp = sys.argv[1], sys.argv[2]; N = int(sys.argv[3]) if len(sys.argv) > 3 else 8
model = load_checkpoint_model(ck); model.eval()
first, size, wk = _run_world(ck)
world = SyntheticWorld(size=size, **wk)
recs = [world[first + i] for i in range(N)]
samples = [to_samples(r, tasks=("generate",))[0] for r in recs]
rows = [torch.stack([torch.as_tensor(s.items[1].image).float() for s in samples])]
ts = (0.1, 0.3, 0.5, 0.7, 0.9)
for tval in ts:
    class Fixed:
        def __call__(self, k, g): return torch.full((k,), tval)
    spec = dataclasses.replace(model.pack_spec(budget=4096), timestep_sampler=Fixed())
    b = pack(samples, spec, seed=1)[0]
    noise = flow_noise(model, b, 7)
    with torch.no_grad():
        o = model(b, noise=noise, return_outputs=True)
        x1 = model.vae.encode(torch.stack([im for im in b.images]))
        n = torch.stack([z.float() for z in noise])
        xt = tval * x1 + (1 - tval) * n
        x1h = xt + (1 - tval) * o["v_pred"][0]
        rows.append(model.vae.decode(x1h, (size, size)))
with torch.no_grad():
    g = model.generate_image([r.prompt["text"] for r in recs], seed=0, steps=12)
rows.append(g["images"])
grid = torch.cat([torch.cat(list(r.clamp(-1, 1)), dim=2) for r in rows], dim=1)
Image.fromarray(((grid.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(outp)
print("rows: truth,", ", ".join(f"one-step from t={t}" for t in ts), ", sampler")
