"""Sample with an Euler loop over the TRAINING forward (noise back-solved so that x_t is the loop's x; no CFG) and
with model.generate_image (cfg 1, shift 1, same steps, same initial noise): do the two agree?  And do they draw?
Usage: euler_check.py CKPT OUT.png [N] [steps]"""
import sys, dataclasses, torch
from PIL import Image
from umm_ops.cli import _run_world
from umm_ops.train.export import load_checkpoint_model
from umm_ops.data.synthetic import SyntheticWorld, to_samples
from umm_ops.data.packing import pack
ck, outp = sys.argv[1], sys.argv[2]; N = int(sys.argv[3]) if len(sys.argv) > 3 else 8
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 12
model = load_checkpoint_model(ck); model.eval()
first, size, wk = _run_world(ck)
world = SyntheticWorld(size=size, **wk)
recs = [world[first + i] for i in range(N)]
samples = [to_samples(r, tasks=("generate",))[0] for r in recs]
truth = torch.stack([torch.as_tensor(s.items[1].image).float() for s in samples])
with torch.no_grad():
    x1 = model.vae.encode(truth)
g = torch.Generator().manual_seed(0)
x0 = torch.randn(x1.shape, generator=g)
x = x0.clone()
ts = torch.linspace(0, 1, steps + 1).tolist()
for i in range(steps):
    t = ts[i]
    class Fixed:
        def __call__(self, k, gg): return torch.full((k,), t)
    spec = dataclasses.replace(model.pack_spec(budget=4096), timestep_sampler=Fixed())
    b = pack(samples, spec, seed=1)[0]
    noise = [((x[j] - t * x1[j]) / (1 - t)) for j in range(N)]
    with torch.no_grad():
        v = model(b, noise=noise, return_outputs=True)["v_pred"][0].float()
    x = x + (ts[i + 1] - t) * v
with torch.no_grad():
    img_train = model.vae.decode(x, (size, size))
    gen = model.generate_image([r.prompt["text"] for r in recs], steps=steps, cfg_scale=1.0, time_shift=1.0,
                               init_noise=x0, sampler="euler")
print("max |x_train_loop - x_generate_image| =", float((x - gen["latents"]).abs().max()) if "latents" in gen else None)
rows = [truth, img_train, gen["images"]]
grid = torch.cat([torch.cat(list(r.clamp(-1, 1)), dim=2) for r in rows], dim=1)
Image.fromarray(((grid.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(outp)
