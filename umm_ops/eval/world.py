"""Held-out evaluation on the synthetic world (what the SFT recipe reports after training).

Records ``first, first + 1, ...`` (never trained on when ``first`` is the recipe's ``train_records``): VQA
exact-match of the answer letter (greedy), captions (with the caption check of :mod:`umm_ops.eval.tasks.caption`),
and generated images scored by the world's pixel checker (:func:`umm_ops.eval.check`) next to two references: the
checker's score of the VAE's reconstruction of the true picture against the same prompt (an upper bound for
anything decoded by that VAE) and the majority-letter baseline of the VQA answers.  It runs the tasks of
``umm eval`` (:mod:`umm_ops.eval.runner`, which adds confidence intervals, breakdowns and more tasks) with the
recipe's small default counts.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..utils import atomic_write, optional_import

__all__ = ["evaluate_world", "to_pil", "report_lines"]


def to_pil(img: torch.Tensor, value_range=(-1.0, 1.0)):
    """(3, H, W) in `value_range` (a model's output: ``pixel_range(model)``), or uint8 -> PIL image."""
    from .tasks.geneval import to_uint8

    Image = optional_import("PIL", "Image")

    x = img.detach().cpu() if img.dtype == torch.uint8 else to_uint8(img, value_range)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())


def _save_png(img, path: Path) -> None:
    atomic_write(path, write=lambda p: img.save(p, format="PNG"), suffix=".png")


@torch.no_grad()
def evaluate_world(model, *, image_size: int, seed: int, first: int, world: dict | None = None, n_vqa: int = 32,
                   n_images: int = 4, n_captions: int = 2, steps: int = 12, prompts=(), out_dir=None,
                   short_vqa: bool = False, chain_vqa: bool = False, n_clear: int = 0) -> dict:
    """The SFT recipe's after-training evaluation, on the tasks of ``umm eval`` (:mod:`umm_ops.eval.tasks`):
    vqa (n_vqa records), caption (n_captions), geneval and vae-recon (n_images) on the world of `seed` and
    `world` (SyntheticWorld's other arguments) from record `first`; `seed` also seeds the evaluation's draws.
    short_vqa: also ask the same questions without options (vqa-short, n_vqa records); chain_vqa: and with options
    answered "<option> (<letter>)" (vqa-chain, n_vqa records).  n_clear: that many
    MMD-Bench items answered in CLEAR's generate-then-answer format (task clear) and directly (task mmd-bench);
    with short_vqa also as short answers (clear-short, mmd-bench-short)."""
    from ..data.synthetic import SyntheticWorld
    from .runner import save_grid
    from .tasks import EvalContext, get_task, pixel_range

    n = max(n_vqa, n_images, n_captions, n_clear, 1)
    world = SyntheticWorld(size=image_size, seed=seed, length=first + n, **(world or {}))
    res: dict = {"held_out_records": [first, first + n]}
    edir = None
    if out_dir is not None:
        edir = Path(out_dir) / "eval"
        edir.mkdir(parents=True, exist_ok=True)

    def run(task, k):
        return get_task(task).run(model, EvalContext(world, first, k, seed, image_size, steps))

    def vqa_summary(out, **extra):
        items, per_type = out.items, {}
        for it in items:
            per_type.setdefault(it["type"], []).append(it["score"])
        return {"n": len(items), "accuracy": sum(it["score"] for it in items) / len(items), **extra,
                "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
                "examples": [{"answer": it["answer"], "predicted": it["predicted"]} for it in items[:8]]}

    if n_vqa:
        out = run("vqa", n_vqa)
        res["vqa"] = vqa_summary(out, chance=0.25, majority_letter=out.extra["majority_letter"])
    if n_vqa and short_vqa:
        out = run("vqa-short", n_vqa)
        res["vqa_short"] = vqa_summary(out, majority_answer=out.extra["majority_answer"])
    if n_vqa and chain_vqa:
        out = run("vqa-chain", n_vqa)
        res["vqa_chain"] = vqa_summary(out, chance=0.25, majority_letter=out.extra["majority_letter"],
                                       word_accuracy=out.extra["word_accuracy"],
                                       consistent=out.extra["consistent"])
    if n_captions:
        out = run("caption", n_captions)
        res["captions"] = [{"truth": it["truth"], "generated": it["generated"], "score": it["score"]}
                           for it in out.items]
    if n_images:
        gen_out, vae_out = run("geneval", n_images), run("vae-recon", n_images)
        gen, recon = gen_out.images["generated"], vae_out.images["reconstruction"]
        items = []
        for k, (g, v) in enumerate(zip(gen_out.items, vae_out.items)):
            item = {"prompt": g["prompt"], "tag": g["type"], "score": g["score"], "correct": bool(g["correct"]),
                    "vae_reconstruction_score": v["prompt_score"]}
            if edir is not None:
                _save_png(to_pil(gen[k]), edir / f"generated-{k}.png")
                item["png"] = str(edir / f"generated-{k}.png")
            items.append(item)
        m = len(items)
        tags: dict = {}
        for i in items:
            tags.setdefault(i["tag"], []).append(i["score"])
        res["images"] = {"n": m, "mean_score": sum(i["score"] for i in items) / m,
                         "correct": sum(i["correct"] for i in items) / m,
                         "per_tag": {t: sum(v) / len(v) for t, v in sorted(tags.items())},
                         "vae_reconstruction_mean_score": sum(i["vae_reconstruction_score"] for i in items) / m,
                         "items": items}
        if edir is not None:   # rows: truth, VAE reconstruction, generated
            recs = [world[first + k] for k in range(m)]
            grid = {"rows": ["truth", "VAE recon", "generated"],
                    "columns": [{"label": "", "images": [recs[k].image, recon[k], gen[k]]} for k in range(m)]}
            res["images"]["grid_png"] = save_grid(grid, edir / "grid.png", tile=image_size, labels=False)
    for key, task, direct in (("clear", "clear", "mmd-bench"), ("clear_short", "clear-short", "mmd-bench-short")):
        if not n_clear or (key == "clear_short" and not short_vqa):
            continue
        out = run(task, n_clear)
        items = out.items
        mm = run(direct, n_clear)

        def mean(k, its=items):
            return sum(it[k] for it in its) / len(its)

        res[key] = {"n": len(items), "accuracy": mean("score"), "restored": mean("restored"),
                    "clean_accuracy": mean("clean"), "restored_clean": mean("restored_clean"),
                    "format": mean("format"), "direct_accuracy": mean("score", mm.items),
                    "direct_clean_accuracy": mean("clean", mm.items),
                    **{k: v for k, v in out.extra.items() if k.startswith("psnr")},
                    "per_level": {lv: {"accuracy": mean("score", g), "restored": mean("restored", g)}
                                  for lv in ("low", "mid", "high")
                                  if (g := [it for it in items if it["level"] == lv])}}
        if edir is not None and out.grid:
            res[key]["grid_png"] = save_grid(out.grid, edir / f"{task}.png")
    if prompts:
        S = image_size
        gen = model.generate_image(list(prompts), height=S, width=S, steps=steps, seed=seed)["images"]
        extra = []
        for k, (p, g) in enumerate(zip(prompts, gen)):
            item = {"prompt": p}
            if edir is not None:
                _save_png(to_pil(g, pixel_range(model)), edir / f"prompt-{k}.png")
                item["png"] = str(edir / f"prompt-{k}.png")
            extra.append(item)
        res["prompts"] = extra
    return res


def report_lines(ev: dict) -> list:
    lines = []
    if "vqa" in ev:
        v = ev["vqa"]
        lines.append(f"eval vqa: {v['accuracy']:.3f} exact-match on {v['n']} held-out questions (chance "
                     f"{v['chance']}, always-the-commonest-letter {v['majority_letter']:.3f})")
    if "vqa_chain" in ev:
        v = ev["vqa_chain"]
        lines.append(f"eval vqa-chain: {v['accuracy']:.3f} exact-match of the letter on {v['n']} held-out questions "
                     f"answered '<option> (<letter>)' (option text right {v['word_accuracy']:.3f}, letter is the "
                     f"named option's {v['consistent']:.3f}; always-the-commonest-letter {v['majority_letter']:.3f})")
    if "vqa_short" in ev:
        v = ev["vqa_short"]
        lines.append(f"eval vqa-short: {v['accuracy']:.3f} exact-match of the answer word on {v['n']} held-out "
                     f"questions (always-the-commonest-answer-of-its-type {v['majority_answer']:.3f}); per type "
                     + ", ".join(f"{t} {a:.2f}" for t, a in v["per_type"].items()))
    for c in ev.get("captions", []):
        lines.append(f"eval caption (score {c['score']:.2f}): {c['generated']!r}\n        truth: {c['truth']!r}")
    if "images" in ev:
        im = ev["images"]
        lines.append(f"eval images: checker score {im['mean_score']:.3f}, all-correct {im['correct']:.3f} on "
                     f"{im['n']} held-out prompts (the VAE's reconstruction of the true pictures scores "
                     f"{im['vae_reconstruction_mean_score']:.3f}); {im.get('grid_png', '')}")
        if len(im.get("per_tag", {})) > 1:
            lines.append("eval images by prompt tag: "
                         + ", ".join(f"{t} {v:.3f}" for t, v in im["per_tag"].items()))
    for key, what in (("clear", "letters"), ("clear_short", "short answers")):
        if key not in ev:
            continue
        c = ev[key]
        lines.append(f"eval {key} (generate-then-answer, {what}, on {c['n']} degraded held-out pictures): accuracy "
                     f"{c['accuracy']:.3f} (answered directly: {c['direct_accuracy']:.3f}), restored "
                     f"{c['restored']:.2f} of them; clean pictures: accuracy {c['clean_accuracy']:.3f} (directly "
                     f"{c['direct_clean_accuracy']:.3f}), restored {c['restored_clean']:.2f}; format {c['format']:.2f}"
                     + (f"; restorations' PSNR {c['psnr_restored']:.1f} dB (the degraded pictures' "
                        f"{c['psnr_degraded_of_restored']:.1f})" if "psnr_restored" in c else ""))
    if ev.get("captions"):
        cs = [c["score"] for c in ev["captions"]]
        lines.append(f"eval captions: mean caption-check score {sum(cs) / len(cs):.3f} on {len(cs)} held-out "
                     f"pictures")
    return lines
