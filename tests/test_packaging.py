"""The package metadata matches the code: every import outside the standard library, torch and numpy is an optional
dependency declared in one of pyproject.toml's extras and goes through utils.optional_import, whose error names
the extra; the torch pin and the build record; the extension refuses another torch with a clear error."""
import ast
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import umm_ops
from umm_ops import _lib
from umm_ops.utils import OPTIONAL_DEPENDENCIES, MissingDependencyError, optional_import

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PKG = os.path.join(ROOT, "umm_ops")
CORE = {"torch", "numpy"}
# optional imports that may stay plain import statements: the Triton kernels (umm_ops.triton's __init__ refuses to
# import them without triton, through optional_import), and, inside a try / except, the backend report's triton
# version probe and rich's progress bar (the reporter prints plain lines without it)
PLAIN_OK = {"triton": ("umm_ops/triton/", "umm_ops/backend.py"), "rich": ("umm_ops/train/engine/metrics.py",)}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _extras():
    """{extra: set of normalised distribution names it installs, self-references (umm-ops[a,b]) expanded}."""
    raw = _pyproject()["project"]["optional-dependencies"]

    def expand(extra, seen=()):
        out = set()
        for req in raw[extra]:
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[([^\]]*)\])?", req)
            name = _norm(m.group(1))
            if name == "umm-ops":
                for sub in m.group(3).split(","):
                    sub = sub.strip()
                    assert sub in raw, f"extra {extra!r} refers to umm-ops[{sub}], which is not an extra"
                    assert sub not in seen, f"extras refer to each other in a cycle: {seen + (extra, sub)}"
                    out |= expand(sub, seen + (extra,))
            else:
                out.add(name)
        return out

    return {e: expand(e) for e in raw}


def _imports(path):
    """(line, top-level module, inside a try that catches ImportError) of every absolute import in a file."""
    tree = ast.parse(open(path).read(), path)
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is not None and any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError",
                                                                               "Exception")
                                           for n in ast.walk(h.type)) for h in node.handlers):
            for sub in node.body:
                guarded |= {id(n) for n in ast.walk(sub)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")[0], id(node) in guarded
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module.split(".")[0], id(node) in guarded


def _optional_import_calls(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "optional_import"
                and node.args and isinstance(node.args[0], ast.Constant)):
            yield node.lineno, node.args[0].value


def _package_files():
    for dirpath, _, files in os.walk(PKG):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(dirpath, f)


def test_extras_declare_every_optional_dependency():
    extras = _extras()
    for root, (dist, extra) in OPTIONAL_DEPENDENCIES.items():
        assert extra in extras, f"OPTIONAL_DEPENDENCIES[{root!r}] names extra {extra!r}, not in pyproject.toml"
        assert _norm(dist) in extras[extra], f"pyproject.toml's extra {extra!r} does not install {dist!r} ({root})"
        assert _norm(dist) in extras["all"], f"umm_ops[all] does not install {dist!r}"
    # the test extra installs what the suite needs: everything
    assert extras["all"] <= extras["test"], extras["all"] - extras["test"]
    deps = _pyproject()["tool"]["scikit-build"]["metadata"]["dependencies"]["requires"]
    assert {_norm(re.split(r"[<>=!~; ]", d)[0]) for d in deps} == {"numpy"}, deps


def test_package_imports_only_declared_dependencies():
    """Any import outside the standard library, torch and numpy is a declared optional dependency, imported
    through optional_import (so that its absence names the extra), except the few plain ones of PLAIN_OK."""
    bad = []
    seen = set()
    for path in _package_files():
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        for line, root, guarded in _imports(path):
            if root in sys.stdlib_module_names or root in CORE or root == "umm_ops" or root == "__future__":
                continue
            seen.add(root)
            if root not in OPTIONAL_DEPENDENCIES:
                bad.append(f"{rel}:{line} imports {root!r}, which is neither core nor in OPTIONAL_DEPENDENCIES")
            elif not (rel.startswith(PLAIN_OK.get(root, ("\0",))) and (guarded or rel.startswith("umm_ops/triton/"))):
                bad.append(f"{rel}:{line} imports {root!r} with a plain import: use utils.optional_import")
        for line, module in _optional_import_calls(path):
            root = module.split(".")[0]
            seen.add(root)
            if root not in OPTIONAL_DEPENDENCIES and module != "torch.utils.tensorboard":
                bad.append(f"{rel}:{line} optional_import({module!r}): not an optional dependency")
    assert not bad, "\n".join(bad)
    # the scan sees the imports it is about (a broken scan would pass everything)
    assert {"diffusers", "safetensors", "PIL", "transformers", "triton"} <= seen, seen


def test_scan_catches_a_plain_optional_import(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("def f():\n    from diffusers import X\n    try:\n        import rich\n    except ImportError:\n"
                 "        pass\n")
    assert list(_imports(p)) == [(2, "diffusers", False), (4, "rich", True)]


@pytest.mark.parametrize("blocked, call, extra", [
    ("diffusers", "CheersModel", "model"),
    ("PIL", "SyntheticWorld", "data"),
    ("safetensors", "load_safetensors", "model"),
    ("tensorboard", "Reporter", "tensorboard"),
    ("transformers", "HFTokenizer", "model"),
])
def test_missing_optional_dependency_names_the_extra(blocked, call, extra, monkeypatch, tmp_path):
    for name in list(sys.modules):
        if name == blocked or name.startswith(blocked + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)   # `import blocked` now raises ModuleNotFoundError
    with pytest.raises(MissingDependencyError) as e:
        if call == "CheersModel":
            from umm_ops.model import CheersModel

            CheersModel("tiny")
        elif call == "SyntheticWorld":
            from umm_ops.data import SyntheticWorld

            SyntheticWorld(size=64, seed=123)[0]
        elif call == "load_safetensors":
            from umm_ops.model.hf import load_safetensors

            (tmp_path / "model.safetensors").write_bytes(b"")
            load_safetensors(tmp_path)
        elif call == "Reporter":
            from umm_ops.train.engine.metrics import Reporter

            Reporter(tmp_path, True, 10, 0, progress=False, tensorboard=True)
        else:
            from umm_ops.data.tokenizer import HFTokenizer

            HFTokenizer(tmp_path)
    msg = str(e.value)
    assert f"pip install 'umm_ops[{extra}]'" in msg, msg
    assert repr(OPTIONAL_DEPENDENCIES[blocked][0]) in msg and "not installed" in msg, msg
    assert isinstance(e.value, ImportError)


def test_cli_names_the_missing_extra(monkeypatch, tmp_path, capsys):
    from umm_ops.cli import main

    monkeypatch.setitem(sys.modules, "PIL", None)
    assert main(["mmd-bench", "preview", "--out", str(tmp_path / "p.png"), "--size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("umm mmd-bench: ") and "pip install 'umm_ops[data]'" in err, err
    assert not (tmp_path / "p.png").exists()


def test_optional_import_version_and_passthrough(monkeypatch):
    assert optional_import("PIL", "Image") is sys.modules["PIL.Image"]   # `from PIL import Image` (a submodule)
    with pytest.raises(MissingDependencyError, match=r"diffusers\.NoSuchModel.*diffusers \d.*pip install -U "
                                                     r"'umm_ops\[model\]'"):
        optional_import("diffusers", "NoSuchModel")
    with pytest.raises(MissingDependencyError, match=r"no module 'diffusers\.no_such_module'.*pip install -U"):
        optional_import("diffusers.no_such_module")
    # a missing module that is not an optional dependency of umm_ops propagates unchanged
    with pytest.raises(ModuleNotFoundError) as e:
        optional_import("no_such_package_umm")
    assert type(e.value) is ModuleNotFoundError


def test_installed_metadata_requires_the_build_torch_and_the_extras():
    from importlib.metadata import metadata

    md = metadata("umm-ops")
    reqs = md.get_all("Requires-Dist")
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    assert f"torch=={major}.{minor}.*" in reqs, reqs
    assert "numpy" in reqs, reqs
    assert set(md.get_all("Provides-Extra")) >= {"model", "data", "train", "eval", "tensorboard", "triton", "all",
                                                 "test", "bench"}


def test_torch_requirement_provider():
    spec = importlib.util.spec_from_file_location("torch_requirement",
                                                  os.path.join(ROOT, "build_support", "torch_requirement.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.torch_requirement("2.13.0+cpu") == "torch==2.13.*"
    assert mod.torch_requirement("2.14.1+cu130") == "torch==2.14.*"
    assert mod.torch_requirement("3.0.0a0+git1234") == "torch==3.0.*"
    with pytest.raises(RuntimeError, match="major.minor"):
        mod.torch_requirement("nightly")
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    assert mod.dynamic_metadata("dependencies", {"requires": ["numpy"]}) == [f"torch=={major}.{minor}.*", "numpy"]
    with pytest.raises(RuntimeError, match="requires"):
        mod.dynamic_metadata("dependencies", {"require": ["numpy"]})


def test_torch_mismatch_message():
    assert _lib.torch_mismatch("2.13.0+cpu", "2.13.1+cu130") is None      # same release: same C++ API
    assert _lib.torch_mismatch("2.13.0", "2.13.0", 1, True) is None
    msg = _lib.torch_mismatch("2.13.0+cpu", "2.14.1")
    assert "compiled against torch 2.13.0+cpu" in msg and "torch 2.14.1 is running" in msg, msg
    assert "torch==2.13.*" in msg and "pip install --no-build-isolation" in msg and "rebuild" in msg, msg
    msg = _lib.torch_mismatch("2.13.0", "2.13.0", 0, 1)
    assert "_GLIBCXX_USE_CXX11_ABI=1" in msg and "(the build used 0)" in msg, msg


_PROBE = r"""
import json, sys, warnings
import torch
if sys.argv[1] != "same":
    torch.__version__ = sys.argv[1]
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import umm_ops
from umm_ops import _lib
out = {"loaded": _lib.loaded(), "error": _lib.load_error(), "C_imported": "umm_ops._C" in sys.modules,
       "warnings": [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]}
x = torch.randn(2, 3, 8)
sh, sc = torch.randn(2, 8), torch.randn(2, 8)
ref = umm_ops.adaln_modulate(x.double(), sh.double(), sc.double()).float()
out["auto_ok"] = bool(torch.allclose(umm_ops.adaln_modulate(x, sh, sc), ref, atol=1e-5))
try:
    with umm_ops.use_backend("cpu"):
        umm_ops.adaln_modulate(x, sh, sc)
    out["forced"] = "ran"
except umm_ops.BackendUnavailableError as e:
    out["forced"] = str(e)
print(json.dumps(out))
"""


def _probe(version, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("UMM_OPS_BACKEND", "PYTHONWARNINGS")}
    r = subprocess.run([sys.executable, "-c", _PROBE, version], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _lib.loaded(), reason="needs the compiled extension")
def test_extension_under_another_torch_is_a_clear_error(tmp_path):
    from umm_ops import _torch_build

    assert _torch_build.TORCH_VERSION == torch.__version__ == _lib.build_info()["torch"]
    same = _probe("same", tmp_path)
    assert same["loaded"] and same["C_imported"] and same["forced"] == "ran" and not same["warnings"], same
    other = _probe("2.99.0", tmp_path)
    assert not other["loaded"] and not other["C_imported"], other   # never loaded: no symbol-lookup crash
    msg = other["error"]
    assert f"compiled against torch {torch.__version__}" in msg and "torch 2.99.0 is running" in msg, msg
    assert "--no-build-isolation" in msg, msg
    assert other["warnings"] == [msg], other
    assert other["auto_ok"], other                                   # the ops still run (reference backend)
    assert "did not load" in other["forced"] and "torch 2.99.0" in other["forced"], other
    # a patch release of the same torch loads (torch's C++ API is kept within a release)
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    assert _probe(f"{major}.{minor}.99", tmp_path)["loaded"]


def test_umm_ops_import_pulls_in_no_optional_dependency():
    code = ("import sys, umm_ops, umm_ops.model, umm_ops.data, umm_ops.eval, umm_ops.train\n"
            "from umm_ops.utils import OPTIONAL_DEPENDENCIES as O\n"
            "print(sorted(m for m in O if m in sys.modules and m != 'triton'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # importing the packages is cheap and works without the extras; the parts import their dependencies on use
    assert r.stdout.strip() == "[]", r.stdout
