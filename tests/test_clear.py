"""CLEAR stage 1 (issue 16): generate-then-answer data on the synthetic world, the format's parser and reward, the
inference loop (with scripted text, the images the tiny model's own), the clear eval task's scoring, and a
few-step clear-sft run from the CLI."""
import math

import pytest
import torch

from umm_ops.data.clear_data import (CLEAR_SUFFIX_MC, RESTORE_TAG, RESTORE_THOUGHT, answer_text, clear_question,
                                     clear_samples, parse_clear)
from umm_ops.data.degradations import degrade
from umm_ops.data.packing import ImageItem, TextItem
from umm_ops.data.synthetic import END, SyntheticWorld
from umm_ops.eval.tasks.clear import format_reward, psnr


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(size=64, seed=0, max_objects=2, length=400, object_scale=1.8)


def _img(t):
    return t.float() / 127.5 - 1.0


def test_restore_and_direct_samples_hold_what_they_claim(world):
    seen = {"restore": 0, "direct": 0}
    for i in range(60):
        rec = world[i]
        for s, q in zip(clear_samples(rec), rec.vqa):
            items = s.items
            assert isinstance(items[0], ImageItem) and items[0].role == "understand"
            assert items[1].text == clear_question(q) and not items[1].loss and items[1].text.endswith(CLEAR_SUFFIX_MC)
            lv, kind = s.meta["level"], s.meta["degradation"]
            want = rec.image if lv == "clean" else degrade(rec.image[None], kind, lv, seed=rec.seed,
                                                           index=[rec.index])[0]
            assert torch.equal(items[0].image, _img(want))
            if s.meta["restore"]:
                seen["restore"] += 1
                assert lv in ("mid", "high") and kind is not None
                assert not torch.equal(items[0].image, _img(rec.image))        # the input really is degraded
                t1, gen, und, t2 = items[2:]
                assert t1.loss and t1.text == f"<think> {RESTORE_THOUGHT} </think> {RESTORE_TAG}"
                assert gen.role == "generate" and torch.equal(gen.image, _img(rec.image))   # target: the clean one
                assert und.role == "understand" and torch.equal(und.image, _img(rec.image))
                last = t2
            else:
                seen["direct"] += 1
                assert len(items) == 3
                assert lv in ("clean", "low") or torch.equal(items[0].image, _img(rec.image))   # nothing to restore
                last = items[2]
            assert last.loss and last.text.endswith(f"<answer>{q['answer_letter']}</answer>{END}")
            p = parse_clear(last.text)
            assert p["answer"] == q["answer_letter"] and all(p["format"].values())
    n = sum(seen.values())
    assert 0.2 < seen["direct"] / n < 0.4, seen          # p_direct = 0.3 over ~180 questions


def test_samples_are_deterministic_and_follow_p_direct(world):
    a, b = clear_samples(world[7], multiple_choice=False), clear_samples(world[7], multiple_choice=False)
    assert [s.meta for s in a] == [s.meta for s in b]
    assert all(torch.equal(x.items[0].image, y.items[0].image) for x, y in zip(a, b))
    assert all(s.items[-1].text.endswith(f"<answer>{q['answer']}</answer>{END}")
               for s, q in zip(a, world[7].vqa))
    assert all(s.meta["restore"] for i in range(20) for s in clear_samples(world[i], p_direct=0.0))
    assert not any(s.meta["restore"] for i in range(20) for s in clear_samples(world[i], p_direct=1.0))
    with pytest.raises(ValueError, match="p_direct"):
        clear_samples(world[0], p_direct=1.5)
    with pytest.raises(ValueError, match="restore_levels"):
        clear_samples(world[0], restore_levels=("worst",))


def test_parse_and_format_reward():
    full = f"<think> x </think> {RESTORE_TAG}" + answer_text("a red circle", "B")
    p = parse_clear(full)
    assert p == {"restore": True, "answer": "B", "format": {"think": True, "answer": True, "order": True}}
    assert format_reward(p["format"]) == pytest.approx(1.0)
    p = parse_clear("<answer>C</answer><think> late </think>")
    assert p["answer"] == "C" and not p["restore"] and p["format"] == {"think": True, "answer": True, "order": False}
    assert format_reward(p["format"]) == pytest.approx(0.7)
    p = parse_clear("A")
    assert p["answer"] == "" and format_reward(p["format"]) == 0.0
    assert parse_clear("<think> t </think><answer> D")["answer"] == "D"        # unclosed: what follows
    with pytest.raises(TypeError):
        parse_clear(None)


def test_psnr_against_its_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)
    mse = sum((int(x) - int(y)) ** 2 for x, y in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()
    assert psnr(a, b) == pytest.approx(20 * math.log10(255) - 10 * math.log10(mse))
    assert psnr(a, a) == 100.0


@pytest.fixture(scope="module")
def model():
    from conftest import tiny_eval_model

    return tiny_eval_model(32)


def _scripted(monkeypatch, script):
    """decode -> per prompt, the next scripted (text, finish_reason) of the first script key found in its texts."""
    from umm_ops.model import generate as gen

    calls, contexts = {}, []

    def fake_decode(model, prompts, **kw):
        out = []
        for p in prompts:
            contexts.append(p)
            text = " ".join(i.text for i in p.items if isinstance(i, TextItem))
            key = next(k for k in script if k in text)
            calls[key] = calls.get(key, 0) + 1
            t, why = script[key][calls[key] - 1]
            out.append({"ids": [1], "text": t, "logprobs": torch.zeros(1), "finish_reason": why})
        return out

    monkeypatch.setattr(gen, "decode", fake_decode)
    return contexts


def test_generate_then_answer_restores_only_when_asked(model, monkeypatch):
    from umm_ops.model.clear import generate_then_answer

    script = {"circle?": [(f"<think> {RESTORE_THOUGHT} </think> ", "stop"),
                          ("<think> a red circle </think><answer>B</answer>", "eos")],
              "square?": [("<think> a blue square </think><answer>A</answer>", "eos")]}
    ctx = _scripted(monkeypatch, script)
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    a, b = generate_then_answer(model, imgs, ["what circle?", "what square?"], steps=2, seed=5)
    assert a["restored"] and a["image"] is not None and a["image"].shape == (3, 32, 32)
    assert a["text"] == f"<think> {RESTORE_THOUGHT} </think> {RESTORE_TAG}<think> a red circle </think><answer>B</answer>"
    assert a["answer"] == "B" and all(a["format"].values())
    assert not b["restored"] and b["image"] is None and b["answer"] == "A"
    # the answer after a restoration reads [image, question, thought + marker, the restored image (understood)]
    last = ctx[-1]
    assert [type(i).__name__ for i in last.items] == ["ImageItem", "TextItem", "TextItem", "ImageItem"]
    assert last.items[2].text.endswith(RESTORE_TAG) and torch.equal(last.items[3].image, a["image"])
    assert torch.equal(last.items[0].image, imgs[0])
    # an item's restoration does not depend on the batch
    _scripted(monkeypatch, script)
    alone = generate_then_answer(model, imgs[:1], ["what circle?"], steps=2, seed=5)[0]
    torch.testing.assert_close(alone["image"], a["image"], rtol=1e-4, atol=1e-4)
    # an oracle restoration replaces the generated one where the model asks for it
    ctx2 = _scripted(monkeypatch, script)
    given = torch.zeros(2, 3, 32, 32)
    o = generate_then_answer(model, imgs, ["what circle?", "what square?"], steps=2, seed=5, restorations=given)
    assert torch.equal(o[0]["image"], given[0]) and o[1]["image"] is None
    assert torch.equal(ctx2[-1].items[3].image, given[0])
    with pytest.raises(ValueError, match="one question per image"):
        generate_then_answer(model, imgs, ["q"])
    with pytest.raises(ValueError, match="NaN"):
        generate_then_answer(model, torch.full((1, 3, 32, 32), float("nan")), ["q"])


def test_clear_task_scores_answers_and_restorations(model, monkeypatch):
    """The task on 4 items with scripted text: right / wrong letters, restored or not, PSNR of the restorations."""
    from umm_ops.eval.runner import evaluate

    def fake(model, images, questions, **kw):
        out = []
        for k, q in enumerate(questions):
            restore = k % 2 == 0
            out.append({"text": "", "restored": restore, "image": images[k] if restore else None,
                        "answer": "A", "format": {"think": True, "answer": k < 2, "order": False}})
        return out

    monkeypatch.setattr(type(model), "generate_then_answer", lambda self, *a, **kw: fake(self, *a, **kw),
                        raising=False)
    res = evaluate(model, "clear", n=4, image_size=32, world_kwargs={"max_objects": 2}, batch_size=4)
    t = res["tasks"]["clear"]
    truth = [it["answer"] for it in t["items"]]
    assert all(L in "ABCD" for L in truth) and len(truth) == 4
    assert t["score"] == pytest.approx(sum(a == "A" for a in truth) / 4)
    assert [it["restored"] for it in t["items"]] == [1.0, 0.0, 1.0, 0.0]
    assert t["metrics"]["restored"]["score"] == pytest.approx(0.5)
    assert t["metrics"]["format"]["score"] == pytest.approx((0.7 + 0.7 + 0.35 + 0.35) / 4)
    # the restorations here are the degraded inputs themselves: their PSNR is the degraded pictures'
    assert t["psnr_restored"] == pytest.approx(t["psnr_degraded_of_restored"])
    assert all(it["psnr"] == pytest.approx(it["psnr_degraded"]) for it in t["items"] if "psnr" in it)
    # ... and the checker scores them as it scores the degraded pictures, against the record's whole scene
    from umm_ops.eval.runner import default_world_kwargs
    from umm_ops.eval.tasks.vae_recon import score_reconstruction

    wk = {k: v for k, v in {**default_world_kwargs(), "max_objects": 2}.items() if k not in ("size", "length")}
    w = SyntheticWorld(size=32, length=res["records"][1], **wk)
    for it in t["items"]:
        if "psnr" in it:
            rec = w[it["index"]]
            deg = degrade(rec.image[None], it["degradation"], it["level"], seed=0, index=[rec.index])[0]
            assert it["checker"] == it["checker_degraded"] == score_reconstruction(rec.scene, rec.prompt,
                                                                                   _img(deg))["score"]
    assert t["checker_restored"] == pytest.approx(t["checker_degraded_of_restored"])


def test_clear_sft_from_the_cli(tmp_path):
    from umm_ops.cli import main

    base = tmp_path / "base"
    assert main(["train", "--steps", "1", "--set", "recipe.caption_first=0", "--no-eval", "--out", str(base),
                 "--device", "cpu", "--set", "data.budget=256"]) == 0
    out = tmp_path / "clear"
    args = ["train", "--recipe", "clear-sft", "--set", f"recipe.init={base}", "--steps", "2", "--no-eval",
            "--set", "data.budget=512", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    assert (out / "checkpoint-2").is_dir()
    from umm_ops.train.export import load_checkpoint_model

    a, b = load_checkpoint_model(str(base / "checkpoint-1")), load_checkpoint_model(str(out / "checkpoint-2"))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("vit."))          # CLEAR: the ViT is frozen
    assert b.config.tokenizer == "world+clear" and b.config.llm["vocab_size"] == 517      # the markers are tokens
    assert len(b.tokenizer.encode("<think> x </think><answer>B</answer>")) == 8     # 5 markers, " x ", "B"
    assert not all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("llm."))      # the LLM trains
    assert main(args[:5] + ["--steps", "3"] + args[7:]) == 0             # resumes from step 2
    assert (out / "checkpoint-3").is_dir()


def test_sft_dataset_clear_and_control_tasks():
    """The SFT dataset's clear tasks give the format's samples; degraded_vqa_short (CLEAR's direct-answer control)
    answers the degraded picture's question with the word."""
    from umm_ops.train.recipes.sft import SyntheticSFTDataset

    kw = dict(max_objects=2, object_scale=1.8)
    ds = SyntheticSFTDataset(64, 0, 20, ("clear", "clear_short", "degraded_vqa_short"), **kw)
    world = ds.world
    for i in range(len(ds)):
        s = ds[i]
        rec = world[i // 3]
        if i % 3 == 2:
            assert s.meta["task"] == "degraded_vqa" and s.items[-1].loss
            assert any(s.items[-1].text == q["answer"] + END for q in rec.vqa)
            assert not torch.equal(s.items[0].image, _img(rec.image))
        else:
            assert s.meta["task"] == "clear"
            want = [q["answer_letter"] if i % 3 == 0 else q["answer"] for q in rec.vqa]
            assert parse_clear(s.items[-1].text)["answer"] in want


def test_with_tokenizer_grows_the_vocabulary_and_keeps_the_model():
    from umm_ops.data.packing import Sample, TextItem
    from umm_ops.model.cheers import CheersModel, with_tokenizer

    torch.manual_seed(0)
    m = CheersModel("tiny").eval()
    g = with_tokenizer(m, "world+clear").eval()
    emb_m, emb_g = m.llm.model.embed_tokens.weight, g.llm.model.embed_tokens.weight
    assert emb_g.shape == (517, emb_m.shape[1]) and torch.equal(emb_g[:512], emb_m)
    for row, t in zip(emb_g[512:], ("<think>", "</think>", "<image_restore>", "<answer>", "</answer>")):
        torch.testing.assert_close(row, emb_m[m.tokenizer.encode(t)].mean(0))      # the mean of its byte pieces
    assert not torch.equal(emb_g[512], emb_g[513])
    assert g.tokenizer.encode("<image_restore>") == [514]
    s = Sample([TextItem("Describe the image."), TextItem("A red circle.", loss=True)])
    with torch.no_grad():
        a = m.generate_text([s], max_new_tokens=4, temperature=0.0)
        b = g.generate_text([s], max_new_tokens=4, temperature=0.0)
    for k, v in m.state_dict().items():
        if k in g.state_dict() and g.state_dict()[k].shape == v.shape:
            assert torch.equal(g.state_dict()[k], v), k
    assert isinstance(a[0], str) and isinstance(b[0], str)
    with pytest.raises(ValueError, match="263 ids, fewer than the model.s tokenizer .512."):
        with_tokenizer(m, "byte")
