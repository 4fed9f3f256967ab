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


def _huge_png(path, w=12000, h=12000):
    """A tiny PNG whose header declares w x h pixels (its data is a few bytes: decoding it would fail, but a
    reader that trusts the header would first allocate w * h * 3 bytes)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_pixel_limit_refuses_huge_images_keeping_finished_records(tmp_path):
    """Issue 20: a small file declaring 12000 x 12000 pixels is a bad record under the default limit (refused
    from its header, before any decoding); without --skip-bad the build stops with a clear error and the
    records finished before it stay in the manifests."""
    from umm_ops.data.mmd_bench import MAX_PIXELS

    _huge_png(tmp_path / "huge.png")
    assert (tmp_path / "huge.png").stat().st_size < 1000 and 12000 * 12000 > MAX_PIXELS
    man = _jsonl(tmp_path, n=2, extra_lines=[json.dumps({"image": "huge.png"}), json.dumps({"image": "img0.png"})])
    with pytest.raises(BadRecord, match=r"line 3 .*declares 12000x12000 = 144,000,000 pixels, above the limit of "
                                        r"64,000,000") as e:
        build(str(man), str(tmp_path / "out"))
    assert e.value.report.written == 2
    for lv in LEVELS:  # the two finished records were not lost
        assert len((tmp_path / "out" / lv / "manifest.jsonl").read_text().splitlines()) == 2
    rep = build(str(man), str(tmp_path / "out2"), skip_bad=True)
    assert rep.written == 3 and [n for n, _ in rep.skipped] == [2] and "12000x12000" in rep.skipped[0][1]
    # the limit is a setting: 48 x 48 = 2304 pixels
    rep = build(str(man), str(tmp_path / "out3"), skip_bad=True, max_pixels=2000)
    assert rep.written == 0 and len(rep.skipped) == 4
    assert build(str(man), str(tmp_path / "out4"), skip_bad=True, max_pixels=2304).written == 3
    for bad in (0, -1, 2.5, "64"):
        with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
            build(str(man), str(tmp_path / "out5"), max_pixels=bad)
    # TSV records too
    buf = io.BytesIO()
    _huge_png(tmp_path / "h2.png", 9000, 9000)
    tsv = tmp_path / "b.tsv"
    tsv.write_text("index\timage\n0\t" + base64.b64encode((tmp_path / "h2.png").read_bytes()).decode() + "\n")
    with pytest.raises(BadRecord, match="record 0 .*base64 image declares 9000x9000"):
        build(str(tsv), str(tmp_path / "out6"))
    del buf


def test_cli_build_pixel_limit_and_folder_manifest(tmp_path):
    _huge_png(tmp_path / "huge.png")
    man = _jsonl(tmp_path, n=1, extra_lines=[json.dumps({"image": "huge.png"})])
    cmd = [sys.executable, "-m", "umm_ops", "mmd-bench", "build", "--manifest", str(man), "--out", str(tmp_path / "o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 2 and "above the limit of 64,000,000" in res.stderr and "Traceback" not in res.stderr
    assert "the 1 records finished before it are in the manifests" in res.stderr
    res = subprocess.run(cmd + ["--skip-bad"], capture_output=True, text=True, check=True)
    assert "wrote 1 records x 3 levels" in res.stdout and "skipped 1" in res.stdout
    res = subprocess.run(cmd + ["--max-pixels", "0"], capture_output=True, text=True)
    assert res.returncode == 2 and "max_pixels must be a positive integer, got 0" in res.stderr
    res = subprocess.run(cmd[:6] + [str(tmp_path), "--out", str(tmp_path / "o2")], capture_output=True, text=True)
    assert res.returncode == 2 and "is a folder, not a file" in res.stderr


def test_rebuild_replaces_a_build_whole_and_never_mixes_two(tmp_path, monkeypatch):
    """Issue 16: a rebuild into a folder holding a build replaces it as a whole (no stale images of the old build);
    while it runs the old build stays as it was; a build that stops keeps its finished records, swapped in whole;
    a folder holding anything else is refused untouched."""
    import umm_ops.data.mmd_bench as mb

    out = tmp_path / "out"
    build(str(_jsonl(tmp_path, n=4)), str(out), seed=1)
    old = {lv: (out / lv / "manifest.jsonl").read_text() for lv in LEVELS}
    small = tmp_path / "small"
    small.mkdir()
    man = _jsonl(small, n=2)
    real, seen = mb._degrade_hwc, []

    def watching(*a, **kw):      # mid-build: the old build is still whole in `out`
        seen.append({lv: (out / lv / "manifest.jsonl").read_text() for lv in LEVELS} == old
                    and len(list((out / "low" / "images").iterdir())) == 4)
        return real(*a, **kw)

    monkeypatch.setattr(mb, "_degrade_hwc", watching)
    assert build(str(man), str(out), seed=1).written == 2
    assert seen and all(seen)
    for lv in LEVELS:
        assert len((out / lv / "manifest.jsonl").read_text().splitlines()) == 2
        assert sorted(p.name for p in (out / lv / "images").iterdir()) == ["0.jpg", "1.jpg"]   # no stale 2, 3
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

    calls = []

    def interrupted(*a, **kw):   # stopped during the second record
        calls.append(1)
        if len(calls) > len(LEVELS):
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(mb, "_degrade_hwc", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(str(_jsonl(tmp_path, n=4)), str(out), seed=1)
    for lv in LEVELS:          # the finished record, alone and whole
        assert len((out / lv / "manifest.jsonl").read_text().splitlines()) == 1
        assert [p.name for p in (out / lv / "images").iterdir()] == ["0.jpg"]

    monkeypatch.setattr(mb, "_degrade_hwc", real)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds 'notes.txt', which is not part of an MMD-Bench build"):
        build(str(man), str(out))
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    (out / "low" / "extra.json").write_text("{}")
    with pytest.raises(ValueError, match="extra.json"):
        build(str(man), str(out))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        build(str(man), str(tmp_path / "afile"))
