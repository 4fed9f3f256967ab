"""Smoke test of an installed umm_ops wheel, run by tests/test_wheel.py inside a fresh venv (python -I: no source
tree, no PYTHONPATH).  Every op family runs forward and backward on the compiled CPU kernels and is compared with
the reference backend; then, depending on the extras installed:

    python -I wheel_smoke.py core    # only torch + numpy installed: the ops; the model must fail naming umm_ops[model]
    python -I wheel_smoke.py all     # umm_ops[all]: the ops, the synthetic world and the tiny model's training step

Prints one line per check; exits non-zero on the first failure.
"""
import os
import sys

import torch

import umm_ops
from umm_ops import _lib

mode = sys.argv[1]
assert mode in ("core", "all"), f"mode: expected 'core' or 'all', got {mode!r}"
here = os.path.dirname(os.path.abspath(__file__))
prefix = os.path.realpath(sys.prefix)

# -- the package is the installed one, with its compiled extension and build record
pkg = os.path.realpath(os.path.dirname(umm_ops.__file__))
assert pkg.startswith(prefix + os.sep), f"umm_ops imported from {pkg}, not from the venv {prefix}"
assert not any(os.path.isdir(os.path.join(p, "csrc")) for p in sys.path if p), f"a source tree on sys.path: {sys.path}"
assert _lib.loaded(), f"the compiled extension did not load: {_lib.load_error()}"
from umm_ops import _torch_build  # noqa: E402

assert _torch_build.TORCH_VERSION == torch.__version__, (_torch_build.TORCH_VERSION, torch.__version__)
info = umm_ops.backends()
print(f"[smoke] umm_ops {umm_ops.__version__} from {pkg}; torch {torch.__version__}; cpu isa {info['cpu']['isa']} "
      f"(built {info['cpu']['isas_built']}); cuda kernels compiled: {info['cuda']['compiled']}", flush=True)
assert info["cpu"]["compiled"], info

g = torch.Generator().manual_seed(0)


def rnd(*shape, grad=True):
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def check(name, fn, *inputs, atol=2e-4):
    """fn(*inputs) on the compiled CPU kernels and on the reference: outputs and input gradients agree."""
    results = []
    for backend in ("cpu", "reference"):
        xs = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x for x in inputs]
        with umm_ops.use_backend(backend):
            out = fn(*xs)
            outs = out if isinstance(out, tuple) else (out,)
            loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs
                       if o.is_floating_point())
            grads = torch.autograd.grad(loss, [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad])
        results.append((outs, grads))
    (o1, g1), (o2, g2) = results
    for a, b in zip(o1 + g1, o2 + g2):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-3)
    print(f"[smoke] {name}: cpu kernel == reference (fwd + bwd)", flush=True)


# -- span attention
layout = umm_ops.SpanLayout.from_segments([[(5, "causal"), (8, "full"), (3, "causal")], [(7, "causal")]])
L = layout.total_q
check("span_attention", lambda q, k, v: umm_ops.span_attention(q, k, v, layout), rnd(L, 4, 32), rnd(L, 2, 32),
      rnd(L, 2, 32))
# -- compression / tokens
check("compress_tokens", lambda x, lw, lb, w, b: umm_ops.compress_tokens(x, (4, 6), lw, lb, w, b),
      rnd(2, 24, 16), rnd(16), rnd(16), rnd(32, 64), rnd(32))
check("expand_tokens", lambda y, w, b: umm_ops.expand_tokens(y, (4, 6), w, b), rnd(2, 6, 32), rnd(64, 32), rnd(64))
rm, rv = torch.randn(16, generator=g), torch.rand(16, generator=g) + 0.5
check("pack_latents", lambda z: umm_ops.pack_latents(z, rm, rv), rnd(2, 4, 6, 8))
check("unpack_latents", lambda t: umm_ops.unpack_latents(t, (6, 8), rm, rv), rnd(2, 12, 16))
# -- flow ops
t, tn = torch.full((3,), 0.3), torch.full((3,), 0.4)
check("flow_step", lambda x, v: umm_ops.flow_step(x, v, t, tn), rnd(3, 4, 8), rnd(3, 4, 8))
sigma = torch.full((3,), 0.7)
check("flow_logprob", lambda x, xn, v: umm_ops.flow_logprob(x, xn, v, t, tn, sigma),
      rnd(3, 4, 8, grad=False), rnd(3, 4, 8, grad=False), rnd(3, 4, 8))
check("flow_kl", lambda v, vr: umm_ops.flow_kl(v, vr, t, tn, sigma), rnd(3, 4, 8), rnd(3, 4, 8, grad=False))
# -- norms and gates
check("adaln_modulate", lambda x, sh, sc: umm_ops.adaln_modulate(x, sh, sc), rnd(2, 5, 32), rnd(2, 32), rnd(2, 32))
check("gated_residual", lambda x, gt, y: umm_ops.gated_residual(x, gt, y), rnd(2, 5, 32), rnd(2, 32), rnd(2, 5, 32))
check("gated_detail_residual",
      lambda lo, hi, gh, w, b, lw, lb: umm_ops.gated_detail_residual(lo, hi, gh, w, b, lw, lb, 1e-6),
      rnd(2, 5, 32), rnd(2, 5, 32), rnd(2, 5, 16), rnd(1, 16), rnd(1), rnd(32), rnd(32))
# -- LM head + cross-entropy / log-probs
targets = torch.randint(0, 50, (12,), generator=g)
check("linear_cross_entropy", lambda h, w: umm_ops.linear_cross_entropy(h, w, targets), rnd(12, 32), rnd(50, 32))
check("linear_logprob", lambda h, w: umm_ops.linear_logprob(h, w, targets, return_entropy=True),
      rnd(12, 32), rnd(50, 32))

if mode == "core":
    # only torch and numpy are installed: the model's first optional import names the extra that installs it
    from umm_ops.utils import MissingDependencyError

    try:
        from umm_ops.model import CheersModel

        CheersModel("tiny")
    except MissingDependencyError as e:
        assert "umm_ops[model]" in str(e), str(e)
        print(f"[smoke] CheersModel without the model extra: {e}", flush=True)
    else:
        raise AssertionError("CheersModel('tiny') built without umm_ops[model] installed")
else:
    from umm_ops.data import SyntheticWorld, pack
    from umm_ops.data.synthetic import to_samples
    from umm_ops.model import CheersModel
    from umm_ops.train import policy

    torch.manual_seed(0)
    model = CheersModel("tiny")
    samples = to_samples(SyntheticWorld(size=64)[0], tasks=("caption", "generate"))
    batch = pack(samples, model.pack_spec())[0]
    out = model(batch, **policy.training_inputs(model, batch, seed=0, cfg_dropout_p=model.config.cfg_dropout))
    assert torch.isfinite(out["loss"]), out["loss"]
    out["loss"].backward()
    n_grad = sum(p.grad is not None for p in model.parameters())
    assert n_grad > 0
    print(f"[smoke] CheersModel('tiny') forward + backward: loss {out['loss'].item():.3f}, "
          f"{n_grad} parameters with gradients", flush=True)
    text = model.generate_text(["Describe the image."], max_new_tokens=4)
    print(f"[smoke] generate_text: {text!r}", flush=True)
print(f"[smoke] {mode}: ok", flush=True)
