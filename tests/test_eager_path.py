"""Eager calls of the public ops skip the torch.library custom op (umm_ops/ops/_common.py `dispatch`): the
implementation directly without gradients, a plain autograd.Function with the custom op's own setup / backward
with them.  Same kernels, so the same bits as the custom op, forward and backward; the custom op runs under
torch.compile and dispatch modes (FakeTensorMode)."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import umm_ops
from umm_ops.ops import _common as C


def _cases():
    def gdr():
        ins = [torch.randn(9, 16), torch.randn(9, 16), torch.randn(9, 8), torch.randn(8), torch.randn(1),
               torch.randn(16), torch.randn(16)]
        return ins, lambda *a: umm_ops.gated_detail_residual(*a)

    def ada():
        ins = [torch.randn(2, 5, 16), torch.randn(2, 16), torch.randn(2, 16), torch.randn(16), torch.randn(16)]
        return ins, lambda x, sh, sc, w, b: umm_ops.adaln_modulate(x, sh, sc, norm="layer", weight=w, bias=b)

    def gr():
        ins = [torch.randn(2, 5, 16), torch.randn(2, 16), torch.randn(2, 5, 16)]
        return ins, umm_ops.gated_residual

    def step():
        ins = [torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 5)]
        t, tn, s = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.3, 0.2, 0.1])
        return ins, lambda x, v, z: umm_ops.flow_step(x, v, t, tn, noise=z, sigma=s, return_logprob=True)

    def logprob():
        ins = [torch.randn(3, 20), torch.randn(3, 20), torch.randn(3, 20)]
        t, tn, s = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.3, 0.2, 0.1])
        return ins, lambda x, xn, v: umm_ops.flow_logprob(x, xn, v, t, tn, s)

    def kl():
        ins = [torch.randn(3, 20), torch.randn(3, 20)]
        t, tn, s = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.3, 0.2, 0.1])
        return ins, lambda v, vr: umm_ops.flow_kl(v, vr, t, tn, s)

    def span():
        lay = umm_ops.SpanLayout.from_segments([[(7, "causal"), (9, "full"), (3, "noise")], [(5, "full")]])
        ins = [torch.randn(24, 4, 16), torch.randn(24, 2, 16), torch.randn(24, 2, 16)]
        return ins, lambda q, k, v: umm_ops.span_attention(q, k, v, lay, return_lse=True)

    return {"gated_detail_residual": gdr, "adaln_modulate": ada, "gated_residual": gr, "flow_step": step,
            "flow_logprob": logprob, "flow_kl": kl, "span_attention": span}


def _flat(o):
    return list(o) if isinstance(o, (tuple, list)) else [o]


@pytest.mark.parametrize("name", list(_cases()))
def test_eager_path_is_the_custom_op_bitwise(name, seed, monkeypatch):
    ins, fn = _cases()[name]()
    with torch.no_grad():
        direct = _flat(fn(*ins))

    def run():
        xs = [t.clone().requires_grad_(True) for t in ins]
        outs = _flat(fn(*xs))
        diff = [o for o in outs if o.requires_grad]
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in diff)
        return outs, torch.autograd.grad(loss, xs, allow_unused=True)

    eager_outs, eager_grads = run()
    assert all(o.grad_fn is None or "Backward" in type(o.grad_fn).__name__ for o in eager_outs)
    used = []

    monkeypatch.setattr(C, "eager_ok", lambda t: False)  # every call through the custom op
    orig_dispatch = C.dispatch

    def spy(op, *a):
        used.append(op)
        return orig_dispatch(op, *a)

    for mod in (umm_ops.ops.norm, umm_ops.ops.flow, umm_ops.ops.tokens, umm_ops.attention.ops):
        monkeypatch.setattr(mod, "dispatch", spy)
    op_outs, op_grads = run()
    assert used, "the op did not go through dispatch"
    for a, b, c in zip(direct, eager_outs, op_outs):
        assert torch.equal(a, b.detach()) and torch.equal(a, c.detach())
    for a, b in zip(eager_grads, op_grads):
        assert (a is None and b is None) or torch.equal(a, b)


def test_fake_mode_and_compile_take_the_custom_op(monkeypatch):
    calls = []
    orig = C.dispatch

    def spy(op, fn, impl, x, *a):
        calls.append(C.eager_ok(x))
        return orig(op, fn, impl, x, *a)

    monkeypatch.setattr(umm_ops.ops.norm, "dispatch", spy)
    x, g, y = torch.randn(2, 5, 16), torch.randn(2, 16), torch.randn(2, 5, 16)
    umm_ops.gated_residual(x, g, y)
    with FakeTensorMode() as mode:
        fx, fg, fy = (mode.from_tensor(t) for t in (x, g, y))
        assert umm_ops.gated_residual(fx, fg, fy).shape == x.shape
    compiled = torch.compile(lambda a, b, c: umm_ops.gated_residual(a, b, c), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, g, y), umm_ops.gated_residual(x, g, y))
    assert calls[0] is True and calls[1] is False and False in calls[2:]
