"""R3's supervised data on the synthetic world: scenes that miss their prompt by one edit, the instruction that fixes
them, and the samples that teach the generate -> reflect -> refine format before RL (papers.md section 4).

For a record whose scene satisfies its prompt spec, :func:`edit_pair` changes one object the prompt names - its
colour ("recolor"), its shape ("reshape") or its presence ("remove") - so that the pixel checker no longer accepts
the picture, and writes the instruction that undoes the change ("change the blue square to red", "turn the red
triangle into a square", "add a red square").  Both pictures are rendered from scene descriptions, so the target
of the edit is exactly the record's picture.

:func:`r3_samples` turns a record into the three supervised tasks:

* ``plan``: [prompt] -> "<think> plan </think>" (loss) -> the picture (generated);
* ``reflect``: [picture, reflection prompt] -> "<think> what the picture shows </think> instruction" (loss), for the
  edited picture (the instruction) and, with probability ``p_perfect``, for the true one ("no further edit needed");
* ``edit``: [edited picture (understood), instruction] -> the true picture (generated).
"""
from __future__ import annotations

import copy
import random

from ..utils import seed_of

__all__ = ["edit_pair", "r3_samples", "EDITS", "plan_text"]

EDITS = ("recolor", "reshape", "remove")


def _matches(o, g) -> bool:
    return o["color"] == g["color"] and (g.get("kind") is None or o["kind"] == g["kind"])


def _phrase_one(color: str, kind: str) -> str:
    head = f"{color} {kind}"
    return ("an " if head[0] in "aeiou" else "a ") + head


def edit_pair(record, rng: random.Random, kinds=None, colors=None):
    """(edited scene, instruction, edit kind) with the edited scene failing ``record.prompt`` and the instruction
    restoring it, or None when no edit of the allowed kinds applies.  ``kinds`` / ``colors``: the world's
    vocabulary (defaults: those of the scene's objects and the prompt)."""
    from ..eval.checker import check
    from .synthetic import COLORS, KINDS, render

    spec = record.prompt
    scene = record.scene
    kinds = tuple(kinds or KINDS)
    colors = tuple(colors or COLORS)
    named = [(k, gi) for k, o in enumerate(scene["objects"]) for gi, g in enumerate(spec["objects"]) if _matches(o, g)]
    if not named:
        return None
    options = list(EDITS)
    rng.shuffle(options)
    for what in options:
        k, gi = rng.choice(named)
        o = scene["objects"][k]
        new = copy.deepcopy(scene)
        if what == "recolor":
            c = rng.choice([c for c in colors if c != o["color"]])
            new["objects"][k]["color"] = c
            ins = f"change the {c} {o['kind']} to {o['color']}"
        elif what == "reshape":
            kd = rng.choice([kd for kd in kinds if kd != o["kind"]])
            new["objects"][k]["kind"] = kd
            ins = f"turn the {o['color']} {kd} into a {o['kind']}"
        else:
            del new["objects"][k]
            ins = f"add {_phrase_one(o['color'], o['kind'])}"
        img, _ = render(new)
        if not check(spec, img, value_range=(0, 255))["correct"]:
            return new, ins, what
    return None


def plan_text(record) -> str:
    """R3's round-1 reasoning for a prompt: what to draw, object by object, from the prompt spec."""
    from .synthetic import prompt_text

    parts = []
    for g in record.prompt["objects"]:
        parts.append(prompt_text({"objects": [g], "relation": None}))
    rel = record.prompt.get("relation")
    plan = "draw " + " and ".join(parts)
    if rel:
        plan += f", with the first {rel['rel']} the second"
    return plan


def r3_samples(record, tasks=("plan", "reflect", "edit"), p_perfect: float = 0.15, kinds=None, colors=None) -> list:
    """The record as R3 SFT samples (see the module docstring); deterministic per (seed, index)."""
    from ..model.refine import REFLECT_PROMPT, STOP_PHRASE
    from .packing import ImageItem, Sample, TextItem
    from .synthetic import END, caption, render

    def img(t):
        return t.float() / 127.5 - 1.0

    rng = random.Random(seed_of(record.seed, record.index, "r3"))
    meta = {"source": "synthetic", "index": record.index, "seed": record.seed}
    prompt = record.prompt["text"]
    out = []
    if "plan" in tasks:
        out.append(Sample([TextItem(prompt), TextItem(f"<think> {plan_text(record)} </think>", loss=True),
                           ImageItem(img(record.image), "generate")], meta={**meta, "task": "plan"}))
    pair = edit_pair(record, rng, kinds, colors) if ("reflect" in tasks or "edit" in tasks) else None
    ask = REFLECT_PROMPT.format(prompt=prompt)
    if pair is not None:
        scene, ins, what = pair
        bad, _ = render(scene)
        if "reflect" in tasks:
            seen = caption(scene, rng)
            out.append(Sample([ImageItem(img(bad), "understand"), TextItem(ask),
                               TextItem(f"<think> {seen} </think> {ins}{END}", loss=True)],
                              meta={**meta, "task": "reflect", "edit": what}))
        if "edit" in tasks:
            out.append(Sample([ImageItem(img(bad), "understand"), TextItem(ins),
                               ImageItem(img(record.image), "generate")], meta={**meta, "task": "edit", "edit": what}))
    if "reflect" in tasks and (pair is None or rng.random() < p_perfect):
        seen = caption(record.scene, rng)
        out.append(Sample([ImageItem(img(record.image), "understand"), TextItem(ask),
                           TextItem(f"<think> {seen} </think> {STOP_PHRASE}{END}", loss=True)],
                          meta={**meta, "task": "reflect", "edit": None}))
    return out
