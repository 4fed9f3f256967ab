"""How much of the latent x_t can be read back from the frozen decoder copy's pixels?  For t in a few values:
x_t = t x1 + (1-t) n on held-out pictures; pixels = vae.decode_trainable(x_t); ridge regression (train 75% / test
25% of tokens) from each 16x16x3 pixel patch (and its 3x3 patch neighbourhood) to the token's 128 latent values of
x_t and of n.  Reports R^2 on the test split."""
import sys, torch
from umm_ops.model.cheers import CheersModel
from umm_ops.data.synthetic import SyntheticWorld
torch.manual_seed(0)
model = CheersModel("tiny").eval()
world = SyntheticWorld(size=64, max_objects=2, object_scale=1.8, seed=0)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 256
imgs = torch.stack([torch.as_tensor(world[50000 + i].image).float() for i in range(N)])
if imgs.shape[-1] == 3: imgs = imgs.permute(0, 3, 1, 2)
if imgs.max() > 2: imgs = imgs / 127.5 - 1
with torch.no_grad():
    x1 = model.vae.encode(imgs)            # (N, 16, 128)
def r2(X, Y):
    k = int(0.75 * len(X)); X = torch.cat([X, torch.ones(len(X), 1)], 1)
    A = X[:k]; lam = 1e-1 * A.pow(2).mean() * A.shape[0]
    W = torch.linalg.solve(A.T @ A + lam * torch.eye(A.shape[1]), A.T @ Y[:k])
    P = X[k:] @ W
    return float(1 - ((P - Y[k:]) ** 2).sum() / ((Y[k:] - Y[k:].mean(0)) ** 2).sum())
for t in (0.02, 0.3, 0.7, 0.98):
    n = torch.randn_like(x1)
    xt = t * x1 + (1 - t) * n
    with torch.no_grad():
        pix = model.vae.decode_trainable(xt, (64, 64)).float()   # (N, 3, 64, 64)
    P = pix.unfold(2, 16, 16).unfold(3, 16, 16)                      # N,3,4,4,16,16
    P = P.permute(0, 2, 3, 1, 4, 5).reshape(N * 16, 768)
    print(f"t={t}: pixel range [{pix.min():.2f}, {pix.max():.2f}]  R2(x_t | patch) {r2(P, xt.reshape(-1, 128)):.3f}"
          f"  R2(noise | patch) {r2(P, n.reshape(-1, 128)):.3f}  R2(x1 | patch) {r2(P, x1.reshape(-1, 128)):.3f}",
          flush=True)
