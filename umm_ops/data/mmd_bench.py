"""Build MMD-Bench from a clean benchmark: one weighted-random degradation type per image, written at the three
levels (low / mid / high) as JPEG, with a manifest per level recording the type and the intensity (CLEAR).

Input: a JSONL manifest (one record per line with an ``image`` path, relative to the manifest's folder or
absolute, plus any fields: question, options, answer, ...) or an MMBench-style TSV (a header row; an ``image``
column holding base64-encoded image bytes; every other column kept).  Output, for each level L:
``OUT/L/images/<n>.jpg`` and ``OUT/L/manifest.jsonl`` (the record's fields, ``image`` pointing at the degraded
file relative to ``OUT/L``, ``source_image`` the original reference, ``degradation``, ``category``,
``intensity``, ``level``).  The type of record n is drawn from (seed, n) only, so a rebuild is identical and
does not depend on the order of processing.  Manifests are written atomically (temporary file + rename).
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

from ..utils import atomic_write, generator
from .degradations import DEGRADATIONS, LEVELS, degrade, sample_kind

__all__ = ["BadRecord", "BuildReport", "read_manifest", "build"]


class BadRecord(ValueError):
    """A record that cannot be used, named by its position in the input."""


@dataclass
class BuildReport:
    written: int = 0
    skipped: list = field(default_factory=list)  # (record number, reason)
    counts: dict = field(default_factory=dict)   # degradation type -> images


def read_manifest(path: str):
    """Yields (record number, record dict, loader) where loader() returns the PIL image."""
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"mmd-bench: manifest {path!r} does not exist")
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
                        return Image.open(io.BytesIO(base64.b64decode(b64, validate=True))).convert("RGB")
                    except Exception as e:  # binascii.Error, PIL.UnidentifiedImageError, ...
                        raise BadRecord(f"record {n} of {path!r}: undecodable base64 image ({e})") from None

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
                if not os.path.isfile(img_path):
                    raise BadRecord(f"line {n + 1} of {path!r}: image file {img_path!r} does not exist")
                try:
                    with Image.open(img_path) as im:
                        return im.convert("RGB")
                except Exception as e:
                    raise BadRecord(f"line {n + 1} of {path!r}: cannot decode image {img_path!r} ({e})") from None

            yield n, rec, load


def build(manifest: str, out_dir: str, seed: int = 0, levels=("low", "mid", "high"), skip_bad: bool = False,
          quality: int = 95) -> BuildReport:
    """Write the degraded benchmark (see the module docstring).  ``skip_bad`` counts and skips unusable records
    instead of stopping at the first one.  Returns a BuildReport."""
    from PIL import Image

    for lv in levels:
        if lv not in LEVELS:
            raise ValueError(f"unknown level {lv!r}: expected some of {sorted(LEVELS)}")
    report = BuildReport()
    records = {lv: [] for lv in levels}
    for lv in levels:
        os.makedirs(os.path.join(out_dir, lv, "images"), exist_ok=True)
    for n, rec, load in read_manifest(manifest):
        try:
            if isinstance(load, BadRecord):
                raise load
            img = load()
        except BadRecord as e:
            if not skip_bad:
                raise
            report.skipped.append((n, str(e)))
            continue
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None]
        kind = sample_kind(generator(int(seed), n, "mmd-bench-kind"))
        report.counts[kind] = report.counts.get(kind, 0) + 1
        for lv in levels:
            y = degrade(x, kind, LEVELS[lv], seed=seed, index=[n])
            rel = os.path.join("images", f"{n}.jpg")
            Image.fromarray(y[0].permute(1, 2, 0).contiguous().numpy()).save(
                os.path.join(out_dir, lv, rel), format="JPEG", quality=quality)
            out = dict(rec)
            out.update(image=rel, source_image=rec.get("image", f"tsv:{n}"), degradation=kind,
                       category=DEGRADATIONS[kind][0], intensity=LEVELS[lv], level=lv)
            records[lv].append(json.dumps(out, ensure_ascii=False))
        report.written += 1
    for lv in levels:
        text = "".join(line + "\n" for line in records[lv])
        atomic_write(os.path.join(out_dir, lv, "manifest.jsonl"), text.encode("utf-8"))  # UTF-8 whatever the locale
    return report
