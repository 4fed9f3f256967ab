"""caption: does the generated caption name the scene's colours and shapes (and no others)?

The model captions each held-out picture ("Describe the image.", greedy, up to 80 tokens).  The check is built
from the scene's own facts: T = the set of distinct object colours plus the set of distinct shapes in the scene;
N = the palette colour words and shape words (singular or plural, whole words, case-insensitive) in the caption.

    score = max(0, (|N & T| - |N - T|) / |T|)

that is the fraction of the scene's colours and shapes named, minus one fact's worth for every colour or shape
named that the scene does not have (so listing every word of the vocabulary scores 0, not 1); an empty scene
scores 1 if the caption names no colour or shape, else 0.  Reported beside it (means with bootstrap CIs): recall
= |N & T| / |T| without the penalty, absent_named = |N - T| per caption, and pair_recall = the fraction of the
scene's (colour, shape) groups named as a phrase ("red circle(s)", the binding of colour to shape).  The world's
own captions score 1 on all three (and 0 absent).  Background greys are not palette colours and are ignored.
"""
from __future__ import annotations

import re

from . import EvalContext, Task, TaskOutput, pixel_range, pixels, register

__all__ = ["CaptionTask", "score_caption"]


def _vocab():
    from ...data.synthetic import _PLURAL, COLORS, KINDS

    return tuple(COLORS), KINDS, _PLURAL


def score_caption(text: str, scene: dict) -> dict:
    """Score a caption against a scene description (``record.scene``); see the module docstring."""
    colors, kinds, plural = _vocab()
    words = set(re.findall(r"[a-z]+", text.lower()))
    named = {c for c in colors if c in words} | {k for k in kinds if k in words or plural[k] in words}
    objs = scene["objects"]
    truth = {o["color"] for o in objs} | {o["kind"] for o in objs}
    hits, absent = len(named & truth), len(named - truth)
    if truth:
        score = max(0.0, (hits - absent) / len(truth))
        recall = hits / len(truth)
    else:
        score = recall = 1.0 if not named else 0.0
    groups = sorted({(o["color"], o["kind"]) for o in objs})
    low = " ".join(re.findall(r"[a-z]+", text.lower()))
    bound = [g for g in groups if re.search(rf"\b{g[0]} (?:{g[1]}|{plural[g[1]]})\b", low)]
    return {"score": score, "recall": recall, "absent_named": absent,
            "pair_recall": len(bound) / len(groups) if groups else 1.0,
            "named": sorted(named), "truth": sorted(truth)}


@register
class CaptionTask(Task):
    name = "caption"
    ci = "bootstrap"
    breakdowns = ("type",)
    metrics = {"recall": ("recall", "bootstrap"), "absent_named": ("absent_named", "bootstrap"),
               "pair_recall": ("pair_recall", "bootstrap")}
    needs = "captions in its training mix (SFT task caption)"
    prompt = "Describe the image."
    max_new_tokens = 80

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        from ...data.packing import ImageItem, Sample, TextItem

        recs = ctx.records()
        samples = [Sample([ImageItem(pixels(r.image, pixel_range(model)), "understand"), TextItem(self.prompt)],
                          meta={"task": self.name, "index": r.index}) for r in recs]
        outs: list = []
        for _, batch in ctx.batches(samples):
            outs += model.generate_text(batch, max_new_tokens=self.max_new_tokens, temperature=0.0)
        items = []
        for r, o in zip(recs, outs):
            s = score_caption(o, r.scene)
            m = len(r.scene["objects"])
            items.append({"index": r.index, "type": f"{m} object{'s' if m != 1 else ''}", "score": s["score"],
                          "recall": s["recall"], "absent_named": s["absent_named"], "pair_recall": s["pair_recall"],
                          "generated": o, "truth": r.caption})
        k = ctx.grid_items
        grid = {"rows": ["picture"], "columns": [{"label": f"{it['score']:.2f}", "images": [r.image]}
                                                 for it, r in zip(items[:k], recs[:k])]}
        return TaskOutput(items, {}, grid)
