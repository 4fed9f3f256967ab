"""Shared test fixtures: devices, backends, fresh-but-reproducible random seeds, tolerance rule."""
from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run through the Triton interpreter on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import umm_ops  # noqa: E402
from umm_ops import backend as _backend  # noqa: E402

# Fresh inputs every run, reproducible on demand: UMM_TEST_SEED=<printed value> pytest ...
BASE_SEED = int(os.environ.get("UMM_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    info = umm_ops.backends()
    return [
        f"umm_ops: UMM_TEST_SEED={BASE_SEED} (set it to replay this run's random inputs)",
        f"umm_ops: extension loaded={info['extension']['loaded']} cuda compiled={info['cuda']['compiled']} "
        f"archs={info['cuda']['archs']} triton={info['triton']['runnable']} device={info['device']}",
    ]


@pytest.fixture
def seed(request):
    # zlib.crc32, not hash(): str hashes change per process (PYTHONHASHSEED), which made UMM_TEST_SEED replay nothing
    s = (BASE_SEED + zlib.crc32(request.node.nodeid.encode()) % 100003) % (2**31)
    torch.manual_seed(s)
    return s


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The compiled CPU kernels' instruction-set variants this CPU runs (x86-64-v3 / x86-64-v4): tests through the
# "cpu" backend run once per variant (ids "cpu-cpu" for the default one, "cpu-cpu@<isa>" for the others).
CPU_ISAS = _backend.cpu_isas() if umm_ops._lib.loaded() else []
DEFAULT_CPU_ISA = _backend.cpu_isa() if CPU_ISAS else None


def backends_for(device: str) -> list:
    """(backend, marks) pairs that can run tensors of `device` here."""
    out = []
    for name in ("cuda", "cpu", "triton", "reference"):
        if _backend._why_not(name, torch.device(device), torch.float32) is None:
            marks = [pytest.mark.triton] if name == "triton" else []
            if name == "cuda":
                marks.append(pytest.mark.cuda)
            out.append(pytest.param(device, name, marks=marks, id=f"{device}-{name}"))
            if name == "cpu":
                out += [pytest.param(device, name, marks=[pytest.mark.cpu_isa(isa)], id=f"{device}-cpu@{isa}")
                        for isa in CPU_ISAS if isa != DEFAULT_CPU_ISA]
    return out


@pytest.fixture(autouse=True)
def _cpu_isa_from_marker(request):
    """Tests marked cpu_isa(name) run the compiled CPU kernels' variant `name`."""
    m = request.node.get_closest_marker("cpu_isa")
    if m is None:
        yield
        return
    with _backend.use_cpu_isa(m.args[0]):
        yield


@pytest.fixture(params=CPU_ISAS or [None])
def cpu_isa(request):
    """Parametrises a test over the CPU kernels' variants (the test runs with that variant in force)."""
    if request.param is None:
        pytest.skip("the compiled extension did not load")
    with _backend.use_cpu_isa(request.param):
        yield request.param


def device_backend_params():
    return [p for d in DEVICES for p in backends_for(d)]


def dtypes_for(device: str, backend: str):
    if backend == "reference":
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.bfloat16, torch.float16]


def results_by_thread_count(run, counts=(1, 2)) -> list:
    """[run() with torch.set_num_threads(n) for n in counts], the process's thread count restored after (for the
    checks that the CPU kernels' results do not depend on the thread count)."""
    before = torch.get_num_threads()
    try:
        out = []
        for n in counts:
            torch.set_num_threads(n)
            out.append(run())
        return out
    finally:
        torch.set_num_threads(before)


def tiny_eval_model(image_size: int):
    """CheersModel("tiny") (seed 0) in eval mode generating at `image_size`: the model of the generation, RL and
    CLEAR / R3 tests (its outputs are whatever a random tiny model gives; the tests compare paths, not quality)."""
    import torch

    from umm_ops.model.cheers import CheersModel

    torch.manual_seed(0)
    m = CheersModel("tiny")
    m.config.image_size = image_size
    return m.eval()


def with_cheers_head(model):
    """A copy of `model` (the tiny preset, whose head has a conv stage) with Cheers' own head
    (HeadConfig.without_conv_stage): every weight but the conv stage's and its context norm's shared; eval mode."""
    import dataclasses

    from umm_ops.model import CheersModel

    cfg = dataclasses.replace(model.config, head=model.config.head.without_conv_stage())
    m = CheersModel(cfg.validate(), tokenizer=model.tokenizer)
    m.load_state_dict({k: v for k, v in model.state_dict().items()
                       if not k.startswith(("head.conv_stage.", "head.context_norm."))})
    return m.eval()


def tiny_model_open_gates():
    """CheersModel("tiny") (seed 1234) in eval mode with the head's zero-initialised adaLN / HiGate gates and the
    conv stage's last convolution opened (so every path carries signal) and its VAE calibrated on three random 64 px
    pictures: the model of the model and training-policy tests."""
    import torch

    from umm_ops.model import CheersModel

    torch.manual_seed(1234)
    m = CheersModel("tiny")
    with torch.no_grad():
        for name, p in m.head.named_parameters():
            if "adaLN_modulation" in name or name.startswith("hi_gate.gate.2") or (
                    name.startswith("conv_stage.") and not p.any()):   # its blocks' and attention's outputs too
                p.normal_(0, 0.02)
    pics = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(3)]
    m.vae.calibrate(torch.stack(pics))
    return m.eval()


def read_metrics(out) -> list:
    """The records of a run folder's metrics.jsonl."""
    import json
    from pathlib import Path

    return [json.loads(ln) for ln in open(Path(out) / "metrics.jsonl") if ln.strip()]


def metrics_on_one_and_two_ranks(tmp_path, recipe: str, args: list, timeout: int) -> dict:
    """{1: metrics, 2: metrics} of tests/helpers/train_worker.py running `recipe` with config overrides `args`, in
    one process and on 2 gloo ranks under torch.distributed.run (runs in tmp_path/n1, tmp_path/n2)."""
    import subprocess
    import sys
    from pathlib import Path

    worker = str(Path(__file__).parent / "helpers" / "train_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", UMM_TEST_RECIPE=recipe)
    env.pop("UMM_TEST_KILL", None)
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        cmd = [sys.executable, worker] if n == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", worker]
        res = subprocess.run(cmd + args + [f"job.out={out}"], env=env, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
        outs[n] = read_metrics(out)
    return outs


def confetti_picture(seed, size, side, n=24):
    """A picture of small palette-coloured fragments on a grey, what an untrained generator's images look like to
    the checker: n shapes of the world (random kind, colour, box of 4..side px) in distinct cells, so that no two
    touch and no fragment covers more than side * side pixels."""
    import numpy as np

    from umm_ops.data.synthetic import COLORS, KINDS, _template

    g = np.random.default_rng(seed)
    img = np.full((size, size, 3), 128, np.uint8)
    c = side + 3
    cells = [(y, x) for y in range(0, size - c + 1, c) for x in range(0, size - c + 1, c)]
    for j in g.permutation(len(cells))[:n]:
        y, x = cells[j]
        h, w = g.integers(4, side + 1, 2)
        m = _template(KINDS[g.integers(4)], int(w), int(h))
        img[y:y + h, x:x + w][m] = COLORS[list(COLORS)[g.integers(len(COLORS))]]
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()
