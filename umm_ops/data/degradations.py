"""MMD-Bench image degradations (CLEAR, arXiv 2604.04780), batched torch implementation.

Each degradation follows the parameterisation of CLEAR's released generator
(data/corruption_datasets_create/add_degradation.py): the same kernel sizes, sigmas, blend weights, counts and
pixel sizes (absolute pixels, as in CLEAR), written as batched torch ops that run on CPU and GPU tensors.

    degrade(images, kind, intensity, seed=0, index=None)

`images` is (B, 3, H, W) RGB, uint8 in [0, 255] or floating in [0, 1]; the result has the same shape, dtype,
device and range. `intensity` is a float in [0, 1] or one of LEVELS ("low" 0.23, "mid" 0.45, "high" 0.9).
Randomness (noise, angles, positions) comes from one CPU torch.Generator per image, seeded from
(seed, index[b], kind); so image i's result depends neither on the batch it is in nor on the device.

Internally every function works on float pixels in [0, 255]; out-of-range values are clipped at the end (as
OpenCV's saturating uint8 arithmetic does). CLEAR's intermediate uint8 roundings are not reproduced.

This is the approximate, batched path (GPU tensors, on-the-fly augmentation).  The exact path - CLEAR's own
OpenCV operations per image, what `umm mmd-bench build` uses when OpenCV is installed - is
umm_ops.data.degradations_cv, reached with ``degrade(..., backend="opencv")``; docs/results/mmd_bench/README.md
measures how far this path is from it, per type and level.
"""
from __future__ import annotations

import io
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import optional_import, seed_of

__all__ = ["DEGRADATIONS", "LEVELS", "CATEGORIES", "WEIGHTS", "BACKENDS", "degrade", "sample_kind", "psnr",
           "opencv_available", "resolve_backend"]

LEVELS = {"low": 0.23, "mid": 0.45, "high": 0.9}
CATEGORIES = ("capture", "transmission", "environment", "post_processing")

Gens = Sequence[torch.Generator]


# ----------------------------------------------------------------------------------------------- helpers
def _reflect_index(n: int, p: int, device) -> torch.Tensor:
    """Indices of a length-n axis padded by p on both sides with OpenCV's BORDER_REFLECT_101 (any p)."""
    idx = torch.arange(-p, n + p, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.abs() % period
    return torch.where(idx >= n, period - idx, idx)


def _pad101(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    if ph:
        x = x.index_select(2, _reflect_index(x.shape[2], ph, x.device))
    if pw:
        x = x.index_select(3, _reflect_index(x.shape[3], pw, x.device))
    return x


def _gauss1d(ksize: int, sigma: float) -> torch.Tensor:
    """cv2.getGaussianKernel: sigma <= 0 picks sigma from ksize."""
    if sigma <= 0:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    t = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    k = torch.exp(-(t * t) / (2 * sigma * sigma))
    return k / k.sum()


def _band_matrix(n: int, k1d: torch.Tensor, device, dtype) -> torch.Tensor:
    """(n, n) matrix M with (M v)[i] = sum_t k[t] v[reflect101(i + t - p)]: the 1-D filter with its border."""
    ks = k1d.numel()
    idx = _reflect_index(n, ks // 2, device)
    rows = torch.arange(n, device=device).repeat_interleave(ks)
    cols = idx[(torch.arange(n, device=device)[:, None] + torch.arange(ks, device=device)[None, :]).reshape(-1)]
    m = torch.zeros(n, n, dtype=torch.float64, device=device)
    m.index_put_((rows, cols), k1d.to(device=device, dtype=torch.float64).repeat(n), accumulate=True)
    return m.to(dtype)


def _sep_filter(x: torch.Tensor, k1d: torch.Tensor) -> torch.Tensor:
    """Separable filter with the same 1-D kernel along rows and columns, per channel, reflect-101 border."""
    H, W = x.shape[-2:]
    if max(H, W) <= max(1024, 16 * k1d.numel()):
        # two GEMMs with banded (border-folded) matrices: 6-15x faster on a CPU than the single-channel
        # convolutions below at 256-512 px for every kernel size used here (bench/NOTES.md, degradations)
        return torch.matmul(torch.matmul(_band_matrix(H, k1d, x.device, x.dtype), x),
                            _band_matrix(W, k1d, x.device, x.dtype).t())
    return _sep_filter_conv(x, k1d)


def _sep_filter_conv(x: torch.Tensor, k1d: torch.Tensor) -> torch.Tensor:
    """_sep_filter by two single-channel convolutions (O(kernel) per pixel: large images, small kernels)."""
    k = k1d.to(device=x.device, dtype=x.dtype)
    n = k.numel()
    p = n // 2
    B, C, H, W = x.shape
    y = _pad101(x, p, p).reshape(B * C, 1, H + 2 * p, W + 2 * p)
    y = F.conv2d(y, k.view(1, 1, n, 1))
    y = F.conv2d(y, k.view(1, 1, 1, n))
    return y.reshape(B, C, H, W)


def _filter2d(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """cv2.filter2D (correlation, reflect-101 border) with one (k, k) kernel or one kernel per image (B, k, k)."""
    B, C, H, W = x.shape
    k = k.to(device=x.device, dtype=x.dtype)
    if k.dim() == 2:
        k = k.expand(B, *k.shape)
    kh, kw = k.shape[-2:]
    # OpenCV's anchor is (k // 2, k // 2) for odd and even sizes: out[y] = sum_t k[t] in[y + t - k // 2]; an
    # even kernel's symmetric padding gives one extra row / column at the end, dropped
    y = _pad101(x, kh // 2, kw // 2).reshape(1, B * C, H + 2 * (kh // 2), W + 2 * (kw // 2))
    w = k.repeat_interleave(C, dim=0).unsqueeze(1)  # (B*C, 1, kh, kw)
    return F.conv2d(y, w, groups=B * C)[..., :H, :W].reshape(B, C, H, W)


def _grid(H: int, W: int, device, dtype):
    yy = torch.arange(H, device=device, dtype=dtype).view(1, H, 1)
    xx = torch.arange(W, device=device, dtype=dtype).view(1, 1, W)
    return yy, xx


def _randint(gens: Gens, lo: int, hi: int, n: int) -> torch.Tensor:
    """(B, n) integers in [lo, hi] inclusive (like random.randint), one generator per image."""
    return torch.stack([torch.randint(lo, hi + 1, (n,), generator=g) for g in gens])


def _rand(gens: Gens, n: int) -> torch.Tensor:
    return torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in gens])


def _paint(canvas: torch.Tensor, mask: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """canvas (B, C, H, W); mask (B, H, W) bool; color (B, C): overwrite like cv2 drawing."""
    return torch.where(mask.unsqueeze(1), color.to(canvas)[:, :, None, None], canvas)


def _circle_mask(yy, xx, cy, cx, r):
    """cy, cx, r: (B,) tensors -> (B, H, W) filled disc."""
    return (yy - cy.view(-1, 1, 1)) ** 2 + (xx - cx.view(-1, 1, 1)) ** 2 <= (r.view(-1, 1, 1)) ** 2


def _segment_mask(yy, xx, y0, x0, y1, x1, thickness):
    """(B, H, W) pixels within thickness/2 of the segment (x0, y0)-(x1, y1)."""
    y0, x0, y1, x1 = (t.view(-1, 1, 1) for t in (y0, x0, y1, x1))
    dy, dx = y1 - y0, x1 - x0
    L2 = (dx * dx + dy * dy).clamp_min(1e-9)
    t = (((xx - x0) * dx + (yy - y0) * dy) / L2).clamp(0, 1)
    d2 = (xx - x0 - t * dx) ** 2 + (yy - y0 - t * dy) ** 2
    return d2 <= (torch.as_tensor(thickness, dtype=yy.dtype, device=yy.device).view(-1, 1, 1) / 2) ** 2 + 0.25


def _ellipse_mask(yy, xx, cy, cx, ay, ax, angle_deg):
    """Filled rotated ellipse, semi-axes ax (along the rotated x axis) and ay."""
    th = torch.deg2rad(angle_deg).view(-1, 1, 1)
    u = xx - cx.view(-1, 1, 1)
    v = yy - cy.view(-1, 1, 1)
    ur = u * torch.cos(th) + v * torch.sin(th)
    vr = -u * torch.sin(th) + v * torch.cos(th)
    return (ur / ax.view(-1, 1, 1)) ** 2 + (vr / ay.view(-1, 1, 1)) ** 2 <= 1


# ----------------------------------------------------------------------------------------------- degradations
# Each takes x: float (B, 3, H, W) in [0, 255], intensity, per-image generators; returns float (unclipped ok).

def gaussian_noise(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """Additive i.i.d. Gaussian noise, std 75*i on the 0..255 scale."""
    if i == 0:
        return x
    noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in gens])
    return x + noise.to(device=x.device, dtype=x.dtype) * (75.0 * i)


def dark_illumination(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """Uniform darkening: pixel * (1 - i^2)."""
    return x * (1.0 - i * i)


def jpeg_quality(i: float) -> int:
    """CLEAR: int(100 - 95 i) clamped to [5, 100]."""
    return max(5, min(100, int(100 - i * 95)))


def jpeg(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """Real JPEG encode/decode with Pillow (libjpeg) at quality int(100 - 95 i), one image at a time."""
    Image = optional_import("PIL", "Image")

    q = jpeg_quality(i)
    u8 = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img in u8:
        buf = io.BytesIO()
        Image.fromarray(img, mode="RGB").save(buf, format="JPEG", quality=q)
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("RGB")))
    y = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    return y.to(device=x.device, dtype=x.dtype)


def _motion_kernel(k: int, angle_deg: float) -> torch.Tensor:
    """CLEAR's kernel: diag(ones(k)) rotated by `angle_deg` about (k/2, k/2) (cv2.getRotationMatrix2D +
    cv2.warpAffine: bilinear, zero outside, source coordinates on OpenCV's 1/32-pixel grid), normalised."""
    th = math.radians(angle_deg)
    a, b = math.cos(th), math.sin(th)
    c = k / 2
    # warpAffine samples the source at M^-1 (x, y); M = [[a, b, (1-a)c - bc], [-b, a, bc + (1-a)c]], a rotation
    t = torch.arange(k, dtype=torch.float64)
    yy, xx = t.view(k, 1), t.view(1, k)
    u = a * (xx - c) - b * (yy - c) + c
    v = b * (xx - c) + a * (yy - c) + c
    u, v = torch.round(u * 32) / 32, torch.round(v * 32) / 32
    u0, v0 = u.floor(), v.floor()
    fu, fv = u - u0, v - v0
    ker = torch.zeros(k, k, dtype=torch.float64)
    for du, wu in ((0, 1 - fu), (1, fu)):
        for dv, wv in ((0, 1 - fv), (1, fv)):
            su, sv = u0 + du, v0 + dv
            inside = (su >= 0) & (su < k) & (sv >= 0) & (sv < k)
            ker += torch.where(inside & (su == sv), wu * wv, torch.zeros(()))  # the source is the identity
    return ker / ker.sum()


def motion_blur(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """Linear motion blur (CLEAR): kernel size max(5, int(30 i)) (even sizes too, anchored as cv2.filter2D), a
    rotated diagonal line at a random angle in [0, 360)."""
    k = max(5, int(i * 30))
    angles = _rand(gens, 1)[:, 0] * 360.0
    kers = torch.stack([_motion_kernel(k, float(a)) for a in angles])
    return _filter2d(x, kers)


def lens_blur(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """Gaussian defocus, kernel min(101, int(3 + 300 i)) | 1, sigma 20 i, blended x*(1-0.7i) + blur*0.9i."""
    if i == 0:
        return x
    ksize = min(101, int(3 + i * 300)) | 1
    blurred = _sep_filter(x, _gauss1d(ksize, i * 20)).clamp(0, 255)
    return x * (1 - 0.7 * i) + blurred * (0.9 * i)


def hsv_saturation(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """Desaturation: HSV saturation * (1 - i) at fixed hue and value (each channel c -> V - (1-i)(V - c))."""
    v = x.amax(dim=1, keepdim=True)
    return v - (1.0 - i) * (v - x)


def scan_lines(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """Near-black horizontal lines: width max(5, int(7 i)) every max(3, int(20 / (i + 0.1))) rows."""
    H = x.shape[2]
    interval = max(3, int(20 / (i + 0.1)))
    width = max(5, int(7 * i))
    rows = torch.arange(H, device=x.device)
    on = (rows % interval) < width
    return torch.where(on.view(1, 1, H, 1), x * 0.01, x)


def block_exchange(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """int(35 i) sequential swaps of random grid-aligned square blocks of size min(32, int(5 + 30 i))."""
    n = int(i * 35)
    bs = min(32, int(5 + i * 30))
    B, C, H, W = x.shape
    gh, gw = H // bs, W // bs
    if n == 0 or gh * gw < 2:
        return x
    picks = _randint(gens, 0, gh * gw - 1, 2 * n).view(B, n, 2)  # (block1, block2) flat grid indices
    perm = torch.arange(gh * gw).repeat(B, 1)
    for s in range(n):  # n <= 35 swaps of an index table, not pixels
        a, b = picks[:, s, 0], picks[:, s, 1]
        pa = perm.gather(1, a[:, None])
        pb = perm.gather(1, b[:, None])
        perm.scatter_(1, a[:, None], pb)
        perm.scatter_(1, b[:, None], pa)
    core = x[:, :, : gh * bs, : gw * bs].reshape(B, C, gh, bs, gw, bs).permute(0, 2, 4, 1, 3, 5)
    core = core.reshape(B, gh * gw, C, bs, bs)
    core = core.gather(1, perm.to(x.device).view(B, -1, 1, 1, 1).expand_as(core))
    core = core.reshape(B, gh, gw, C, bs, bs).permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * bs, gw * bs)
    out = x.clone()
    out[:, :, : gh * bs, : gw * bs] = core
    return out


def sharpness_change(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """CLEAR's over-sharpening: 3x3 Laplacian sharpen scaled by 80 i (saturating), blended 0.7 x + 0.3 result.

    At i = 0 CLEAR takes its blur branch (3x3 Gaussian) instead, so intensity 0 is a mild blur, not identity.
    """
    if i > 0:
        k = torch.tensor([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], dtype=torch.float64) * (i * 80)
        res = _filter2d(x, k)
    else:
        res = _sep_filter(x, _gauss1d(3, 0))
    return 0.7 * x + 0.3 * res.clamp(0, 255)


def color_diffusion(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """Colour bleeding: Gaussian (size 3 + 2 int(20 i), sigma 50 i) scaled by i^2, blended
    x*max(0.1, 1-0.9i) + diffused*min(0.9, 0.9i); above i = 0.9 also int(100 i) random grey blots (r 5..19)."""
    ksize = 3 + 2 * int(i * 20)
    diffused = _sep_filter(x, _gauss1d(ksize, i * 50)) * (i * i)
    if i > 0.9:
        B, C, H, W = x.shape
        m = int(100 * i)
        cx, cy = _randint(gens, 0, W - 1, m), _randint(gens, 0, H - 1, m)
        r, g = _randint(gens, 5, 19, m), _randint(gens, 0, 254, m)
        yy, xx = _grid(H, W, x.device, x.dtype)
        for j in range(m):
            mask = _circle_mask(yy, xx, cy[:, j].to(yy), cx[:, j].to(yy), r[:, j].to(yy))
            diffused = _paint(diffused, mask, g[:, j:j + 1].expand(B, C))
    return x * max(0.1, 1 - i * 0.9) + diffused.clamp(0, 255) * min(0.9, i * 0.9)


def atmospheric_turbulence(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """Heat-haze warp (CLEAR, deterministic): d(y) = 40 i sin(y/30 + 5 i); sample at (x + d, y + 0.7 d), bilinear."""
    B, C, H, W = x.shape
    yy, xx = _grid(H, W, x.device, torch.float64)
    d = 40 * i * torch.sin(yy / 30 + i * 5)
    xs = (xx + d).clamp(0, W - 1)
    ys = (yy + 0.7 * d).clamp(0, H - 1)
    gx = xs / max(W - 1, 1) * 2 - 1
    gy = ys / max(H - 1, 1) * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1).to(x.dtype).expand(B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def dirty_lens(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """Smudges on the lens: grey ellipses (i > 0.1), int(300 i) spots and (i > 0.5) large blotches, blurred with
    sigma 30 and blended x*(1-0.7i) + dirt*0.8i (CLEAR's sizes, in pixels)."""
    if i == 0:
        return x
    B, C, H, W = x.shape
    yy, xx = _grid(H, W, x.device, torch.float32)
    dirt = torch.zeros(B, 1, H, W, device=x.device, dtype=torch.float32)

    def col(v):
        return torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1).expand(B, 1)

    dev = lambda t: t.to(device=x.device, dtype=torch.float32)  # noqa: E731
    if i > 0.1:
        m = int(10 * i)
        cx, cy = _randint(gens, 0, W, m), _randint(gens, 0, H, m)
        ax, ay, ang = _randint(gens, 150, 300, m), _randint(gens, 100, 200, m), _randint(gens, 0, 180, m)
        for j in range(m):
            mask = _ellipse_mask(yy, xx, dev(cy[:, j]), dev(cx[:, j]), dev(ay[:, j]), dev(ax[:, j]), dev(ang[:, j]))
            dirt = _paint(dirt, mask, col(50.0))
    m = int(300 * i)
    cx, cy = _randint(gens, 0, W, m), _randint(gens, 0, H, m)
    r, g = _randint(gens, 4, 20, m), _randint(gens, 50, 100, m)
    # the small spots (r <= 20) are painted in their own bounding windows, in order (later spots cover earlier
    # ones), with the full-frame formula on the window's coordinates: the same pixels as a full-frame mask
    yv, xv = yy.view(-1), xx.view(-1)
    for b in range(B):
        for j, (sx, sy, sr, sg) in enumerate(zip(cx[b].tolist(), cy[b].tolist(), r[b].tolist(), g[b].tolist())):
            y0, y1, x0, x1 = max(0, sy - sr), min(H, sy + sr + 1), max(0, sx - sr), min(W, sx + sr + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            inside = (yv[y0:y1, None] - sy) ** 2 + (xv[None, x0:x1] - sx) ** 2 <= float(sr) ** 2
            win = dirt[b, 0, y0:y1, x0:x1]
            win.masked_fill_(inside, float(sg))
    if i > 0.5:
        m = int(5 * i)
        cx, cy = _randint(gens, 0, W, m), _randint(gens, 0, H, m)
        r1, r2 = _randint(gens, 20, 50, m), _randint(gens, 10, 30, m)
        for j in range(m):
            dirt = _paint(dirt, _circle_mask(yy, xx, dev(cy[:, j]), dev(cx[:, j]), dev(r1[:, j])), col(80.0))
            dirt = _paint(dirt, _circle_mask(yy, xx, dev(cy[:, j]), dev(cx[:, j]), dev(r2[:, j])), col(120.0))
    ksize = int(round(30 * 4 * 2 + 1)) | 1  # cv2 GaussianBlur(ksize=0, sigma=30) on float images
    dirt = _sep_filter(dirt, _gauss1d(ksize, 30.0)).to(x.dtype)
    return x * (1 - 0.7 * i) + dirt * (0.8 * i)


def lens_flare(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """3 + int(30 i) bright discs (r 10..50) with streaks (length 30..150, width 2), 3x3 blur sigma 20 i,
    added with weight 0.9 i (CLEAR's BGR colour (255, 255, 235) -> RGB (235, 255, 255))."""
    if i == 0:
        return x
    B, C, H, W = x.shape
    yy, xx = _grid(H, W, x.device, torch.float32)
    flare = torch.zeros(B, 1, H, W, device=x.device, dtype=torch.float32)
    m = 3 + int(30 * i)
    cx, cy = _randint(gens, 0, W, m).float(), _randint(gens, 0, H, m).float()
    r = _randint(gens, 10, 50, m).float()
    ang = _rand(gens, m).float() * 2 * math.pi
    length = _randint(gens, 30, 150, m).float()
    ex, ey = (cx + length * torch.cos(ang)).trunc(), (cy + length * torch.sin(ang)).trunc()
    one = torch.ones(B, 1)
    dev = lambda t: t.to(x.device)  # noqa: E731
    for j in range(m):
        flare = _paint(flare, _circle_mask(yy, xx, dev(cy[:, j]), dev(cx[:, j]), dev(r[:, j])), one)
        flare = _paint(flare, _segment_mask(yy, xx, dev(cy[:, j]), dev(cx[:, j]), dev(ey[:, j]), dev(ex[:, j]), 2.0),
                       one)
    color = torch.tensor([235.0, 255.0, 255.0], device=x.device).view(1, 3, 1, 1)
    flare = _sep_filter(flare * color, _gauss1d(3, 20 * i)).to(x.dtype)
    return x + flare * (0.9 * i)


def _ms_profile(q: torch.Tensor) -> torch.Tensor:
    """Range weight for q = |dc|^2 / sr^2: cv2's flat profile (1 inside the colour ball), with a short linear
    ramp (q in [0.75, 1]) instead of the hard step so the result is continuous in the input."""
    return ((1 - q) * 4).clamp(0, 1)


def mean_shift(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """Mean-shift filtering (CLEAR: cv2.pyrMeanShiftFiltering(img, sp=int(40 i), sr=int(40 i)), used unblended).

    Batched torch approximation, same two-level pyramid idea as OpenCV but cheaper:
      1. area-downsample by f = ceil(sp / 4) so the spatial window is a (2r+1)^2 box with r = round(sp / f) <= 4;
      2. 5 mean-shift iterations (cv2's default iteration cap) in colour space at every low-res pixel: the colour
         estimate moves to the mean of the window's original colours weighted by a flat range profile
         (1 inside the colour ball |c - c_k| < sr, as cv2, with a short linear ramp at its edge for continuity), so each
         pixel converges to its local colour mode while colours farther than sr (across edges) are ignored;
      3. edge-aware upsampling (in place of cv2's full-resolution level): each full-res pixel takes the
         tent-weighted mean of the 3x3 surrounding low-res modes, each weighted by the same range profile at
         1.5 sr against the pixel's own colour (a cv2 trajectory moves step by step, so it reaches modes somewhat
         farther than sr from its start), plus a small weight on the pixel itself, so a colour far from every
         neighbouring mode (an edge, a small detail) stays as it is.
    Unlike cv2 the spatial position does not move with the colour, and the window is the downsampled one; the
    effect is the same kind: flat, posterised colour regions with sharp edges, stronger with intensity.
    """
    sp = sr = int(40 * i)
    if sp < 1:
        return x
    B, C, H, W = x.shape
    f = max(1, math.ceil(sp / 4))
    r = max(1, round(sp / f))
    h, w = max(1, math.ceil(H / f)), max(1, math.ceil(W / f))
    low = F.adaptive_avg_pool2d(x, (h, w)) if f > 1 else x
    k = 2 * r + 1
    lowp = _pad101(low, r, r)  # reflect-101 padding of any width; window offset (a, b) = a slice of it
    inv = 1.0 / (sr * sr)
    eps = 1e-3
    c = low
    for _ in range(5):
        # one window offset at a time on (B, C, h, w) slices (no (B, C, k*k, h, w) unfold)
        num, den = eps * c, torch.full_like(c[:, :1], eps)
        for a in range(k):
            for b in range(k):
                sh = lowp[:, :, a:a + h, b:b + w]
                wgt = _ms_profile((sh - c).square().sum(1, keepdim=True) * inv)
                num.addcmul_(wgt, sh)
                den.add_(wgt)
        c = num / den
    if f == 1:
        return c
    # edge-aware upsampling from the 3x3 low-res neighbourhood of each full-res pixel, one neighbour at a time:
    # (B, C, H, W) temporaries only, no (B, C, 9, H, W) gather (28 MB per 512 px image); same bits, same speed
    cp = F.pad(c, (1, 1, 1, 1), mode="replicate")  # (B, C, h + 2, w + 2): low-res neighbour (a, b) of (y, x)
    ys = (torch.arange(H, device=x.device, dtype=x.dtype) + 0.5) / f - 0.5
    xs = (torch.arange(W, device=x.device, dtype=x.dtype) + 0.5) / f - 0.5
    yi, xi = ys.round().clamp(0, h - 1).long(), xs.round().clamp(0, w - 1).long()
    off = torch.arange(-1, 2, device=x.device, dtype=x.dtype)
    ty = (1.5 - (ys.view(-1, 1) - (yi.to(x.dtype).view(-1, 1) + off)).abs()).clamp(0, 1)  # (H, 3)
    tx = (1.5 - (xs.view(-1, 1) - (xi.to(x.dtype).view(-1, 1) + off)).abs()).clamp(0, 1)  # (W, 3)
    inv_up = inv / 1.5 ** 2  # 1.5 sr: cv2's trajectories travel beyond sr
    self_w = 0.05
    num, den = self_w * x, torch.full_like(x[:, :1], self_w)
    for b in range(3):
        cols = cp.index_select(3, xi + b)  # (B, C, h + 2, W): the column gather on the small tensor
        for a in range(3):
            mode = cols.index_select(2, yi + a)  # (B, C, H, W): whole-row copies
            d2 = (mode - x).square().sum(1, keepdim=True)
            wgt = _ms_profile(d2 * inv_up) * (ty[:, a].view(H, 1) * tx[:, b].view(1, W))  # (a, b): tent weight
            num.addcmul_(wgt, mode)
            den.add_(wgt)
    return num / den


_GRAFFITI_TEXTS = ("X", "FAKE", "COPY", "VOID", "COPYRIGHT")


def _font(size: int):
    ImageFont = optional_import("PIL", "ImageFont")

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # old Pillow: fixed-size bitmap font
        return ImageFont.load_default()


def graffiti(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """CLEAR's graffiti, drawn with Pillow's ImageDraw: int(10 i) strokes of random colour between two random
    points, width randint(1, max(1, int(5 i))) (every other one a quadratic curve through a random control point);
    above i = 0.55 one red word from ("X", "FAKE", "COPY", "VOID", "COPYRIGHT", a number 1..100) at cv2 font scale
    max(0.5, 5 i) (Pillow's default font sized to Hershey-simplex cap height ~22 px * scale).

    The per-image parameters for all 10 possible strokes are always drawn, so a lower intensity draws a prefix
    of the strokes of a higher one. Strokes are rasterised into a colour layer + mask and overwrite the image.
    """
    Image, ImageDraw = optional_import("PIL", "Image", "ImageDraw")

    B, C, H, W = x.shape
    n = int(10 * i)
    text_on = i > 0.55
    if n == 0 and not text_on:
        return x
    tmax = max(1, int(5 * i))
    layers, masks = [], []
    for g in gens:
        col = torch.randint(0, 256, (10, 3), generator=g).tolist()
        pts = torch.stack([torch.randint(0, W, (10, 3), generator=g),
                           torch.randint(0, H, (10, 3), generator=g)], -1).tolist()  # p1, p2, control
        u = torch.rand(10, generator=g, dtype=torch.float64).tolist()
        curve = torch.rand(10, generator=g).lt(0.5).tolist()
        word_pick = int(torch.randint(0, len(_GRAFFITI_TEXTS) + 1, (1,), generator=g))
        number = int(torch.randint(1, 101, (1,), generator=g))
        tu = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        layer = Image.new("RGB", (W, H))
        mask = Image.new("L", (W, H))
        dl, dm = ImageDraw.Draw(layer), ImageDraw.Draw(mask)
        for j in range(n):
            (x0, y0), (x1, y1), (cx, cy) = pts[j]
            width = 1 + min(tmax - 1, int(u[j] * tmax))
            if curve[j]:
                ts = [s / 16 for s in range(17)]
                line = [((1 - t) ** 2 * x0 + 2 * t * (1 - t) * cx + t * t * x1,
                         (1 - t) ** 2 * y0 + 2 * t * (1 - t) * cy + t * t * y1) for t in ts]
            else:
                line = [(x0, y0), (x1, y1)]
            dl.line(line, fill=tuple(col[j]), width=width, joint="curve")
            dm.line(line, fill=255, width=width, joint="curve")
        if text_on:
            text = _GRAFFITI_TEXTS[word_pick] if word_pick < len(_GRAFFITI_TEXTS) else str(number)
            scale = max(0.5, 5 * i)
            font = _font(max(8, round(22 * scale / 0.75)))
            stroke = max(0, int(scale) // 3)
            l_, t_, r_, b_ = dl.textbbox((0, 0), text, font=font, anchor="ls", stroke_width=stroke)
            tw, th = r_ - l_, -t_
            if H - 10 > th + 10:
                tx = int(tu[0] * (max(1, W - tw - 10) + 1))
                ty = th + 10 + int(tu[1] * (H - 10 - th - 10 + 1))
                dl.text((tx, ty), text, fill=(255, 0, 0), font=font, anchor="ls", stroke_width=stroke)
                dm.text((tx, ty), text, fill=255, font=font, anchor="ls", stroke_width=stroke)
        layers.append(torch.from_numpy(np.asarray(layer).copy()))
        masks.append(torch.from_numpy(np.asarray(mask).copy()))
    layer = torch.stack(layers).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype)
    mask = torch.stack(masks).to(x.device).gt(127)
    return torch.where(mask.unsqueeze(1), layer, x)


def _push_pull_fill(x: torch.Tensor, known: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Inpainting-like fill of the unknown pixels (known: (B, 1, H, W) float 0/1) from the surrounding ones:
    a push-pull pyramid (masked 2x2 averages down, fill holes from the coarser level up) gives a smooth first
    fill, then `iters` Jacobi steps of harmonic diffusion with the known pixels fixed."""
    levels = [(x * known, known)]
    while max(levels[-1][0].shape[-2:]) > 1:  # fixed depth: independent of the other images in the batch
        v, m = levels[-1]
        levels.append((F.avg_pool2d(v, 2, ceil_mode=True), F.avg_pool2d(m, 2, ceil_mode=True)))
    v, m = levels[-1]
    fill = v / m.clamp_min(1e-6)
    for v, m in reversed(levels[:-1]):
        up = F.interpolate(fill, size=v.shape[-2:], mode="bilinear", align_corners=False)
        val = v / m.clamp_min(1e-6)
        fill = val * m + up * (1 - m)  # partly known cells keep their own average, holes take the coarser fill
    xk, unknown = x * known, 1 - known
    # Jacobi steps fill <- xk + mean4(fill) * unknown, the 4-neighbour mean by slices of a replicate-padded copy
    # (a depthwise conv2d was ~10x slower on a CPU), in two ping-pong padded buffers without allocations.
    # unknown / 4 is exact (a power of two), so ((a + b) + (c + d)) * (unknown / 4) rounds as (... * 0.25) * unknown.
    uq = unknown * 0.25
    cur = F.pad(fill, (1, 1, 1, 1), mode="replicate")
    nxt, tmp = torch.empty_like(cur), torch.empty_like(fill)
    for _ in range(iters):
        inner = nxt[..., 1:-1, 1:-1]
        torch.add(cur[..., :-2, 1:-1], cur[..., 2:, 1:-1], out=inner)
        torch.add(cur[..., 1:-1, :-2], cur[..., 1:-1, 2:], out=tmp)
        inner.add_(tmp).mul_(uq).add_(xk)
        nxt[..., 0, 1:-1] = inner[..., 0, :]  # replicate border
        nxt[..., -1, 1:-1] = inner[..., -1, :]
        nxt[..., :, 0] = nxt[..., :, 1]
        nxt[..., :, -1] = nxt[..., :, -2]
        cur, nxt = nxt, cur
    return xk + cur[..., 1:-1, 1:-1] * unknown


def watermark_damage(x: torch.Tensor, i: float, gens: Gens) -> torch.Tensor:
    """CLEAR's removed-watermark damage: int(1 + 15 i) rectangles (top-left in [0, W-50] x [0, H-50], size
    50..200 x 20..80 px) are inpainted (cv2.INPAINT_TELEA there; a push-pull + diffusion fill from the borders
    here), blended x*(1-i) + repaired*i, and above i = 0.5 the rectangles' edges are darkened to 0.8.

    The parameters of all 16 possible rectangles are always drawn, so lower intensities use a prefix of them."""
    B, C, H, W = x.shape
    n = int(1 + 15 * i)
    x0, y0 = _randint(gens, 0, max(0, W - 50), 16), _randint(gens, 0, max(0, H - 50), 16)
    rw, rh = _randint(gens, 50, 200, 16), _randint(gens, 20, 80, 16)
    yy, xx = _grid(H, W, x.device, torch.float32)
    mask = torch.zeros(B, H, W, dtype=torch.bool, device=x.device)
    dev = lambda t: t.to(device=x.device, dtype=torch.float32).view(-1, 1, 1)  # noqa: E731
    for j in range(n):
        a, b = dev(x0[:, j]), dev(y0[:, j])
        mask |= (xx >= a) & (xx <= a + dev(rw[:, j])) & (yy >= b) & (yy <= b + dev(rh[:, j]))
    m = mask.unsqueeze(1).to(x.dtype)
    repaired = _push_pull_fill(x, 1 - m)
    out = x * (1 - i) + repaired * i
    if i > 0.5:  # mask edges (cv2.Canny on the binary mask): inner boundary, no edge at the image border
        er = -F.max_pool2d(-F.pad(m, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        edge = (m > 0.5) & (er < 0.5)
        out = torch.where(edge, out * 0.8, out)
    return out


# ----------------------------------------------------------------------------------------------- registry
DEGRADATIONS: dict[str, tuple[str, Callable]] = {
    "lens_blur": ("capture", lens_blur),
    "lens_flare": ("capture", lens_flare),
    "motion_blur": ("capture", motion_blur),
    "dirty_lens": ("capture", dirty_lens),
    "hsv_saturation": ("capture", hsv_saturation),
    "jpeg": ("transmission", jpeg),
    "block_exchange": ("transmission", block_exchange),
    "scan_lines": ("transmission", scan_lines),
    "mean_shift": ("transmission", mean_shift),
    "dark_illumination": ("environment", dark_illumination),
    "atmospheric_turbulence": ("environment", atmospheric_turbulence),
    "gaussian_noise": ("environment", gaussian_noise),
    "color_diffusion": ("environment", color_diffusion),
    "sharpness_change": ("post_processing", sharpness_change),
    "graffiti": ("post_processing", graffiti),
    "watermark_damage": ("post_processing", watermark_damage),
}

# CLEAR's sampling weights (generate_degradation_benchmark.py); only registered types are sampled.
_CLEAR_WEIGHTS = {
    "lens_blur": 20, "lens_flare": 20, "motion_blur": 20, "dirty_lens": 20, "hsv_saturation": 20,
    "jpeg": 25, "block_exchange": 25, "mean_shift": 25, "scan_lines": 25,
    "dark_illumination": 25, "atmospheric_turbulence": 25, "gaussian_noise": 25, "color_diffusion": 25,
    "sharpness_change": 33, "graffiti": 33, "watermark_damage": 34,
}
WEIGHTS = {k: _CLEAR_WEIGHTS[k] for k in DEGRADATIONS}


def sample_kind(generator: torch.Generator | None = None) -> str:
    """One degradation type drawn with CLEAR's weights (restricted to the registered types)."""
    names = list(WEIGHTS)
    w = torch.tensor([float(WEIGHTS[n]) for n in names], dtype=torch.float64)
    return names[int(torch.multinomial(w, 1, generator=generator))]


def _intensity(intensity) -> float:
    if isinstance(intensity, str):
        if intensity not in LEVELS:
            raise ValueError(f"unknown intensity level {intensity!r}; use one of {sorted(LEVELS)} or a float in [0, 1]")
        return LEVELS[intensity]
    if isinstance(intensity, bool) or not isinstance(intensity, (int, float, np.floating, np.integer)):
        raise TypeError(f"intensity must be a float in [0, 1] or a level name {sorted(LEVELS)}, got {intensity!r}")
    i = float(intensity)
    if not (0.0 <= i <= 1.0):  # also rejects nan
        raise ValueError(f"intensity must be in [0, 1], got {intensity!r}")
    return i


BACKENDS = ("torch", "opencv", "auto")


def opencv_available() -> bool:
    """Whether the exact OpenCV path can run (opencv-python-headless, the `data` extra, is importable)."""
    try:
        optional_import("cv2")
        return True
    except ImportError:
        return False


def resolve_backend(backend: str, device=None) -> str:
    """"torch" or "opencv" for `backend`; "auto" is "opencv" for CPU images when cv2 is importable, else "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown degradation backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        on_cpu = device is None or torch.device(device).type == "cpu"
        return "opencv" if on_cpu and opencv_available() else "torch"
    return backend


def degrade(images: torch.Tensor, kind: str, intensity, seed: int = 0, index=None,
            backend: str = "torch") -> torch.Tensor:
    """Apply MMD-Bench degradation `kind` at `intensity` to a batch of RGB images (see module docstring).

    backend: "torch" (default: this module's batched ops, any device, for on-the-fly augmentation), "opencv"
    (umm_ops.data.degradations_cv: CLEAR's own per-image OpenCV operations on the CPU, the exact path; float
    images are quantised to uint8 first, as CLEAR works on uint8, and the result goes back to the input's device
    and dtype), or "auto" ("opencv" for CPU tensors when cv2 is importable, else "torch").  The two backends draw
    different random numbers for the same seed (the torch path from torch generators, the exact path from
    CLEAR's Mersenne Twister streams), so stochastic types agree in distribution, not pixel for pixel.
    """
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; valid kinds: {', '.join(sorted(DEGRADATIONS))}")
    i = _intensity(intensity)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 in [0, 255] or floating in [0, 1], got dtype {images.dtype}")
    is_u8 = images.dtype == torch.uint8
    B = images.shape[0]
    if index is None:
        idx = list(range(B))
    else:
        idx = [int(v) for v in (index.tolist() if isinstance(index, torch.Tensor) else index)]
        if len(idx) != B:
            raise ValueError(f"index has {len(idx)} entries for a batch of {B} images")
    which = resolve_backend(backend, images.device)
    if B == 0:
        return images.clone()
    if not is_u8:
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"floating images must be in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
                             "pass uint8 for 0..255 pixels")
    if which == "opencv":
        return _degrade_opencv(images, kind, i, seed, idx)
    work = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(work) if is_u8 else images.to(work) * 255.0
    gens = [torch.Generator().manual_seed(seed_of(int(seed), j, kind)) for j in idx]
    y = DEGRADATIONS[kind][1](x, i, gens).clamp(0, 255)
    if is_u8:
        return y.round().to(torch.uint8)
    return (y / 255.0).to(images.dtype)


def _degrade_opencv(images: torch.Tensor, kind: str, i: float, seed: int, idx: list) -> torch.Tensor:
    from .degradations_cv import clear_seed, run_batch

    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("images hold non-finite values (nan / inf); the opencv backend works on uint8 pixels "
                             "and will not turn them into finite ones")
        x = (x.double() * 255.0).round().clamp(0, 255).to(torch.uint8)
    cv2 = optional_import("cv2")
    B, _, H, W = x.shape
    src = x.contiguous().numpy()                     # (B, 3, H, W)
    out = torch.empty(B, 3, H, W, dtype=torch.uint8)
    dst = out.numpy()

    # channels first <-> last with cv2.merge / cv2.split (vectorised; numpy's strided transpose copy of uint8
    # took longer than the cheaper degradations themselves), in the worker threads
    def get(b):
        return cv2.merge(list(src[b]))

    def put(b, img):
        for c, plane in enumerate(cv2.split(img)):
            dst[b, c] = plane

    run_batch(get, put, B, kind, i, [clear_seed(seed, j, kind) for j in idx], H * W)
    if images.dtype != torch.uint8:
        out = (out.to(torch.float64) / 255.0).to(images.dtype)
    return out.to(images.device)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on the 0..255 scale (uint8 or [0, 1] float inputs)."""
    def f(t):
        return t.double() if t.dtype == torch.uint8 else t.double() * 255.0
    mse = ((f(a) - f(b)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-12))
