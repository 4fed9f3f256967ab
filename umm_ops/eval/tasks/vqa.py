"""vqa: multiple-choice VQA on held-out scenes, exact match of the answer letter.

Per record one of its questions (colour / shape / count / position, picked by seed_of(seed, index, "eval-q")),
asked LLaVA-style (question, options A-D, "Answer with the option's letter ...") with the picture to understand;
greedy decoding of as many tokens as the answer letter takes.  An item scores 1 when the generated text, stripped
of surrounding whitespace and one trailing "." or ")", is exactly the answer letter.  Chance is 0.25; the
result also reports the always-the-commonest-letter baseline of the answers and the letters the model chose.

A user's benchmark instead of the world (``umm eval --data FILE``): an MMBench-style TSV (columns question, A-D,
answer, optional hint and category, image as base64) or a JSONL manifest (image path, question, options or A-D,
answer as a letter or as the option's text), read with :func:`umm_ops.data.mmd_bench.read_manifest`; its first n
records, pictures resized to the evaluation size (square), per category.
"""
from __future__ import annotations

from collections import Counter

from . import EvalContext, Task, TaskOutput, pixel_range, pixels, register
from ...utils import optional_import

__all__ = ["VQATask", "ShortVQATask", "ChainVQATask", "score_answer", "parse_chain", "score_short_answer",
           "pick_question", "ask", "questions", "read_multiple_choice", "picture_grid"]


def score_answer(predicted: str, letter: str) -> float:
    """1.0 if `predicted` is the answer letter (whitespace and one trailing '.' / ')' ignored), else 0.0."""
    p = predicted.strip()
    if p[-1:] in (".", ")"):
        p = p[:-1].strip()
    return 1.0 if p == letter else 0.0


def parse_chain(predicted: str) -> tuple:
    """(option text, letter) of a ``vqa_chain`` answer "<option text> (<letter>)"; ("", "") when it is not one."""
    p = predicted.strip()
    if len(p) < 4 or not p.endswith(")") or p[-3] != "(":
        return "", ""
    return p[:-3].strip(), p[-2]


def _normalise(text: str) -> str:
    t = " ".join(text.strip().lower().split())
    return t[:-1].strip() if t[-1:] == "." else t


def score_short_answer(predicted: str, answer: str) -> float:
    """1.0 if `predicted` is the answer (case, surrounding / repeated whitespace and one trailing '.' ignored)."""
    return 1.0 if _normalise(predicted) == _normalise(answer) else 0.0


def pick_question(ctx: EvalContext, rec) -> dict:
    """The record's evaluation question (the same one for every task that asks about this record)."""
    return rec.vqa[ctx.seed_for(rec.index, "eval-q") % len(rec.vqa)]


def read_multiple_choice(path: str, image_size: int, n: int) -> list:
    """The first n records of an MMBench-style TSV / JSONL manifest -> [{"index", "key", "image" uint8 (3, S, S),
    "question": {"question", "options", "answer_letter", "type"}}]; BadRecord names a record that cannot be used."""
    import numpy as np
    import torch
    Image = optional_import("PIL", "Image")

    from ...data.mmd_bench import BadRecord, read_manifest
    from ...data.readers import _field_text, vqa_fields

    out = []
    for k, rec, load in read_manifest(path):
        if isinstance(load, BadRecord):
            raise load
        f = vqa_fields(rec, f"record {k} of {path!r}", multiple_choice=True)
        im = load().convert("RGB").resize((image_size, image_size), Image.BICUBIC)
        out.append({"index": k, "key": _field_text(rec.get("index")) or str(k),
                    "image": torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous(),
                    "question": {"question": f["question"], "options": f["options"], "answer_letter": f["answer"],
                                 "type": f["type"]}})
        if len(out) == n:
            break
    if not out:
        raise BadRecord(f"{path!r} holds no records")
    return out


def questions(ctx: EvalContext) -> list:
    """(index, picture uint8 (3, H, W), question) of every item: the world's held-out records, or the user's file."""
    if ctx.data is not None:
        return [(r["index"], r["image"], r["question"]) for r in ctx.data_records()]
    return [(r.index, r.image, pick_question(ctx, r)) for r in ctx.records()]


def ask(model, ctx: EvalContext, images, questions, indices, task: str, multiple_choice: bool = True,
        chain: bool = False) -> list:
    """Greedy answers of `model` to `questions` about `images` (uint8 (3, H, W)), batched: multiple choice (as many
    new tokens as the answer letter takes), short answer (the answer's tokens and one more, so that an answer
    running on is seen and scored wrong) or, with chain, multiple choice answered "<option> (<letter>)" (the
    longest option's answer and one more token)."""
    from ...data.packing import ImageItem, Sample, TextItem
    from ...data.synthetic import MC_CHAIN_SUFFIX, chain_answer, format_question

    rng = pixel_range(model)
    samples = [Sample([ImageItem(pixels(im, rng), "understand"),
                       TextItem(format_question(q, True, MC_CHAIN_SUFFIX) if chain
                                else format_question(q, multiple_choice))],
                      meta={"task": task, "index": i})
               for im, q, i in zip(images, questions, indices)]
    tok = getattr(model, "tokenizer", None)
    if chain:
        texts = [chain_answer({**q, "answer": o}) for q in questions for o in q["options"]]
    else:
        texts = [q["answer_letter" if multiple_choice else "answer"] for q in questions]
    n_new = max(len(tok.encode(t)) for t in texts) if tok is not None else 2
    n_new += 0 if multiple_choice and not chain else 1
    preds: list = []
    for _, batch in ctx.batches(samples):
        preds += model.generate_text(batch, max_new_tokens=n_new, temperature=0.0)
    return preds


def picture_grid(ctx: EvalContext, items, qa, width: int, with_type: bool = False) -> dict:
    """The first ctx.grid_items pictures, each labelled "<predicted, first `width` characters>/<answer>" (and the
    question type)."""
    k = ctx.grid_items
    return {"rows": ["picture"],
            "columns": [{"label": f"{it['predicted'].strip()[:width]}/{it['answer']}"
                                  + (f"\n{it['type']}" if with_type else ""), "images": [im]}
                        for it, (_, im, _) in zip(items[:k], qa[:k])]}


def letter_summary(items) -> dict:
    answers = [it["answer"] for it in items]
    out = {"chance": 0.25}
    if answers:
        out["majority_letter"] = round(max(Counter(answers).values()) / len(answers), 6)
        out["predicted_letters"] = dict(sorted(Counter(it["predicted"].strip()[:8] for it in items).items()))
    return out


@register
class VQATask(Task):
    name = "vqa"
    ci = "wilson"
    breakdowns = ("type",)
    needs = "VQA in its training mix (SFT task vqa)"
    reads_data = True

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        qa = questions(ctx)
        preds = ask(model, ctx, [im for _, im, _ in qa], [q for _, _, q in qa], [i for i, _, _ in qa], self.name)
        items = [{"index": i, "type": q["type"], "score": score_answer(p, q["answer_letter"]),
                  "answer": q["answer_letter"], "predicted": p, "question": q["question"]}
                 for (i, _, q), p in zip(qa, preds)]
        return TaskOutput(items, letter_summary(items), picture_grid(ctx, items, qa, 3, with_type=True))


@register
class ShortVQATask(Task):
    """Short-answer VQA on held-out scenes: the same question per record as ``vqa``, asked without options ("Answer
    the question using a single word or phrase."), scored by exact match of the answer word (case and one trailing
    '.' ignored).  No fixed chance: the result reports the always-the-commonest-answer-of-its-type baseline."""
    name = "vqa-short"
    ci = "wilson"
    breakdowns = ("type",)
    needs = "short-answer VQA in its training mix (SFT task vqa_short)"

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        qa = [(r.index, r.image, pick_question(ctx, r)) for r in ctx.records()]
        preds = ask(model, ctx, [im for _, im, _ in qa], [q for _, _, q in qa], [i for i, _, _ in qa], self.name,
                    multiple_choice=False)
        items = [{"index": i, "type": q["type"], "score": score_short_answer(p, q["answer"]),
                  "answer": q["answer"], "predicted": p, "question": q["question"]}
                 for (i, _, q), p in zip(qa, preds)]
        by_type: dict = {}
        for it in items:
            by_type.setdefault(it["type"], []).append(it["answer"])
        extra = {"majority_answer": round(sum(max(Counter(v).values()) for v in by_type.values()) / len(items), 6)
                 if items else None}
        return TaskOutput(items, extra, picture_grid(ctx, items, qa, 8))


@register
class ChainVQATask(Task):
    """Multiple-choice VQA answered with the option's text, then its letter ("orange (D)"; SFT task vqa_chain, the
    world's MC_CHAIN_SUFFIX): the same question per record as ``vqa``.  An item scores 1 when the answer has that
    form and its letter is the answer letter; the result also reports how often the named option is the right one
    (word_accuracy) and how often the letter is the named option's (consistent).  Chance is 0.25."""
    name = "vqa-chain"
    ci = "wilson"
    breakdowns = ("type",)
    needs = "chain multiple-choice VQA in its training mix (SFT task vqa_chain)"
    reads_data = True

    def run(self, model, ctx: EvalContext) -> TaskOutput:
        qa = questions(ctx)
        preds = ask(model, ctx, [im for _, im, _ in qa], [q for _, _, q in qa], [i for i, _, _ in qa], self.name,
                    chain=True)
        items = []
        for (i, _, q), p in zip(qa, preds):
            word, letter = parse_chain(p)
            named = {_normalise(o): L for L, o in zip("ABCD", q["options"])}.get(_normalise(word)) if word else None
            items.append({"index": i, "type": q["type"], "score": 1.0 if letter == q["answer_letter"] else 0.0,
                          "answer": q["answer_letter"], "predicted": p, "question": q["question"],
                          "word_score": score_short_answer(word, q["options"]["ABCD".index(q["answer_letter"])]),
                          "consistent": float(named is not None and named == letter)})
        extra = letter_summary(items)
        n = max(len(items), 1)
        extra["word_accuracy"] = sum(it["word_score"] for it in items) / n
        extra["consistent"] = sum(it["consistent"] for it in items) / n
        return TaskOutput(items, extra, picture_grid(ctx, items, qa, 12, with_type=True))
