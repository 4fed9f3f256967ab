"""The tolerance rule of the tests (FlashAttention's): measured against a float64 reference evaluated on the
same (rounded) inputs, the kernel's error must be at most 2x the error plain PyTorch makes computing the
same formula in the input dtype, plus a floor of a few units in the last place of the output dtype (PyTorch's
own chain can be exact for tiny problems, and a kernel that rounds once still rounds).

The floor is 4 ulps of the largest reference value for 16-bit outputs.  For float32 it is 32 ulps
(~4e-6 relative): kernels and PyTorch both accumulate in float32 but in different orders (PyTorch sums
pairwise, the kernels in vector lanes and chunks), and the normalisation backwards subtract nearly equal
terms (e.g. C = 1, where the exact gradient is ~eps), which turns ordinary rounding differences into a few
ulps of the result's scale.  A wrong formula is off by O(1) of the scale, far above either floor.
"""
from __future__ import annotations

import torch

ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 2.0**-52}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - ref.double()).abs().max().item()


def assert_close_rule(out, ref64, ref_lowp, dtype, name="output", ulps: float | None = None,
                      floor: float | None = None):
    """out: kernel result; ref64: float64 reference; ref_lowp: the reference computed in `dtype` by PyTorch."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    if ulps is None:
        ulps = 32.0 if dtype in (torch.float32, torch.float64) else 4.0
    floor = ulps * ULP[dtype] * scale + (floor or 0.0)
    e_k = max_err(out, ref64)
    e_pt = max_err(ref_lowp, ref64)
    bound = 2.0 * e_pt + floor
    assert e_k <= bound, (f"{name}: kernel error {e_k:.3e} > bound {bound:.3e} "
                          f"(2 x PyTorch's {dtype} error {e_pt:.3e} + floor {floor:.3e})")
