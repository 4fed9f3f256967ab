"""clear: MMD-Bench questions answered in CLEAR's generate-then-answer format (issue 16).

The items are mmd-bench's (each held-out record's evaluation question about its picture degraded with one
(type, level) pair, the pairs in turn), asked with :func:`umm_ops.model.clear.generate_then_answer` (greedy text,
the restoration with the model's sampler; seeded).  Per item: ``score`` = the letter inside ``<answer>...</answer>``
is right (a missing answer is wrong), ``restored`` = the model restored before answering, ``clean`` /
``restored_clean`` = the same for the clean picture, ``format`` = CLEAR's format reward (0.35 think + 0.35 answer
+ 0.3 order).  Task-level: the restorations' PSNR (capped at PSNR_CAP) to the clean picture (mean over restored items, and per level).
Breakdowns per type/level, degradation, level, question type.  Synthetic world only (a user's file has no clean
picture for the PSNR; mmd-bench reads those).

clear-bridge / clear-short-bridge: the same items with the restoration joining the context through CLEAR's latent
bridge (``generate_then_answer(bridge=True)``: the restored latent written into the KV cache, no decode -> re-encode);
for the PSNR and the grids only, the restored latents are decoded to pixels after the answers.
"""
from __future__ import annotations

from . import EvalContext, Task, TaskOutput, pixel_range, pixels, register
from .vqa import letter_summary, questions, score_answer, score_short_answer

__all__ = ["ClearTask", "ShortClearTask", "BridgeClearTask", "ShortBridgeClearTask", "psnr", "format_reward",
           "PSNR_CAP"]


PSNR_CAP = 100.0   # dB: equal images (inf) are counted as this in the means


def psnr(a, b) -> float:
    """PSNR in dB of two uint8 images (``umm_ops.data.degradations.psnr``), at most PSNR_CAP (equal images)."""
    from ...data.degradations import psnr as per_image

    return min(PSNR_CAP, float(per_image(a[None], b[None])[0]))


def format_reward(fmt: dict) -> float:
    """CLEAR's format reward of parse_clear's checks: ``umm_ops.rl.FormatReward``'s weights (0.35 think + 0.35
    answer + 0.3 order)."""
    from ...rl.rewards import FormatReward

    return FormatReward().total(fmt)


@register
class ClearTask(Task):
    name = "clear"
    ci = "wilson"
    breakdowns = ("type", "degradation", "level", "question_type")
    metrics = {"restored": ("restored", "wilson"), "clean": ("clean", "wilson"),
               "restored_clean": ("restored_clean", "wilson"), "format": ("format", "bootstrap")}
    needs = "CLEAR's generate-then-answer SFT (SFT tasks clear / clear_short)"
    multiple_choice = True
    bridge = False

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        from ...data.degradations import degrade
        from ...data.clear_data import clear_question
        from .geneval import to_uint8
        from .mmd_bench import pairs

        if ctx.data is not None:
            raise ValueError("clear reads the synthetic world only (it needs the clean picture); use mmd-bench for "
                             "a data file")
        qa = questions(ctx)
        idx, images, qs = [i for i, _, _ in qa], [im for _, im, _ in qa], [q for _, _, q in qa]
        ps = pairs()
        offset = ctx.seed_for("mmd-bench", "offset") % len(ps)      # the same items as mmd-bench
        chosen = [ps[(k + offset) % len(ps)] for k in range(len(qa))]
        degraded = [degrade(im[None], kind, lv, seed=ctx.seed, index=[i])[0]
                    for i, im, (kind, lv) in zip(idx, images, chosen)]
        mc = self.multiple_choice
        texts = [clear_question(q, mc) for q in qs]
        score, key = (score_answer, "answer_letter") if mc else (score_short_answer, "answer")
        res, res_clean = [], []
        for s, b in ctx.batches(list(range(len(qa)))):
            # the bridge tasks draw what their decode -> re-encode counterparts draw (paired comparison)
            seed = ctx.seed_for(self.name.removesuffix("-bridge"), idx[b[0]])
            kw = {"bridge": True} if self.bridge else {}
            rng = pixel_range(model)
            res += model.generate_then_answer([pixels(degraded[k], rng) for k in b], [texts[k] for k in b],
                                              steps=ctx.steps, seed=seed, **kw)
            res_clean += model.generate_then_answer([pixels(images[k], rng) for k in b], [texts[k] for k in b],
                                                    steps=ctx.steps, seed=seed, **kw)
        if self.bridge:       # the restored latents to pixels, for the PSNR and the grids (after the answers)
            import torch

            for r in res:
                if r.get("latent") is not None:
                    hw = images[0].shape[-2:]
                    with torch.no_grad():
                        r["image"] = model.vae.decode(r["latent"][None].to(model.device, model.dtype), hw,
                                                      clamp=tuple(model.profile.pixel_range))[0].float()
        from .vae_recon import score_reconstruction

        scenes = {rec.index: rec for rec in ctx.records()}
        items, by_level = [], {}
        restorations = []
        for k, (i, q, (kind, lv), r, c) in enumerate(zip(idx, qs, chosen, res, res_clean)):
            it = {"index": i, "type": f"{kind}/{lv}", "degradation": kind, "level": lv, "question_type": q["type"],
                  "score": score(r["answer"], q[key]), "restored": float(r["restored"]),
                  "clean": score(c["answer"], q[key]), "restored_clean": float(c["restored"]),
                  "format": format_reward(r["format"]), "answer": q[key], "predicted": r["answer"],
                  "text": r["text"]}
            if r["image"] is not None:
                rest = to_uint8(r["image"], pixel_range(model))
                it["psnr"] = psnr(rest, images[k])
                it["psnr_degraded"] = psnr(degraded[k], images[k])
                # the world's checker on the restoration and on the picture it restored, against the whole scene
                sc = scenes[i]
                it["checker"] = score_reconstruction(sc.scene, sc.prompt, pixels(rest, rng), rng)["score"]
                it["checker_degraded"] = score_reconstruction(sc.scene, sc.prompt, pixels(degraded[k], rng),
                                                              rng)["score"]
                by_level.setdefault(lv, []).append(it["psnr"])
                restorations.append((k, rest))
            items.append(it)
        extra = letter_summary(items) if mc else {}
        got = [it["psnr"] for it in items if "psnr" in it]
        if got:
            extra["psnr_restored"] = round(sum(got) / len(got), 4)
            extra["psnr_degraded_of_restored"] = round(sum(it["psnr_degraded"] for it in items if "psnr" in it)
                                                       / len(got), 4)
            extra["psnr_restored_per_level"] = {lv: round(sum(v) / len(v), 4) for lv, v in sorted(by_level.items())}
            extra["checker_restored"] = round(sum(it["checker"] for it in items if "psnr" in it) / len(got), 4)
            extra["checker_degraded_of_restored"] = round(sum(it["checker_degraded"] for it in items if "psnr" in it)
                                                          / len(got), 4)
        kept = ctx.grid_items
        grid = {"rows": ["clean", "degraded", "restored"],
                "columns": [{"label": f"{items[k]['predicted'][:3]}/{items[k]['answer']} {items[k]['level']}\n"
                                      f"{items[k]['degradation']}", "images": [images[k], degraded[k], rest]}
                            for k, rest in restorations[:kept]]} if restorations else None
        return TaskOutput(items, extra, grid, {"restored": [r for _, r in restorations]})


@register
class ShortClearTask(ClearTask):
    """clear's items asked for a short answer (the word inside <answer>; ``vqa-short``'s scoring): the counterpart of
    mmd-bench-short."""
    name = "clear-short"
    needs = "CLEAR's generate-then-answer SFT with short answers (SFT task clear_short)"
    multiple_choice = False


@register
class BridgeClearTask(ClearTask):
    """clear's items answered through the latent bridge (module docstring)."""
    name = "clear-bridge"
    needs = "CLEAR's generate-then-answer SFT (clear-sft or clear-bridge)"
    bridge = True


@register
class ShortBridgeClearTask(ShortClearTask):
    """clear-short's items answered through the latent bridge (module docstring)."""
    name = "clear-short-bridge"
    needs = "CLEAR's generate-then-answer SFT with short answers (clear-sft or clear-bridge)"
    bridge = True
