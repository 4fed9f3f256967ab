"""The synthetic world's pixel checker: a GenEval-like evaluation and reward oracle.

    check(record.prompt, any_image)                        # {"score", "correct", "details"}
    check(record.prompt, model_output, value_range=(-1, 1))
    find_objects(any_image)                                # [{"color", "kind", "iou", "bbox", "center", "area"}]

It scores ANY image against a prompt spec of umm_ops.data.synthetic (counts, colours, shapes, one relation) from
its pixels alone: per palette colour, the connected components of the pixels that have that colour, each matched
against the shapes rendered into its bounding box.  It relies on the world's guarantees (objects never touch,
palette colours far apart and far from the background greys: see umm_ops.data.synthetic), whose constants
(COLORS, KINDS, RELATIONS, COLOR_TOL, MIN_IOU, REL_MARGIN) and shape templates it shares.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.synthetic import (COLOR_TOL, COLORS, KINDS, MIN_IOU, REL_MARGIN, RELATIONS, _center, _relation_holds,
                              _template)
from ..utils import optional_import

__all__ = ["check", "find_objects"]


def _as_hwc(image, value_range) -> np.ndarray:
    """Any image -> float32 (H, W, 3) on 0..255 (numpy: per-image pixel work is cheaper there than in torch's
    thread pool)."""
    Image = optional_import("PIL", "Image")

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        arr = t.numpy()
        if arr.ndim != 3 or arr.shape[0] != 3:
            raise ValueError(f"check: image must have shape (3, H, W), got {tuple(arr.shape)}")
        arr = arr.transpose(1, 2, 0)
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise ValueError(f"check: a numpy image must have shape (H, W, 3), got {tuple(arr.shape)}")
    else:
        raise TypeError(f"check: image must be a torch tensor (3, H, W), a numpy array (H, W, 3) or a PIL image, "
                        f"got {type(image).__name__}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"check: image dtype must be uint8 or floating, got {arr.dtype}")
    x = arr.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError("check: image has non-finite values")
    lo, hi = value_range
    mn, mx = float(x.min()), float(x.max())
    if mn < lo - 1e-3 or mx > hi + 1e-3:
        raise ValueError(f"check: float image values must be in value_range={tuple(value_range)}, got "
                         f"[{mn:.3g}, {mx:.3g}] (pass value_range=(-1, 1) for model outputs in [-1, 1])")
    return (x - lo) * (255.0 / (hi - lo))


def _components(mask: np.ndarray, min_area: int) -> list:
    """Connected components (8-neighbourhood) of a (H, W) bool mask -> list of (H, W) bool masks with at least
    min_area pixels.  Each pixel starts with its own flat index + 1 as label; a sweep takes the largest label in
    the 3x3 neighbourhood, then jumps: label L names pixel L - 1 of the same component, whose label is at least
    L, so lab <- lab[lab - 1] spreads labels along chains in logarithmically many steps."""
    if not mask.any():
        return []
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    full, mask = mask, np.ascontiguousarray(mask[r0:r1, c0:c1])  # work on the mask's bounding box
    H, W = mask.shape
    flat_mask = mask.reshape(-1)
    lab = np.where(flat_mask, np.arange(1, H * W + 1, dtype=np.int64), 0)
    while True:
        grid = lab.reshape(H, W)
        p = np.pad(grid, 1)
        new = grid.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.maximum(new, p[dy:dy + H, dx:dx + W], out=new)
        new = new.reshape(-1) * flat_mask
        for _ in range(4):
            new = np.where(flat_mask, new[np.maximum(new - 1, 0)], 0)
        if np.array_equal(new, lab):
            break
        lab = new
    lab = lab.reshape(H, W)
    ids, counts = np.unique(lab[mask], return_counts=True)
    out = []
    for v, c in zip(ids.tolist(), counts.tolist()):
        if c >= min_area:
            m = np.zeros_like(full)
            m[r0:r1, c0:c1] = lab == v
            out.append(m)
    return out


def _classify(comp: np.ndarray):
    """-> (kind, iou, bbox) of a component by template matching within its bounding box."""
    ys, xs = np.nonzero(comp)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    crop = comp[y0:y1, x0:x1]
    best, best_iou = None, 0.0
    for kind in KINDS:
        t = _template(kind, x1 - x0, y1 - y0)
        iou = float((t & crop).sum()) / max(1.0, float((t | crop).sum()))
        if iou > best_iou:
            best, best_iou = kind, iou
    return (best if best_iou >= MIN_IOU else None), best_iou, [x0, y0, x1, y1]


def find_objects(image, colors=None, value_range=(0.0, 1.0), min_area: int | None = None) -> list:
    """Objects in any image, from its pixels: per palette colour, the connected components of the pixels that
    have that colour (see COLOR_TOL), each classified by shape.
    -> [{"color", "kind" (None if no shape fits), "iou", "bbox", "center", "area"}]."""
    x = _as_hwc(image, value_range)
    H, W, _ = x.shape
    if min_area is None:
        min_area = max(4, int(0.004 * H * W))
    elif isinstance(min_area, bool) or not isinstance(min_area, int) or min_area < 1:
        raise ValueError(f"check: min_area must be a positive int (pixels) or None, got {min_area!r}")
    names = list(COLORS) if colors is None else list(colors)
    bad = [c for c in names if c not in COLORS]
    if bad:
        raise ValueError(f"check: unknown colour(s) {bad}; the palette has {list(COLORS)}")
    all_names = list(COLORS)
    pal = np.array([COLORS[c] for c in all_names], dtype=np.float32)
    d2 = ((x[:, :, None, :] - pal[None, None]) ** 2).sum(-1)  # (H, W, n_colors)
    nearest = d2.argmin(-1)
    dmin = d2.min(-1)
    grey2 = ((x - x.mean(-1, keepdims=True)) ** 2).sum(-1)   # squared distance to the grey axis r = g = b
    close = (dmin <= COLOR_TOL ** 2) & (dmin < grey2)
    found = []
    for c in names:
        for comp in _components(close & (nearest == all_names.index(c)), min_area):
            kind, iou, bbox = _classify(comp)
            found.append({"color": c, "kind": kind, "iou": round(iou, 4), "bbox": bbox, "center": list(_center(bbox)),
                          "area": int(comp.sum())})
    return found


def _validate_spec(spec) -> dict:
    if isinstance(spec, str):
        raise TypeError("check: pass a prompt spec dict ({'objects': [...], 'relation': ...}), e.g. record.prompt; "
                        f"got the string {spec[:60]!r}")
    if not isinstance(spec, dict) or not isinstance(spec.get("objects"), (list, tuple)) or not spec["objects"]:
        raise ValueError(f"check: prompt spec must be a dict with a non-empty 'objects' list, got {spec!r:.200}")
    for j, g in enumerate(spec["objects"]):
        if not isinstance(g, dict) or g.get("color") not in COLORS or not isinstance(g.get("count"), int) \
                or g["count"] < 0 or (g.get("kind") is not None and g["kind"] not in KINDS):
            raise ValueError(f"check: spec object {j} must be {{'count': int >= 0, 'color': one of {list(COLORS)}, "
                             f"'kind': one of {list(KINDS)} or None}}, got {g!r}")
    rel = spec.get("relation")
    if rel is not None:
        n = len(spec["objects"])
        if not isinstance(rel, dict) or rel.get("rel") not in RELATIONS or rel.get("a") not in range(n) \
                or rel.get("b") not in range(n) or rel["a"] == rel["b"]:
            raise ValueError(f"check: relation must be {{'a': i, 'rel': one of {RELATIONS}, 'b': j}} with i != j "
                             f"indexing the {n} spec objects, got {rel!r}")
    return spec


def check(prompt_spec: dict, image, value_range=(0.0, 1.0), min_area: int | None = None) -> dict:
    """Score any image against a prompt spec from its pixels (GenEval-like).

    Constraints: each group's exact count of objects with that colour (and shape, unless kind is None), and the
    relation, which holds when every object of group a is on the stated side of every object of group b (bbox
    centres apart by more than REL_MARGIN of the image side) and both groups are present.  Objects not named in
    the prompt are ignored.  -> {"score": fraction of constraints met, "correct": all met, "details": {...}}.
    Images: uint8 (3, H, W), float (3, H, W) in value_range, numpy (H, W, 3), or PIL.
    Rendered scenes score exactly; blur and noise are tolerated, but shapes about 16 px across or smaller can be
    misread after lossy compression (JPEG's chroma subsampling smears their outline).
    min_area: the fewest pixels a component needs to count as an object (default: 0.4% of the picture, at least
    4, which admits the smallest objects of any world).  Pass the world's ``SyntheticWorld.min_object_area`` when
    the image should show that world's objects: with the default, the small fragments of a noisy image (an untrained
    generator's confetti) are read as objects, and random confetti scores about 0.2 on 64 px prompts."""
    spec = _validate_spec(prompt_spec)
    x = _as_hwc(image, value_range)
    H, W, _ = x.shape
    objects = find_objects(x, colors=sorted({g["color"] for g in spec["objects"]}), value_range=(0.0, 255.0),
                           min_area=min_area)
    groups, met = [], []
    for g in spec["objects"]:
        hits = [o for o in objects if o["color"] == g["color"] and (g.get("kind") is None or o["kind"] == g["kind"])]
        ok = len(hits) == g["count"]
        groups.append({"want": g["count"], "found": len(hits), "ok": ok, "color": g["color"], "kind": g.get("kind"),
                       "centers": [h["center"] for h in hits]})
        met.append(ok)
    rel_detail = None
    rel = spec.get("relation")
    if rel:
        ca, cb = groups[rel["a"]]["centers"], groups[rel["b"]]["centers"]
        ok = bool(ca) and bool(cb) and all(_relation_holds(p, q, rel["rel"], REL_MARGIN * max(H, W))
                                           for p in ca for q in cb)
        rel_detail = {"rel": rel["rel"], "ok": ok}
        met.append(ok)
    score = sum(met) / len(met)
    return {"score": score, "correct": all(met),
            "details": {"groups": groups, "relation": rel_detail, "objects": objects}}
