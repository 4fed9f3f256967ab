"""mmd-bench: VQA on degraded held-out pictures (CLEAR's MMD-Bench), per degradation type and level.

Each held-out record gets one (degradation, level) pair of the 16 MMD-Bench types x low / mid / high, in turn
(item k takes pair (k + offset) mod 48, offset from the seed), so every pair is covered equally as n grows
(n >= 48 covers all).  The picture is degraded with :func:`umm_ops.data.degrade` (seeded by (seed, record index,
type)) and the record's evaluation question (the same one vqa asks) is asked about it; scoring as vqa (exact
match of the letter, Wilson intervals).  ``clean`` is the same questions on the clean pictures, so ``drop`` =
clean - degraded is the damage done by the degradations on exactly these items.  Breakdowns: per type/level
(``per_type``), per degradation, per level, per question type.  Reads a user's multiple-choice file as vqa does
(``umm eval --data``), degrading its pictures the same way.
"""
from __future__ import annotations

from . import EvalContext, Task, TaskOutput, register
from .vqa import ask, letter_summary, questions, score_answer, score_short_answer

__all__ = ["MMDBenchTask", "ShortMMDBenchTask", "pairs"]


def pairs() -> list:
    """Every (degradation, level) pair, level-major (consecutive items take different degradations)."""
    from ...data.degradations import DEGRADATIONS, LEVELS

    levels = sorted(LEVELS, key=LEVELS.get)
    return [(kind, lv) for lv in levels for kind in sorted(DEGRADATIONS)]


@register
class MMDBenchTask(Task):
    name = "mmd-bench"
    ci = "wilson"
    breakdowns = ("type", "degradation", "level", "question_type")
    metrics = {"clean": ("clean", "wilson")}
    needs = "VQA in its training mix (SFT task vqa; degraded_vqa / CLEAR for robustness)"
    reads_data = True
    multiple_choice = True

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        from ...data.degradations import degrade

        if not self.multiple_choice and ctx.data is not None:
            raise ValueError(f"{self.name} reads the synthetic world only (a data file's questions are multiple "
                             "choice); use mmd-bench")
        qa = questions(ctx)
        idx, images, qs = [i for i, _, _ in qa], [im for _, im, _ in qa], [q for _, _, q in qa]
        ps = pairs()
        offset = ctx.seed_for("mmd-bench", "offset") % len(ps)    # the short variant: the same items
        chosen = [ps[(k + offset) % len(ps)] for k in range(len(qa))]
        degraded = [degrade(im[None], kind, lv, seed=ctx.seed, index=[i])[0]
                    for i, im, (kind, lv) in zip(idx, images, chosen)]
        mc = self.multiple_choice
        preds = ask(model, ctx, degraded, qs, idx, self.name, multiple_choice=mc)
        clean = ask(model, ctx, images, qs, idx, self.name + ":clean", multiple_choice=mc)
        score, key = (score_answer, "answer_letter") if mc else (score_short_answer, "answer")
        items = []
        for i, q, (kind, lv), p, c in zip(idx, qs, chosen, preds, clean):
            items.append({"index": i, "type": f"{kind}/{lv}", "degradation": kind, "level": lv,
                          "question_type": q["type"], "score": score(p, q[key]), "clean": score(c, q[key]),
                          "answer": q[key], "predicted": p, "predicted_clean": c})
        extra = letter_summary(items) if mc else {}
        if items:
            extra["drop"] = round(sum(it["clean"] - it["score"] for it in items) / len(items), 6)
        k = ctx.grid_items
        grid = {"rows": ["clean", "degraded"],
                "columns": [{"label": f"{it['predicted'].strip()[:3]}/{it['answer']} {it['level']}\n"
                                      f"{it['degradation']}", "images": [im, d]}
                            for it, im, d in zip(items[:k], images[:k], degraded[:k])]}
        return TaskOutput(items, extra, grid, {"degraded": degraded})


@register
class ShortMMDBenchTask(MMDBenchTask):
    """mmd-bench's items asked as short-answer questions (``vqa-short``'s prompt and scoring): the tiny world's
    models read pictures into answer words far better than into option letters, so this is where a degradation's
    damage shows.  Synthetic world only."""
    name = "mmd-bench-short"
    needs = "short-answer VQA in its training mix (SFT task vqa_short)"
    reads_data = False
    multiple_choice = False
