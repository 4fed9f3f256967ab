"""Experiment: pretrain the tiny preset's ViT on the synthetic world with dense supervision (per patch: the share of
its pixels of each kind / colour, background included; per picture: the object count), on the frozen VAE's
reconstructions (what the understanding path hands the ViT).  Saves the ViT state dict (SiglipViT names).

    python pretrain_vit.py OUT.safetensors STEPS [N64 N128]
"""
import math
import sys
import time

import torch
import torch.nn.functional as F

from umm_ops.data.synthetic import COLORS, KINDS, SyntheticWorld
from umm_ops.model.config import preset
from umm_ops.model.vae import CheersVAE
from umm_ops.model.vit import SiglipViT, SiglipVisionConfig
from safetensors.torch import save_file

torch.manual_seed(0)
out, steps = sys.argv[1], int(sys.argv[2])
n64 = int(sys.argv[3]) if len(sys.argv) > 3 else 24000
n128 = int(sys.argv[4]) if len(sys.argv) > 4 else 4000
cfg = preset("tiny")
cfg.vae.compute_dtype = "bfloat16"
vae = CheersVAE(cfg.vae).eval()
vit = SiglipViT(cfg.vit_config())
C = cfg.vit_config().hidden_size
NK, NC, NN = len(KINDS) + 1, len(COLORS) + 1, 5
cols = list(COLORS)
heads = torch.nn.ModuleDict(dict(kind=torch.nn.Linear(C, NK), color=torch.nn.Linear(C, NC),
                                 count=torch.nn.Linear(C, NN)))

# worlds: (size, max_objects, two_tone, object_scale, share); seed 0 records < 50,000 (the training records)
WORLDS = [(64, 2, 0.0, 1.8), (64, 3, 0.2, 1.4), (64, 4, 0.4, 1.0)]


def labels(rec, size):
    inst = rec.instances
    kmap = torch.zeros_like(inst)
    cmap = torch.zeros_like(inst)
    for k, o in enumerate(rec.scene["objects"]):
        m = inst == k + 1
        kmap[m] = KINDS.index(o["kind"]) + 1
        cmap[m] = cols.index(o["color"]) + 1
    g = size // 16

    def pool(m, n):
        oh = F.one_hot(m, n).float().permute(2, 0, 1)[None]          # (1, n, H, W)
        return F.avg_pool2d(oh, 16)[0].permute(1, 2, 0).reshape(g * g, n)
    return pool(kmap, NK), pool(cmap, NC), min(len(rec.scene["objects"]), NN - 1)


@torch.no_grad()
def build(size, recs_spec):
    pics, ks, cs, ns = [], [], [], []
    for (mo, tt, sc), idx in recs_spec:
        w = SyntheticWorld(size=size, seed=0, max_objects=mo, two_tone=tt, object_scale=sc, length=100_000)
        rec = w[idx]
        pics.append(rec.image.float() / 127.5 - 1.0)
        k, c, n = labels(rec, size)
        ks.append(k); cs.append(c); ns.append(n)
    pics = torch.stack(pics)
    recon = []
    for i in range(0, len(pics), 64):
        x = pics[i:i + 64]
        recon.append(vae.decode_trainable(vae.encode(x), x.shape[-2:]).float().clamp(-1, 1))
    recon = torch.cat(recon)
    return recon, torch.stack(ks), torch.stack(cs), torch.tensor(ns)


import os
import random
rng = random.Random(int(os.environ.get("DATA_SEED", "0")))
t0 = time.time()
data = {}
CACHE = os.environ.get("CACHE")
if CACHE and os.path.exists(CACHE):
    data, held = torch.load(CACHE)
    n64 = n128 = 0
    print("loaded", CACHE, {k: len(v[0]) for k, v in data.items()}, flush=True)
INIT = os.environ.get("INIT")
if INIT:
    from safetensors.torch import load_file
    vit.load_state_dict(load_file(INIT))
    print("init", INIT, flush=True)
LR = float(os.environ.get("LR", "1e-3"))
for size, n in ((64, n64), (128, n128)):
    if n == 0:
        continue
    spec = []
    for j in range(n):
        wc = WORLDS[j % len(WORLDS)] if size == 64 else (4, 0.4, rng.choice([1.0, 1.4]))
        spec.append((wc[1:] if size == 64 else wc, rng.randrange(50_000)))
    data[size] = build(size, spec)
    print(f"built {n} at {size} px in {time.time() - t0:.0f} s", flush=True)
if not (CACHE and os.path.exists(CACHE)):
    held = {}
    for size, n in ((64, 512),):
        spec = [((2, 0.0, 1.8), 50_000 + j) for j in range(n)]   # the base world's held-out records (kinds differ)
        held[size] = build(size, spec)
    if CACHE:
        torch.save((data, held), CACHE)

params = list(vit.parameters()) + list(heads.parameters())
opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
B = 128


def lr_at(s):
    if s < 100:
        return (s + 1) / 100
    p = (s - 100) / max(1, steps - 100)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def loss_of(x, k, c, n):
    h = vit(x)                                            # (N, T, C)
    lk = -(k * F.log_softmax(heads["kind"](h), -1)).sum(-1).mean()
    lc = -(c * F.log_softmax(heads["color"](h), -1)).sum(-1).mean()
    ln = F.cross_entropy(heads["count"](h.mean(1)), n)
    return lk, lc, ln, h


@torch.no_grad()
def evaluate():
    vit.eval()
    x, k, c, n = held[64]
    lk, lc, ln, h = loss_of(x, k, c, n)
    obj = k[..., 1:].sum(-1) > 0.3                         # patches at least 30% object
    pk = heads["kind"](h)[..., 1:].argmax(-1)
    pc = heads["color"](h)[..., 1:].argmax(-1)
    acck = (pk == k[..., 1:].argmax(-1))[obj].float().mean().item()
    accc = (pc == c[..., 1:].argmax(-1))[obj].float().mean().item()
    accn = (heads["count"](h.mean(1)).argmax(-1) == n).float().mean().item()
    vit.train()
    return dict(lk=lk.item(), lc=lc.item(), ln=ln.item(), kind_acc=acck, color_acc=accc, count_acc=accn)


sizes = list(data)
g = torch.Generator().manual_seed(0)
t0 = time.time()
for s in range(steps):
    size = sizes[s % len(sizes)] if n128 and s % 4 == 3 else 64
    x, k, c, n = data[size]
    bs = B if size == 64 else B // 4
    idx = torch.randint(0, len(x), (bs,), generator=g)
    for grp in opt.param_groups:
        grp["lr"] = LR * lr_at(s)
    lk, lc, ln, _ = loss_of(x[idx], k[idx], c[idx], n[idx])
    loss = lk + lc + 0.5 * ln
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if s % 250 == 0 or s == steps - 1:
        print(s, f"{time.time() - t0:.0f}s", f"train {lk.item():.3f} {lc.item():.3f} {ln.item():.3f}", evaluate(),
              flush=True)
save_file({kk: v.detach().contiguous() for kk, v in vit.state_dict().items()}, out)
torch.save(heads.state_dict(), out + ".heads.pt")
print("saved", out)
