"""`umm mmd-bench build`: JSONL and MMBench-style TSV in, three degraded levels with manifests out."""
import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest

PIL = pytest.importorskip("PIL.Image")

from umm_ops.data import DEGRADATIONS, LEVELS  # noqa: E402
from umm_ops.data.mmd_bench import BadRecord, build  # noqa: E402


def _png(path, seed, size=48):
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    PIL.fromarray(arr).save(path)
    return arr


def _jsonl(tmp_path, n=4, extra_lines=()):
    lines = []
    for i in range(n):
        _png(tmp_path / f"img{i}.png", i)
        lines.append(json.dumps({"image": f"img{i}.png", "question": f"q{i}?", "options": ["a", "b"], "answer": "a"}))
    man = tmp_path / "bench.jsonl"
    man.write_text("\n".join(lines + list(extra_lines)) + "\n")
    return man


def test_build_jsonl_writes_three_levels_deterministically(tmp_path):
    man = _jsonl(tmp_path)
    rep = build(str(man), str(tmp_path / "out"), seed=3)
    assert rep.written == 4 and not rep.skipped
    per_level = {}
    for lv, inten in LEVELS.items():
        recs = [json.loads(x) for x in (tmp_path / "out" / lv / "manifest.jsonl").read_text().splitlines()]
        assert len(recs) == 4
        for i, r in enumerate(recs):
            assert r["question"] == f"q{i}?" and r["answer"] == "a" and r["source_image"] == f"img{i}.png"
            assert r["degradation"] in DEGRADATIONS and r["intensity"] == inten and r["level"] == lv
            assert r["category"] == DEGRADATIONS[r["degradation"]][0]
            im = PIL.open(tmp_path / "out" / lv / r["image"])
            assert im.format == "JPEG" and im.size == (48, 48)
        per_level[lv] = [r["degradation"] for r in recs]
    assert per_level["low"] == per_level["mid"] == per_level["high"]  # one type per image across levels
    rep2 = build(str(man), str(tmp_path / "out2"), seed=3)
    for lv in LEVELS:
        a = (tmp_path / "out" / lv / "manifest.jsonl").read_text().replace("out", "")
        b = (tmp_path / "out2" / lv / "manifest.jsonl").read_text().replace("out2", "")
        assert a == b
        for i in range(4):
            assert (tmp_path / "out" / lv / "images" / f"{i}.jpg").read_bytes() == \
                (tmp_path / "out2" / lv / "images" / f"{i}.jpg").read_bytes()
    assert rep2.counts == rep.counts


def test_build_tsv(tmp_path):
    rows = ["index\tquestion\tA\tB\tanswer\timage"]
    for i in range(3):
        buf = io.BytesIO()
        PIL.fromarray(np.full((32, 40, 3), 60 * i, np.uint8)).save(buf, format="PNG")
        rows.append(f"{i}\tq{i}\tx\ty\tA\t{base64.b64encode(buf.getvalue()).decode()}")
    man = tmp_path / "mmbench.tsv"
    man.write_text("\n".join(rows) + "\n")
    rep = build(str(man), str(tmp_path / "out"), levels=("high",))
    assert rep.written == 3
    recs = [json.loads(x) for x in (tmp_path / "out" / "high" / "manifest.jsonl").read_text().splitlines()]
    assert [r["question"] for r in recs] == ["q0", "q1", "q2"] and all(r["A"] == "x" for r in recs)
    assert PIL.open(tmp_path / "out" / "high" / recs[0]["image"]).size == (40, 32)


def test_bad_records_stop_or_are_counted(tmp_path):
    man = _jsonl(tmp_path, n=2, extra_lines=['{"image": "missing.png"}', "{not json", '{"question": "no image"}'])
    with pytest.raises(BadRecord, match="does not exist"):
        build(str(man), str(tmp_path / "out"))
    rep = build(str(man), str(tmp_path / "out"), skip_bad=True)
    assert rep.written == 2 and len(rep.skipped) == 3
    reasons = " ".join(r for _, r in rep.skipped)
    assert "does not exist" in reasons and "bad JSON" in reasons and "'image' path" in reasons
    (tmp_path / "broken.png").write_text("not an image")
    man2 = tmp_path / "b.jsonl"
    man2.write_text(json.dumps({"image": "broken.png"}) + "\n")
    with pytest.raises(BadRecord, match="cannot decode image"):
        build(str(man2), str(tmp_path / "out3"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(str(tmp_path / "nope.jsonl"), str(tmp_path / "out4"))
    with pytest.raises(ValueError, match="unknown level"):
        build(str(man2), str(tmp_path / "out5"), levels=("extreme",))


def test_cli_build(tmp_path):
    man = _jsonl(tmp_path, n=2, extra_lines=["{oops"])
    res = subprocess.run([sys.executable, "-m", "umm_ops", "mmd-bench", "build", "--manifest", str(man), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode == 2 and "bad JSON" in res.stderr
    res = subprocess.run([sys.executable, "-m", "umm_ops", "mmd-bench", "build", "--manifest", str(man), "--out",
                          str(tmp_path / "o"), "--skip-bad"], capture_output=True, text=True, check=True)
    assert "wrote 2 records x 3 levels" in res.stdout and "skipped 1" in res.stdout
