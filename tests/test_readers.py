"""Readers: tiny datasets written in tmp_path (Pillow images, JSON, tar), good and broken records; COCO RLE checked
against strings produced by pycocotools' encoder."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from umm_ops.data.readers import (BadRecord, CaptionReader, CocoReader, LlavaReader, WebDatasetReader, expand_shards,
                                  rle_counts_from_string, rle_decode)


def _png(path, rng, h=12, w=17):
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return torch.from_numpy(arr).permute(2, 0, 1)


def _png_bytes(rng, h=9, w=7):
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), torch.from_numpy(arr).permute(2, 0, 1)


def _truncated_png(path, rng):
    _png(path, rng, 40, 40)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


# ----------------------------------------------------------------------------------------------- LLaVA
def test_llava_reader(tmp_path, seed):
    rng = np.random.default_rng(seed)
    (tmp_path / "img").mkdir()
    a = _png(tmp_path / "img" / "a.png", rng)
    b = _png(tmp_path / "img" / "b.png", rng, 5, 6)
    (tmp_path / "img" / "junk.png").write_bytes(b"not an image at all")
    conv = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Noise."}]
    recs = [
        {"id": "ok-1", "image": "img/a.png", "conversations": conv},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "missing", "image": "img/nope.png", "conversations": conv},
        {"id": "junk", "image": "img/junk.png", "conversations": conv},
        {"id": "bad-role", "image": "img/a.png", "conversations": [{"from": "robot", "value": "x"}]},
        {"id": "two", "image": ["img/a.png", "img/b.png"],
         "conversations": [{"from": "human", "value": "<image><image> same?"}, {"from": "gpt", "value": "No."}]},
        {"id": "tokens", "image": "img/a.png",
         "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "?"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(recs))
    with pytest.raises(BadRecord, match=r"llava.json: record 2 \(id 'missing'\): image file .*nope.png.* does not exist"):
        list(LlavaReader(path))
    r = LlavaReader(path, skip_bad=True)
    out = list(r)
    assert [o["key"] for o in out] == ["ok-1", "text-only", "two"]
    assert r.skipped == 4 and len(r.errors) == 4
    assert "cannot decode image file" in r.errors[1] and "'junk'" in r.errors[1]
    assert "turn 0 must be" in r.errors[2] and "2 '<image>' placeholders but 1 image(s)" in r.errors[3]
    assert torch.equal(out[0]["image"], a) and out[0]["image"].dtype == torch.uint8
    assert out[0]["conversations"] == [{"role": "user", "text": "<image>\nWhat is this?"},
                                       {"role": "assistant", "text": "Noise."}]
    assert out[0]["text"] == "<image>\nWhat is this?\nNoise."
    assert out[1]["image"] is None and out[1]["images"] == []
    assert len(out[2]["images"]) == 2 and torch.equal(out[2]["images"][1], b)
    # a second pass counts afresh
    assert len(list(r)) == 3 and r.skipped == 4


def test_llava_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="LlavaReader: .*absent.json' does not exist"):
        LlavaReader(tmp_path / "absent.json")
    p = tmp_path / "broken.json"
    p.write_text('[{"id": 1,\n "conversations": [}]')
    with pytest.raises(BadRecord, match=r"broken.json: bad JSON \(.* at line 2 column"):
        list(LlavaReader(p, skip_bad=True))
    p.write_text('{"id": 1}')
    with pytest.raises(BadRecord, match="expected a JSON list of records, got dict"):
        list(LlavaReader(p))


# ----------------------------------------------------------------------------------------------- captions
def test_caption_reader(tmp_path, seed):
    rng = np.random.default_rng(seed)
    a = _png(tmp_path / "a.png", rng)
    _truncated_png(tmp_path / "trunc.png", rng)
    lines = [json.dumps({"image": "a.png", "caption": "random pixels", "source": "test"}),
             '{"image": "a.png", "caption": ',
             "",
             json.dumps({"image": "a.png"}),
             json.dumps({"image": "gone.png", "caption": "x"}),
             json.dumps({"image": "trunc.png", "caption": "half a file"}),
             json.dumps({"image": str(tmp_path / "a.png"), "caption": "absolute path"})]
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRecord, match=r"caps.jsonl: line 2: bad JSON"):
        list(CaptionReader(path))
    r = CaptionReader(path, skip_bad=True)
    out = list(r)
    assert [o["text"] for o in out] == ["random pixels", "absolute path"]
    assert torch.equal(out[0]["image"], a) and torch.equal(out[1]["image"], a)
    assert out[0]["meta"] == {"source": "test"}
    assert r.skipped == 4
    assert "line 4: expected an object with an 'image' path and a 'caption' string" in r.errors[1]
    assert "line 5: image file" in r.errors[2] and "gone.png" in r.errors[2]
    assert "line 6: cannot decode image file" in r.errors[3] and "trunc.png" in r.errors[3]
    r2 = CaptionReader(path, skip_bad=True, text_key="source")
    assert [o["text"] for o in r2] == ["test"]


# ----------------------------------------------------------------------------------------------- WebDataset
def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_reader(tmp_path, seed):
    rng = np.random.default_rng(seed)
    pa, a = _png_bytes(rng)
    pb, b = _png_bytes(rng, 4, 5)
    _tar(tmp_path / "s-0.tar", [
        ("a.png", pa), ("a.txt", "first caption".encode()),
        ("sub/b.part.png", pb), ("sub/b.part.json", json.dumps({"caption": "from json", "w": 5}).encode()),
        ("c.txt", b"text but no image"),
        ("d.png", b"\x89PNG garbage"), ("d.txt", b"undecodable"),
    ])
    _tar(tmp_path / "s-1.tar", [
        ("e.png", pa), ("e.json", b'{"other": 1}'),
        ("f.json", json.dumps({"text": "text field"}).encode()), ("f.png", pb),
    ])
    assert expand_shards(str(tmp_path / "s-{0..1}.tar")) == [str(tmp_path / "s-0.tar"), str(tmp_path / "s-1.tar")]
    assert expand_shards("x-{008..010}-{a,b}.tar") == ["x-008-a.tar", "x-008-b.tar", "x-009-a.tar", "x-009-b.tar",
                                                       "x-010-a.tar", "x-010-b.tar"]
    with pytest.raises(BadRecord, match=r"s-0.tar: key 'c': no image file"):
        list(WebDatasetReader(str(tmp_path / "s-{0..1}.tar")))
    r = WebDatasetReader(str(tmp_path / "s-{0..1}.tar"), skip_bad=True)
    out = list(r)
    assert [(o["key"], o["text"]) for o in out] == [("a", "first caption"), ("sub/b", "from json"), ("f", "text field")]
    assert torch.equal(out[0]["image"], a) and torch.equal(out[1]["image"], b) and torch.equal(out[2]["image"], b)
    assert out[1]["meta"] == {"caption": "from json", "w": 5}
    assert r.skipped == 3
    assert "key 'd'" in r.errors[1] and "cannot decode image bytes" in r.errors[1]
    assert "s-1.tar: key 'e': no text" in r.errors[2]


def test_webdataset_truncated_shard_and_missing(tmp_path, seed):
    rng = np.random.default_rng(seed)
    pa, a = _png_bytes(rng, 64, 64)
    _tar(tmp_path / "t.tar", [("a.png", pa), ("a.txt", b"ok"), ("b.png", pa), ("b.txt", b"cut")])
    data = (tmp_path / "t.tar").read_bytes()
    b_png_data = 512 + -(-len(pa) // 512) * 512 + 512 + 512 + 512  # headers and 512-byte padded contents
    (tmp_path / "t.tar").write_bytes(data[: b_png_data + 100])  # cut inside b.png
    r = WebDatasetReader(str(tmp_path / "t.tar"), skip_bad=True)
    out = list(r)
    assert [o["key"] for o in out] == ["a"] and r.skipped == 1 and "unreadable tar" in r.errors[0]
    with pytest.raises(FileNotFoundError, match="WebDatasetReader shard: .*u-1.tar' does not exist"):
        WebDatasetReader([str(tmp_path / "t.tar"), str(tmp_path / "u-1.tar")])


# ----------------------------------------------------------------------------------------------- COCO RLE
# Masks on a 25 x 25 image and the compressed strings pycocotools.mask.encode writes for them (the known answers
# used by the pytorchcocotools test suite, tests/mask/test_encode.py).
PYCOCO_CASES = [((0, 5), "05d00000000d?"), ((5, 10), "R45d00000000b;"), ((20, 25), "X`05d00000000"), ((0, 25), "0ac0")]


@pytest.mark.parametrize("square,counts", PYCOCO_CASES)
def test_rle_matches_pycocotools(square, counts):
    want = np.zeros((25, 25), bool)
    want[square[0]:square[1], square[0]:square[1]] = True
    assert np.array_equal(rle_decode({"size": [25, 25], "counts": counts}), want)
    assert np.array_equal(rle_decode({"size": [25, 25], "counts": counts.encode()}), want)


def _runs(mask):
    """Uncompressed COCO RLE counts of a mask (column-major, starting with a run of zeros)."""
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def _compress(counts):
    """The COCO API's string form, written from its description (delta from the run two before, 5-bit groups)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_rle_round_trips_random_masks(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        h, w = rng.integers(1, 40, 2)
        mask = rng.random((h, w)) < rng.uniform(0.05, 0.95)
        runs = _runs(mask)
        assert np.array_equal(rle_decode({"size": [int(h), int(w)], "counts": runs}), mask)
        assert rle_counts_from_string(_compress(runs)) == runs
        assert np.array_equal(rle_decode({"size": [int(h), int(w)], "counts": _compress(runs)}), mask)


def test_rle_errors():
    with pytest.raises(ValueError, match="runs cover 24 pixels, but size 5x5 has 25"):
        rle_decode({"size": [5, 5], "counts": [20, 4]})
    with pytest.raises(ValueError, match="ends inside a run"):
        rle_counts_from_string("0a")  # 'a' = 49 -> continuation bit set, nothing follows
    with pytest.raises(ValueError, match="invalid character"):
        rle_counts_from_string("0 ")


# ----------------------------------------------------------------------------------------------- COCO reader
def test_coco_reader(tmp_path, seed):
    rng = np.random.default_rng(seed)
    (tmp_path / "images").mkdir()
    img1 = _png(tmp_path / "images" / "one.png", rng, 25, 25)
    _png(tmp_path / "images" / "small.png", rng, 10, 10)
    big = np.zeros((25, 25), bool)
    big[2:20, 2:20] = True
    small = np.zeros((25, 25), bool)
    small[5:10, 5:10] = True
    crowd = np.zeros((25, 25), bool)
    crowd[21:24, 0:25] = True
    tri = [2.0, 22.0, 12.0, 22.0, 2.0, 24.0]  # a polygon, rasterised by Pillow
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "segmentation": {"size": [25, 25], "counts": _runs(big)},
         "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 2, "segmentation": {"size": [25, 25], "counts": "R45d00000000b;"},
         "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 1, "segmentation": {"size": [25, 25], "counts": _compress(_runs(crowd))},
         "iscrowd": 1},
        {"id": 13, "image_id": 1, "category_id": 1, "segmentation": [[20.0, 1.0, 24.0, 1.0, 24.0, 5.0, 20.0, 5.0]],
         "iscrowd": 0},
        {"id": 20, "image_id": 2, "category_id": 2, "segmentation": {"size": [9, 10], "counts": [90]}},
        {"id": 30, "image_id": 3, "category_id": 2, "segmentation": [tri]},
    ]
    coco = {"images": [{"id": 1, "file_name": "one.png", "height": 25, "width": 25},
                       {"id": 2, "file_name": "small.png", "height": 10, "width": 10},
                       {"id": 3, "file_name": "one.png", "height": 30, "width": 25},
                       {"id": 4, "file_name": "missing.png", "height": 25, "width": 25}],
            "annotations": anns, "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    r = CocoReader(path, image_dir=str(tmp_path / "images"), skip_bad=True)
    assert len(r) == 4
    out = list(r)
    assert len(out) == 1 and r.skipped == 3
    assert "image 1 ('small.png', id 2): annotation 20: RLE size [9, 10] does not match the image's 10x10" in r.errors[0]
    assert "image 2 ('one.png', id 3): the file is 25x25 (w x h) but the annotation says 25x30" in r.errors[1]
    assert "missing.png" in r.errors[2] and "does not exist" in r.errors[2]
    rec = out[0]
    assert torch.equal(rec["image"], img1) and rec["key"] == "one.png" and rec["image_id"] == 1
    inst = rec["instances"].numpy()
    # non-crowd annotations in order -> ids 1, 2, 3; the small square lies on top of the big one
    assert [c["annotation_id"] for c in rec["instance_colors"]] == [10, 11, 13]
    assert [c["category"] for c in rec["instance_colors"]] == ["person", "dog", "person"]
    assert np.array_equal(inst == 2, small)
    assert np.array_equal(inst == 1, big & ~small)
    square = np.zeros((25, 25), bool)
    square[1:6, 20:25] = True  # Pillow fills polygons including their boundary pixels
    assert np.array_equal(inst == 3, square)
    assert (inst[21:24] == 0).all()  # the crowd region is left out
    seg = rec["segmentation"]
    assert torch.equal(seg.bool().any(0), rec["instances"] > 0)
    for c in rec["instance_colors"]:
        assert (seg[:, rec["instances"] == c["id"]] == torch.tensor(c["color"], dtype=torch.uint8)[:, None]).all()
    assert rec["text"] == "2 person, 1 dog"
    # with crowds, and without decoding the images
    rec = next(iter(CocoReader(path, image_dir=str(tmp_path / "images"), include_crowd=True, load_images=False)))
    assert rec["image"] is None
    assert np.array_equal(rec["instances"].numpy() == 3, crowd)
    with pytest.raises(BadRecord, match=r"instances.json: image 1 \('small.png', id 2\): annotation 20"):
        list(CocoReader(path, image_dir=str(tmp_path / "images")))


def test_coco_file_level_errors(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"images": []')
    with pytest.raises(BadRecord, match="x.json: bad JSON"):
        CocoReader(p)
    p.write_text('{"images": []}')
    with pytest.raises(BadRecord, match="'images' and 'annotations' lists"):
        CocoReader(p)
    with pytest.raises(FileNotFoundError, match="CocoReader"):
        CocoReader(os.path.join(str(tmp_path), "nope.json"))
