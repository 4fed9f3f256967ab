"""MMD-Bench degradations: determinism, batching independence, dtype/range, monotone effect, JPEG codec, errors."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from umm_ops.data import DEGRADATIONS, LEVELS, WEIGHTS, degrade, psnr, sample_kind
from umm_ops.data.degradations import CATEGORIES, jpeg_quality

KINDS = sorted(DEGRADATIONS)
# Intensity 0 is the identity (or within 40 dB of it) for these; motion_blur (min kernel 5), scan_lines (lines
# every 200 rows), sharpness_change (CLEAR's i=0 blur branch) and jpeg (4:2:0 chroma at q=100) are not.
IDENTITY_AT_ZERO = {"lens_blur", "lens_flare", "dirty_lens", "hsv_saturation", "block_exchange",
                    "dark_illumination", "atmospheric_turbulence", "gaussian_noise", "color_diffusion"}
# CLEAR's colour_diffusion darkens most at mid level (gain 0.68 at i=0.45, 0.85 at i=0.9), so PSNR is only
# monotone over low -> mid; at high it must still be clearly degraded.
NOT_MONOTONE_AT_HIGH = {"color_diffusion"}


def _test_image(H: int = 192, W: int = 192) -> torch.Tensor:
    """Natural-ish RGB uint8 (1, 3, H, W): smooth gradients, flat shapes with hard edges, luminance texture."""
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    img = torch.stack([40 + 170 * xx / W, 60 + 140 * yy / H, 200 - 120 * (xx + yy) / (H + W)])
    img[:, 30:80, 20:100] = torch.tensor([210.0, 50, 50]).view(3, 1, 1)
    disc = (yy - 130) ** 2 + (xx - 130) ** 2 < 35 ** 2
    img[:, disc] = torch.tensor([40.0, 170, 80]).view(3, 1)
    tri = (yy > 100) & (yy < 170) & ((xx - 45).abs() < (yy - 100) * 0.6)
    img[:, tri] = torch.tensor([240.0, 220, 60]).view(3, 1)
    lum = 12 * torch.sin(xx / 3.1) * torch.sin(yy / 4.3) + 6 * torch.sin((xx + 2 * yy) / 1.7)
    lum = lum + 3 * torch.randn(H, W, generator=torch.Generator().manual_seed(1234))
    return (img + lum).clamp(0, 255).round().to(torch.uint8)[None]


IMG = _test_image()
BATCH = torch.cat([IMG, IMG.flip(-1), IMG.flip(-2)])  # three different images


def test_registry():
    assert len(KINDS) >= 5
    for name, (cat, fn) in DEGRADATIONS.items():
        assert cat in CATEGORIES and callable(fn), name
    assert LEVELS == {"low": 0.23, "mid": 0.45, "high": 0.9}
    assert set(WEIGHTS) == set(DEGRADATIONS)
    g = torch.Generator().manual_seed(0)
    drawn = [sample_kind(g) for _ in range(400)]
    assert set(drawn) <= set(KINDS) and len(set(drawn)) >= len(KINDS) - 2
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [sample_kind(g1) for _ in range(20)] == [sample_kind(g2) for _ in range(20)]


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_and_batch_independent(kind):
    a = degrade(BATCH, kind, "mid", seed=3)
    b = degrade(BATCH, kind, 0.45, seed=3)
    assert torch.equal(a, b)
    for i in range(BATCH.shape[0]):
        single = degrade(BATCH[i:i + 1], kind, "mid", seed=3, index=[i])
        assert torch.equal(a[i], single[0]), f"{kind}: image {i} depends on its batch"
    # index, not position, picks the randomness: reversing the batch with its indices reverses the result
    rev = degrade(BATCH.flip(0), kind, "mid", seed=3, index=[2, 1, 0])
    assert torch.equal(rev.flip(0), a)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_shape_dtype_range(kind, dtype):
    x = BATCH[:2] if dtype == torch.uint8 else BATCH[:2].to(dtype) / 255
    y = degrade(x, kind, "high", seed=1)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    if dtype == torch.uint8:
        ref = y
    else:
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        ref = (y * 255).round().to(torch.uint8)
        # float and uint8 paths agree up to rounding (jpeg quantises its input, the rest work in float)
        yu = degrade(BATCH[:2], kind, "high", seed=1)
        assert float(psnr(ref, yu).min()) > 35, kind
    assert torch.isfinite(ref.float()).all()


@pytest.mark.parametrize("kind", KINDS)
def test_psnr_falls_with_intensity(kind):
    p = [float(psnr(degrade(IMG, kind, i, seed=0), IMG)[0]) for i in (0.23, 0.45, 0.9)]
    if kind in NOT_MONOTONE_AT_HIGH:
        assert p[0] > p[1] and p[2] < 25, (kind, p)
    else:
        assert p[0] > p[1] > p[2], (kind, p)
    assert p[0] < 40, (kind, p)  # low level is visibly degraded


@pytest.mark.parametrize("kind", sorted(IDENTITY_AT_ZERO & set(KINDS)))
def test_intensity_zero_near_identity(kind):
    assert float(psnr(degrade(IMG, kind, 0.0), IMG)[0]) > 40
    xf = IMG.float() / 255
    assert float(psnr(degrade(xf, kind, 0.0), xf)[0]) > 40


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_matches_gpu(kind):
    c = degrade(BATCH, kind, "high", seed=2)
    g = degrade(BATCH.cuda(), kind, "high", seed=2)
    assert g.is_cuda
    assert float(psnr(c, g.cpu()).min()) > 45, kind


@pytest.mark.parametrize("intensity", [0.0, 0.23, 0.45, 0.9, 1.0])
def test_jpeg_is_pillow_codec(intensity):
    from PIL import Image

    if "jpeg" not in DEGRADATIONS:
        pytest.skip("jpeg not registered")
    q = jpeg_quality(intensity)
    assert q == max(5, min(100, int(100 - 95 * intensity)))
    out = degrade(BATCH, "jpeg", intensity)
    for b in range(BATCH.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(BATCH[b].permute(1, 2, 0).numpy(), mode="RGB").save(buf, format="JPEG", quality=q)
        ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        assert np.array_equal(out[b].permute(1, 2, 0).numpy(), ref)


def test_seed_changes_random_kinds():
    for kind in ("gaussian_noise", "motion_blur", "block_exchange"):
        if kind in DEGRADATIONS:
            assert not torch.equal(degrade(IMG, kind, "high", seed=0), degrade(IMG, kind, "high", seed=1)), kind


def test_errors():
    kind = KINDS[0]
    with pytest.raises(ValueError, match="valid kinds"):
        degrade(IMG, "fog", 0.5)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            degrade(IMG, kind, bad)
    with pytest.raises(ValueError, match="level"):
        degrade(IMG, kind, "extreme")
    with pytest.raises(TypeError):
        degrade(IMG, kind, None)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        degrade(IMG[0], kind, 0.5)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        degrade(IMG[:, :1], kind, 0.5)
    with pytest.raises(TypeError, match="dtype"):
        degrade(IMG.to(torch.int32), kind, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        degrade(IMG.float(), kind, 0.5)  # 0..255 floats
    with pytest.raises(ValueError, match="index"):
        degrade(BATCH, kind, 0.5, index=[0, 1])
    with pytest.raises(TypeError):
        degrade(IMG.numpy(), kind, 0.5)


@pytest.mark.parametrize("ksize", [1, 3, 15, 61, 181])
@pytest.mark.parametrize("hw", [(1, 7), (40, 56), (33, 1)])
def test_separable_filter_gemm_matches_convolution(ksize, hw):
    """The blurs run as two GEMMs with border-folded band matrices below max(1024 px, 16 x kernel) and as two
    convolutions with explicit reflect-101 padding above: the same filter, including kernels wider than the image
    (the border reflects more than once) and single-pixel axes."""
    from umm_ops.data import degradations as D

    x = torch.rand(2, 3, *hw, dtype=torch.float64) * 255
    k = D._gauss1d(ksize, 0.0 if ksize < 3 else ksize / 5)
    got, want = D._sep_filter(x, k), D._sep_filter_conv(x, k)
    assert got.shape == want.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    # a constant image stays constant (the weights of every output pixel sum to 1, border included)
    c = torch.full((1, 1, *hw), 7.0, dtype=torch.float64)
    torch.testing.assert_close(D._sep_filter(c, k), c, rtol=0, atol=1e-9)
