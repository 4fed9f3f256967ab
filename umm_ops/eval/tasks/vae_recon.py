"""vae-recon: the checker's score of the VAE's reconstructions of held-out pictures.

Each picture goes through the model's frozen VAE (``vae.encode`` -> ``vae.decode``) and the reconstruction is
scored by :func:`umm_ops.eval.check` against the spec of the whole scene (every (colour, shape) group with its
count): the fraction of groups reproduced with the right count, colour and shape.  Nothing decoded by this VAE
(generated images, segmentation maps) can do better, so this is the upper bound of geneval and segment.
``prompt_score`` scores the reconstruction against the record's generation prompt instead (directly comparable
with geneval, item by item); ``correct``: every group right.  Per number of objects in the scene.
"""
from __future__ import annotations

import torch

from . import EvalContext, Task, TaskOutput, model_device_dtype, pixel_range, pixels, register
from .geneval import score_image, to_uint8

__all__ = ["VAEReconTask", "scene_spec", "score_reconstruction"]


def scene_spec(scene: dict) -> dict | None:
    """The prompt spec of every object group of a scene (None for an empty scene)."""
    groups: dict = {}
    for o in scene["objects"]:
        groups[(o["color"], o["kind"])] = groups.get((o["color"], o["kind"]), 0) + 1
    if not groups:
        return None
    return {"objects": [{"count": c, "color": col, "kind": kd} for (col, kd), c in groups.items()], "relation": None}


def score_reconstruction(scene: dict, prompt: dict, image: torch.Tensor, value_range=(-1.0, 1.0)) -> dict:
    """{"score" (whole scene), "correct", "prompt_score"} of an image (3, H, W) in `value_range` (the model's
    pixel range)."""
    from ..checker import find_objects

    spec = scene_spec(scene)
    lo, hi = (float(v) for v in value_range)
    if spec is None:   # an empty scene: right if no palette-coloured object is found
        found = find_objects(image.detach().float().cpu().clamp(lo, hi), value_range=(lo, hi))
        whole = {"score": 0.0 if found else 1.0, "correct": 0.0 if found else 1.0}
    else:
        whole = score_image(spec, image, (lo, hi))
    return {"score": whole["score"], "correct": whole["correct"],
            "prompt_score": score_image(prompt, image, (lo, hi))["score"]}


@register
class VAEReconTask(Task):
    name = "vae-recon"
    ci = "bootstrap"
    breakdowns = ("type",)
    metrics = {"correct": ("correct", "wilson"), "prompt_score": ("prompt_score", "bootstrap")}
    needs = "a trained VAE (the model's own; an untrained VAE scores 0)"

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        recs = ctx.records()
        dev, dt = model_device_dtype(model)
        rec_imgs: list = []
        rng = pixel_range(model)          # the model's pixels, in and out
        for _, batch in ctx.batches(recs):
            real = torch.stack([pixels(r.image, rng) for r in batch]).to(dev, dt)
            with torch.no_grad():
                out = model.vae.decode(model.vae.encode(real), tuple(real.shape[-2:]))
            rec_imgs += [to_uint8(x, rng) for x in out]
        items = []
        for r, x in zip(recs, rec_imgs):
            v = score_reconstruction(r.scene, r.prompt, pixels(x, rng), rng)
            m = len(r.scene["objects"])
            items.append({"index": r.index, "type": f"{m} object{'s' if m != 1 else ''}", **v})
        k = ctx.grid_items
        grid = {"rows": ["truth", "reconstruction"],
                "columns": [{"label": f"{it['score']:.2f}", "images": [r.image, x]}
                            for it, r, x in zip(items[:k], recs[:k], rec_imgs[:k])]}
        return TaskOutput(items, {}, grid, {"reconstruction": rec_imgs})
