"""The project's one seeding helper and one atomic-write helper.

Seeding: every random draw of the project (scenes of the synthetic world, degradations, data order, timesteps,
flow noise, CFG dropout, rollouts) is seeded from a tuple of parts, typically ``(run seed, step, sample id,
purpose)``, through :func:`seed_of`; :func:`generator` wraps it in a ``torch.Generator``.  The value is a 63-bit
int from BLAKE2b of the parts joined by ``":"`` (their ``str``), so it is stable across processes, machines and
Python versions, and never depends on Python's salted ``hash``.

Atomic writes: :func:`atomic_write` writes a file under a temporary sibling name, fsyncs it and renames it into
place (a reader sees the old file or the new one, never a half-written one); :func:`atomic_folder` does the same
for a folder assembled under a temporary name.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["ASSETS", "seed_of", "generator", "atomic_write", "atomic_folder", "fsync_tree"]

_MASK63 = (1 << 63) - 1


ASSETS = Path(__file__).resolve().parent / "assets"   # shipped in the package: trained VAE, world tokenizer


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
