"""Build MMD-Bench from a clean benchmark: one weighted-random degradation type per image, written at the three
levels (low / mid / high) as JPEG, with a manifest per level recording the type and the intensity (CLEAR).

Input: a JSONL manifest (one record per line with an ``image`` path, relative to the manifest's folder or
absolute, plus any fields: question, options, answer, ...) or an MMBench-style TSV (a header row; an ``image``
column holding base64-encoded image bytes; every other column kept).  Output, for each level L:
``OUT/L/images/<n>.jpg`` and ``OUT/L/manifest.jsonl`` (the record's fields, ``image`` pointing at the degraded
file relative to ``OUT/L``, ``source_image`` the original reference, ``degradation``, ``category``,
``intensity``, ``level``, ``degradation_backend``).  The type of record n is drawn from (seed, n) only, so a rebuild is identical and
does not depend on the order of processing.  The build is written into a new sibling folder and swapped in
when it ends (``utils.atomic_folder``), also when it stops at a bad record (the records finished before it are
kept): ``OUT`` always holds one whole build, never the manifests of one build beside the images of another; a
killed build leaves ``OUT`` as it was (and a ``OUT.tmp-*`` sibling).  An existing ``OUT`` is replaced only when
it holds nothing but a previous build (level folders with their manifest and images); anything else there is
refused, so nothing else the user keeps in it is lost.

Images whose header declares more than ``max_pixels`` pixels (default ``MAX_PIXELS``, 64 MP: 192 MB decoded,
several times that while degrading) are bad records: they are refused before decoding, so a small file that
declares a huge picture cannot exhaust memory.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from ..utils import atomic_folder, atomic_write, generator, not_a_file, optional_import
from .degradations import DEGRADATIONS, LEVELS, degrade, resolve_backend, sample_kind
from .degradations_cv import degrade_images

__all__ = ["BadRecord", "BuildReport", "MAX_PIXELS", "read_manifest", "build"]

MAX_PIXELS = 64_000_000  # default limit on an input image's decoded pixels (width x height)


class BadRecord(ValueError):
    """A record that cannot be used, named by its position in the input."""


@dataclass
class BuildReport:
    written: int = 0
    skipped: list = field(default_factory=list)  # (record number, reason)
    counts: dict = field(default_factory=dict)   # degradation type -> images
    backend: str = ""                            # "opencv" (CLEAR's exact operations) or "torch"


def _open_rgb(src, where: str, what: str, max_pixels: int):
    """A path or file object -> RGB PIL image, decoded only if its header declares at most max_pixels pixels."""
    import warnings

    Image = optional_import("PIL", "Image")

    try:
        with warnings.catch_warnings():  # PIL's bomb warning (> 89 MP): the limit below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(src)
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise BadRecord(f"{where}: {what} declares {w}x{h} = {w * h:,} pixels, above the limit of "
                                f"{max_pixels:,} decoded pixels (max_pixels / --max-pixels)")
            return im.convert("RGB")
    except BadRecord:
        raise
    except Image.DecompressionBombError as e:  # PIL refuses > 2 x its MAX_IMAGE_PIXELS whatever max_pixels says
        raise BadRecord(f"{where}: {what} is too large to decode ({e})") from None
    except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated), MemoryError, OSError (truncated), MemoryError
        raise BadRecord(f"{where}: cannot decode {what} ({type(e).__name__}: {e})") from None


def read_manifest(path: str, max_pixels: int = MAX_PIXELS):
    """Yields (record number, record dict, loader) where loader() returns the PIL image (BadRecord for an image
    that cannot be decoded or declares more than max_pixels pixels)."""
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ValueError(f"mmd-bench: max_pixels must be a positive integer, got {max_pixels!r}")
    why = not_a_file(path)
    if why:
        raise FileNotFoundError(f"mmd-bench: manifest {path!r} {why}")
    return _records(path, max_pixels)  # checked above, now: a generator would check only when first iterated


def _records(path: str, max_pixels: int):
    base = os.path.dirname(os.path.abspath(path))
    if path.endswith(".tsv"):
        csv.field_size_limit(sys.maxsize)
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if reader.fieldnames is None or "image" not in reader.fieldnames:
                raise BadRecord(f"mmd-bench: {path!r} must be a TSV with a header that has an 'image' column "
                                f"(base64 image bytes), got columns {reader.fieldnames}")
            for n, row in enumerate(reader):
                b64 = row.pop("image") or ""

                def load(b64=b64, n=n):
                    try:
                        data = base64.b64decode(b64, validate=True)
                    except Exception as e:  # binascii.Error
                        raise BadRecord(f"record {n} of {path!r}: undecodable base64 image ({e})") from None
                    return _open_rgb(io.BytesIO(data), f"record {n} of {path!r}", "base64 image", max_pixels)

                row.setdefault("index", str(n))
                yield n, row, load
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, None, BadRecord(f"line {n + 1} of {path!r}: bad JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                yield n, None, BadRecord(f"line {n + 1} of {path!r}: expected an object with an 'image' path, got "
                                         f"{line.strip()[:80]!r}")
                continue
            img_path = rec["image"] if os.path.isabs(rec["image"]) else os.path.join(base, rec["image"])

            def load(img_path=img_path, n=n):
                why = not_a_file(img_path)
                if why:
                    raise BadRecord(f"line {n + 1} of {path!r}: image file {img_path!r} {why}")
                return _open_rgb(img_path, f"line {n + 1} of {path!r}", f"image {img_path!r}", max_pixels)

            yield n, rec, load


def build(manifest: str, out_dir: str, seed: int = 0, levels=("low", "mid", "high"), skip_bad: bool = False,
          quality: int = 95, max_pixels: int = MAX_PIXELS, backend: str = "auto") -> BuildReport:
    """Write the degraded benchmark (see the module docstring).  ``skip_bad`` counts and skips unusable records
    instead of stopping at the first one (without it, BadRecord is raised after the manifests of the records
    finished so far are written; its ``report`` attribute says how many).  ``backend``: "auto" (default) degrades
    with CLEAR's own OpenCV operations (umm_ops.data.degradations_cv, the exact path) when OpenCV is installed
    and with the batched torch approximation otherwise; "opencv" requires OpenCV; "torch" forces the
    approximation.  Each record names the backend that made it (``degradation_backend``).  Returns a
    BuildReport (its ``backend`` says which one ran)."""
    Image = optional_import("PIL", "Image")

    backend = resolve_backend(backend)
    if backend == "opencv":
        optional_import("cv2")  # asked for explicitly and missing: the error names the extra, before any work

    for lv in levels:
        if lv not in LEVELS:
            raise ValueError(f"unknown level {lv!r}: expected some of {sorted(LEVELS)}")
    manifests = read_manifest(manifest, max_pixels)
    why = _not_a_build(out_dir)
    if why:
        raise ValueError(f"{out_dir!r} {why}; give a new folder (or empty this one): a build "
                         f"replaces its folder as a whole")
    stopped = None
    with atomic_folder(out_dir) as tmp:
        try:
            report = _build_into(manifests, tmp, seed, levels, skip_bad, quality, Image, backend)
        except BaseException as e:      # the finished records are swapped in; then the error goes on
            stopped = e
    if stopped is not None:
        raise stopped
    return report


def _not_a_build(folder) -> str | None:
    """None when `folder` is absent, empty or holds only a previous build; else why it may not be replaced."""
    if not os.path.exists(folder):
        return None
    if not os.path.isdir(folder):
        return "is a file, not a folder"
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name not in LEVELS or not os.path.isdir(path):
            return f"holds {name!r}, which is not part of an MMD-Bench build"
        extra = set(os.listdir(path)) - {"manifest.jsonl", "images"}
        if extra:
            return f"holds {os.path.join(name, sorted(extra)[0])!r}, which is not part of an MMD-Bench build"
    return None


def _degrade_hwc(arr: np.ndarray, kind: str, intensity: float, seed: int, n: int, backend: str) -> np.ndarray:
    """Record n's (H, W, 3) uint8 RGB picture degraded by `backend`, as (H, W, 3) uint8 RGB."""
    if backend == "opencv":  # numpy in, numpy out: no layout changes
        return degrade_images(arr, kind, intensity, seed=seed, index=[n])
    x = torch.from_numpy(arr).permute(2, 0, 1)[None]
    return degrade(x, kind, intensity, seed=seed, index=[n], backend=backend)[0].permute(1, 2, 0).contiguous().numpy()


def _build_into(manifests, out_dir, seed, levels, skip_bad, quality, Image, backend) -> BuildReport:
    report = BuildReport(backend=backend)
    records = {lv: [] for lv in levels}
    for lv in levels:
        os.makedirs(os.path.join(out_dir, lv, "images"), exist_ok=True)
    try:
        for n, rec, load in manifests:
            try:
                if isinstance(load, BadRecord):
                    raise load
                img = load()
            except BadRecord as e:
                if not skip_bad:
                    e.report = report
                    raise
                report.skipped.append((n, str(e)))
                continue
            arr = np.asarray(img).copy()              # (H, W, 3) uint8 RGB
            del img
            kind = sample_kind(generator(int(seed), n, "mmd-bench-kind"))
            lines = []
            for lv in levels:
                y = _degrade_hwc(arr, kind, LEVELS[lv], seed, n, backend)
                rel = os.path.join("images", f"{n}.jpg")
                Image.fromarray(y).save(
                    os.path.join(out_dir, lv, rel), format="JPEG", quality=quality)
                out = dict(rec)
                out.update(image=rel, source_image=rec.get("image", f"tsv:{n}"), degradation=kind,
                           category=DEGRADATIONS[kind][0], intensity=LEVELS[lv], level=lv,
                           degradation_backend=backend)
                lines.append(json.dumps(out, ensure_ascii=False))
            for lv, line in zip(levels, lines):  # a record counts once all its levels are written
                records[lv].append(line)
            report.counts[kind] = report.counts.get(kind, 0) + 1
            report.written += 1
    finally:  # the finished records are kept whatever stopped the build
        for lv in levels:
            text = "".join(line + "\n" for line in records[lv])
            atomic_write(os.path.join(out_dir, lv, "manifest.jsonl"), text.encode("utf-8"))  # UTF-8 always
    return report
