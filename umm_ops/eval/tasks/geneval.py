"""geneval: text-to-image, each generated image scored from its pixels by the world's checker (GenEval-like).

Per held-out record its prompt spec (``record.prompt``: single_object / two_object / counting / position / all,
the world prefers the demanding ones) is generated at the evaluation size with the sampler seeded per batch
(seed_of(seed, "geneval", first index of the batch)).  An item's score is :func:`umm_ops.eval.check`'s fraction
of the prompt's constraints met (each group's exact count of objects of that colour and shape, and the relation;
components smaller than half the world's smallest object are not objects: ``SyntheticWorld.min_object_area``);
``correct`` (all constraints met, GenEval's headline) is reported beside it with a Wilson interval.  Per prompt
tag.  The VAE bounds it from above: see vae-recon.
"""
from __future__ import annotations

import torch

from . import EvalContext, Task, TaskOutput, pixel_range, pixels, register

__all__ = ["GenEvalTask", "score_image", "to_uint8"]


def score_image(spec: dict, image: torch.Tensor, value_range=(-1.0, 1.0), min_area: int | None = None) -> dict:
    """The checker's verdict on one image (3, H, W) in `value_range` (a model's output: its
    ``pixel_range(model)``; clamped to it) for a prompt spec: {"score", "correct"}.  ``min_area``: the checker's
    (pass the world's ``min_object_area`` for generated images, so that noise fragments are not objects)."""
    from ..checker import check

    lo, hi = (float(v) for v in value_range)
    x = image.detach().float().cpu()
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError("score_image: the image holds NaN / Inf values; it cannot be scored")
    r = check(spec, x.clamp(lo, hi), value_range=(lo, hi), min_area=min_area)
    return {"score": float(r["score"]), "correct": 1.0 if r["correct"] else 0.0}


def to_uint8(img: torch.Tensor, value_range) -> torch.Tensor:
    """(3, H, W) in `value_range` (the model's pixel range, ``pixel_range(model)``: (-1, 1) or (0, 1);
    clamped to it) -> uint8 (3, H, W) on the CPU.  NaN / Inf are refused, not turned into pixels."""
    lo, hi = (float(v) for v in value_range)
    x = img.detach().float().cpu()
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError("to_uint8: the image holds NaN / Inf values; refusing to turn them into pixels")
    if (lo, hi) == (-1.0, 1.0):
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if (lo, hi) == (0.0, 1.0):
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)
    raise ValueError(f"to_uint8: value_range must be (-1, 1) or (0, 1) (a profile's pixel range), got {value_range!r}")


@register
class GenEvalTask(Task):
    name = "geneval"
    ci = "bootstrap"
    breakdowns = ("type",)
    metrics = {"correct": ("correct", "wilson")}
    needs = "text-to-image in its training mix (SFT task generate)"

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        from ...data.packing import Sample, TextItem

        recs = ctx.records()
        S = ctx.image_size
        rng = pixel_range(model)          # the model's pixels, in and out
        gen: list = []
        for s, batch in ctx.batches(recs):
            prompts = [Sample([TextItem(r.prompt["text"])], meta={"task": self.name, "index": r.index})
                       for r in batch]
            with torch.no_grad():
                out = model.generate_image(prompts, height=S, width=S, steps=ctx.steps, cfg_scale=ctx.cfg_scale,
                                           seed=ctx.seed_for(self.name, batch[0].index))["images"]
            gen += [to_uint8(g, rng) for g in out]
        items, min_area = [], ctx.world.min_object_area
        for r, g in zip(recs, gen):
            v = score_image(r.prompt, pixels(g, rng), rng, min_area)
            items.append({"index": r.index, "type": r.prompt["tag"], "score": v["score"], "correct": v["correct"],
                          "prompt": r.prompt["text"]})
        k = ctx.grid_items
        grid = {"rows": ["truth", "generated"],
                "columns": [{"label": f"{it['score']:.2f}\n{it['type']}", "images": [r.image, g]}
                            for it, r, g in zip(items[:k], recs[:k], gen[:k])]}
        return TaskOutput(items, {}, grid, {"generated": gen})
