"""CLEAR's generate-then-answer samples from a user's VQA data (issue 16, stage 1): VQAReader (LLaVA JSON, JSONL
manifest, MMBench-style TSV; random access, bad records, pixel limit), clear_vqa_sample against an independent
construction, the SFT task clear_data, and a few-step clear-sft run on a user's file from the CLI."""
import base64
import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from umm_ops.data.clear_data import (CLEAR_SUFFIX_FREE, CLEAR_SUFFIX_MC, RESTORE_TAG, USER_SEEN, clear_vqa_sample,
                                     parse_clear)
from umm_ops.data.degradations import degrade
from umm_ops.data.mmd_bench import BadRecord
from umm_ops.data.packing import ImageItem
from umm_ops.data.readers import VQAReader
from umm_ops.data.synthetic import END


def _picture(k, h=80, w=96):
    g = torch.Generator().manual_seed(k)
    a = torch.randint(0, 256, (3, h // 8, w // 8), generator=g, dtype=torch.uint8)
    return a.repeat_interleave(8, 1).repeat_interleave(8, 2)       # blocky, so degradations show


def _png(t):
    buf = io.BytesIO()
    Image.fromarray(t.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


QS = [("What colour is the ball?", ["red", "blue", "green", "pink"], "B"),
      ("How many cats?", ["one", "two"], "two"),                   # the answer as the option's text
      ("Which side is the door on?", ["left", "right", "top"], "A")]


@pytest.fixture
def files(tmp_path):
    rows, lines, convs = [], [], []
    for k, (q, opts, ans) in enumerate(QS):
        pic = _picture(k)
        (tmp_path / f"{k}.png").write_bytes(_png(pic))
        cols = (opts + ["", "", "", ""])[:4]
        rows.append("\t".join([str(10 + k), q, *cols, ans, "cat" if k else "", "hint" if k == 2 else "",
                               base64.b64encode(_png(pic)).decode()]))
        lines.append(json.dumps({"image": f"{k}.png", "question": q, "options": opts, "answer": ans,
                                 **({"think": "a ball and a box"} if k == 0 else {})}))
        convs.append({"id": f"c{k}", "image": f"{k}.png",
                      "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                        {"from": "gpt", "value": f"answer {k}"}]})
    tsv = tmp_path / "bench.tsv"
    tsv.write_text("index\tquestion\tA\tB\tC\tD\tanswer\tcategory\thint\timage\n" + "\n".join(rows) + "\n")
    jsonl = tmp_path / "bench.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps(convs))
    return tsv, jsonl, llava


def test_reader_reads_the_three_formats(files):
    tsv, jsonl, llava = files
    for f in (tsv, jsonl):
        r = VQAReader(str(f))
        assert len(r) == 3
        recs = list(r)
        assert [x["answer"] for x in recs] == ["B", "B", "A"]
        assert recs[1]["options"] == ["one", "two"] and recs[0]["options"] == QS[0][1]
        for k, x in enumerate(recs):
            assert torch.equal(x["image"], _picture(k)) and x["image"].dtype == torch.uint8
        assert torch.equal(r[-1]["image"], recs[2]["image"])                    # random access, negative too
    t = VQAReader(str(tsv))
    assert t[2]["question"] == "hint\n" + QS[2][0] and t[1]["type"] == "cat" and t[0]["type"] == "all"
    assert t[0]["key"] == "10"
    assert VQAReader(str(jsonl))[0]["think"] == "a ball and a box" and VQAReader(str(jsonl))[1]["think"] == ""
    lv = VQAReader(str(llava))
    x = lv[1]
    assert x["question"] == QS[1][0] and x["answer"] == "answer 1" and x["options"] == [] and x["key"] == "c1"
    assert torch.equal(x["image"], _picture(1))
    r2 = pickle.loads(pickle.dumps(VQAReader(str(tsv))))                      # loader workers
    assert torch.equal(r2[0]["image"], _picture(0))
    with pytest.raises(IndexError, match="out of range for 3 records"):
        t[3]


def test_reader_bad_records_and_limits(tmp_path, files):
    tsv, jsonl, llava = files
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        json.dumps({"image": "0.png", "question": "Q?", "answer": "yes"}),              # free-form: fine
        "{not json",
        json.dumps({"image": "missing.png", "question": "Q?", "answer": "yes"}),
        json.dumps({"image": "0.png", "question": "Q?", "options": ["a", "b"], "answer": "c"}),
        json.dumps({"image": "0.png", "question": "", "answer": "yes"}),
    ]) + "\n")
    r = VQAReader(str(bad))
    assert len(r) == 5 and r[0]["answer"] == "yes" and r[0]["options"] == []
    for i, msg in ((1, "line 2: bad JSON"), (2, "missing.png.* does not exist"), (3, "neither an option letter"),
                   (4, "needs a non-empty 'question'")):
        with pytest.raises(BadRecord, match=msg):
            r[i]
    with pytest.raises(BadRecord, match="bad JSON"):
        list(r)
    s = VQAReader(str(bad), skip_bad=True)
    assert len(list(s)) == 1 and s.skipped == 4 and len(s.errors) == 4
    with pytest.raises(BadRecord, match="above the limit of 100 decoded pixels"):
        VQAReader(str(jsonl), max_pixels=100)[0]                                # refused before decoding
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match=r"\.json .*\.jsonl .*\.tsv.*'\.csv'"):
        VQAReader(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="is a folder"):
        VQAReader(str(tmp_path))
    noimg = tmp_path / "noimg.json"
    noimg.write_text(json.dumps([{"id": 1, "conversations": [{"from": "human", "value": "hi"},
                                                             {"from": "gpt", "value": "hello"}]}]))
    with pytest.raises(BadRecord, match="needs an image"):
        VQAReader(str(noimg))[0]


def _resized(t, size):
    im = Image.fromarray(t.permute(1, 2, 0).numpy()).resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 * 2 - 1


def test_clear_vqa_sample_against_an_independent_construction(files):
    tsv, jsonl, llava = files
    mc, free = VQAReader(str(jsonl)), VQAReader(str(llava))
    seen = {True: 0, False: 0}
    for draw in range(40):
        rec = (mc if draw % 2 else free)[draw % 3]
        s = clear_vqa_sample(rec, 32, seed=5, draw=draw)
        assert s.meta["task"] == "clear_data" and s.meta["draw"] == draw and s.meta["key"] == rec["key"]
        assert isinstance(s.items[0], ImageItem) and s.items[0].role == "understand"
        q = s.items[1].text
        if rec["options"]:
            assert q.startswith(rec["question"] + "\nA. ") and q.endswith(CLEAR_SUFFIX_MC)
        else:
            assert q == f"{rec['question']}\n{CLEAR_SUFFIX_FREE}"
        lv, kind = s.meta["level"], s.meta["degradation"]
        # degraded at the file's resolution (80 x 96), then resized: recomputed here from the meta
        want = rec["image"] if lv == "clean" else degrade(rec["image"][None], kind, lv, seed=5, index=[draw])[0]
        assert torch.allclose(s.items[0].image, _resized(want, 32), atol=1e-6)
        last = s.items[-1]
        assert last.loss and last.text.endswith(f"<answer>{rec['answer']}</answer>{END}")
        assert f"<think> {rec['think'] or USER_SEEN} </think>" in last.text
        assert parse_clear(last.text)["answer"] == rec["answer"]
        seen[s.meta["restore"]] += 1
        if s.meta["restore"]:
            assert lv in ("mid", "high")
            assert s.items[2].text.endswith(RESTORE_TAG) and s.items[2].loss
            assert s.items[3].role == "generate" and s.items[4].role == "understand"
            assert torch.allclose(s.items[3].image, _resized(rec["image"], 32), atol=1e-6)   # target: the clean one
        else:
            assert len(s.items) == 3
    assert seen[True] and seen[False]
    a, b = clear_vqa_sample(mc[0], 32, 5, 3), clear_vqa_sample(mc[0], 32, 5, 3)
    assert a.meta == b.meta and torch.equal(a.items[0].image, b.items[0].image)      # the same draw, the same sample
    metas = {(clear_vqa_sample(mc[0], 32, 5, d).meta["degradation"]) for d in range(12)}
    assert len(metas) > 2                                                            # draws differ
    with pytest.raises(TypeError, match="VQAReader record"):
        clear_vqa_sample({"image": mc[0]["image"]}, 32, 5, 0)
    with pytest.raises(ValueError, match="p_direct"):
        clear_vqa_sample(mc[0], 32, 5, 0, p_direct=2)


def test_sft_dataset_task_clear_data(tmp_path, files):
    from umm_ops.train.recipes.sft import SyntheticSFTDataset

    tsv, jsonl, llava = files
    r = VQAReader(str(jsonl))
    ds = SyntheticSFTDataset(32, 0, 10, ("clear_data", "caption"), clear_data=r, max_objects=1)
    for i in range(0, 20, 2):
        s = ds[i]
        assert s.meta["task"] == "clear_data" and s.meta["index"] == (i // 2) % 3 and s.meta["draw"] == i
        assert s.items[0].image.shape == (3, 32, 32)
    assert ds[1].meta["task"] == "caption"
    with pytest.raises(ValueError, match="clear_data needs a non-empty VQAReader"):
        SyntheticSFTDataset(32, 0, 10, ("clear_data",), max_objects=1)
    lines = jsonl.read_text().splitlines()
    lines[1] = json.dumps({"image": "gone.png", "question": "Q?", "answer": "x"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    strict = SyntheticSFTDataset(32, 0, 10, ("clear_data",), clear_data=VQAReader(str(bad)), max_objects=1)
    with pytest.raises(BadRecord, match="gone.png"):
        strict[1]
    lenient = SyntheticSFTDataset(32, 0, 10, ("clear_data",), clear_data=VQAReader(str(bad), skip_bad=True),
                                  max_objects=1)
    assert lenient[1].meta["index"] == 2                     # the next usable record


def test_clear_sft_on_a_users_file_from_the_cli(tmp_path, files):
    from umm_ops.cli import main
    from umm_ops.train import Config, ConfigError

    tsv, jsonl, llava = files
    base = tmp_path / "base"
    assert main(["train", "--steps", "1", "--set", "recipe.caption_first=0", "--no-eval", "--out", str(base),
                 "--device", "cpu", "--set", "data.budget=256"]) == 0
    out = tmp_path / "clear"
    args = ["train", "--recipe", "clear-sft", "--set", f"recipe.init={base}", "--steps", "2", "--no-eval",
            "--set", "recipe.tasks=clear_data,clear_short", "--set", "recipe.task_weights=2,1",
            "--set", f"recipe.clear_data={tsv}", "--set", "data.budget=512", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    assert (out / "checkpoint-2").is_dir()
    assert "clear_data" in (out / "config.toml").read_text()
    with pytest.raises(ConfigError, match="clear_data.*must name a VQA file"):
        Config.build("clear-sft", overrides=["recipe.tasks=clear_data", "recipe.task_weights=1,"])
    with pytest.raises(ConfigError, match="clear_data.*must name a VQA file"):
        Config.build("sft", overrides=[f"recipe.clear_data={tsv}"])          # a file no task reads
