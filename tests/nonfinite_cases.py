"""Non-finite inputs to span attention: the cases every backend is held to (docs/span-attention-contract.md:
a row meeting a NaN / Inf - in its q, or in k / v at a key it sees - is NaN, out and lse; keys a row cannot see
never affect it).  Shared by test_span_attention.py (reference, cpu, cuda) and test_triton_span_attention.py
(the interpreter), and replayed through the CUDA forward's tile algorithm by test_span_cuda_tiling.py.

The layout has a 70-token causal segment (several 64-key chunks of the CPU kernel, 16-key tiles of the
interpreted Triton kernel: the poisoned key 30 shares a diagonal tile with queries that cannot see it), a noise
segment (its keys are seen by its own queries only) and a second document in the cache case.
"""
from __future__ import annotations

import torch

from umm_ops import SpanLayout

DOCS = [[(70, "causal"), (20, "noise"), (10, "causal")], [(5, "full"), (24, "causal")]]
Q_LENS = [100, 20]
HQ, HKV, D = 2, 1, 8


def visible(lay: SpanLayout) -> torch.Tensor:
    """(Lq, Lk) bool: which keys each query sees."""
    from umm_ops.attention.layout import span_mask
    return span_mask(lay).cpu()


# (name, tensor, token, value): the token is a query row for q, a key for k / v
CASES = [
    ("q-nan", "q", 40, float("nan")),
    ("k-nan", "k", 30, float("nan")),
    ("k-inf", "k", 30, float("inf")),
    ("k-neginf", "k", 75, float("-inf")),      # a noise key: only the noise segment's queries see it
    ("v-inf", "v", 30, float("inf")),          # queries 0..29 share its tile but cannot see it
    ("v-nan", "v", 110, float("nan")),         # second document
]
IDS = [c[0] for c in CASES]


def inputs(case: int, dtype=torch.float32, seed: int = 0):
    """(layout, q, k, v, expected bad rows (Lq,) bool)."""
    name, which, tok, val = CASES[case]
    lay = SpanLayout.from_segments(DOCS, Q_LENS)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(lay.total_q, HQ, D, generator=g)
    k = torch.randn(lay.total_k, HKV, D, generator=g)
    v = torch.randn(lay.total_k, HKV, D, generator=g)
    t = {"q": q, "k": k, "v": v}[which]
    t[tok, :, 3] = val  # q: every head of the row; k / v: the one kv head, used by every query head
    vis = visible(lay)
    bad = torch.zeros(lay.total_q, dtype=torch.bool)
    if which == "q":
        bad[tok] = True
    else:
        bad = vis[:, tok].clone()
    assert 0 < int(bad.sum()) < lay.total_q
    return lay, q.to(dtype), k.to(dtype), v.to(dtype), bad


def check(out: torch.Tensor, lse: torch.Tensor, bad: torch.Tensor, clean_out: torch.Tensor, what: str,
          atol=2e-5, rtol=1e-4):
    """Rows in `bad`: every element of out and lse NaN (for every query head, since the poisoned element is in
    kv head 0 or query row); the others finite and equal to the reference computed on the same inputs."""
    Hq = out.shape[1]
    assert torch.isnan(out[bad]).all(), f"{what}: rows meeting a NaN / Inf must be NaN"
    assert torch.isnan(lse[:, bad]).all(), f"{what}: lse of rows meeting a NaN / Inf must be NaN"
    good = ~bad
    assert torch.isfinite(out[good]).all(), f"{what}: rows that do not see the NaN / Inf must stay finite"
    assert torch.isfinite(lse[:, good]).all(), what
    torch.testing.assert_close(out[good].float(), clean_out[good].float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")
    assert Hq == HQ
