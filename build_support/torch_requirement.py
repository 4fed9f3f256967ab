"""scikit-build-core metadata provider (pyproject.toml, [tool.scikit-build.metadata.dependencies]): the package's
run-time dependencies with torch pinned to the release the extension is compiled against.

umm_ops/_C links libtorch's C++ API, which has no stable ABI across torch releases, so a wheel built against
torch 2.13 requires ``torch==2.13.*`` (as flash-attn's wheels do); the torch is the one in the build environment
(the same one CMakeLists.txt compiles against: build with ``--no-build-isolation`` to use the installed torch).
Settings: ``requires``, the other dependencies (a list of requirement strings).
"""
from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version


def torch_requirement(torch_version: str) -> str:
    """'2.13.0+cpu' -> 'torch==2.13.*' (a local label such as +cpu / +cu130 is the same C++ API)."""
    m = re.match(r"(\d+)\.(\d+)", torch_version)
    if not m:
        raise RuntimeError(f"umm_ops build: cannot read a major.minor release from torch's version {torch_version!r}")
    return f"torch=={m.group(1)}.{m.group(2)}.*"


def dynamic_metadata(field: str, settings=None) -> list:
    if field != "dependencies":
        raise RuntimeError(f"build_support.torch_requirement provides 'dependencies', not {field!r}")
    settings = dict(settings or {})
    requires = settings.pop("requires", [])
    if settings or not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise RuntimeError(f"build_support.torch_requirement takes one setting, requires = [requirement strings], "
                           f"got {dict(settings, requires=requires)!r}")
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        raise RuntimeError("umm_ops is compiled against torch, which is not installed in the build environment: "
                           "install torch first and build with --no-build-isolation (or let an isolated build "
                           "install the torch of [build-system] requires)") from None
    return [torch_requirement(torch_version), *requires]
