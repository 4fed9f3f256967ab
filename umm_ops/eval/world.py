"""Held-out evaluation on the synthetic world (what the SFT recipe reports after training).

Records ``first, first + 1, ...`` (never trained on when ``first`` is the recipe's ``train_records``): VQA
exact-match of the answer letter (greedy), captions, and generated images scored by the world's pixel checker
(:func:`umm_ops.eval.check`) next to two references: the checker's score of the VAE's reconstruction of the true
picture (an upper bound for anything decoded by that VAE) and the majority-letter baseline of the VQA answers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..utils import atomic_write, seed_of

__all__ = ["evaluate_world", "to_pil", "report_lines"]


def to_pil(img: torch.Tensor):
    """(3, H, W) in [-1, 1] -> PIL image."""
    from PIL import Image

    x = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().cpu().numpy())


def _save_png(img, path: Path) -> None:
    atomic_write(path, write=lambda p: img.save(p, format="PNG"), suffix=".png")


@torch.no_grad()
def evaluate_world(model, *, image_size: int, seed: int, max_objects: int, first: int, n_vqa: int = 32,
                   n_images: int = 4, n_captions: int = 2, steps: int = 12, prompts=(), out_dir=None) -> dict:
    from ..data.packing import ImageItem, Sample, TextItem
    from ..data.synthetic import SyntheticWorld, format_question
    from .checker import check

    n = max(n_vqa, n_images, n_captions, 1)
    world = SyntheticWorld(size=image_size, seed=seed, max_objects=max_objects, length=first + n)
    tok = model.tokenizer
    res: dict = {"held_out_records": [first, first + n]}
    edir = None
    if out_dir is not None:
        edir = Path(out_dir) / "eval"
        edir.mkdir(parents=True, exist_ok=True)

    def pix(rec):
        return rec.image.float() / 127.5 - 1.0

    if n_vqa:
        qs, answers, types = [], [], []
        for k in range(n_vqa):
            rec = world[first + k]
            q = rec.vqa[seed_of(seed, first + k, "eval-q") % len(rec.vqa)]
            qs.append(Sample([ImageItem(pix(rec), "understand"), TextItem(format_question(q))]))
            answers.append(q["answer_letter"])
            types.append(q["type"])
        n_new = max(len(tok.encode(a)) for a in answers)
        preds = []
        for i in range(0, len(qs), 16):
            preds += model.generate_text(qs[i:i + 16], max_new_tokens=n_new, temperature=0.0)
        ok = [p.strip() == a for p, a in zip(preds, answers)]
        per_type: dict = {}
        for t, o in zip(types, ok):
            per_type.setdefault(t, []).append(o)
        majority = max(answers.count(a) for a in set(answers)) / len(answers)
        res["vqa"] = {"n": len(ok), "accuracy": sum(ok) / len(ok), "chance": 0.25, "majority_letter": majority,
                      "per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
                      "examples": [{"answer": a, "predicted": p} for a, p in list(zip(answers, preds))[:8]]}
    if n_captions:
        recs = [world[first + k] for k in range(n_captions)]
        cs = [Sample([ImageItem(pix(r), "understand"), TextItem("Describe the image.")]) for r in recs]
        outs = model.generate_text(cs, max_new_tokens=80, temperature=0.0)
        res["captions"] = [{"truth": r.caption, "generated": o} for r, o in zip(recs, outs)]
    if n_images:
        recs = [world[first + k] for k in range(n_images)]
        S = image_size
        gen = model.generate_image([r.prompt["text"] for r in recs], height=S, width=S, steps=steps,
                                   seed=seed)["images"].float().cpu()
        real = torch.stack([pix(r) for r in recs]).to(model.device, model.dtype)
        recon = model.vae.decode(model.vae.encode(real), (S, S)).float().cpu()
        scores = [check(r.prompt, g, value_range=(-1.0, 1.0)) for r, g in zip(recs, gen)]
        rscores = [check(r.prompt, x, value_range=(-1.0, 1.0)) for r, x in zip(recs, recon)]
        items = []
        for k, (r, s, rs) in enumerate(zip(recs, scores, rscores)):
            item = {"prompt": r.prompt["text"], "tag": r.prompt["tag"], "score": s["score"], "correct": s["correct"],
                    "vae_reconstruction_score": rs["score"]}
            if edir is not None:
                _save_png(to_pil(gen[k]), edir / f"generated-{k}.png")
                item["png"] = str(edir / f"generated-{k}.png")
            items.append(item)
        m = len(items)
        res["images"] = {"n": m, "mean_score": sum(i["score"] for i in items) / m,
                         "correct": sum(i["correct"] for i in items) / m,
                         "vae_reconstruction_mean_score": sum(i["vae_reconstruction_score"] for i in items) / m,
                         "items": items}
        if edir is not None:   # rows: truth, VAE reconstruction, generated
            from PIL import Image

            grid = Image.new("RGB", (len(recs) * (S + 4), 3 * (S + 4)), "white")
            for k in range(len(recs)):
                for row, im in enumerate((pix(recs[k]), recon[k], gen[k])):
                    grid.paste(to_pil(im), (k * (S + 4), row * (S + 4)))
            _save_png(grid, edir / "grid.png")
            res["images"]["grid_png"] = str(edir / "grid.png")
    if prompts:
        S = image_size
        gen = model.generate_image(list(prompts), height=S, width=S, steps=steps, seed=seed)["images"]
        extra = []
        for k, (p, g) in enumerate(zip(prompts, gen)):
            item = {"prompt": p}
            if edir is not None:
                _save_png(to_pil(g), edir / f"prompt-{k}.png")
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
    for c in ev.get("captions", []):
        lines.append(f"eval caption: {c['generated']!r}\n        truth: {c['truth']!r}")
    if "images" in ev:
        im = ev["images"]
        lines.append(f"eval images: checker score {im['mean_score']:.3f}, all-correct {im['correct']:.3f} on "
                     f"{im['n']} held-out prompts (the VAE's reconstruction of the true pictures scores "
                     f"{im['vae_reconstruction_mean_score']:.3f}); {im.get('grid_png', '')}")
    return lines
