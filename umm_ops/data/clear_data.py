"""CLEAR's generate-then-answer data on the synthetic world (papers.md section 2; issue 16, stage 1).

A record's question about a *degraded* copy of its picture becomes one supervised sample in CLEAR's output format:

* restore (the picture is degraded at level mid or high):
  [degraded picture (understood)] [question] -> "<think> RESTORE_THOUGHT </think> <image_restore>" (loss)
  -> [the clean picture] (generated: flow loss, conditioned on the degraded picture, the question and the thought;
  the editing path) -> [the clean picture again, understood] -> "<think> what the clean picture shows
  </think><answer>X</answer>" (loss): at inference the restored picture joins the context as a picture to
  understand (``generate_then_answer``), so the answer is trained reading the clean picture that way (BAGEL, on
  which CLEAR is built, also follows a generated image with its clean understanding copy).  With the tiny preset's
  gen_mode "full" the answer also sees the noisy generated tokens in training, which inference does not have;
* direct (a clean picture, or one degraded at level low; probability ``p_direct``):
  [picture] [question] -> "<think> what the picture shows </think><answer>X</answer>" (loss),

so the model learns when to restore (CLEAR: clean or mildly degraded images are answered directly).  The
degradation type is drawn with CLEAR's weights (``degradations.sample_kind``), the level uniformly among those of the
branch; everything is deterministic per (world seed, record index, question).  A degradation that leaves the
picture unchanged (~1% at mid / high: block_exchange or mean_shift on flat regions) makes the sample a direct one.

The world tokenizer's 512 ids are all in use, so the format's markers (``<think>``, ``<image_restore>``,
``<answer>``) are spelled in its byte-level pieces (about 12 tokens each) instead of being added as special tokens;
on a Qwen-vocabulary model they would be added tokens (not built: the synthetic world's models use the world
tokenizer).
"""
from __future__ import annotations

import re

import torch

from ..utils import seed_of

__all__ = ["RESTORE_TAG", "RESTORE_THOUGHT", "clear_samples", "clear_vqa_sample", "CLEAR_SUFFIX_FREE", "USER_SEEN", "clear_question", "answer_text", "parse_clear",
           "DIRECT_LEVELS", "RESTORE_LEVELS", "CLEAR_SUFFIX_MC", "CLEAR_SUFFIX_SA"]

RESTORE_TAG = "<image_restore>"
RESTORE_THOUGHT = "The image is degraded. Restore it first."
DIRECT_LEVELS = ("clean", "low")          # answered directly
RESTORE_LEVELS = ("mid", "high")          # restored first
# the instruction that asks for the format (it replaces the plain VQA suffix, so a model trained on both formats
# knows which one a question wants)
CLEAR_SUFFIX_MC = ("Think first, restore the image if it is degraded, then give the option's letter in "
                   "<answer></answer>.")
CLEAR_SUFFIX_SA = "Think first, restore the image if it is degraded, then give a single word or phrase in <answer></answer>."
CLEAR_SUFFIX_FREE = "Think first, restore the image if it is degraded, then answer in <answer></answer>."
# the answering <think> of a user's record without its own reasoning ("think"): there is no scene to describe
USER_SEEN = "I read the picture to answer."
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)


def answer_text(seen: str, answer: str) -> str:
    """The answering part of the format: ``<think> seen </think><answer>answer</answer>``."""
    return f"<think> {seen} </think><answer>{answer}</answer>"


def clear_question(item: dict, multiple_choice: bool = True) -> str:
    """The prompt of a VQA item in the generate-then-answer format: the question (and options), then the format's
    instruction instead of the plain VQA suffix."""
    from .synthetic import format_question

    return format_question(item, multiple_choice, CLEAR_SUFFIX_MC if multiple_choice else CLEAR_SUFFIX_SA)


def parse_clear(text: str) -> dict:
    """A generated generate-then-answer text -> {"restore": the model asked for a restoration (RESTORE_TAG present),
    "answer": the text inside the first <answer>...</answer> (an unclosed <answer> keeps what follows it), stripped;
    "" when there is none, "format": think / answer / order checks of ``umm_ops.rl.FormatReward``}."""
    if not isinstance(text, str):
        raise TypeError(f"parse_clear: expected the generated text (str), got {type(text).__name__}")
    from ..rl.rewards import FormatReward

    m = _ANSWER.search(text)
    return {"restore": RESTORE_TAG in text, "answer": m.group(1).strip() if m else "",
            "format": FormatReward().checks(text)}


def clear_samples(record, multiple_choice: bool = True, p_direct: float = 0.3, restore_levels=RESTORE_LEVELS,
                  direct_levels=DIRECT_LEVELS) -> list:
    """One generate-then-answer sample per VQA question of the record (module docstring)."""
    import random

    from .synthetic import caption

    _check_levels(p_direct, restore_levels, direct_levels, "clear_samples")
    meta = {"source": "synthetic", "index": record.index, "seed": record.seed}
    out = []
    for j, q in enumerate(record.vqa):
        rng = random.Random(seed_of(record.seed, record.index, "clear", j))
        ans = q["answer_letter"] if multiple_choice else q["answer"]
        out.append(_clear_sample(record.image, clear_question(q, multiple_choice), ans, rng,
                                 kind_seed=seed_of(record.seed, record.index, "clear-kind", j),
                                 degrade_seed=record.seed, degrade_index=record.index,
                                 seen=lambda rng: caption(record.scene, rng), p_direct=p_direct,
                                 restore_levels=restore_levels, direct_levels=direct_levels,
                                 meta={**meta, "type": q["type"]}))
    return out


def _check_levels(p_direct, restore_levels, direct_levels, who: str):
    if not 0.0 <= float(p_direct) <= 1.0:
        raise ValueError(f"{who}: p_direct must be in [0, 1], got {p_direct!r}")
    for name, lv in (("restore_levels", restore_levels), ("direct_levels", direct_levels)):
        bad = [x for x in lv if x not in ("clean", "low", "mid", "high")]
        if not lv or bad:
            raise ValueError(f"{who}: {name} must be a non-empty subset of clean / low / mid / high, got "
                             f"{tuple(lv)!r}")


def _clear_sample(clean, question: str, answer: str, rng, *, kind_seed: int, degrade_seed: int, degrade_index: int,
                  seen, p_direct: float, restore_levels, direct_levels, meta: dict, size=None, backend="torch"):
    """One sample of the format (module docstring) from a clean uint8 (3, H, W) picture.  The draws, in order:
    rng.random() (direct?), rng.choice(level), the degradation type from a generator seeded by kind_seed, the
    degradation itself (seed degrade_seed, index degrade_index), then ``seen(rng)`` (the text read from the
    picture; a str is taken as it is).  size: the pictures are degraded at their own resolution, then resized to
    (size, size) (bicubic, this project's square preprocessing) when given."""
    from .degradations import degrade, sample_kind
    from .packing import ImageItem, Sample, TextItem
    from .synthetic import END

    direct = rng.random() < p_direct
    level = rng.choice(list(direct_levels if direct else restore_levels))
    kind = None
    picture = clean
    if level != "clean":
        kind = sample_kind(torch.Generator().manual_seed(kind_seed))
        picture = degrade(clean[None], kind, level, seed=degrade_seed, index=[degrade_index], backend=backend)[0]
        if torch.equal(picture, clean):
            direct = True     # the degradation left no trace (block_exchange / mean_shift on a flat scene)
    seen = seen(rng) if callable(seen) else seen

    def img(t):
        if size is not None and tuple(t.shape[-2:]) != (size, size):
            from ..model.profile import square_resize

            return (square_resize(t.permute(1, 2, 0).contiguous().numpy(), size) * 2 - 1).clamp(-1, 1)
        return t.float() / 127.5 - 1.0

    items = [ImageItem(img(picture), "understand"), TextItem(question)]
    if direct:
        items.append(TextItem(answer_text(seen, answer) + END, loss=True))
    else:
        restored = img(clean)
        items += [TextItem(f"<think> {RESTORE_THOUGHT} </think> {RESTORE_TAG}", loss=True),
                  ImageItem(restored, "generate"),
                  ImageItem(restored, "understand"),
                  TextItem(answer_text(seen, answer) + END, loss=True)]
    return Sample(items, meta={**meta, "task": meta.get("task", "clear"), "degradation": kind, "level": level,
                               "restore": not direct})


def clear_vqa_sample(rec: dict, size: int, seed: int, draw: int, p_direct: float = 0.3,
                     restore_levels=RESTORE_LEVELS, direct_levels=DIRECT_LEVELS, backend: str = "torch"):
    """One generate-then-answer sample from a record of a user's VQA data (:class:`umm_ops.data.VQAReader`): the
    picture degraded at its own resolution (type drawn with CLEAR's weights, level as :func:`clear_samples`), both
    copies resized to (size, size); a multiple-choice record is asked with its options (answer: the letter), a
    free-form one with ``CLEAR_SUFFIX_FREE`` (answer: its text).  The text inside the answering ``<think>`` is the
    record's ``think`` when it has one, else ``USER_SEEN`` (a user's data has no scene to describe).  ``draw``
    numbers the sample (a training run uses its dataset index, so a record drawn again gets a new degradation);
    every draw is seeded by (seed, draw)."""
    import random

    _check_levels(p_direct, restore_levels, direct_levels, "clear_vqa_sample")
    if not isinstance(rec, dict) or not {"image", "question", "options", "answer"} <= set(rec):
        raise TypeError("clear_vqa_sample: expected a VQAReader record (image, question, options, answer), got "
                        f"{type(rec).__name__}" + (f" with keys {sorted(rec)}" if isinstance(rec, dict) else ""))
    if rec["options"]:
        from .synthetic import format_question

        question = format_question(rec, True, CLEAR_SUFFIX_MC)
    else:
        question = f"{rec['question']}\n{CLEAR_SUFFIX_FREE}"
    rng = random.Random(seed_of(seed, draw, "clear-user"))
    meta = {"source": rec.get("source"), "index": rec.get("index"), "key": rec.get("key"), "draw": draw,
            "type": rec.get("type", "all"), "task": "clear_data"}
    return _clear_sample(rec["image"], question, rec["answer"], rng, kind_seed=seed_of(seed, draw, "clear-user-kind"),
                         degrade_seed=seed, degrade_index=draw, seen=rec.get("think") or USER_SEEN,
                         p_direct=p_direct, restore_levels=restore_levels, direct_levels=direct_levels, meta=meta,
                         size=size, backend=backend)
