"""The shipped tower's patch features of 64 held-out scenes (records 50,000-50,063, the base world): how much of them
is a shared mean direction (the floor of REPA's cosine).  python feature_cos.py"""
import torch
from umm_ops.model.vit import SiglipViT
from umm_ops.model.config import preset
from umm_ops.data.synthetic import SyntheticWorld
torch.set_num_threads(1)
c = preset("tiny")
t = SiglipViT(c.vit_config()); t.load_pretrained(c.vit_weights); t.eval()
w = SyntheticWorld(size=64, seed=0, max_objects=2, length=60000, object_scale=1.8, kinds=("circle","square","triangle","cross"))
x = torch.stack([w[50000+i].image.float()/127.5-1 for i in range(64)])
with torch.no_grad(): y = t(x)   # (64,16,192)
f = torch.nn.functional.normalize(y.reshape(-1,192), dim=-1)
s = f @ f.T
print("mean cos all pairs", s.mean().item())
mu = y.reshape(-1,192).mean(0)
print("norm of mean / mean norm", mu.norm().item(), y.norm(dim=-1).mean().item())
fc = torch.nn.functional.normalize(y.reshape(-1,192)-mu, dim=-1)
print("centered mean cos", (fc@fc.T).mean().item())
cm = torch.nn.functional.cosine_similarity(y.reshape(-1,192), mu[None], dim=-1)
print("mean cos with the mean vector", cm.mean().item())
