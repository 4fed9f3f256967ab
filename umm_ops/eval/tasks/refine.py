"""refine: R3's generate -> reflect -> refine loop (``umm_ops.model.refine.generate_refined``) on held-out prompts,
every round's image scored by the world's checker.

Per held-out record its prompt spec (as geneval) runs through up to ``EvalContext.refine_rounds`` rounds.  An item's
score is the checker score of the loop's final image; beside it: ``round1`` (the first image's score: geneval with
R3's reasoning before the image), ``stopped`` (the model itself said no further edit was needed, Wilson),
``worse`` (some edit lowered the score, Wilson) and ``better`` (the final image scores higher than the first,
Wilson).  The extra numbers give the mean score after each round (a stopped prompt keeps its image).
"""
from __future__ import annotations

from . import EvalContext, Task, TaskOutput, pixel_range, register
from .geneval import score_image, to_uint8

__all__ = ["RefineTask"]


@register
class RefineTask(Task):
    name = "refine"
    ci = "bootstrap"
    breakdowns = ("type",)
    metrics = {"round1": ("round1", "bootstrap"), "stopped": ("stopped", "wilson"), "worse": ("worse", "wilson"),
               "better": ("better", "wilson")}
    needs = "R3's format (SFT tasks r3_plan, r3_reflect, r3_edit) or the r3 recipe"

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        recs = ctx.records()
        S, R = ctx.image_size, ctx.refine_rounds
        rng = pixel_range(model)          # the model's pixels
        res = []
        for _, batch in ctx.batches(recs):
            res += model.generate_refined([r.prompt["text"] for r in batch], max_rounds=R, steps=ctx.steps,
                                          seed=ctx.seed_for(self.name), height=S, width=S,
                                          cfg_scale=ctx.cfg_scale, image_cfg_scale=ctx.image_cfg_scale,
                                          cfg_renorm=ctx.cfg_renorm, cfg_interval=ctx.cfg_interval)
        items, per_round, min_area = [], [[] for _ in range(R)], ctx.world.min_object_area
        for r, out in zip(recs, res):
            scores = [score_image(r.prompt, rd["image"], rng, min_area)["score"] for rd in out["rounds"]]
            full = scores + [scores[-1]] * (R - len(scores))
            for k in range(R):
                per_round[k].append(full[k])
            items.append({"index": r.index, "type": r.prompt["tag"], "score": scores[-1], "round1": scores[0],
                          "stopped": float(out["stopped"]), "rounds": len(out["rounds"]),
                          "worse": float(any(b < a for a, b in zip(scores, scores[1:]))),
                          "better": float(scores[-1] > scores[0]), "prompt": r.prompt["text"],
                          "texts": [rd["text"] if rd["round"] == 1 else rd["instruction"] for rd in out["rounds"]]})
        extra = {"score_after_round": [sum(v) / len(v) for v in per_round], "max_rounds": R,
                 "cfg_scale": ctx.cfg_scale, "image_cfg_scale": ctx.image_cfg_scale, "cfg_renorm": ctx.cfg_renorm,
                 "cfg_interval": ctx.cfg_interval}
        k = ctx.grid_items
        grid = {"rows": ["truth"] + [f"round {j + 1}" for j in range(R)],
                "columns": [{"label": f"{it['round1']:.2f}->{it['score']:.2f}\n{it['type']}",
                             "images": [r.image] + [to_uint8(rd["image"], rng) for rd in out["rounds"]] +
                                       [to_uint8(out["image"], rng)] * (R - len(out["rounds"]))}
                            for it, r, out in zip(items[:k], recs[:k], res[:k])]}
        return TaskOutput(items, extra, grid, {"final": [to_uint8(o["image"], rng) for o in res]})
