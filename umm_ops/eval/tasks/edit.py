"""edit: instruction-based editing on held-out pictures, built as the SFT task r3_edit builds them.

Per held-out record whose scene satisfies its prompt, :func:`umm_ops.data.refine_data.edit_pair` (with the same
per-record seed as ``r3_samples``) changes one named object - recolour, reshape or remove - so that the pixel
checker no longer accepts the picture, and writes the instruction that undoes it.  The model edits the changed
picture with the instruction (``edit_image``: [picture to understand, instruction] -> image; guidance from the
context: ``cfg_scale``, and two-scale ``image_cfg_scale`` / ``cfg_renorm`` / ``cfg_interval``), and the checker
scores the edit against the target scene's description (the record's prompt spec).  An item's ``score`` is that
checker score; beside it ``before`` (the unedited, changed picture's score against the same description), ``gain``
(score - before, paired; bootstrap) and ``exact`` (the edit fully satisfies the description, Wilson).  Breakdown per
edit kind.  Records without an applicable edit are left out (``skipped`` counts them).  Images in the model's
pixel range.
"""
from __future__ import annotations

import random

from ...utils import seed_of
from . import EvalContext, Task, TaskOutput, pixel_range, pixels, register
from .geneval import score_image, to_uint8

__all__ = ["EditTask", "edit_items"]


def edit_items(ctx: EvalContext) -> tuple:
    """(items, skipped): per held-out record with an applicable edit, (record, changed picture uint8, instruction,
    edit kind), exactly the pair r3_samples' r3_edit task would build for that record."""
    from ...data.refine_data import edit_pair
    from ...data.synthetic import render

    items, skipped = [], 0
    w = ctx.world
    for rec in ctx.records():
        rng = random.Random(seed_of(rec.seed, rec.index, "r3"))        # r3_samples' draw for this record
        pair = edit_pair(rec, rng, getattr(w, "kinds", None), getattr(w, "colors", None))
        if pair is None:
            skipped += 1
            continue
        scene, ins, what = pair
        bad, _ = render(scene)
        items.append((rec, bad, ins, what))
    return items, skipped


@register
class EditTask(Task):
    name = "edit"
    ci = "bootstrap"
    breakdowns = ("type",)
    metrics = {"before": ("before", "bootstrap"), "gain": ("gain", "bootstrap"), "exact": ("exact", "wilson")}
    needs = "instruction edits (SFT task r3_edit) or the r3 recipe"

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        rng = pixel_range(model)
        todo, skipped = edit_items(ctx)
        S = ctx.image_size
        outs = []
        for _, batch in ctx.batches(todo):
            res = model.edit_image([pixels(bad, rng) for _, bad, _, _ in batch], [ins for _, _, ins, _ in batch],
                                   height=S, width=S, steps=ctx.steps, cfg_scale=ctx.cfg_scale,
                                   image_cfg_scale=ctx.image_cfg_scale, cfg_renorm=ctx.cfg_renorm,
                                   cfg_interval=ctx.cfg_interval,
                                   seed=[ctx.seed_for(self.name, rec.index) for rec, _, _, _ in batch])
            outs += list(res["images"])
        items, min_area = [], ctx.world.min_object_area
        for (rec, bad, ins, what), img in zip(todo, outs):
            after = score_image(rec.prompt, img, rng, min_area)
            before = score_image(rec.prompt, pixels(bad, rng), rng, min_area)["score"]
            items.append({"index": rec.index, "type": what, "score": after["score"], "before": before,
                          "gain": after["score"] - before, "exact": after["correct"], "instruction": ins,
                          "prompt": rec.prompt["text"]})
        extra = {"skipped": skipped, "cfg_scale": ctx.cfg_scale, "image_cfg_scale": ctx.image_cfg_scale,
                 "cfg_renorm": ctx.cfg_renorm, "cfg_interval": ctx.cfg_interval}
        k = ctx.grid_items
        grid = {"rows": ["to edit", "edited", "target"],
                "columns": [{"label": f"{it['before']:.2f}->{it['score']:.2f}\n{it['type']}",
                             "images": [bad, to_uint8(img, rng), rec.image]}
                            for it, (rec, bad, _, _), img in zip(items[:k], todo[:k], outs[:k])]}
        return TaskOutput(items, extra, grid, {"edited": [to_uint8(o, rng) for o in outs]})
