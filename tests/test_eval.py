"""`umm eval` (umm_ops.eval.runner, umm_ops.eval.tasks, umm_ops.eval.stats): confidence intervals against closed
forms, every task's scorer on hand-made cases with known answers (a perfect prediction scores 1, a wrong one 0,
chance behaves like chance) through stand-in models that answer from the world's own records, determinism, and a
tiny end-to-end `umm eval --model tiny` through the command line."""
import json
import math
import random

import numpy as np
import pytest
import torch

from umm_ops.data.synthetic import SyntheticWorld, format_question
from umm_ops.eval.runner import default_world_kwargs, evaluate, render_markdown
from umm_ops.eval.stats import Z95, bootstrap_mean, summarize, wilson
from umm_ops.eval.tasks import TASKS
from umm_ops.eval.tasks.caption import score_caption
from umm_ops.eval.tasks.segment import score_segmentation
from umm_ops.eval.tasks.vae_recon import scene_spec
from umm_ops.eval.tasks.vqa import score_answer
from umm_ops.utils import seed_of

FIRST = 1000     # held-out start used with the stand-in models (any index works for them)
S = 64           # the checker needs objects of more than a few pixels to tell shapes from blobs


# ----------------------------------------------------------------------------------------------- CI helpers
def _wilson_by_roots(k, n, z):
    """The Wilson interval as the roots of (k/n - p)^2 = z^2 p (1 - p) / n (the quadratic, solved directly)."""
    ph = k / n
    a = 1 + z * z / n
    b = -(2 * ph + z * z / n)
    c = ph * ph
    d = math.sqrt(b * b - 4 * a * c)
    return (-b - d) / (2 * a), (-b + d) / (2 * a)


@pytest.mark.parametrize("k,n", [(0, 10), (5, 10), (10, 10), (1, 3), (71, 100), (0, 1)])
def test_wilson_matches_closed_form(k, n):
    lo, hi = wilson(k, n)
    elo, ehi = _wilson_by_roots(k, n, Z95)
    assert lo == pytest.approx(max(0.0, elo), abs=1e-12) and hi == pytest.approx(min(1.0, ehi), abs=1e-12)


def test_wilson_known_values():
    assert wilson(0, 10) == (0.0, pytest.approx(Z95 ** 2 / (10 + Z95 ** 2)))        # 0.2775
    assert wilson(10, 10) == (pytest.approx(10 / (10 + Z95 ** 2)), 1.0)              # 0.7225
    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)                          # published value
    assert wilson(0, 0) == (0.0, 1.0)
    for bad in [(3, 2), (-1, 4), (1.5, 4)]:
        with pytest.raises(ValueError):
            wilson(*bad)


def test_bootstrap_known_values_and_determinism():
    assert bootstrap_mean([0.4] * 7, seed=3) == (pytest.approx(0.4), pytest.approx(0.4))
    # two values 0 and 1: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 -> the 95% interval is [0, 1]
    assert bootstrap_mean([0.0, 1.0], seed=0) == (0.0, 1.0)
    v = np.random.default_rng(0).random(400)
    a, b = bootstrap_mean(v, seed=(1, "x")), bootstrap_mean(v, seed=(1, "x"))
    assert a == b and a != bootstrap_mean(v, seed=(2, "x"))
    half = Z95 * v.std(ddof=1) / math.sqrt(v.size)        # the normal approximation, close for n = 400
    assert a[0] == pytest.approx(v.mean() - half, abs=0.01) and a[1] == pytest.approx(v.mean() + half, abs=0.01)
    assert all(math.isnan(x) for x in bootstrap_mean([], seed=0))


def test_summarize():
    s = summarize([1, 0, 1, 1], "wilson")
    assert s["score"] == 0.75 and s["n"] == 4 and s["ci_method"] == "wilson"
    assert s["ci95"] == [pytest.approx(x, abs=1e-6) for x in wilson(3, 4)]
    assert summarize([], "bootstrap")["score"] is None
    with pytest.raises(ValueError, match="0 / 1"):
        summarize([0.5], "wilson")


# ----------------------------------------------------------------------------------------------- stand-in models
def _world(n=64):
    return SyntheticWorld(size=S, length=FIRST + n, **default_world_kwargs())


class _VAE:
    def __init__(self, mode):
        self.mode = mode

    def encode(self, x):
        return x

    def decode(self, z, hw):
        if self.mode == "noise":
            return torch.rand(z.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
        return z


class _Cached:
    def __init__(self, world):
        self.w, self.recs = world, {}

    def __len__(self):
        return len(self.w)

    def __getitem__(self, i):
        if i not in self.recs:
            self.recs[i] = self.w[i]
        return self.recs[i]


class Oracle:
    """A stand-in model answering from the world's records (each prompt names its record in Sample.meta):
    mode "right" (the true letter, caption, picture, instance map), "wrong" (another letter, nothing, noise,
    black) or "random" (a random letter).  profile: the model's conventions, whose pixel range its images come in
    and go out in (images it is given outside the range are refused, as the real model refuses them)."""

    tokenizer = None

    def __init__(self, world, mode="right", seed=0, profile="umm"):
        from umm_ops.model.profile import get_profile

        self.profile = get_profile(profile)
        self.world = _Cached(world)
        self.mode, self.rng = mode, random.Random(seed)
        self.vae = _VAE("noise" if mode == "wrong" else "identity")
        self.by_pixels = {}

    def _px(self, u8):
        """uint8 -> the profile's pixel range."""
        return u8.float() / 127.5 - 1 if self.profile.pixel_range == (-1.0, 1.0) else u8.float() / 255

    def _noise(self, *shape, generator):
        x = torch.rand(*shape, generator=generator)
        return x * 2 - 1 if self.profile.pixel_range == (-1.0, 1.0) else x

    def _given(self, images):
        for im in images:
            self.profile.check_pixels(im, "Oracle")

    def generate_text(self, samples, max_new_tokens=2, temperature=0.0, **kw):
        from umm_ops.data.packing import ImageItem

        self._given([it.image for s in samples for it in s.items if isinstance(it, ImageItem)])
        out = []
        for s in samples:
            rec = self.world[s.meta["index"]]
            text = s.items[-1].text
            if s.meta["task"] == "caption":
                out.append(rec.caption if self.mode == "right" else "I see nothing.")
                continue
            if s.meta["task"].split(":")[0] in ("vqa-short", "mmd-bench-short"):
                q = next(q for q in rec.vqa if format_question(q, False) == text)
                out.append({"right": q["answer"].upper() + ".", "wrong": q["answer"] + " " + q["answer"],
                            "random": self.rng.choice(q["options"])}[self.mode])
                continue
            if s.meta["task"] == "vqa-chain":
                from umm_ops.data.synthetic import MC_CHAIN_SUFFIX

                q = next(q for q in rec.vqa if format_question(q, True, MC_CHAIN_SUFFIX) == text)
                k = "ABCD".index(q["answer_letter"])
                named, letter = {"right": (k, k), "wrong": ((k + 1) % 4, (k + 1) % 4), "mismatch": (k, (k + 1) % 4),
                                 "random": (self.rng.randrange(4),) * 2}[self.mode]
                out.append(f"{q['options'][named]} ({'ABCD'[letter]})")
                continue
            q = next(q for q in rec.vqa if format_question(q) == text)   # the harness asks a real question
            a = q["answer_letter"]
            out.append({"right": a, "wrong": "ABCD"[("ABCD".index(a) + 1) % 4],
                        "random": self.rng.choice("ABCD")}[self.mode])
        return out

    def generate_image(self, prompts, height, width, steps=None, seed=0, **kw):
        if self.mode == "right":
            imgs = [self._px(self.world[p.meta["index"]].image) for p in prompts]
            return {"images": torch.stack(imgs)}
        return {"images": self._noise(len(prompts), 3, height, width, generator=torch.Generator().manual_seed(seed))}

    def generate_refined(self, prompts, max_rounds=3, height=64, width=64, seed=0, **kw):
        """R3's loop: "right" draws the true picture and stops; otherwise noise, edited for every round."""
        recs = {self.world[i].prompt["text"]: self.world[i] for i in range(FIRST, FIRST + 64)}
        out = []
        for k, p in enumerate(prompts):
            if self.mode == "right":
                img = self._px(recs[p].image)
                rounds = [{"round": 1, "text": "<think> plan </think>", "instruction": None, "image": img},
                          {"round": 2, "text": "no further edit needed", "instruction": "no further edit needed",
                           "image": img}][:max_rounds]
                out.append({"prompt": p, "rounds": rounds, "stopped": max_rounds > 1, "image": img})
                continue
            g = torch.Generator().manual_seed(seed + k)
            rounds = [{"round": r + 1, "text": "x", "instruction": None if r == 0 else "x",
                       "image": self._noise(3, height, width, generator=g)} for r in range(max_rounds)]
            out.append({"prompt": p, "rounds": rounds, "stopped": False, "image": rounds[-1]["image"]})
        return out

    def generate_then_answer(self, images, questions, seed=0, **kw):
        """CLEAR's format: "right" restores to the true picture and answers the true letter, "wrong" answers
        directly with another letter, "random" a random letter (the record is found by its question's text)."""
        from umm_ops.data.clear_data import clear_question

        self._given(images)
        out = []
        for im, text in zip(images, questions):
            rec, q, mc = next((r, q, mc) for i in range(FIRST, FIRST + 64) for r in [self.world[i]] for q in r.vqa
                              for mc in (True, False) if clear_question(q, mc) == text)
            a = q["answer_letter"]
            letter = {"right": a, "wrong": "ABCD"[("ABCD".index(a) + 1) % 4], "random": self.rng.choice("ABCD")}
            if not mc:
                letter = {"right": q["answer"], "wrong": q["answer"] + "s", "random": self.rng.choice(q["options"])}
            restore = self.mode == "right"
            out.append({"text": "", "restored": restore,
                        "image": self._px(rec.image) if restore else None, "answer": letter[self.mode],
                        "format": {"think": restore, "answer": restore, "order": restore}})
        return out

    def edit_image(self, images, instructions, height, width, steps=None, seed=0, **kw):
        from umm_ops.eval.tasks.geneval import to_uint8

        self._given(images)
        if not self.by_pixels:
            for i in range(FIRST, len(self.world)):
                self.by_pixels[self.world[i].image.numpy().tobytes()] = i
        out = []
        for im, ins in zip(images, instructions):
            key = to_uint8(im, self.profile.pixel_range).numpy().tobytes()
            if key not in self.by_pixels:      # task edit: a changed picture; "right" restores the record's
                out.append(self._px(self.world[self._changed()[(key, ins)]].image) if self.mode == "right" else im)
                continue
            seg = self._px(self.world[self.by_pixels[key]].segmentation)
            out.append(seg if self.mode == "right" else torch.full_like(seg, self.profile.pixel_range[0]))
        return {"images": torch.stack(out)}

    def _changed(self):
        """(changed picture bytes, instruction) -> record index, from r3_samples' r3_edit task (independent of the
        eval task's own construction)."""
        if not hasattr(self, "_changed_map"):
            from umm_ops.data.refine_data import r3_samples
            from umm_ops.eval.tasks.geneval import to_uint8

            self._changed_map = {}
            for i in range(FIRST, len(self.world)):
                rec = self.world[i]
                for smp in r3_samples(rec, ("edit",), kinds=self.world.w.kinds, colors=self.world.w.colors):
                    pic = to_uint8(smp.items[0].image, (-1.0, 1.0)).numpy().tobytes()
                    self._changed_map[(pic, smp.items[1].text)] = i
        return self._changed_map


def _eval(model, tasks, n=8, seed=0, **kw):
    return evaluate(model, tasks, n=n, seed=seed, image_size=S, first=FIRST, **kw)


# ----------------------------------------------------------------------------------------------- vqa / mmd-bench
def test_score_answer():
    assert score_answer("B", "B") == score_answer(" B.\n", "B") == score_answer("B)", "B") == 1.0
    assert score_answer("A", "B") == score_answer("", "B") == score_answer("B C", "B") == score_answer("b", "B") == 0.0


def test_short_vqa_right_wrong_and_chance():
    from umm_ops.eval.tasks.vqa import score_short_answer

    assert score_short_answer(" Red.\n", "red") == score_short_answer("left  of", "left of") == 1.0
    assert score_short_answer("red circle", "red") == score_short_answer("", "red") == 0.0
    w = _world(200)
    right = _eval(Oracle(w, "right"), "vqa-short", n=40)["tasks"]["vqa-short"]
    assert right["score"] == 1.0 and right["n"] == 40 and set(right["per_type"]) <= {"color", "shape", "count",
                                                                                   "position"}
    assert _eval(Oracle(w, "wrong"), "vqa-short", n=40)["tasks"]["vqa-short"]["score"] == 0.0
    # guessing one of the 4 options: about 1 in 4; the commonest-answer-per-type baseline is reported
    rnd = [_eval(Oracle(w, "random", seed=s), "vqa-short", n=100)["tasks"]["vqa-short"] for s in range(10)]
    assert abs(sum(r["score"] for r in rnd) / 10 - 0.25) < 0.04
    assert 0 < rnd[0]["majority_answer"] <= 1
    # the same questions as vqa (one per record, the same pick)
    a = _eval(Oracle(w, "right"), "vqa,vqa-short", n=6)["tasks"]
    assert [it["question"] for it in a["vqa"]["items"]] == [it["question"] for it in a["vqa-short"]["items"]]


def test_vqa_chain_scores_the_letter_and_reports_the_named_option():
    from umm_ops.data.synthetic import chain_answer
    from umm_ops.eval.tasks.vqa import parse_chain

    assert parse_chain(" orange (D)\n") == ("orange", "D") and parse_chain("light blue (A)") == ("light blue", "A")
    assert parse_chain("D") == parse_chain("(D)") == parse_chain("orange D") == parse_chain("orange (D") == ("", "")
    assert chain_answer({"answer": "2", "answer_letter": "C"}) == " 2 (C)"
    w = _world(200)
    right = _eval(Oracle(w, "right"), "vqa-chain", n=40)["tasks"]["vqa-chain"]
    assert right["score"] == 1.0 and right["word_accuracy"] == 1.0 and right["consistent"] == 1.0
    wrong = _eval(Oracle(w, "wrong"), "vqa-chain", n=40)["tasks"]["vqa-chain"]
    assert wrong["score"] == wrong["word_accuracy"] == 0.0 and wrong["consistent"] == 1.0
    # the right option named with another option's letter scores 0 (the letter is what is scored)
    mis = _eval(Oracle(w, "mismatch"), "vqa-chain", n=40)["tasks"]["vqa-chain"]
    assert mis["score"] == mis["consistent"] == 0.0 and mis["word_accuracy"] == 1.0
    rnd = [_eval(Oracle(w, "random", seed=s), "vqa-chain", n=100)["tasks"]["vqa-chain"]["score"] for s in range(10)]
    assert abs(sum(rnd) / 10 - 0.25) < 0.04
    # the same question per record as vqa
    a = _eval(Oracle(w, "right"), "vqa,vqa-chain", n=6)["tasks"]
    assert [it["question"] for it in a["vqa"]["items"]] == [it["question"] for it in a["vqa-chain"]["items"]]


def test_vqa_right_wrong_and_chance():
    w = _world(100)
    right = _eval(Oracle(w, "right"), "vqa")["tasks"]["vqa"]
    assert right["score"] == 1.0 and right["n"] == 8 and right["ci_method"] == "wilson"
    assert right["ci95"] == [pytest.approx(x, abs=1e-6) for x in wilson(8, 8)]
    assert set(right["per_type"]) <= {"color", "shape", "count", "position"}
    assert sum(v["n"] for v in right["per_type"].values()) == 8
    assert all(v["score"] == 1.0 for v in right["per_type"].values())
    assert _eval(Oracle(w, "wrong"), "vqa")["tasks"]["vqa"]["score"] == 0.0
    # random letters: accuracy about 1 in 4, and the 95% interval holds 0.25 about 95% of the time
    scores, covered = [], 0
    for s in range(20):
        rnd = _eval(Oracle(w, "random", seed=s), "vqa", n=100)["tasks"]["vqa"]
        scores.append(rnd["score"])
        covered += rnd["ci95"][0] <= 0.25 <= rnd["ci95"][1]
    assert abs(sum(scores) / 20 - 0.25) < 0.03 and covered >= 16      # P(covered < 16) = 0.3% for a true 95% CI
    assert rnd["chance"] == 0.25 and 0.25 <= rnd["majority_letter"] <= 1


def test_mmd_bench_covers_every_degradation_and_level():
    from umm_ops.data.degradations import DEGRADATIONS, LEVELS

    w = _world(48)
    res = _eval(Oracle(w, "right"), "mmd-bench", n=48)["tasks"]["mmd-bench"]
    assert res["score"] == 1.0 and res["metrics"]["clean"]["score"] == 1.0 and res["drop"] == 0.0
    assert set(res["per_type"]) == {f"{k}/{lv}" for k in DEGRADATIONS for lv in LEVELS}
    assert all(v["n"] == 1 for v in res["per_type"].values())
    assert set(res["per_degradation"]) == set(DEGRADATIONS) and set(res["per_level"]) == set(LEVELS)
    assert all(v["n"] == 16 for v in res["per_level"].values())
    assert _eval(Oracle(w, "wrong"), "mmd-bench", n=4)["tasks"]["mmd-bench"]["score"] == 0.0


# ----------------------------------------------------------------------------------------------- caption
def test_score_caption_rule():
    scene = {"objects": [{"color": "red", "kind": "circle"}, {"color": "red", "kind": "circle"},
                         {"color": "blue", "kind": "square"}]}
    perfect = score_caption("Two red circles and a large blue square on a gray background.", scene)
    assert perfect["score"] == perfect["recall"] == perfect["pair_recall"] == 1.0 and perfect["absent_named"] == 0
    swapped = score_caption("A blue circle and a red square.", scene)      # every word, wrongly bound
    assert swapped["score"] == 1.0 and swapped["pair_recall"] == 0.0
    assert score_caption("A red circle.", scene)["score"] == 0.5
    half_wrong = score_caption("A red circle and a green star.", scene)    # 2 of 4 named, 2 absent named
    assert half_wrong["score"] == 0.0 and half_wrong["recall"] == 0.5 and half_wrong["absent_named"] == 2
    from umm_ops.data.synthetic import COLORS, KINDS

    everything = score_caption(" ".join(list(COLORS) + list(KINDS)), scene)
    assert everything["recall"] == 1.0 and everything["score"] == 0.0     # listing the vocabulary earns nothing
    assert score_caption("", scene)["score"] == 0.0
    assert score_caption("Nothing on a dark gray background.", {"objects": []})["score"] == 1.0
    assert score_caption("A red dot.", {"objects": []})["score"] == 0.0
    plural = score_caption("Three crosses, two stars.", {"objects": [{"color": "pink", "kind": "cross"},
                                                                     {"color": "pink", "kind": "star"}]})
    assert plural["score"] == pytest.approx(2 / 3)                     # plurals count; pink is not named


def test_caption_task_truth_scores_one():
    w = _world()
    res = _eval(Oracle(w, "right"), "caption")["tasks"]["caption"]
    assert res["score"] == 1.0 and res["metrics"]["pair_recall"]["score"] == 1.0
    assert res["metrics"]["absent_named"]["score"] == 0.0
    assert _eval(Oracle(w, "wrong"), "caption")["tasks"]["caption"]["score"] == 0.0


# ----------------------------------------------------------------------------------------------- images
def test_geneval_and_vae_recon_truth_scores_one_noise_zero():
    w = _world()
    right = _eval(Oracle(w, "right"), "geneval,vae-recon")["tasks"]
    for t in ("geneval", "vae-recon"):
        assert right[t]["score"] == 1.0 and right[t]["metrics"]["correct"]["score"] == 1.0
    assert right["vae-recon"]["metrics"]["prompt_score"]["score"] == 1.0
    assert set(right["geneval"]["per_type"]) <= {"single_object", "two_object", "counting", "position", "all"}
    noise = _eval(Oracle(w, "wrong"), "geneval,vae-recon")["tasks"]
    assert noise["geneval"]["score"] == 0.0 and noise["vae-recon"]["score"] == 0.0


def test_geneval_draws_with_the_guidance_asked_for():
    """evaluate(cfg_scale=...) (umm eval --cfg) reaches geneval's drawings; None leaves the model's default."""
    w = _world()
    seen = []

    class Spy(Oracle):
        def generate_image(self, prompts, height, width, steps=None, seed=0, **kw):
            seen.append(kw.get("cfg_scale", "absent"))
            return super().generate_image(prompts, height, width, steps, seed, **kw)

    _eval(Spy(w, "right"), "geneval", n=2, cfg_scale=7.0)
    _eval(Spy(w, "right"), "geneval", n=2)
    assert seen == [7.0, None]


def test_geneval_does_not_count_confetti_as_objects():
    """Fragments far smaller than any object of the world (an untrained generator's confetti) are not objects:
    the checker's default threshold alone scores them above 0.1 on this world (about 0.2 for a real untrained
    generator, docs/results/base)."""
    from conftest import confetti_picture
    from umm_ops.eval import check

    w = _world()
    side = math.isqrt(w.min_object_area - 1)
    pics = [confetti_picture(k, S, side) for k in range(16)]
    assert sum(check(w[FIRST + k].prompt, p)["score"] for k, p in enumerate(pics)) / 16 > 0.1

    class Confetti(Oracle):
        def generate_image(self, prompts, height, width, steps=None, seed=0, **kw):
            return {"images": torch.stack([self._px(pics[p.meta["index"] - FIRST]) for p in prompts])}

    res = _eval(Confetti(w, "wrong"), "geneval", n=16)["tasks"]["geneval"]
    assert res["score"] == 0.0 and res["n"] == 16


def test_scene_spec():
    w = _world()
    rec = w[FIRST + 3]
    spec = scene_spec(rec.scene)
    assert sum(g["count"] for g in spec["objects"]) == len(rec.scene["objects"])
    assert scene_spec({"objects": []}) is None


def test_segment_scorer():
    w = _world()
    rec = next(w[i] for i in range(FIRST, FIRST + 64) if len(w[i].scene["objects"]) >= 2)
    inst, seg = rec.instances, rec.segmentation
    m = int(inst.max())
    assert score_segmentation(seg, inst) == {"score": 1.0, "count_ok": 1.0, "miou": 1.0, "n_true": m, "n_pred": m}
    # the instances in other palette colours: the same instances, the same score
    perm = seg.clone()
    perm[:, inst == 1], perm[:, inst == 2] = seg[:, inst == 2][:, :1], seg[:, inst == 1][:, :1]
    assert score_segmentation(perm, inst)["score"] == 1.0
    assert score_segmentation(perm.float() / 127.5 - 1, inst)["score"] == 1.0     # model range
    black = torch.zeros_like(seg)
    assert score_segmentation(black, inst) == {"score": 0.0, "count_ok": 0.0, "miou": 0.0, "n_true": m, "n_pred": 0}
    one = seg.clone()
    one[:, inst == 1] = 0                                                   # one instance missed
    r = score_segmentation(one, inst)
    assert r["score"] == pytest.approx((m - 1) / m) and r["count_ok"] == 0.0 and r["miou"] == pytest.approx((m - 1) / m)
    merged = seg.clone()
    merged[:, inst > 0] = seg[:, inst == 1][:, :1]                          # same colour, still apart: counted
    assert score_segmentation(merged, inst)["score"] == 1.0
    noise = (torch.rand(seg.shape, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    assert score_segmentation(noise, inst)["score"] < 0.1


def test_segment_task():
    w = _world()
    assert _eval(Oracle(w, "right"), "segment")["tasks"]["segment"]["score"] == 1.0
    res = _eval(Oracle(w, "wrong"), "segment")["tasks"]["segment"]
    assert res["score"] == 0.0 and res["metrics"]["count_accuracy"]["score"] == 0.0


# ----------------------------------------------------------------------------------------------- edit
def test_edit_task_right_wrong_and_its_items():
    """The edit task's items are r3_edit's pairs on held-out records; an oracle that restores the record's picture
    scores 1 with gain 1 - before, one that returns the picture unedited scores exactly `before` (gain 0)."""
    from umm_ops.data.refine_data import r3_samples

    w = _world()
    right = _eval(Oracle(w, "right"), "edit", n=24)["tasks"]["edit"]
    wrong = _eval(Oracle(w, "wrong"), "edit", n=24)["tasks"]["edit"]
    want = [(i, smp.items[1].text, smp.meta["edit"]) for i in range(FIRST, FIRST + 24)
            for smp in r3_samples(w[i], ("edit",), kinds=w.kinds, colors=w.colors)]
    assert [(it["index"], it["instruction"], it["type"]) for it in right["items"]] == want
    assert right["skipped"] == 24 - len(want) and len(want) >= 12
    assert right["score"] == 1.0 and right["metrics"]["exact"]["score"] == 1.0
    assert all(it["before"] < 1.0 for it in right["items"])            # the changed picture fails its description
    assert right["metrics"]["gain"]["score"] == pytest.approx(1.0 - right["metrics"]["before"]["score"], abs=1e-6)
    assert set(right["per_type"]) <= {"recolor", "reshape", "remove"} and len(right["per_type"]) >= 2
    assert [it["score"] for it in wrong["items"]] == [it["before"] for it in wrong["items"]]
    assert wrong["metrics"]["gain"]["score"] == 0.0 and wrong["score"] == right["metrics"]["before"]["score"]


# ----------------------------------------------------------------------------------------------- runner
def test_all_tasks_json_shape_grids_and_determinism(tmp_path):
    w = _world()
    # probe and attention read the model's hidden states / attention (tests/test_sgt.py): no stand-in for them
    outputs = [t for t in TASKS if t not in ("probe", "attention")]
    a = _eval(Oracle(w, "right"), outputs, n=6, seed=3, out_dir=tmp_path / "a")
    b = _eval(Oracle(w, "right"), outputs, n=6, seed=3, out_dir=tmp_path / "a")
    assert json.dumps(a) == json.dumps(b)
    assert json.loads((tmp_path / "a" / "eval.json").read_text()) == a
    assert list(a["tasks"]) == ["vqa", "vqa-short", "vqa-chain", "caption", "geneval", "segment", "seg-miou",
                              "vae-recon", "mmd-bench", "mmd-bench-short", "clear", "clear-short", "clear-bridge",
                              "clear-short-bridge", "refine", "edit"]
    assert a["records"] == [FIRST, FIRST + 6] and a["seed"] == 3 and a["image_size"] == S
    for name, r in a["tasks"].items():
        assert r["score"] == 1.0 and r["n"] == 6 and len(r["ci95"]) == 2 and "per_type" in r, name
        assert [it["index"] for it in r["items"]] == list(range(FIRST, FIRST + 6))
        assert (tmp_path / "a" / f"{name}.png").is_file()
    md = render_markdown(a)
    assert md.count("\n| vqa |") == 1 and "| geneval: correct |" in md
    # another seed asks other questions about the same records
    c = _eval(Oracle(w, "right"), "vqa", n=6, seed=4)
    questions = [[it["question"] for it in r["tasks"]["vqa"]["items"]] for r in (a, c)]
    assert questions[0] != questions[1]


def test_evaluate_errors():
    w = _world()
    with pytest.raises(ValueError, match="unknown task"):
        _eval(Oracle(w), "vqa,pointing")
    with pytest.raises(ValueError, match="n must be"):
        _eval(Oracle(w), "vqa", n=0)


def test_held_out_default_first():
    from umm_ops.train.recipes.sft import SFTRecipeConfig

    w = SyntheticWorld(size=S, length=SFTRecipeConfig().train_records + 2, **default_world_kwargs())
    res = evaluate(Oracle(w), "vqa", n=2, image_size=S)
    assert res["first"] == SFTRecipeConfig().train_records == 50_000
    assert [it["index"] for it in res["tasks"]["vqa"]["items"]] == [50_000, 50_001]


def test_evaluate_world_keeps_its_keys(tmp_path):
    from umm_ops.eval.world import evaluate_world, report_lines

    w = _world()
    kw = default_world_kwargs()
    ev = evaluate_world(Oracle(w), image_size=S, seed=kw.pop("seed"), world=kw, first=FIRST,
                        n_vqa=4, n_images=2, n_captions=2, steps=2, out_dir=tmp_path)
    assert ev["held_out_records"] == [FIRST, FIRST + 4]
    assert ev["vqa"]["accuracy"] == 1.0 and ev["vqa"]["n"] == 4 and ev["vqa"]["chance"] == 0.25
    assert set(ev["vqa"]) == {"n", "accuracy", "chance", "majority_letter", "per_type", "examples"}
    assert [c["score"] for c in ev["captions"]] == [1.0, 1.0] and ev["captions"][0]["truth"] == w[FIRST].caption
    im = ev["images"]
    assert im["n"] == 2 and im["mean_score"] == im["correct"] == im["vae_reconstruction_mean_score"] == 1.0
    assert set(im["items"][0]) == {"prompt", "tag", "score", "correct", "vae_reconstruction_score", "png"}
    assert (tmp_path / "eval" / "grid.png").is_file() and (tmp_path / "eval" / "generated-1.png").is_file()
    assert set(im["per_tag"]) == {it["tag"] for it in im["items"]} and all(v == 1.0 for v in im["per_tag"].values())
    lines = report_lines(ev)
    assert lines[-1] == "eval captions: mean caption-check score 1.000 on 2 held-out pictures"
    assert "vqa_short" not in ev
    ev = evaluate_world(Oracle(w), image_size=S, seed=0, world=kw, first=FIRST, n_vqa=4, n_images=0,
                        n_captions=0, short_vqa=True)
    assert ev["vqa_short"]["accuracy"] == 1.0 and ev["vqa_short"]["n"] == 4 and ev["vqa"]["accuracy"] == 1.0
    assert set(ev["vqa_short"]) == {"n", "accuracy", "majority_answer", "per_type", "examples"}
    assert any(line.startswith("eval vqa-short: 1.000 exact-match") for line in report_lines(ev))
    assert len(lines) == 5 + (len(im["per_tag"]) > 1)


# ----------------------------------------------------------------------------------------------- a real (tiny) model
def test_tiny_model_deterministic():
    from umm_ops.model.cheers import CheersModel

    torch.manual_seed(seed_of(0, "test-eval"))
    model = CheersModel("tiny").eval()
    a = evaluate(model, "vqa,vae-recon", n=4, seed=1, image_size=32)
    b = evaluate(model, "vqa,vae-recon", n=4, seed=1, image_size=32)
    assert json.dumps(a) == json.dumps(b)
    assert a["tasks"]["vae-recon"]["score"] > 0.0   # the shipped VAE (a random one scores 0, even at 32 px)
    assert a["tasks"]["vqa"]["n"] == 4


def test_cli_eval_tiny(tmp_path, capsys):
    from umm_ops.cli import main

    out, js = tmp_path / "out", tmp_path / "res.json"
    assert main(["eval", "--model", "tiny", "--tasks", "vqa,vae-recon", "--n", "4", "--image-size", "32",
                 "--json", str(js), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| vqa |" in text and "| vae-recon |" in text and "preset tiny (untrained)" in text
    res = json.loads(js.read_text())
    assert list(res["tasks"]) == ["vqa", "vae-recon"] and res["n"] == 4 and res["first"] == 50_000
    v = res["tasks"]["vqa"]
    assert 0 <= v["score"] <= 1 and v["ci95"][0] <= v["score"] <= v["ci95"][1] and v["n"] == 4
    for f in ("eval.json", "eval.md", "vqa.png", "vae-recon.png"):
        assert (out / f).is_file(), f
    assert main(["eval"]) == 2 and main(["eval", "x", "--model", "tiny"]) == 2
    assert main(["eval", "--model", "tiny", "--tasks", "vqa,nope", "--n", "1"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_cli_eval_reads_the_run_config(tmp_path):
    """A run's held-out split and world come from its saved config (recipe.train_records, image_size, job.seed)."""
    from umm_ops.cli import _run_world
    from umm_ops.train.engine.checkpoint import FORMAT, STATE_FILE, VERSION

    ck = tmp_path / "run" / "checkpoint-5"
    ck.mkdir(parents=True)
    cfg = {"job": {"seed": 7}, "recipe": {"train_records": 1234, "image_size": 96, "max_objects": 2,
                                          "tasks": ["vqa"]}, "recipe_name": "sft"}
    (ck / STATE_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, "config": cfg}))
    # saved before the world had object_scale: it trained on the world's default (1.0), not today's recipe default
    assert _run_world(ck) == (1234, 96, {"max_objects": 2, "object_scale": 1.0, "seed": 7})
    cfg["recipe"]["object_scale"] = 1.5
    (ck / STATE_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, "config": cfg}))
    assert _run_world(ck)[2]["object_scale"] == 1.5
    # a world the checkpoint recorded (flow-grpo and its family: what the run read from its recipe.init) wins
    (ck / STATE_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, "config": cfg,
                                             "world": {"max_objects": 3, "kinds": ["circle"], "object_scale": 2.0}}))
    assert _run_world(ck) == (1234, 96, {"max_objects": 3, "kinds": ("circle",), "object_scale": 2.0, "seed": 7})
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "config.json").write_text("{}")
    assert _run_world(tmp_path / "pretrained") is None


def test_cli_eval_saved_model(tmp_path, capsys):
    from umm_ops.cli import main
    from umm_ops.model.cheers import CheersModel

    torch.manual_seed(0)
    CheersModel("tiny").save_pretrained(tmp_path / "m")
    assert main(["eval", str(tmp_path / "m"), "--tasks", "vqa", "--n", "2", "--image-size", "32", "--brief"]) == 0
    assert f"**{tmp_path / 'm'}**: held-out records 50000..50001" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "m"), "--tasks", "vqa", "--n", "1", "--first", "10", "--image-size", "32"]) == 0
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "vqa"]) == 2


# ----------------------------------------------------------------------------------------------- a user's benchmark
class _Letters:
    """Answers item k (Sample.meta["index"]) with letters[k]."""

    tokenizer = None

    def __init__(self, letters):
        from umm_ops.model.profile import get_profile

        self.letters = letters
        self.profile = get_profile("umm")

    def generate_text(self, samples, **kw):
        return [self.letters[s.meta["index"]] for s in samples]


def _mc_files(tmp_path):
    import base64
    import io

    from PIL import Image

    w = _world(6)
    rows, lines, letters = [], [], []
    for k in range(6):
        rec = w[FIRST + k]
        q = rec.vqa[0]
        buf = io.BytesIO()
        Image.fromarray(rec.image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        b64 = base64.b64encode(buf.getvalue()).decode()
        rows.append("\t".join([str(100 + k), q["question"], *q["options"], q["answer_letter"], q["type"], b64]))
        Image.fromarray(rec.image.permute(1, 2, 0).numpy()).save(tmp_path / f"{k}.png")
        lines.append(json.dumps({"image": f"{k}.png", "question": q["question"], "options": q["options"],
                                 "answer": q["answer"]}))                 # the answer as the option's text
        letters.append(q["answer_letter"])
    tsv = tmp_path / "bench.tsv"
    tsv.write_text("index\tquestion\tA\tB\tC\tD\tanswer\tcategory\timage\n" + "\n".join(rows) + "\n")
    jsonl = tmp_path / "bench.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    return tsv, jsonl, letters


def test_vqa_and_mmd_bench_read_a_users_file(tmp_path):
    from umm_ops.data.mmd_bench import BadRecord

    tsv, jsonl, letters = _mc_files(tmp_path)
    wrong = ["ABCD"[("ABCD".index(a) + 1) % 4] for a in letters]
    for f in (tsv, jsonl):
        res = evaluate(_Letters(letters), "vqa,mmd-bench", n=4, image_size=32, data=str(f))
        assert res["records"] == [0, 4] and res["data"] == str(f)
        assert res["tasks"]["vqa"]["score"] == res["tasks"]["mmd-bench"]["score"] == 1.0
        assert res["tasks"]["vqa"]["n"] == 4
        assert evaluate(_Letters(wrong), "vqa", n=10, image_size=32, data=str(f))["tasks"]["vqa"]["score"] == 0.0
    res = evaluate(_Letters(letters), "vqa", n=6, image_size=32, data=str(tsv))
    assert set(res["tasks"]["vqa"]["per_type"]) <= {"color", "shape", "count", "position"}   # per category column
    with pytest.raises(ValueError, match="synthetic world only"):
        evaluate(_Letters(letters), "vqa,geneval", n=2, image_size=32, data=str(tsv))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "0.png", "question": "Which?", "options": ["x", "y"], "answer": "z"}) + "\n")
    with pytest.raises(BadRecord, match="neither an option letter"):
        evaluate(_Letters(letters), "vqa", n=2, image_size=32, data=str(bad))


# ----------------------------------------------------------------------------------------------- pixel range
def test_tasks_feed_and_read_the_models_pixel_range():
    """Under the released Cheers profile a model takes and gives pixels in [0, 1]: every task feeds its images in
    that range (the stand-in refuses others, as the real model does) and reads the outputs with it, so a perfect
    model still scores 1 - with the [-1, 1] assumption the inputs were refused and the outputs read as washed-out
    halves of the range."""
    w = _world()
    tasks = "vqa,caption,geneval,vae-recon,segment,refine,clear,edit"
    right = _eval(Oracle(w, "right", profile="cheers"), tasks, n=6)["tasks"]
    for t in tasks.split(","):
        assert right[t]["score"] == 1.0, (t, right[t]["score"])
    assert _eval(Oracle(w, "wrong", profile="cheers"), "geneval,segment", n=6)["tasks"]["geneval"]["score"] == 0.0


def test_pixel_conversions_follow_the_range():
    from umm_ops.eval.tasks import pixels
    from umm_ops.eval.tasks.geneval import to_uint8
    from umm_ops.eval.world import to_pil

    u8 = torch.arange(0, 256, dtype=torch.uint8).repeat(3, 1, 1)
    for rng in ((-1.0, 1.0), (0.0, 1.0)):
        x = pixels(u8, rng)
        assert float(x.min()) == rng[0] and float(x.max()) == rng[1]
        assert torch.equal(to_uint8(x, rng), u8)
        assert np.array_equal(np.asarray(to_pil(x, rng)), u8.permute(1, 2, 0).numpy())
    assert torch.equal(pixels(u8, (-1.0, 1.0)), u8.float() / 127.5 - 1.0)            # the project's, unchanged
    with pytest.raises(FloatingPointError, match="NaN"):
        to_uint8(torch.full((3, 2, 2), float("nan")), (0.0, 1.0))
    with pytest.raises(ValueError, match="value_range must be"):
        pixels(u8, (0.0, 255.0))
    with pytest.raises(TypeError, match="expected a uint8"):
        pixels(u8.float(), (0.0, 1.0))
    with pytest.raises(TypeError, match="needs a conventions profile"):      # a model that does not say its range
        _eval(_NoProfile(), "vqa", n=2)


class _NoProfile:
    tokenizer = None

    def generate_text(self, samples, **kw):
        return ["A"] * len(samples)


def test_eval_end_to_end_on_a_tiny_cheers_model(tmp_path):
    """A real tiny model under the released Cheers conventions through vqa, geneval and vae-recon: the questions'
    images reach it in [0, 1], its generated and reconstructed images are read in [0, 1] (the same uint8 as its
    own outputs converted by hand), and they use the whole range - read as [-1, 1] every pixel was >= 128."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
    from cheers_released import tiny_cheers_model, write_qwen_like_tokenizer

    from umm_ops.data.packing import Sample, TextItem
    from umm_ops.eval.tasks import EvalContext, get_task, pixels
    from umm_ops.eval.tasks.geneval import to_uint8

    model = tiny_cheers_model(write_qwen_like_tokenizer(tmp_path / "tok"))
    assert model.profile.pixel_range == (0.0, 1.0)
    w = _world(8)
    ctx = EvalContext(w, FIRST, 2, seed=0, image_size=S, steps=2)
    seen = []
    real = model.generate_text

    def spy(samples, *a, **k):
        seen.extend(it.image for s in samples for it in s.items if hasattr(it, "role"))
        return real(samples, *a, **k)

    model.generate_text = spy
    try:
        vqa = get_task("vqa").run(model, ctx)
    finally:
        del model.generate_text
    assert len(vqa.items) == 2 and seen
    assert torch.equal(seen[0], pixels(ctx.record(FIRST).image, (0.0, 1.0))) and float(seen[0].min()) >= 0.0
    gen = get_task("geneval").run(model, ctx).images["generated"]
    recs = ctx.records()
    prompts = [Sample([TextItem(r.prompt["text"])], meta={"task": "geneval", "index": r.index}) for r in recs]
    with torch.no_grad():
        own = model.generate_image(prompts, height=S, width=S, steps=2,
                                   seed=ctx.seed_for("geneval", recs[0].index))["images"]
    for g, o in zip(gen, own):
        assert torch.equal(g, to_uint8(o, (0.0, 1.0)))
    recon = get_task("vae-recon").run(model, ctx).images["reconstruction"]
    for img in list(gen) + list(recon):
        inside = ((img > 0) & (img < 255)).float().mean()
        assert int(img.min()) < 128 and float(inside) > 0.05, (int(img.min()), float(inside))
