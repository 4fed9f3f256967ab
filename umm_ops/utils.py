"""The project's one seeding helper, one atomic-write helper and one optional-import helper.

Seeding: every random draw of the project (scenes of the synthetic world, degradations, data order, timesteps,
flow noise, CFG dropout, rollouts) is seeded from a tuple of parts, typically ``(run seed, step, sample id,
purpose)``, through :func:`seed_of`; :func:`generator` wraps it in a ``torch.Generator``.  The value is a 63-bit
int from BLAKE2b of the parts joined by ``":"`` (their ``str``), so it is stable across processes, machines and
Python versions, and never depends on Python's salted ``hash``.

Atomic writes: :func:`atomic_write` writes a file under a temporary sibling name, fsyncs it and renames it into
place (a reader sees the old file or the new one, never a half-written one); :func:`atomic_folder` does the same
for a folder assembled under a temporary name.

Optional dependencies: the core (the ops) needs torch and numpy only; the model, data, training and Triton code
import their packages through :func:`optional_import`, whose error names the extra of ``pip install umm_ops[...]``
that installs the missing package (:data:`OPTIONAL_DEPENDENCIES`, the same extras as pyproject.toml's).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["ASSETS", "resolve_shipped_weights", "seed_of", "generator", "atomic_write", "atomic_folder", "fsync_tree",
           "OPTIONAL_DEPENDENCIES", "MissingDependencyError", "optional_import"]

_MASK63 = (1 << 63) - 1


ASSETS = Path(__file__).resolve().parent / "assets"   # shipped in the package: trained VAE, world tokenizer


def resolve_shipped_weights(weights, what: str) -> Path:
    """A weights setting -> its safetensors file: the name of a file shipped in umm_ops/assets (``"tiny-world-vae"``,
    with or without ``.safetensors``) or a path.  `what` names the setting in errors (``"VAEConfig.weights"``)."""
    if not isinstance(weights, (str, os.PathLike)) or not os.fspath(weights):
        raise TypeError(f"{what} must be a shipped weights name or a .safetensors path, got {weights!r}")
    w = os.fspath(weights)
    name = w if w.endswith(".safetensors") else w + ".safetensors"
    if os.sep not in w and "/" not in w and (ASSETS / name).is_file():
        return ASSETS / name
    if Path(w).is_file():
        return Path(w)
    shipped = sorted(p.stem for p in ASSETS.glob("*.safetensors"))
    raise FileNotFoundError(f"{what} = {w!r}: neither a file nor shipped weights (shipped: {shipped})")


def seed_of(*parts) -> int:
    """A 63-bit seed from ints / strings / floats (their ``str`` joined by ':'), e.g. ``seed_of(seed, step, "noise")``."""
    for p in parts:
        if not isinstance(p, (int, str, float)):
            raise TypeError(f"seed_of: parts must be int, str or float, got {type(p).__name__} ({p!r})")
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & _MASK63


def generator(*parts, device="cpu"):
    """A ``torch.Generator`` on `device` seeded by ``seed_of(*parts)``."""
    import torch

    return torch.Generator(device=device).manual_seed(seed_of(*parts))


def _fsync_dir(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def not_a_file(path) -> str | None:
    """None when `path` is an existing regular file, else why not, for an error message: "does not exist" or
    "is a folder, not a file"."""
    if os.path.isfile(path):
        return None
    return "is a folder, not a file" if os.path.isdir(path) else "does not exist"


def atomic_write(path, data=None, *, write=None, suffix: str = "", fsync: bool = True) -> str:
    """Write a file atomically: `data` (str or bytes), or ``write(tmp_path)`` for writers that take a path
    (``torch.save``, ``safetensors.save_file``, ``PIL.Image.save``, matplotlib's ``savefig``).

    The temporary file sits beside `path` (same file system, so the rename is atomic) and ends in `suffix` (for
    writers that pick a format from the extension, e.g. ``".png"``).  Returns `path`."""
    if (data is None) == (write is None):
        raise TypeError("atomic_write: give exactly one of data= or write=")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"atomic_write: {path!r} is a folder; expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", suffix=suffix, dir=parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp's 0600 -> what open() would have given
        if data is not None:
            with os.fdopen(fd, "wb" if isinstance(data, (bytes, bytearray)) else "w") as f:
                f.write(data)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
        else:
            os.close(fd)
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())   # a writer may have replaced the file (safetensors writes 0600)
            if fsync:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_tree(folder) -> None:
    """fsync every file and folder below `folder` (before renaming it into place)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


@contextlib.contextmanager
def atomic_folder(folder, *, fsync: bool = True):
    """``with atomic_folder(path) as tmp:`` fill `tmp`; on a clean exit it replaces `path` (an existing folder is
    set aside first and removed after), on an exception it is removed and `path` is untouched.  A crash leaves at
    most a ``<name>.tmp-*`` / ``<name>.old-*`` sibling, never a half-written `path`."""
    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp's 0700 -> what mkdir would have given
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".old-", dir=parent)
            os.replace(folder, os.path.join(old, "x"))
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        if fsync:
            _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- optional dependencies
# top-level import name -> (its distribution on PyPI, the extra of umm_ops that installs it).  pyproject.toml's
# [project.optional-dependencies] lists the same (tests/test_packaging.py checks that both agree, and that the
# package imports nothing else outside the standard library, torch and numpy).
OPTIONAL_DEPENDENCIES = {
    "safetensors": ("safetensors", "model"),
    "transformers": ("transformers", "model"),
    "tokenizers": ("tokenizers", "model"),
    "diffusers": ("diffusers", "model"),
    "PIL": ("pillow", "data"),
    "cv2": ("opencv-python-headless", "data"),
    "rich": ("rich", "train"),
    "matplotlib": ("matplotlib", "train"),
    "tomli": ("tomli", "train"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "triton": ("triton", "triton"),
}


class MissingDependencyError(ModuleNotFoundError):
    """An optional dependency of umm_ops is not installed (or too old); the message names the extra to install."""


def _requirement(dist: str, extra: str) -> str | None:
    """The requirement umm_ops' installed metadata gives `dist` in `extra` (e.g. "diffusers>=0.42"), or None when
    umm_ops is not installed (a source tree on sys.path) or does not name it."""
    try:
        from importlib.metadata import PackageNotFoundError, requires

        reqs = requires("umm-ops") or []
    except (ImportError, PackageNotFoundError):
        return None
    norm = re.sub(r"[-_.]+", "-", dist).lower()
    for r in reqs:
        spec, _, marker = r.partition(";")
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        if m and re.sub(r"[-_.]+", "-", m.group(1)).lower() == norm and re.search(
                rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]", marker):
            return spec.strip().replace(" ", "")
    return None


def _install_hint(root: str, upgrade: bool = False) -> str:
    dist, extra = OPTIONAL_DEPENDENCIES[root]
    req = _requirement(dist, extra) or dist
    pip = "pip install -U" if upgrade else "pip install"
    return f"{pip} 'umm_ops[{extra}]' (or {pip} '{req}')"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def _have(root: str) -> str:
    """'diffusers 0.42.1': the installed distribution of an optional dependency, for an error message."""
    dist = OPTIONAL_DEPENDENCIES[root][0]
    try:
        from importlib.metadata import version

        return f"{dist} {version(dist)}"
    except Exception:
        return dist


def optional_import(module: str, *names: str):
    """Import an optional dependency: ``optional_import("diffusers", "AutoencoderKLFlux2")`` is ``from diffusers
    import AutoencoderKLFlux2`` (several names give a tuple; no name gives the module).

    When the package (or a package it needs that is one of :data:`OPTIONAL_DEPENDENCIES`) is not installed it raises
    :class:`MissingDependencyError` naming who needed it, what is missing and the ``pip install umm_ops[extra]``
    that installs it; a name the installed version lacks raises it too, with the required version.  Any other
    import error propagates unchanged."""
    who = sys._getframe(1).f_globals.get("__name__", "umm_ops")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        root = (e.name or "").partition(".")[0]
        if root not in OPTIONAL_DEPENDENCIES:
            raise
        if e.name != root and _importable(root):   # the package is there, a module of it is not: another version
            raise MissingDependencyError(f"{who} needs {module}, but the installed {_have(root)} has no module "
                                         f"{e.name!r} (too old?): {_install_hint(root, upgrade=True)}",
                                         name=e.name) from e
        raise MissingDependencyError(f"{who} needs the {OPTIONAL_DEPENDENCIES[root][0]!r} package, which is not "
                                     f"installed: {_install_hint(root)}", name=e.name) from e
    out = []
    for n in names:
        try:
            out.append(getattr(mod, n))
            continue
        except AttributeError:
            pass
        try:   # `from package import submodule`
            out.append(importlib.import_module(f"{module}.{n}"))
        except ModuleNotFoundError as e:
            if e.name != f"{module}.{n}":
                raise
            root = module.partition(".")[0]
            if root not in OPTIONAL_DEPENDENCIES:
                raise ImportError(f"{who}: cannot import {n!r} from {module!r}") from None
            raise MissingDependencyError(f"{who} needs {module}.{n}, which the installed {_have(root)} does not "
                                         f"have (too old?): {_install_hint(root, upgrade=True)}",
                                         name=f"{module}.{n}") from None
    if not names:
        return mod
    return out[0] if len(out) == 1 else tuple(out)
