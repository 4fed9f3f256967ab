"""Argument leniencies of the public ops found by fuzzing (issue 20): every one is now a clear refusal naming
what was expected and what was given, and the value checks are skipped for tensors without values (meta, fake)."""
from __future__ import annotations

import pytest
import torch

import umm_ops
from umm_ops import SpanLayout
from umm_ops.ops.tokens import compress_tokens, expand_tokens, pack_latents, unpack_latents


def _ct_args():
    return torch.randn(1, 16, 4), torch.randn(5, 16)


@pytest.mark.parametrize("grid", [(4.9, 4.2), (4.0, 4.0), ("4", "4"), (True, 4), (4,), None, "44"])
def test_grid_hw_must_be_ints(grid):
    x, w = _ct_args()
    with pytest.raises(ValueError, match=r"grid_hw must be a pair of ints \(H, W\), got"):
        compress_tokens(x, grid, None, None, w, None)
    with pytest.raises(ValueError, match=r"grid_hw must be a pair of ints"):
        expand_tokens(torch.randn(1, 4, 3), grid, torch.randn(8, 3), None)
    with pytest.raises(ValueError, match=r"grid_hw must be a pair of ints"):
        unpack_latents(torch.randn(1, 4, 8), grid, torch.zeros(8), torch.ones(8))


def test_grid_hw_integer_scalars_are_fine():
    import numpy as np

    x, w = _ct_args()
    want = compress_tokens(x, (4, 4), None, None, w, None)
    for grid in ((np.int64(4), 4), (torch.tensor(4), torch.tensor(4)), torch.Size([4, 4])):
        torch.testing.assert_close(compress_tokens(x, grid, None, None, w, None), want)


@pytest.mark.parametrize("eps,err,msg", [
    (float("inf"), ValueError, "eps must be a finite number >= 0, got inf"),
    (float("nan"), ValueError, "eps must be a finite number >= 0, got nan"),
    (-1e-6, ValueError, "eps must be a finite number >= 0, got -1e-06"),
    ("1e-6", TypeError, r"eps must be a finite number >= 0, got '1e-6' \(str\)"),
    (None, TypeError, r"eps must be a finite number >= 0, got None \(NoneType\)"),
    (True, TypeError, r"got True \(bool\)"),
])
def test_eps_is_a_finite_number(eps, err, msg):
    x, w = _ct_args()
    z = torch.randn(1, 2, 4, 4)
    calls = [
        lambda: compress_tokens(x, (4, 4), None, None, w, None, eps=eps),
        lambda: pack_latents(z, torch.zeros(8), torch.ones(8), eps=eps),
        lambda: unpack_latents(torch.randn(1, 4, 8), (4, 4), torch.zeros(8), torch.ones(8), eps=eps),
        lambda: umm_ops.adaln_modulate(torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8), eps=eps),
        lambda: umm_ops.gated_detail_residual(torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 4),
                                              torch.randn(4, 1), eps=eps),
    ]
    for call in calls:
        with pytest.raises(err, match=msg):
            call()


def test_running_var_plus_eps_must_be_positive():
    z = torch.randn(1, 2, 4, 4)
    rv = torch.ones(8)
    rv[3] = -0.5
    with pytest.raises(ValueError, match=r"running_var \+ eps must be > 0 \(a variance\), got running_var\[3\] = -0.5"):
        pack_latents(z, torch.zeros(8), rv)
    with pytest.raises(ValueError, match=r"running_var\[3\] = -0.5"):
        unpack_latents(torch.randn(1, 4, 8), (4, 4), torch.zeros(8), rv)
    with pytest.raises(ValueError, match=r"running_var\[0\] = 0.0 with eps = 0.0"):
        pack_latents(z, torch.zeros(8), torch.zeros(8), eps=0.0)
    with pytest.raises(ValueError, match=r"running_var\[2\] = nan"):
        pack_latents(z, torch.zeros(8), torch.tensor([1, 1, float("nan"), 1, 1, 1, 1, 1.0]))
    pack_latents(z, torch.zeros(8), torch.zeros(8))  # var 0 + eps 1e-4 is fine
    with umm_ops.value_checks(False):  # the switch for tuned loops turns this one off too
        assert torch.isnan(pack_latents(z, torch.zeros(8), rv)).any()


def test_meta_tensors_skip_the_value_checks():
    """Meta tensors have no values: the ops give shapes, never 'Cannot copy out of meta tensor'."""
    m = dict(device="meta")
    x, v = torch.randn(2, 8, **m), torch.randn(2, 8, **m)
    t, tn = torch.full((2,), 0.2, **m), torch.full((2,), 0.3, **m)
    assert umm_ops.flow_step(x, v, t, tn).shape == (2, 8)
    out, lp = umm_ops.flow_step(x, v, 0.2, 0.3, noise=torch.randn(2, 8, **m), sigma=0.3, return_logprob=True)
    assert out.shape == (2, 8) and lp.shape == (2,)
    assert umm_ops.flow_logprob(x, x, v, t, tn, torch.full((2,), 0.3, **m)).shape == (2,)
    assert umm_ops.flow_kl(v, v, t, tn, 0.3).shape == (2,)
    assert umm_ops.time_shift(t, 0.5).shape == (2,)
    assert pack_latents(torch.randn(1, 2, 4, 4, **m), torch.zeros(8, **m), torch.ones(8, **m)).shape == (1, 4, 8)
    assert unpack_latents(torch.randn(1, 4, 8, **m), (4, 4), torch.zeros(8, **m),
                          torch.ones(8, **m)).shape == (1, 2, 4, 4)
    ids = torch.zeros(2, dtype=torch.int64, **m)   # the target-range check reads no values
    assert umm_ops.linear_cross_entropy(x, torch.randn(5, 8, **m), ids).shape == ()
    assert umm_ops.linear_logprob(x, torch.randn(5, 8, **m), ids).shape == (2,)


def _unchecked(docs, edit):
    lay = SpanLayout.from_segments(docs)
    ts = [t.clone() for t in lay.tensors()]
    edit(ts)
    return SpanLayout(*ts, max_seqlen_q=lay.max_seqlen_q, max_seqlen_k=lay.max_seqlen_k, validate=False,
                      total_q=lay.total_q, total_k=lay.total_k)


@pytest.mark.parametrize("edit,msg", [
    (lambda ts: ts[5].__setitem__(1, 7), r"seg_mode\[1\] must be 0 \(causal\), 1 \(full\) or 2 \(noise\), got 7"),
    (lambda ts: ts.__setitem__(2, torch.tensor([0, 1], dtype=torch.int32)),
     "seg_offsets\\[-1\\] must equal the number of segments 2, got 1"),
    (lambda ts: ts.__setitem__(2, torch.tensor([0], dtype=torch.int32)), "seg_offsets must have D\\+1 = 2 entries"),
])
def test_unchecked_layout_is_refused_by_the_reference(edit, msg):
    """A SpanLayout built with validate=False and a bad table: the reference backend refuses it as the CPU
    kernel does (it used to compute with a wrong mask)."""
    lay = _unchecked([[(5, "causal"), (3, "full")]], edit)
    q, k = torch.randn(8, 2, 8), torch.randn(8, 2, 8)
    with umm_ops.use_backend("reference"), pytest.raises(ValueError, match=msg):
        umm_ops.span_attention(q, k, k, lay)
