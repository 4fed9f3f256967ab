"""The wheel as users install it: scripts/build_wheel.sh builds it (reusing setup's build folder, so only what
changed is compiled), then it is installed with pip into fresh venvs that hold nothing but the distributions its
metadata requires - for `umm_ops` alone (torch, numpy and what they need) and for `umm_ops[all]` - and
tests/helpers/wheel_smoke.py runs there with `python -I` (no source tree, no PYTHONPATH): every op family on the
compiled kernels against the reference, and the tiny model's training step.

The fresh venvs borrow the dev venv's installed distributions as symlinks (nothing is downloaded), one
distribution at a time, only those in the requirement closure of the wheel's metadata: an import the metadata
does not declare fails there.  Cost: ~1-2 minutes (UMM_SKIP_WHEEL_TEST=1 skips it).
"""
import os
import re
import subprocess
import sys
import sysconfig
import time
import zipfile
from importlib.metadata import PackageNotFoundError, distribution

import pytest
import torch

from umm_ops import _lib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SMOKE = os.path.join(ROOT, "tests", "helpers", "wheel_smoke.py")

pytestmark = [
    pytest.mark.skipif(os.environ.get("UMM_SKIP_WHEEL_TEST") == "1", reason="UMM_SKIP_WHEEL_TEST=1"),
    pytest.mark.skipif(not _lib.loaded(), reason="needs the compiled extension (scripts/setup.sh builds it)"),
]

packaging = pytest.importorskip("packaging.requirements")
from packaging.markers import default_environment  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402


def _run(cmd, timeout, **kw):
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{out[-6000:]}"
    return out, time.time() - t0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHON=sys.executable)
    log, dt = _run(["bash", os.path.join(ROOT, "scripts", "build_wheel.sh"), str(out_dir)], timeout=1800, env=env)
    print(log)
    print(f"[test_wheel] scripts/build_wheel.sh took {dt:.0f} s")
    wheels = sorted(out_dir.glob("umm_ops-*.whl"))
    assert len(wheels) == 1, (wheels, log)
    return wheels[0]


def _metadata(whl):
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


def test_wheel_contents_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        record = z.read("umm_ops/_torch_build.py").decode()
    assert any(re.fullmatch(r"umm_ops/_C\..*\.so", n) for n in names), names
    assert f'TORCH_VERSION = "{torch.__version__}"' in record, record
    assert "umm_ops/assets/" in "\n".join(names)     # the tiny preset's VAE weights and tokenizer ship
    assert not [n for n in names if n.startswith(("tests/", "csrc/", "build/", "bench/"))]
    md = _metadata(wheel)
    reqs = [l.split(":", 1)[1].strip() for l in md.splitlines() if l.startswith("Requires-Dist:")]
    base = sorted(r for r in reqs if "extra ==" not in r)
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    assert base == ["numpy", f"torch=={major}.{minor}.*"], base
    extras = {l.split(":", 1)[1].strip() for l in md.splitlines() if l.startswith("Provides-Extra:")}
    assert {"model", "data", "train", "eval", "tensorboard", "triton", "all"} <= extras, extras
    size = os.path.getsize(wheel)
    print(f"[test_wheel] {wheel.name}: {size / 2**20:.1f} MiB")
    # the extension keeps its symbol table (install.strip = false) and holds two CPU variants (and CUDA here when
    # nvcc exists): a wheel far outside this range has lost or gained something
    assert 1 * 2**20 < size < 200 * 2**20, size


def _closure(requirements, extras=()):
    """The installed distributions (of this venv) needed by umm-ops[extras] whose metadata says `requirements`
    (Requires-Dist strings with markers), recursively."""
    env = default_environment()
    todo = [(Requirement(r), extra) for r in requirements for extra in ("", *extras)]
    dists, seen = {}, set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate(dict(env, extra=extra)):
            continue
        name = canonicalize_name(req.name)
        if name == "umm-ops":   # a self-reference of an extra: umm-ops[model,data]
            todo += [(Requirement(r), e) for r in requirements for e in req.extras]
            continue
        key = (name, tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            d = distribution(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req} is required by the wheel's metadata but not installed in the dev venv")
        assert d.version in req.specifier or req.specifier.contains(d.version, prereleases=True), (str(req), d.version)
        dists[name] = d
        todo += [(Requirement(r), e) for r in (d.requires or []) for e in ("", *req.extras)]
    return dists


def _fresh_venv(path, dists):
    """A venv (no pip) whose site-packages links the top-level files of exactly `dists` from this venv's."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], timeout=120)
    py = path / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = os.path.realpath(sysconfig.get_paths()["purelib"])
    linked = set()
    for d in dists.values():
        base = os.path.realpath(str(d.locate_file("")))
        for f in d.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or top in linked or top.endswith(".pth"):
                continue
            src = os.path.join(base, top)
            if os.path.realpath(base) != ours or not os.path.exists(src):
                continue
            os.symlink(src, os.path.join(purelib, top))
            linked.add(top)
    return py


@pytest.mark.parametrize("extra", ["core", "all"])
def test_wheel_installs_into_a_fresh_venv_and_runs(wheel, extra, tmp_path):
    md = _metadata(wheel)
    requires = [l.split(":", 1)[1].strip() for l in md.splitlines() if l.startswith("Requires-Dist:")]
    dists = _closure(requires, () if extra == "core" else ("all",))
    names = set(dists)
    if extra == "core":
        assert not names & {"diffusers", "transformers", "safetensors", "pillow", "triton"}, names
    else:
        assert {"diffusers", "transformers", "safetensors", "pillow", "tensorboard", "triton"} <= names, names
    py = _fresh_venv(tmp_path / "venv", dists)
    target = str(wheel) + ("[all]" if extra == "all" else "")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "UMM_OPS"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # --no-index: every requirement must already be satisfied by the linked distributions (nothing is downloaded)
    log, dt = _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", "--no-cache-dir",
                    "--no-compile", target], timeout=600, env=env, cwd=tmp_path)
    print(f"[test_wheel] pip install {os.path.basename(target)} into a fresh venv ({len(dists)} distributions "
          f"linked): {dt:.0f} s")
    assert "Successfully installed umm-ops" in log, log[-3000:]
    if extra == "core":
        # pip checks the metadata against what is linked: the model extra's packages are not there
        r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", "--no-cache-dir",
                            str(wheel) + "[model]"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert r.returncode != 0 and "safetensors" in r.stdout + r.stderr, r.stdout + r.stderr
    out, dt = _run([str(py), "-I", SMOKE, extra], timeout=900, env=env, cwd=tmp_path)
    print(out)
    print(f"[test_wheel] smoke test ({extra}): {dt:.0f} s")
    assert f"[smoke] {extra}: ok" in out
