"""R3's inference loop (reason, reflect, refine; papers.md section 4): generate -> understand -> regenerate.

Round 1 plans and draws: the model continues the prompt with its reasoning (R3: ``<think> plan </think>``, stopped at
``</think>``) and the image is generated conditioned on [prompt, reasoning].  Every later round shows the model its own image with R3's
reflection prompt; the model thinks and writes one editing instruction, and the image is edited with it (the
``edit_image`` path: [image to understand, instruction] -> new image).  The loop stops for a prompt when the model
answers that no edit is needed (``STOP_PHRASE``) or after ``max_rounds`` rounds.

Batched over prompts (the prompts still refining at a round run together); every draw seeded by (seed, prompt text,
its occurrence among equal prompts, round), so a prompt's rounds do not depend on the other prompts.
"""
from __future__ import annotations

import re

import torch

from ..data.packing import ImageItem, Sample, TextItem
from ..utils import seed_of

__all__ = ["generate_refined", "REFLECT_PROMPT", "STOP_PHRASE", "instruction_of"]

REFLECT_PROMPT = ("The description of the target image is: {prompt}. How to further edit the provided image to make it "
                  "consistent with the target description? Give concrete editing instructions in a single sentence. "
                  "If no edit is needed, answer: no further edit needed.")
STOP_PHRASE = "no further edit needed"
_THINK = re.compile(r"<think>.*?</think>", re.S)


def instruction_of(text: str) -> str:
    """The instruction of a reflection: the text with its <think>...</think> parts removed, stripped (an unclosed
    <think> keeps what follows it)."""
    return _THINK.sub("", text).strip()


def is_stop(text: str) -> bool:
    """Whether a reflection says that no further edit is needed (case-insensitive, anywhere in its instruction)."""
    return STOP_PHRASE in instruction_of(text).lower()


@torch.no_grad()
def generate_refined(model, prompts, max_rounds: int = 4, think_tokens: int = 64, reflect_tokens: int = 64,
                     steps: int | None = None, edit_steps: int | None = None, cfg_scale: float | None = None,
                     temperature: float = 0.0, top_k: int | None = None, seed: int = 0, height: int | None = None,
                     width: int | None = None, image_cfg_scale: float = 1.0, cfg_renorm: str = "none",
                     cfg_interval=None) -> list:
    """Run the loop for each prompt (a str) -> one dict per prompt:

    ``rounds``: a list of {"round", "text" (the model's reasoning / reflection), "instruction" (rounds >= 2),
    "image" ((3, H, W) in [-1, 1]; the image after this round: for a stopping round the previous one)};
    ``stopped``: whether the model itself said no further edit was needed (else max_rounds was reached);
    ``image``: the final image.

    cfg_scale guides both the drawing (round 1) and the edits (on the instruction); image_cfg_scale and cfg_renorm
    add the edits' image guidance (BAGEL / R3's two-scale CFG, ``umm_ops.model.generate.guide``; R3: 4.0 / 1.5,
    "text_channel"); the default 1 / "none" is one-scale guidance.  cfg_interval (lo, hi): guidance of the
    drawing and the edits only at noise levels in (lo, hi] (BAGEL / R3's cfg_interval, R3: (0.4, 1.0)).
    """
    from .generate import decode, edit_image, generate_image

    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"generate_refined: prompts must be non-empty strings, got {prompts!r:.100}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"generate_refined: max_rounds must be an int >= 1, got {max_rounds!r}")
    size = model.config.image_size
    H, W = int(height or size), int(width or size)
    n = len(prompts)
    if max_rounds > 1:      # refuse settings the edits cannot take before anything is drawn
        from .generate import CFG_RENORMS

        if cfg_renorm not in CFG_RENORMS:
            raise ValueError(f"generate_refined: cfg_renorm must be one of {', '.join(CFG_RENORMS)}, got "
                             f"{cfg_renorm!r}")
        if float(image_cfg_scale) != 1.0 and model.profile.dummy_image:
            raise ValueError(f"generate_refined: image_cfg_scale={image_cfg_scale} (two-scale CFG of the edits) needs "
                             f"a prompt without its image, which the {model.profile.name!r} profile does not have "
                             f"(a dummy image stands in front of every prompt without one); use image_cfg_scale=1")
    out = [{"prompt": p, "rounds": [], "stopped": False, "image": None} for p in prompts]

    keys = [(p, prompts[:i].count(p)) for i, p in enumerate(prompts)]     # (prompt, its occurrence), not the index

    def sd(i, r, what):
        return seed_of(int(seed), *keys[i], r, what)

    # round 1: reason, then draw conditioned on [prompt, reasoning]
    plans = decode(model, prompts, max_new_tokens=think_tokens, temperature=temperature, top_k=top_k,
                   stop=["</think>"], seed=[sd(i, 1, "text") for i in range(n)])
    eos = model.tokenizer.eos_id
    for r in plans:       # the plan as written, its closing </think> included: the image follows it (R3's format)
        r["text"] = model.tokenizer.decode([t for t in r["ids"] if t != eos])
    samples = [Sample([TextItem(p)] + ([TextItem(r["text"])] if r["text"] else [])) for p, r in zip(prompts, plans)]
    imgs = generate_image(model, samples, height=H, width=W, steps=steps, cfg_scale=cfg_scale,
                          cfg_interval=cfg_interval,
                          seed=[sd(i, 1, "image") for i in range(n)])["images"]
    for i in range(n):
        out[i]["rounds"].append({"round": 1, "text": plans[i]["text"], "instruction": None, "image": imgs[i]})
        out[i]["image"] = imgs[i]
    active = list(range(n))
    for r in range(2, max_rounds + 1):
        if not active:
            break
        asks = [Sample([ImageItem(out[i]["image"], "understand"),
                        TextItem(REFLECT_PROMPT.format(prompt=prompts[i]))]) for i in active]
        refl = decode(model, asks, max_new_tokens=reflect_tokens, temperature=temperature, top_k=top_k,
                      seed=[sd(i, r, "text") for i in active])
        edit_i, edit_txt = [], []
        for i, res in zip(active, refl):
            ins = instruction_of(res["text"])
            if is_stop(res["text"]):
                out[i]["stopped"] = True
                out[i]["rounds"].append({"round": r, "text": res["text"], "instruction": ins,
                                         "image": out[i]["image"]})
            else:
                edit_i.append(i)
                edit_txt.append(ins)
        if edit_i:
            new = edit_image(model, [out[i]["image"] for i in edit_i], edit_txt, height=H, width=W,
                             steps=edit_steps if edit_steps is not None else steps, cfg_scale=cfg_scale,
                             image_cfg_scale=image_cfg_scale, cfg_renorm=cfg_renorm, cfg_interval=cfg_interval,
                             seed=[sd(i, r, "image") for i in edit_i])["images"]
            for j, i in enumerate(edit_i):
                text = refl[active.index(i)]["text"]
                out[i]["rounds"].append({"round": r, "text": text, "instruction": edit_txt[j], "image": new[j]})
                out[i]["image"] = new[j]
        active = edit_i
    return out
