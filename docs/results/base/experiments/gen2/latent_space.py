"""What a tiny VAE's decoder makes of latents near and between real ones, and how much of the latent's energy is
high-frequency.  Rows: the pictures, their decodes, x1 + N(0, s^2) for s = 0.1, 0.2, 0.4, the midpoint of two
scenes' latents, the latent average-pooled 2 x 2 on the packed grid (upsampled back), 0.5 * x1.
High-frequency share: |z - up(pool2(z))|^2 / |z - mean(z)|^2 on the raw latent (32 x 8 x 8 at 64 px), and the same
for the pictures pooled 16 x 16 (the same spatial scale); 1,024 held-out scenes.
Usage: latent_space.py OUT.png [VAE_WEIGHTS] [N]"""
import sys, json, torch
import torch.nn.functional as F
from umm_ops.model import CheersModel
from umm_ops.model.config import preset
from umm_ops.data.synthetic import SyntheticWorld
from PIL import Image

out = sys.argv[1]
weights = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
n = int(sys.argv[3]) if len(sys.argv) > 3 else 8
c = preset("tiny")
if weights:
    c.vae.weights = weights
torch.manual_seed(0)
m = CheersModel(c).eval()
w = SyntheticWorld(size=64)
g = torch.Generator().manual_seed(0)


def hf_share(a, k):
    low = F.interpolate(F.avg_pool2d(a, k), scale_factor=k, mode="nearest")
    return float(((a - low) ** 2).sum() / ((a - a.mean(dim=(-1, -2), keepdim=True)) ** 2).sum())


with torch.no_grad():
    big = torch.stack([w[90000 + i].image.float() / 127.5 - 1 for i in range(1024)])
    raw = torch.cat([m.vae.frozen.encode(big[i:i + 128]).latent_dist.mean for i in range(0, 1024, 128)])
    stats = {"weights": weights or "tiny-world-vae (shipped)",
             "latent_hf_share_2x": round(hf_share(raw, 2), 4), "latent_hf_share_4x": round(hf_share(raw, 4), 4),
             "picture_hf_share_16px": round(hf_share(big, 16), 4), "picture_hf_share_32px": round(hf_share(big, 32), 4)}
    px = big[:n]
    x1 = m.vae.encode(px)
    dec = lambda z: m.vae.decode(z, (64, 64))
    rows = [px, dec(x1)]
    for s in (0.1, 0.2, 0.4):
        rows.append(dec(x1 + s * torch.randn(x1.shape, generator=g)))
    rows.append(dec(0.5 * (x1 + x1.roll(1, 0))))
    gr = x1.view(n, 4, 4, 128).permute(0, 3, 1, 2)
    bl = F.interpolate(F.avg_pool2d(gr, 2), scale_factor=2, mode="nearest").permute(0, 2, 3, 1).reshape(n, 16, 128)
    rows.append(dec(bl))
    rows.append(dec(0.5 * x1))
print(json.dumps(stats))
grid = torch.cat([torch.cat(list(r.clamp(-1, 1)), dim=2) for r in rows], dim=1)
Image.fromarray(((grid.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(out)
