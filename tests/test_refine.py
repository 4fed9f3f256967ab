"""R3's inference loop (umm_ops.model.refine): stopping rule, round bookkeeping, reflection parsing and per-prompt
seeding, with the model's text replaced by scripted answers (the images are the tiny model's own)."""
import pytest
import torch

from umm_ops.model import refine
from umm_ops.model.refine import generate_refined, instruction_of, is_stop


def test_instruction_parsing():
    assert instruction_of("<think> it is blue </think> make the circle red") == "make the circle red"
    assert instruction_of("make it red") == "make it red"
    assert is_stop("<think> looks right </think> No further edit needed.")
    assert not is_stop("<think> no further edit needed? no </think> add a square")


@pytest.fixture(scope="module")
def model():
    from conftest import tiny_eval_model

    return tiny_eval_model(32)


def _scripted(monkeypatch, script):
    """decode -> for each prompt, the scripted text of its (prompt, round): the round is counted per prompt."""
    from umm_ops.model import generate as gen

    calls = {}

    def fake_decode(model, prompts, **kw):
        out = []
        for p in prompts:
            items = p.items if hasattr(p, "items") else None
            text = p if isinstance(p, str) else next(i.text for i in items if hasattr(i, "text"))
            key = next(k for k in script if k in text)
            calls[key] = calls.get(key, 0) + 1
            out.append({"ids": [1], "text": script[key][calls[key] - 1], "logprobs": torch.zeros(1),
                        "finish_reason": "eos"})
        return out

    monkeypatch.setattr(gen, "decode", fake_decode)
    return calls


def test_loop_stops_by_itself_and_keeps_every_round(model, monkeypatch):
    script = {"red circle": ["<think> one red circle </think>", "<think> ok </think> no further edit needed"],
              "blue square": ["<think> a square </think>", "make it bluer", "<think> x </think> move it left",
                              "unused"]}
    _scripted(monkeypatch, script)
    res = generate_refined(model, ["a red circle", "a blue square"], max_rounds=3, steps=2, seed=3)
    a, b = res
    assert [r["round"] for r in a["rounds"]] == [1, 2] and a["stopped"]
    assert torch.equal(a["rounds"][1]["image"], a["rounds"][0]["image"]) and torch.equal(a["image"],
                                                                                        a["rounds"][0]["image"])
    assert a["rounds"][1]["instruction"] == "no further edit needed"
    assert [r["round"] for r in b["rounds"]] == [1, 2, 3] and not b["stopped"]
    assert [r["instruction"] for r in b["rounds"]] == [None, "make it bluer", "move it left"]
    assert not torch.equal(b["rounds"][1]["image"], b["rounds"][0]["image"])    # an edit makes a new image
    assert torch.equal(b["image"], b["rounds"][2]["image"])
    # a prompt's rounds do not depend on the other prompts
    _scripted(monkeypatch, script)
    alone = generate_refined(model, ["a blue square"], max_rounds=3, steps=2, seed=3)[0]
    for x, y in zip(alone["rounds"], b["rounds"]):
        torch.testing.assert_close(x["image"], y["image"], rtol=1e-4, atol=1e-4)


def test_two_scale_cfg_guides_the_edits_only(model, monkeypatch):
    """image_cfg_scale / cfg_renorm reach the loop's edits (BAGEL / R3's two-scale CFG) and not its first drawing:
    round 1 is the one-scale loop's, round 2 is edit_image's two-scale edit of round 1 with the round's seed."""
    from umm_ops.model.generate import edit_image
    from umm_ops.utils import seed_of

    script = {"blue square": ["<think> a square </think>", "<think> x </think> make it bluer"]}
    _scripted(monkeypatch, script)
    one = generate_refined(model, ["a blue square"], max_rounds=2, steps=2, seed=3, cfg_scale=4.0)[0]
    _scripted(monkeypatch, script)
    two = generate_refined(model, ["a blue square"], max_rounds=2, steps=2, seed=3, cfg_scale=4.0,
                           image_cfg_scale=1.5, cfg_renorm="text_channel")[0]
    assert torch.equal(one["rounds"][0]["image"], two["rounds"][0]["image"])
    want = edit_image(model, [two["rounds"][0]["image"]], ["make it bluer"], steps=2, cfg_scale=4.0,
                      image_cfg_scale=1.5, cfg_renorm="text_channel",
                      seed=[seed_of(3, "a blue square", 0, 2, "image")])["images"][0]
    torch.testing.assert_close(two["rounds"][1]["image"], want, rtol=1e-4, atol=1e-4)
    assert float((two["rounds"][1]["image"] - one["rounds"][1]["image"]).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="cfg_renorm must be one of"):
        generate_refined(model, ["a blue square"], max_rounds=2, cfg_renorm="bogus")


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="max_rounds"):
        generate_refined(model, ["a red circle"], max_rounds=0)
    with pytest.raises(ValueError, match="prompts"):
        generate_refined(model, [""])
    assert refine.STOP_PHRASE in refine.REFLECT_PROMPT


def test_refine_from_the_cli(tmp_path, capsys):
    from umm_ops.cli import main
    from umm_ops.model.cheers import CheersModel

    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    CheersModel("tiny").save_pretrained(folder)
    png = tmp_path / "r.png"
    assert main(["generate", str(folder), "--prompt", "a red circle", "--steps", "2", "--size", "32",
                 "--refine", "2", "--max-new-tokens", "4", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.is_file() and (tmp_path / "r-round1.png").is_file() and "round 1:" in out
    # an untrained model does not say the stop phrase: round 2 is an edit, written too
    assert (tmp_path / "r-round2.png").is_file() and "stopped after --refine 2 rounds" in out
    assert main(["generate", str(folder), "--prompt", "x", "--text", "--refine", "2"]) == 2
    # two-scale CFG of the edits; refused where nothing is edited
    png2 = tmp_path / "two.png"
    assert main(["generate", str(folder), "--prompt", "a red circle", "--steps", "2", "--size", "32",
                 "--refine", "2", "--max-new-tokens", "4", "--image-cfg", "1.5", "--cfg-renorm", "text_channel",
                 "--cfg-interval", "0.4,1.0", "--out", str(png2)]) == 0 and (tmp_path / "two-round2.png").is_file()
    with pytest.raises(SystemExit):
        main(["generate", str(folder), "--prompt", "a red circle", "--refine", "2", "--cfg-interval", "1,0.4"])
    assert "expected 0 <= LO < HI <= 1" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["generate", str(folder), "--prompt", "a red circle", "--steps", "2", "--size", "32",
                 "--image-cfg", "1.5", "--out", str(tmp_path / "no.png")]) == 2
    assert "--image-cfg / --cfg-renorm guide edits" in capsys.readouterr().err


def test_edit_pairs_miss_the_prompt_by_the_edit_the_instruction_names():
    import random

    from umm_ops.data.refine_data import edit_pair, r3_samples
    from umm_ops.data.synthetic import SyntheticWorld, render
    from umm_ops.eval.checker import check

    w = SyntheticWorld(size=64, seed=1, max_objects=2, object_scale=1.8, kinds=("circle", "square", "triangle",
                                                                                "cross"))
    seen = set()
    for i in range(40):
        rec = w[i]
        assert check(rec.prompt, rec.image, value_range=(0, 255))["correct"]
        scene, ins, what = edit_pair(rec, random.Random(i), w.kinds, w.colors)
        seen.add(what)
        bad, _ = render(scene)
        assert not check(rec.prompt, bad, value_range=(0, 255))["correct"], (i, ins)
        before, after = rec.scene["objects"], scene["objects"]
        if what == "remove":
            assert len(after) == len(before) - 1 and ins.startswith("add ")
        else:
            (k,) = [k for k, (a, b) in enumerate(zip(before, after)) if a != b]
            o, e = before[k], after[k]
            if what == "recolor":
                assert ins == f"change the {e['color']} {o['kind']} to {o['color']}" and e["kind"] == o["kind"]
            else:
                assert ins == f"turn the {o['color']} {e['kind']} into a {o['kind']}" and e["color"] == o["color"]
    assert seen == {"recolor", "reshape", "remove"}
    s = r3_samples(w[0], kinds=w.kinds, colors=w.colors)
    tasks = [x.meta["task"] for x in s]
    assert tasks[:3] == ["plan", "reflect", "edit"]
    plan, refl, edit = s[:3]
    assert [type(it).__name__ for it in plan.items] == ["TextItem", "TextItem", "ImageItem"]
    assert plan.items[1].loss and plan.items[2].role == "generate"
    assert refl.items[0].role == "understand" and refl.items[2].loss and refl.items[2].text.endswith("<|im_end|>")
    assert edit.items[0].role == "understand" and edit.items[2].role == "generate"
    assert torch.equal(edit.items[2].image, w[0].image.float() / 127.5 - 1)


def test_sft_from_init_weights_on_the_r3_tasks(tmp_path):
    from umm_ops.model.cheers import CheersModel
    from umm_ops.train import Config, train
    from umm_ops.train.recipes.sft import SFTRecipe

    torch.manual_seed(1)
    src = CheersModel("tiny")
    src.save_pretrained(tmp_path / "base")
    over = [f"recipe.init={tmp_path / 'base'}", "recipe.image_size=32", "recipe.tasks=r3_plan,r3_reflect,r3_edit",
            "recipe.evaluate=false", "recipe.caption_first=0", "job.steps=2", "job.progress=false",
            f"job.out={tmp_path / 'run'}", "checkpoint.every=0", "metrics.plot=false", "data.budget=1024"]
    cfg = Config.build("sft", overrides=over)
    built = SFTRecipe().build_model(cfg)
    for (n, a), b in zip(src.state_dict().items(), built.state_dict().values()):
        assert torch.equal(a, b), n
    s = train(cfg)
    assert s["steps"] == 2 and s["loss_last1"] > 0


def test_refine_eval_task(model):
    from umm_ops.eval.runner import evaluate

    res = evaluate(model, "refine", n=3, image_size=32, steps=2, refine_rounds=2, first=100,
                   world_kwargs={"max_objects": 1})
    t = res["tasks"]["refine"]
    assert t["n"] == 3 and set(t["metrics"]) == {"round1", "stopped", "worse", "better"}
    assert len(t["score_after_round"]) == 2 and all(0 <= s <= 1 for s in t["score_after_round"])
