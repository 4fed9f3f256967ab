"""segment: instance segmentation as image generation (SGT), scored by matching colour regions to instances.

The model edits each held-out picture with SGT's instruction ("Segment instances with different colors.",
``model.edit_image``: the picture to understand + the instruction -> a generated image of the same size), the
form in which the synthetic world's segmentation maps are trained (SFT task ``segment``: every instance in its
own colour of the VOC instance palette on black).  The generated map is read back into regions: each pixel goes
to its nearest colour among black and the first 32 palette colours (within an RGB distance of 80; farther pixels
count as background), and each connected component (8-neighbourhood, at least max(4, 0.4% of the image) pixels)
of one colour is a region.  Regions are matched one-to-one to the true instances greedily by IoU (largest first;
the world's objects never touch, so ambiguities are rare).  An item's score is

    sum of the matched IoUs / max(true instances, predicted regions)

(1 for a perfect map, whatever colours it gives the instances; every missed instance and every extra region
counts 0); ``count_accuracy`` (predicted regions == instances) is reported with a Wilson interval, and ``miou``
(instance mIoU: each true instance's IoU with the region matched to it, 0 when none is, averaged over the true
instances; extra regions do not lower it) with a bootstrap interval.  Task ``seg-miou`` is the same run with the
mIoU as its headline score (SGT's measurement of the generated maps).  Only a model
trained on segmentation maps can score above ~0: an untrained or SFT model without the ``segment`` task generates
no instance map.
"""
from __future__ import annotations

import numpy as np
import torch

from . import EvalContext, Task, TaskOutput, pixel_range, pixels, register
from .geneval import to_uint8

__all__ = ["SegmentTask", "SegMIoUTask", "predicted_regions", "score_segmentation"]

PALETTE_COLORS = 32
COLOR_TOL = 80.0


def _hwc(image) -> np.ndarray:
    t = image.detach().cpu()
    if t.dtype == torch.uint8:
        x = t.float()
    else:
        x = (t.float().clamp(-1, 1) + 1) * 127.5
    return x.permute(1, 2, 0).numpy()


def predicted_regions(image, min_area: int | None = None) -> np.ndarray:
    """A generated instance map (3, H, W), uint8 or float in [-1, 1] -> region labels (H, W) int64, 0 background."""
    from ...data.synthetic import instance_palette
    from ..checker import _components

    x = _hwc(image)
    H, W, _ = x.shape
    if min_area is None:
        min_area = max(4, int(0.004 * H * W))
    pal = np.array([(0, 0, 0)] + instance_palette(PALETTE_COLORS), dtype=np.float32)
    d2 = ((x[:, :, None, :] - pal[None, None]) ** 2).sum(-1)
    nearest = d2.argmin(-1)
    nearest[d2.min(-1) > COLOR_TOL ** 2] = 0
    labels = np.zeros((H, W), np.int64)
    r = 0
    for c in np.unique(nearest).tolist():
        if c == 0:
            continue
        for comp in _components(nearest == c, min_area):
            r += 1
            labels[comp] = r
    return labels


def score_segmentation(image, instances) -> dict:
    """Score a generated instance map against the true instance ids (H, W) (0 background, objects 1..m)."""
    t = instances.cpu().numpy() if isinstance(instances, torch.Tensor) else np.asarray(instances)
    t = t.astype(np.int64)
    r = predicted_regions(image)
    if r.shape != t.shape:
        raise ValueError(f"score_segmentation: map {r.shape} and instances {t.shape} differ in size")
    m, R = int(t.max()), int(r.max())
    joint = np.bincount((t * (R + 1) + r).ravel(), minlength=(m + 1) * (R + 1)).reshape(m + 1, R + 1)
    inter = joint[1:, 1:].astype(np.float64)
    union = joint[1:, :].sum(1)[:, None] + joint[:, 1:].sum(0)[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    matched, used_t, used_r = [], set(), set()
    per_inst = [0.0] * m    # instance mIoU: each true instance's IoU with the region matched to it, 0 if none
    for flat in np.argsort(-iou, axis=None, kind="stable").tolist():
        a, b = divmod(flat, max(R, 1))
        if iou.size == 0 or iou[a, b] <= 0:
            break
        if a not in used_t and b not in used_r:
            used_t.add(a)
            used_r.add(b)
            matched.append(float(iou[a, b]))
            per_inst[a] = float(iou[a, b])
    denom = max(m, R)
    return {"score": sum(matched) / denom if denom else 1.0, "count_ok": 1.0 if R == m else 0.0,
            "miou": sum(per_inst) / m if m else (1.0 if R == 0 else 0.0), "n_true": m, "n_pred": R}


@register
class SegmentTask(Task):
    name = "segment"
    ci = "bootstrap"
    breakdowns = ("type",)
    metrics = {"count_accuracy": ("count_ok", "wilson"), "miou": ("miou", "bootstrap")}
    needs = "segmentation maps in its training mix (SFT task segment / SGT); other models score ~0"

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        from ...data.synthetic import SEGMENT_PROMPT

        if not callable(getattr(model, "edit_image", None)):
            raise TypeError("segment: the model has no edit_image(images, instructions) to generate instance maps")
        recs = ctx.records()
        S = ctx.image_size
        maps: list = []
        for _, batch in ctx.batches(recs):
            with torch.no_grad():
                rng = pixel_range(model)
                out = model.edit_image([pixels(r.image, rng) for r in batch], [SEGMENT_PROMPT] * len(batch), height=S,
                                       width=S, steps=ctx.steps, seed=ctx.seed_for(self.name, batch[0].index))
            maps += [to_uint8(x, pixel_range(model)) for x in out["images"]]
        items = []
        for r, x in zip(recs, maps):
            v = score_segmentation(x, r.instances)
            m = len(r.scene["objects"])
            items.append({"index": r.index, "type": f"{m} object{'s' if m != 1 else ''}", **v})
        k = ctx.grid_items
        grid = {"rows": ["picture", "truth", "generated"],
                "columns": [{"label": f"{it['score']:.2f} {it['n_pred']}/{it['n_true']}",
                             "images": [r.image, r.segmentation, x]}
                            for it, r, x in zip(items[:k], recs[:k], maps[:k])]}
        return TaskOutput(items, {}, grid, {"generated": maps})


@register
class SegMIoUTask(SegmentTask):
    """``segment`` with the instance mIoU as the headline score (the matched-IoU score a secondary metric)."""
    name = "seg-miou"
    metrics = {"matched_score": ("matched", "bootstrap"), "count_accuracy": ("count_ok", "wilson")}

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        out = super().run(model, ctx)
        for it in out.items:
            it["matched"], it["score"] = it["score"], it["miou"]
        for col, it in zip(out.grid["columns"], out.items):
            col["label"] = f"{it['miou']:.2f} {it['n_pred']}/{it['n_true']}"
        return out
