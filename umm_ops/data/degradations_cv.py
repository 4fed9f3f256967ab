"""MMD-Bench degradations, exact CPU path: CLEAR's per-image OpenCV / numpy operations on uint8 images.

CLEAR's released generator (data/corruption_datasets_create/add_degradation.py) degrades one BGR uint8 image at a
time with OpenCV and numpy, drawing its randomness from Python's global ``random`` and ``np.random``.  This module
performs the same operations (same OpenCV calls where CLEAR calls OpenCV, the same uint8 roundings and
truncations, the same random draws in the same order) so that a benchmark built here is CLEAR's benchmark:

    degrade_images(images, kind, intensity, seed=0, index=None) -> images

`images` is a uint8 numpy array (B, H, W, 3) or (H, W, 3), RGB.  CLEAR works on BGR (cv2.imdecode); every step
here that depends on the channel order takes it into account (graffiti's colours and red text and the flare's
tint are CLEAR's BGR colours reversed, the HSV conversion is RGB2HSV, the JPEG codec and the noise see CLEAR's
BGR order), the others treat the channels alike, so the result is CLEAR's, in RGB.  The result
has the same shape.  Image b draws from its own ``random.Random(s)`` and ``np.random.RandomState(s)`` with
``s = clear_seed(seed, index[b], kind)``: the Mersenne Twister streams CLEAR's global ``random`` / ``np.random``
give after ``random.seed(s); np.random.seed(s)``, so CLEAR's function seeded that way and this path agree pixel
for pixel (tests/test_degradations_cv.py checks it against outputs recorded from CLEAR's code), and an image's
result depends on neither its batch nor the other images.

Where CLEAR's function raises on a small image (block_exchange smaller than one block, watermark_damage narrower
or lower than 50 px), CLEAR's generator (apply_degradation_Benchmark) catches the error and keeps the image
unchanged; so does this path.

Speed: the images of a batch run in a thread pool (OpenCV releases the GIL), and a few steps are computed in
cheaper ways that give the same pixels: look-up tables for the per-pixel scalings (dark_illumination, scan_lines,
hsv_saturation's saturation), the dirt layer of dirty_lens (grey: all channels equal) drawn and blurred as one
channel, the sampling maps of atmospheric_turbulence computed once per (size, intensity), the Gaussian blurs of
lens_blur and color_diffusion filtering the three channels in one cv2.filter2D call (CLEAR: one per channel),
each type's last step writing straight into the output batch.  Types whose work is tiny or already threaded
inside OpenCV run one image after another (_SEQUENTIAL).  Every type gives CLEAR's pixels exactly (tests/test_degradations_cv.py, docs/results/mmd_bench/README.md).
"""
from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from ..utils import optional_import, seed_of

__all__ = ["KINDS", "clear_seed", "degrade_images", "degrade_image"]


def _cv2():
    return optional_import("cv2")


def clear_seed(seed: int, index: int, kind: str) -> int:
    """The 32-bit seed of image `index` for `kind`: CLEAR's code seeded with ``random.seed(s); np.random.seed(s)``
    draws what this path draws."""
    return seed_of(int(seed), int(index), kind) & 0xFFFFFFFF


class _Rng:
    """CLEAR's two random sources for one image: Python's `random` (py) and numpy's legacy global RandomState (np),
    each made when first used (seeding a RandomState costs more than the cheapest degradations)."""

    def __init__(self, s: int):
        self._s = s
        self._py = self._np = None

    @property
    def py(self) -> random.Random:
        if self._py is None:
            self._py = random.Random(self._s)
        return self._py

    @property
    def np(self) -> np.random.RandomState:
        if self._np is None:
            self._np = np.random.RandomState(self._s)
        return self._np


# ----------------------------------------------------------------------------------------------- capture
def motion_blur(img, i, rng, out=None):
    """Line kernel: a diag(ones(d)) rotated about (d/2, d/2) by a uniform angle in [0, 360), d = max(5, int(30 i)),
    normalised; cv2.filter2D (uint8 out, reflect-101 border)."""
    cv2 = _cv2()
    d = max(5, int(i * 30))
    angle = rng.py.uniform(0, 360)
    rot = cv2.getRotationMatrix2D((d / 2, d / 2), angle, 1)
    k = cv2.warpAffine(np.eye(d), rot, (d, d))
    k /= k.sum()
    return cv2.filter2D(img, -1, k, dst=out)


@lru_cache(maxsize=32)
def _gauss2d(n: int, sigma: float, scale: float) -> np.ndarray:
    """CLEAR's 2-D kernel: the outer product of cv2.getGaussianKernel(n, sigma) with itself, times scale."""
    g = _cv2().getGaussianKernel(n, sigma)
    k = g @ g.T * scale
    k.flags.writeable = False
    return k


def lens_blur(img, i, rng, out=None):
    """Gaussian kernel min(101, int(3 + 300 i)) | 1, sigma 20 i, per channel on float32, truncated to uint8, then
    cv2.addWeighted(img, 1 - 0.7 i, blurred, 0.9 i)."""
    cv2 = _cv2()
    n = min(101, int(3 + i * 300)) | 1
    # the 2-D kernel on the three channels at once: the same values as CLEAR's per-channel calls (a DFT above
    # 11x11 taps); the separable filter would differ by float rounding, and CLEAR's truncation turns that into
    # one grey level on up to half of a flat picture's values
    blurred = cv2.filter2D(img.astype(np.float32), -1, _gauss2d(n, i * 20, 1.0))
    return cv2.addWeighted(img, 1 - i * 0.7, _trunc_u8(blurred), i * 0.9, 0, dst=out)


def _trunc_u8(a: np.ndarray, out=None) -> np.ndarray:
    """numpy's astype(uint8) of values in (-1, 256): truncation toward zero, as CLEAR's `.astype(np.uint8)`
    (np.copyto's unsafe cast into `out` is the same C cast)."""
    if out is None:
        return a.astype(np.uint8)
    np.copyto(out, a, casting="unsafe")
    return out


def dirty_lens(img, i, rng, out=None):
    """Grey dirt: int(10 i) ellipses (i > 0.1), int(300 i) spots, int(5 i) double blotches (i > 0.5), blurred with
    sigma 30, truncated, cv2.addWeighted(img, 1 - 0.7 i, dirt, 0.8 i).  Every colour CLEAR draws is grey, so the
    dirt is drawn and blurred as one channel (the same values as CLEAR's three equal channels)."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    r = rng.py
    dirt = np.zeros((h, w), np.float32)
    if i > 0.1:
        for _ in range(int(10 * i)):
            c = (r.randint(0, w), r.randint(0, h))
            axes = (r.randint(150, 300), r.randint(100, 200))
            cv2.ellipse(dirt, c, axes, angle=r.randint(0, 180), startAngle=0, endAngle=360, color=50, thickness=-1)
    for _ in range(int(300 * i)):
        c = (r.randint(0, w), r.randint(0, h))
        rad = r.randint(4, 20)
        cv2.circle(dirt, c, rad, r.randint(50, 100), -1)
    if i > 0.5:
        for _ in range(int(5 * i)):
            c = (r.randint(0, w), r.randint(0, h))
            cv2.circle(dirt, c, r.randint(20, 50), 80, -1)
            cv2.circle(dirt, c, r.randint(10, 30), 120, -1)
    dirt = _trunc_u8(cv2.GaussianBlur(dirt, (0, 0), 30))
    return cv2.addWeighted(img, 1 - 0.7 * i, cv2.merge((dirt, dirt, dirt)), 0.8 * i, 0, dst=out)


def hsv_saturation(img, i, rng, out=None):
    """HSV (OpenCV) saturation scaled by (1 - i) in float32 and truncated; back to BGR."""
    cv2 = _cv2()
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # on RGB: CLEAR's BGR2HSV of the same picture
    lut = np.arange(256, dtype=np.float32)
    lut *= 1 - i  # float32 times the Python float, as CLEAR's in-place `hsv[..., 1] *= (1 - intensity)`
    hsv[..., 1] = _trunc_u8(lut.clip(0, 255))[hsv[..., 1]]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=out)


def lens_flare(img, i, rng, out=None):
    """3 + int(30 i) flares: a filled circle (radius 10..50) and a 2 px ray (length 30..150, uniform angle) in
    (255, 255, 235) BGR on a float32 layer, 3x3 Gaussian (sigma 20 i), added with weight 0.9 i, truncated."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    r = rng.py
    flare = np.zeros((h, w, 3), np.float32)
    color = (235, 255, 255)  # CLEAR's (255, 255, 235) BGR
    for _ in range(3 + int(30 * i)):
        x, y = r.randint(0, w), r.randint(0, h)
        cv2.circle(flare, (x, y), r.randint(10, 50), color, -1)
        a = r.uniform(0, 2 * np.pi)
        length = r.randint(30, 150)
        cv2.line(flare, (x, y), (int(x + length * np.cos(a)), int(y + length * np.sin(a))), color, 2)
    flare = cv2.GaussianBlur(flare, (3, 3), 20 * i)
    res = cv2.addWeighted(img.astype(np.float32), 1, flare, 0.9 * i, 0)
    return _trunc_u8(np.clip(res, 0, 255, out=res), out)


# ----------------------------------------------------------------------------------------------- transmission
def jpeg(img, i, rng, out=None):
    """OpenCV's JPEG codec (libjpeg-turbo in opencv-python) at quality int(100 - 95 i) clamped to [5, 100]."""
    cv2 = _cv2()
    q = max(5, min(100, int(100 - i * 95)))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), q])
    if not ok:
        raise RuntimeError(f"jpeg: cv2.imencode failed for an image of shape {img.shape}")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB, dst=out)  # the codec saw BGR


def block_exchange(img, i, rng, out=None):
    """int(35 i) sequential swaps of two random grid-aligned blocks of size min(32, int(5 + 30 i))."""
    h, w = img.shape[:2]
    bs = min(32, int(5 + i * 30))
    gh, gw = h // bs, w // bs
    n = int(i * 35)
    if n and (gh < 1 or gw < 1):
        return img  # CLEAR's randint(0, -1) raises; its generator keeps the image
    out = _copy(img, out)
    r = rng.py
    for _ in range(n):
        y1, x1 = r.randint(0, gh - 1) * bs, r.randint(0, gw - 1) * bs
        y2, x2 = r.randint(0, gh - 1) * bs, r.randint(0, gw - 1) * bs
        a = out[y1:y1 + bs, x1:x1 + bs].copy()
        out[y1:y1 + bs, x1:x1 + bs] = out[y2:y2 + bs, x2:x2 + bs]
        out[y2:y2 + bs, x2:x2 + bs] = a
    return out


def mean_shift(img, i, rng, out=None):
    """cv2.pyrMeanShiftFiltering with spatial and colour radius int(40 i)."""
    cv2 = _cv2()
    rad = int(i * 40)
    return cv2.pyrMeanShiftFiltering(img, rad, rad, dst=out)


@lru_cache(maxsize=8)
def _scan_lut() -> np.ndarray:
    # CLEAR: uint8 rows times 0.01 (float64), stored back into uint8 (truncation)
    return _trunc_u8(np.arange(256, dtype=np.uint8) * 0.01)


def scan_lines(img, i, rng, out=None):
    """Rows [k * interval, k * interval + width) scaled by 0.01 (truncated): interval max(3, int(20 / (i + 0.1))),
    width max(5, int(7 i))."""
    interval = max(3, int(20 / (i + 0.1)))
    width = max(5, int(7 * i))
    out = _copy(img, out)
    lut = _scan_lut()
    cv2 = _cv2()
    for y in range(0, img.shape[0], interval):
        band = out[y:y + width]  # whole rows: a contiguous block, rewritten in place
        cv2.LUT(band, lut, dst=band)
    return out


# ----------------------------------------------------------------------------------------------- environment
def dark_illumination(img, i, rng, out=None):
    """pixel * (1 - i^2) in float64, truncated to uint8 (a 256-entry table)."""
    lut = _trunc_u8((np.arange(256, dtype=np.uint8) * (1 - i ** 2)).clip(0, 255))
    return _cv2().LUT(img, lut, dst=out)


@lru_cache(maxsize=3)  # the three levels of one size; 8 bytes per pixel each, so not more
def _turbulence_maps(h: int, w: int, i: float):
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    d = i * 40 * np.sin(y / 30 + i * 5)
    mx = np.clip(x + d, 0, w - 1).astype(np.float32)
    my = np.clip(y + d * 0.7, 0, h - 1).astype(np.float32)
    # kept as float maps: cv2.convertMaps' fixed-point tables round differently from remap's own conversion
    # (1 grey level on ~9% of the values), so only the map computation is shared between images
    mx.flags.writeable = my.flags.writeable = False
    return mx, my


def atmospheric_turbulence(img, i, rng, out=None):
    """Deterministic warp d(y) = 40 i sin(y / 30 + 5 i): sample at (x + d, y + 0.7 d) clipped to the image,
    cv2.remap bilinear."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    mx, my = _turbulence_maps(h, w, float(i))
    return cv2.remap(img, mx, my, cv2.INTER_LINEAR, dst=out)


def gaussian_noise(img, i, rng, out=None):
    """np.random.normal(0, 75 i, image shape) added in float64, clipped, truncated to uint8."""
    noise = rng.np.normal(0, i * 75, img.shape)[..., ::-1]  # CLEAR's noise[..., c] goes to BGR channel c
    noise = noise + img
    return _trunc_u8(np.clip(noise, 0, 255, out=noise), out)


def color_diffusion(img, i, rng, out=None):
    """Gaussian (size 3 + 2 int(20 i), sigma 50 i) scaled by i^2 on float32; above i = 0.9 int(100 i) grey discs
    (np.random: centre, radius 5..19, grey 0..254); truncated; cv2.addWeighted(img, max(0.1, 1 - 0.9 i), diffused,
    min(0.9, 0.9 i))."""
    cv2 = _cv2()
    n = 3 + 2 * int(i * 20)
    diffused = cv2.filter2D(img.astype(np.float32), -1, _gauss2d(n, i * 50, i ** 2))
    if i > 0.9:
        h, w = img.shape[:2]
        r = rng.np
        for _ in range(int(100 * i)):
            x, y = r.randint(0, w), r.randint(0, h)
            rad = r.randint(5, 20)
            cv2.circle(diffused, (int(x), int(y)), int(rad), (int(r.randint(0, 255)),) * 3, -1)
    return cv2.addWeighted(img, max(0.1, 1 - i * 0.9), _trunc_u8(diffused), min(0.9, i * 0.9), 0, dst=out)


# ----------------------------------------------------------------------------------------------- post-processing
def sharpness_change(img, i, rng, out=None):
    """i > 0: cv2.filter2D with the 3x3 sharpen kernel times 80 i (saturating uint8); i = 0: 3x3 Gaussian blur;
    then cv2.addWeighted(img, 0.7, result, 0.3)."""
    cv2 = _cv2()
    if i > 0:
        res = cv2.filter2D(img, -1, np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]]) * (i * 80))
    else:
        res = cv2.GaussianBlur(img, (3, 3), 0)
    return cv2.addWeighted(img, 0.7, res, 0.3, 0, dst=out)


_GRAFFITI_WORDS = ("X", "FAKE", "COPY", "VOID", "COPYRIGHT")


def graffiti(img, i, rng, out=None):
    """int(10 i) cv2.line strokes (random BGR colour, end points, thickness 1..max(1, int(5 i))); above i = 0.55 a
    red Hershey-simplex word (or a number 1..100) at scale max(0.5, 5 i), thickness max(1, int(scale))."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    r = rng.py
    out = _copy(img, out)
    for _ in range(int(10 * i)):
        color = (r.randint(0, 255), r.randint(0, 255), r.randint(0, 255))[::-1]  # CLEAR draws BGR
        p1 = (r.randint(0, w - 1), r.randint(0, h - 1))
        p2 = (r.randint(0, w - 1), r.randint(0, h - 1))
        cv2.line(out, p1, p2, color, r.randint(1, max(1, int(5 * i))))
    if i > 0.55:
        words = _GRAFFITI_WORDS + (str(r.randint(1, 100)),)
        text = r.choice(words)
        scale = max(0.5, i * 5)
        thick = max(1, int(scale))
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        if h - 10 > th + 10:
            org = (r.randint(0, max(1, w - tw - 10)), r.randint(th + 10, h - 10))
            cv2.putText(out, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 0, 0), thick)
    return out


def watermark_damage(img, i, rng, out=None):
    """int(1 + 15 i) rectangles (corner in [0, W-50] x [0, H-50], size 50..200 x 20..80) inpainted with
    cv2.INPAINT_TELEA (radius 3), cv2.addWeighted(img, 1 - i, repaired, i); above i = 0.5 the mask's Canny edges
    scaled by 0.8 (truncated)."""
    cv2 = _cv2()
    h, w = img.shape[:2]
    if w < 50 or h < 50:
        return img  # CLEAR's randint(0, negative) raises; its generator keeps the image
    r = rng.py
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(1 + i * 15)):
        x, y = r.randint(0, w - 50), r.randint(0, h - 50)
        x2 = x + r.randint(50, 200)
        cv2.rectangle(mask, (x, y), (x2, y + r.randint(20, 80)), 255, -1)
    repaired = cv2.inpaint(img, mask, 3, cv2.INPAINT_TELEA)
    out = cv2.addWeighted(img, 1 - i, repaired, i, 0, dst=out)
    if i > 0.5:
        edge = cv2.Canny(mask, 50, 150) > 0
        out[edge] = _trunc_u8(out[edge] * 0.8)
    return out


KINDS = {
    "lens_blur": lens_blur, "lens_flare": lens_flare, "motion_blur": motion_blur, "dirty_lens": dirty_lens,
    "hsv_saturation": hsv_saturation, "jpeg": jpeg, "block_exchange": block_exchange, "mean_shift": mean_shift,
    "scan_lines": scan_lines, "dark_illumination": dark_illumination,
    "atmospheric_turbulence": atmospheric_turbulence, "gaussian_noise": gaussian_noise,
    "color_diffusion": color_diffusion, "sharpness_change": sharpness_change, "graffiti": graffiti,
    "watermark_damage": watermark_damage,
}


def _copy(img: np.ndarray, out) -> np.ndarray:
    if out is None:
        return img.copy()
    np.copyto(out, img)
    return out


def degrade_image(rgb: np.ndarray, kind: str, i: float, s: int, out=None) -> np.ndarray:
    """One (H, W, 3) uint8 RGB image, intensity i (a float already checked), seed s (clear_seed): CLEAR's
    result, RGB.  `out`, a contiguous (H, W, 3) uint8 array not overlapping `rgb`, receives the result when
    given (the last OpenCV call writes there, dst=out) and is returned - except where CLEAR keeps the image
    (too small for block_exchange / watermark_damage), which returns `rgb` itself."""
    return KINDS[kind](np.ascontiguousarray(rgb), i, _Rng(s), out=out)


def _threads(n: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(n, cpus))


# below this many pixels per image the thread hand-off costs more than the work
_THREADED_PIXELS = 128 * 128
# types run one image after another: a fraction of a millisecond per 512 px image (block_exchange, scan_lines,
# graffiti, the dark_illumination table) or OpenCV's own threads already busy (cv2.remap), so a thread pool over
# the batch was slower (bench/bench_mmd_bench.py, measured pool / sequential 0.57-0.91 at 512 px); the others
# (single-threaded codecs, inpainting, drawing, numpy's RNG) gain 1.4-2x from it on 2 cores
_SEQUENTIAL = {"block_exchange", "scan_lines", "graffiti", "dark_illumination", "atmospheric_turbulence"}


@lru_cache(maxsize=4)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="umm-degrade")


def degrade_images(images: np.ndarray, kind: str, intensity, seed: int = 0, index=None) -> np.ndarray:
    """Degrade uint8 RGB images, (B, H, W, 3) or (H, W, 3), exactly as CLEAR's add_degradation.py (see the module
    docstring).  `intensity`: a float in [0, 1] or a level name ("low", "mid", "high")."""
    from .degradations import _intensity  # one validation of levels / intensities for both paths

    if kind not in KINDS:
        raise ValueError(f"unknown degradation {kind!r}; valid kinds: {', '.join(sorted(KINDS))}")
    i = _intensity(intensity)
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy uint8 array (B, H, W, 3) or (H, W, 3), got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8 RGB in [0, 255], got dtype {images.dtype}")
    single = images.ndim == 3
    batch = images[None] if single else images
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.shape[1] < 1 or batch.shape[2] < 1:
        raise ValueError(f"images must have shape (B, H, W, 3) or (H, W, 3), got {tuple(images.shape)}")
    B = batch.shape[0]
    idx = list(range(B)) if index is None else [int(v) for v in index]
    if len(idx) != B:
        raise ValueError(f"index has {len(idx)} entries for a batch of {B} images")
    seeds = [clear_seed(seed, j, kind) for j in idx]
    out = np.empty_like(batch)

    def put(b, img):
        if img.__array_interface__["data"][0] != dests[b].__array_interface__["data"][0]:
            out[b] = img  # not written in place (an image CLEAR keeps as it is)

    dests = list(out)  # (H, W, 3) contiguous views: each type's last step writes there directly
    run_batch(lambda b: batch[b], put, B, kind, i, seeds, batch.shape[1] * batch.shape[2], dests)
    return out[0] if single else out


def run_batch(get, put, n: int, kind: str, i: float, seeds, pixels: int, dests=None) -> None:
    """put(b, CLEAR's result for image get(b)) for b < n, in a thread pool when the images are large enough and
    the type gains from it.  get and put run in the worker, so a batch's layout changes run in parallel too.
    dests[b], when given, is a contiguous (H, W, 3) uint8 array the result is written into (put then receives
    an array on dests[b]'s memory)."""
    _cv2()  # a missing OpenCV fails here, naming the extra, not inside a worker thread

    def one(b):
        put(b, degrade_image(get(b), kind, i, seeds[b], None if dests is None else dests[b]))

    workers = _threads(n) if pixels >= _THREADED_PIXELS and kind not in _SEQUENTIAL else 1
    if workers == 1:
        for b in range(n):
            one(b)
    else:
        list(_pool(workers).map(one, range(n)))
