"""CLEAR's generate-then-answer inference (papers.md section 2; issue 16): understand a degraded image by restoring it
first when the model decides to.

For each (image, question): the model reads [image, question] and writes its reasoning; if it asks for a restoration
(it writes ``RESTORE_TAG``, the decoder stops there), the restored image is generated conditioned on everything so far
(the editing path: the degraded image is in context), joins the context as an image to understand (VAE encode ->
ViT -> projector, as the model reads any image), and the model writes the rest: its reasoning about the restored
image and ``<answer>...</answer>``.  Otherwise its first text already holds the answer.  Batched; every draw seeded by
(seed, question, its occurrence among equal items, part), so an item does not depend on the batch.

This is the decode -> re-encode path; the latent bridge's direct path (the restored latent written into the KV cache
without decoding to pixels) is issue 16's stage 2 and is not built.
"""
from __future__ import annotations

import torch

from ..data.packing import ImageItem, Sample, TextItem
from ..utils import seed_of

__all__ = ["generate_then_answer"]


@torch.no_grad()
def generate_then_answer(model, images, questions, think_tokens: int = 96, answer_tokens: int = 96,
                         steps: int | None = None, cfg_scale: float | None = None, temperature: float = 0.0,
                         top_k: int | None = None, seed: int = 0, restorations=None) -> list:
    """images: (N, 3, H, W) or a list of (3, H, W) in [-1, 1]; questions: N strings (the question as the model was
    trained to read it, options included).  Returns one dict per item: ``text`` (everything the model wrote, the
    restoration marker included), ``restored`` (bool: it asked for a restoration), ``image`` (the restored (3, H, W)
    image in [-1, 1], or None), ``answer`` (inside <answer>...</answer>, "" if missing), ``format`` (think / answer /
    order checks).  restorations: optional images ((3, H, W) in [-1, 1], one per item) used as the restoration
    instead of generating one, where the model asks for it (e.g. the clean pictures: an oracle restoration that
    separates the format from the quality of the model's own restorations).  Token budgets: the world tokenizer spells the format's markers in byte pieces (the restoration
    thought and marker are ~51 tokens, an answer with its reasoning ~50)."""
    from ..data.clear_data import RESTORE_TAG, parse_clear
    from .generate import decode, generate_image

    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"generate_then_answer: images must be (N, 3, H, W), got {tuple(images.shape)}")
        images = list(images)
    if isinstance(questions, str):
        questions = [questions]
    if len(images) != len(questions) or not images:
        raise ValueError(f"generate_then_answer: expected one question per image, got {len(images)} images and "
                         f"{len(questions)} questions")
    if not all(isinstance(q, str) and q for q in questions):
        raise ValueError("generate_then_answer: every question must be a non-empty string")
    for im in images:
        if not torch.isfinite(im).all():
            raise ValueError("generate_then_answer: an input image holds NaN / Inf values")
    n = len(images)
    keys = [(q, questions[:i].count(q)) for i, q in enumerate(questions)]

    def sd(i, what):
        return seed_of(int(seed), *keys[i], what)

    base = [[ImageItem(im, "understand"), TextItem(q)] for im, q in zip(images, questions)]
    first = decode(model, [Sample(b) for b in base], max_new_tokens=think_tokens, temperature=temperature,
                   top_k=top_k, stop=[RESTORE_TAG], seed=[sd(i, "think") for i in range(n)])
    out = []
    for r in first:     # decode cuts the text before the stop string: the marker is put back
        stop = r["finish_reason"] == "stop"
        out.append({"text": r["text"] + (RESTORE_TAG if stop else ""), "restored": stop, "image": None})
    idx = [i for i in range(n) if out[i]["restored"]]
    if idx:
        ctx = [Sample(base[i] + [TextItem(out[i]["text"])]) for i in idx]
        H, W = images[idx[0]].shape[-2:]
        if any(tuple(images[i].shape[-2:]) != (H, W) for i in idx):
            raise ValueError("generate_then_answer: images to restore in one call must share their size")
        if restorations is not None:
            if len(restorations) != n:
                raise ValueError(f"generate_then_answer: expected one restoration per image ({n}), got "
                                 f"{len(restorations)}")
            restored = torch.stack([restorations[i] for i in idx])
        else:
            restored = generate_image(model, ctx, height=H, width=W, steps=steps, cfg_scale=cfg_scale,
                                      seed=[sd(i, "restore") for i in idx])["images"]
        ans = decode(model, [Sample(s.items + [ImageItem(im, "understand")]) for s, im in zip(ctx, restored)],
                     max_new_tokens=answer_tokens, temperature=temperature, top_k=top_k,
                     seed=[sd(i, "answer") for i in idx])
        for j, i in enumerate(idx):
            out[i]["image"] = restored[j]
            out[i]["text"] += ans[j]["text"]
    for o in out:
        p = parse_clear(o["text"])
        o["answer"], o["format"] = p["answer"], p["format"]
    return out
