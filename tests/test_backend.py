"""Backend selection, the build report, and the build itself (CUDA kernels compiled whenever nvcc exists)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import umm_ops
from umm_ops import backend as B
from conftest import device_backend_params, results_by_thread_count


def test_report_says_what_was_built():
    rep = umm_ops.backends()
    for key in ("torch", "device", "extension", "cpu", "cuda", "triton", "reference", "auto"):
        assert key in rep
    assert rep["reference"]["runnable"] is True
    assert rep["extension"]["loaded"], f"umm_ops._C did not load: {rep['extension']['error']}"
    assert rep["cpu"]["runnable"]
    assert rep["extension"]["built_against_torch"] == torch.__version__


@pytest.mark.skipif(shutil.which("nvcc") is None and os.environ.get("CI") is None, reason="no nvcc here")
def test_cuda_kernels_were_compiled_when_nvcc_exists():
    """CI has nvcc but no GPU: the build must still have compiled every CUDA kernel (a compile error fails the
    build, and AUTO must not silently skip CUDA)."""
    if os.environ.get("UMM_CUDA", "AUTO").upper() == "OFF":
        pytest.skip("UMM_CUDA=OFF requested")
    rep = umm_ops.backends()
    assert rep["cuda"]["compiled"], "nvcc is on PATH but the CUDA kernels were not built"
    assert rep["cuda"]["archs"]


def test_auto_selection_on_cpu():
    assert B.select(torch.device("cpu"), torch.float32) == "cpu"
    assert B.select(torch.device("cpu"), torch.bfloat16) == "cpu"
    assert B.select(torch.device("cpu"), torch.float64) == "reference"


def test_forcing_and_context_nesting():
    with umm_ops.use_backend("reference"):
        assert B.select(torch.device("cpu"), torch.float32) == "reference"
        with umm_ops.use_backend("auto"):
            assert B.select(torch.device("cpu"), torch.float32) == "cpu"
        assert B.select(torch.device("cpu"), torch.float32) == "reference"
    assert B.select(torch.device("cpu"), torch.float32) == "cpu"


def test_forcing_unavailable_backend_is_a_clear_error():
    x = torch.randn(2, 3, 4)
    s = torch.randn(2, 4)
    if not torch.cuda.is_available():
        with umm_ops.use_backend("cuda"), pytest.raises(umm_ops.BackendUnavailableError, match="runs CUDA tensors"):
            umm_ops.gated_residual(x, s, x)
    with umm_ops.use_backend("cpu"), pytest.raises(umm_ops.BackendUnavailableError, match="float64"):
        umm_ops.gated_residual(x.double(), s.double(), x.double())
    with pytest.raises(ValueError, match="unknown umm_ops backend"):
        with umm_ops.use_backend("fast"):
            pass


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if isinstance(B._triton_module(), Exception):
        pytest.skip("triton not importable")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with umm_ops.use_backend("triton"), pytest.raises(umm_ops.BackendUnavailableError, match="TRITON_INTERPRET"):
        B.select(torch.device("cpu"), torch.float32)


def test_env_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("UMM_OPS_BACKEND", "reference")
    assert B.select(torch.device("cpu"), torch.float32) == "reference"
    monkeypatch.setenv("UMM_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown umm_ops backend"):
        B.select(torch.device("cpu"), torch.float32)


def test_cached_automatic_choice_yields_to_forcing(monkeypatch):
    """kernels_for caches the automatic choice per (device kind, dtype, op); a forced backend (block or
    environment variable, set after the cache was filled) still wins, and shape-limited ops are not cached."""
    from umm_ops.reference import kernels as ref

    x = torch.randn(3)
    auto = B.kernels_for(x, "flow_step")
    assert B.kernels_for(x, "flow_step") is auto
    assert (auto is ref) == (B.select(x.device, x.dtype, "flow_step") == "reference")
    with umm_ops.use_backend("reference"):
        assert B.kernels_for(x, "flow_step") is ref
    monkeypatch.setenv("UMM_OPS_BACKEND", "reference")
    assert B.kernels_for(x, "flow_step") is ref
    monkeypatch.delenv("UMM_OPS_BACKEND")
    assert B.kernels_for(x, "flow_step") is auto
    assert B.kernels_for(x.double(), "flow_step") is ref
    assert B.kernels_for(torch.empty(3, device="meta"), "flow_step") is ref
    B.kernels_for(x, "span_attention_fwd")
    assert not any(k[-1].startswith("span_attention") for k in B._AUTO_CACHE)


def test_backends_give_identical_results_for_the_same_call(seed):
    """Sanity across backends on one call (the real checks are in test_flow/test_norm)."""
    x, v = torch.randn(4, 33), torch.randn(4, 33)
    outs = []
    for name in ("cpu", "reference"):
        with umm_ops.use_backend(name):
            outs.append(umm_ops.flow_step(x, v, 0.2, 0.3))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


def test_cpu_kernels_deterministic_across_thread_counts(seed):
    x = torch.randn(3, 40000)
    v, z = torch.randn_like(x), torch.randn_like(x)
    def run():
        _, lp = umm_ops.flow_step(x, v, 0.1, 0.2, noise=z, sigma=0.4, return_logprob=True)
        a = torch.randn(2, 300, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        s = torch.randn(2, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
        out = umm_ops.adaln_modulate(a, s, s, norm="layer")
        return (lp, *torch.autograd.grad(out.square().sum(), [a, s]))

    res = results_by_thread_count(run, (1, max(2, torch.get_num_threads())))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "umm_ops", "info"], capture_output=True, text=True, check=True)
    assert "cpu kernels" in out.stdout and "cuda kernels" in out.stdout
    js = subprocess.run([sys.executable, "-m", "umm_ops", "info", "--json"], capture_output=True, text=True,
                        check=True)
    assert json.loads(js.stdout)["reference"]["runnable"] is True


def test_backward_runs_on_the_forward_backend(monkeypatch):
    """Eager autograd runs the backward after the `use_backend` block; it must still use the forced backend."""
    from umm_ops.reference import kernels as ref

    calls = []
    real = ref.gated_residual_backward

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ref, "gated_residual_backward", spy)
    x = torch.randn(2, 3, 8, requires_grad=True)
    g = torch.randn(2, 8, requires_grad=True)
    with umm_ops.use_backend("reference"):
        out = umm_ops.gated_residual(x, g, x)
    out.sum().backward()
    assert calls == [1]
    calls.clear()
    umm_ops.gated_residual(x, g, x).sum().backward()  # automatic: the C++ kernel, not the reference
    assert calls == ([] if umm_ops.backends()["cpu"]["runnable"] else [1])


def test_selection_skips_backends_without_the_op():
    """Ops land backend by backend: a backend lacking a kernel is skipped automatically and refused when forced."""
    assert B._has_op("reference", "anything")
    assert not B._has_op("cpu", "no_such_op")
    assert B.select(torch.device("cpu"), torch.float32, "no_such_op") == "reference"
    with umm_ops.use_backend("cpu"), pytest.raises(umm_ops.BackendUnavailableError, match="no 'no_such_op' kernel"):
        B.select(torch.device("cpu"), torch.float32, "no_such_op")
    assert B.select(torch.device("cpu"), torch.float32, "flow_step") == "cpu"


def test_kernel_list_is_the_reference_contract():
    from umm_ops.reference import kernels as ref

    for name in ref.KERNELS:
        assert callable(getattr(ref, name))
    assert set(umm_ops.backends()["kernels"]) == set(ref.KERNELS)


def test_cuda_span_kernel_limits():
    """The CUDA span-attention kernel covers bf16/fp16 and head dims % 8 == 0 up to 128; other CUDA tensors fall
    through to Triton when nothing is forced (the limit is part of the backend choice, not a kernel error)."""
    lim = B._OP_LIMITS[("cuda", "span_attention_fwd")]
    assert B._OP_LIMITS[("cuda", "span_attention_bwd")] is lim
    assert lim(torch.bfloat16, (10, 4, 72)) is None and lim(torch.float16, (10, 4, 128)) is None
    assert "bfloat16 / float16" in lim(torch.float32, (10, 4, 64))
    assert "multiple of 8" in lim(torch.bfloat16, (10, 4, 12))
    assert "<= 128" in lim(torch.bfloat16, (10, 4, 256))
    if torch.cuda.is_available() and B._has_op("cuda", "span_attention_fwd") and B.forced_backend() is None:
        dev = torch.device("cuda")
        assert B.select(dev, torch.float32, "span_attention_fwd", (10, 4, 64)) != "cuda"
        assert B.select(dev, torch.bfloat16, "span_attention_fwd", (10, 4, 64)) == "cuda"


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_empty_batch_norm_and_flow_ops(device, backend):
    """A batch of 0 samples (a packed batch with no image to generate reaches the flow head with none): every
    norm / flow op returns the shape its fake kernel promises and its backward runs (found: reshape(B, -1, C)
    raised "ambiguous" for B = 0)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    C, N = 8, 16
    t0, t1, s = torch.rand(0, device=device), torch.rand(0, device=device) + 0.1, torch.full((0,), 0.7, device=device)
    r = lambda *shape: torch.randn(*shape, device=device)  # noqa: E731
    cases = {
        "gated_residual": (umm_ops.gated_residual, (r(0, 5, C), r(0, C), r(0, 5, C))),
        "adaln_modulate": (lambda x, sh, sc: umm_ops.adaln_modulate(x, sh, sc), (r(0, 5, C), r(0, C), r(0, C))),
        "gated_detail_residual": (umm_ops.gated_detail_residual, (r(0, C), r(0, C), r(0, 4), r(4))),
        "flow_step": (lambda x, v: umm_ops.flow_step(x, v, t0, t1), (r(0, N), r(0, N))),
        "flow_logprob": (lambda x, xn, v: umm_ops.flow_logprob(x, xn, v, t0, t1, s), (r(0, N), r(0, N), r(0, N))),
        "flow_kl": (lambda v, vr: umm_ops.flow_kl(v, vr, t0, t1, s), (r(0, N), r(0, N))),
    }
    ran = 0
    for name, (fn, ins) in cases.items():
        if not B._has_op(backend, name):
            continue
        xs = [t.clone().requires_grad_(True) for t in ins]
        with umm_ops.use_backend(backend):
            out = fn(*xs)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake = fn(*(mode.from_tensor(t) for t in ins))
            grads = torch.autograd.grad(out.sum(), xs, allow_unused=True)
        assert out.shape == fake.shape, (name, out.shape, fake.shape)
        assert all(g is None or g.shape == x.shape for g, x in zip(grads, xs)), name
        ran += 1
    assert ran > 0
