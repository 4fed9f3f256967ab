"""The synthetic world: determinism, rendering consistency (image / instance ids / segmentation map), answers
re-derived from the scene and from the pixels, the GenEval-like checker accepting ground truth and rejecting
perturbed images, degraded copies, and the packing helper."""
from __future__ import annotations

import copy
import importlib.util
import itertools
import math
import random

import numpy as np
import pytest
import torch

from umm_ops.data import synthetic as syn
from umm_ops.data.synthetic import COLORS, KINDS, SyntheticWorld, instance_palette, render
from umm_ops.eval import check
from umm_ops.eval.checker import find_objects

from conftest import confetti_picture

SIZES = (64, 128, 256)


def _world(seed, size=64, **kw):
    return SyntheticWorld(size=size, seed=seed, **kw)


def _indices(seed, n, hi=10_000):
    return random.Random(seed).sample(range(hi), n)


def _center(b):
    return ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)


# ----------------------------------------------------------------------------------------------- determinism
def test_same_seed_and_index_give_the_same_record(seed):
    i = _indices(seed, 1)[0]
    a, b = _world(seed)[i], _world(seed)[i]
    assert torch.equal(a.image, b.image) and torch.equal(a.segmentation, b.segmentation)
    assert (a.scene, a.caption, a.vqa, a.prompt) == (b.scene, b.caption, b.vqa, b.prompt)
    w = _world(seed, length=50)
    assert len(w) == 50 and torch.equal(w[-1].image, w[49].image)
    with pytest.raises(IndexError, match="out of range for length 50"):
        w[50]
    # a different seed gives a different world
    other = [_world(seed + 1)[j].scene["objects"] for j in range(5)]
    assert other != [_world(seed)[j].scene["objects"] for j in range(5)]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="size must be an int in \\[32, 1024\\]"):
        SyntheticWorld(size=16)
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticWorld(max_objects=0)
    with pytest.raises(ValueError, match="kinds must be"):
        SyntheticWorld(kinds=("hexagon",))
    with pytest.raises(TypeError, match="indices are ints"):
        SyntheticWorld()["3"]
    for bad in (0.2, 3.0, "2", True, float("nan")):
        with pytest.raises(ValueError, match="object_scale must be a number in \\[0.5, 2.5\\]"):
            SyntheticWorld(object_scale=bad)


def test_object_scale_scales_the_objects():
    """object_scale multiplies every object's size (the same scenes otherwise: colours, kinds, counts); objects
    still fit and never touch, and the pixel checker still reads every object of the true pictures."""
    from umm_ops.eval.checker import check

    base, big = SyntheticWorld(size=64, seed=3, max_objects=2), SyntheticWorld(size=64, seed=3, max_objects=2,
                                                                               object_scale=2.0)
    ratios = []
    for i in range(40):
        a, b = base.scene(i)["objects"], big.scene(i)["objects"]
        assert [(o["kind"], o["color"]) for o in b][:1] == [(o["kind"], o["color"]) for o in a][:1]
        for o in b:
            assert 0 <= o["box"][0] and o["box"][2] < 64 and 0 <= o["box"][1] and o["box"][3] < 64
        ratios += [(ob["box"][2] - ob["box"][0]) / (oa["box"][2] - oa["box"][0]) for oa, ob in zip(a, b)
                   if oa["size"] == ob["size"]]
        r = big[i]
        assert check(r.prompt, r.image)["score"] == 1.0, i
    assert 1.7 < sum(ratios) / len(ratios) < 2.3


# ----------------------------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("size", SIZES)
def test_render_shapes_and_segmentation_cover_exactly_the_objects(seed, size):
    w = _world(seed, size=size, max_objects=6)
    for i in _indices(seed, 4):
        r = w[i]
        objs = r.scene["objects"]
        assert r.image.shape == (3, size, size) and r.image.dtype == torch.uint8
        assert r.segmentation.shape == (3, size, size) and r.segmentation.dtype == torch.uint8
        assert r.instances.shape == (size, size)
        assert 1 <= len(objs) <= 6
        inst = r.instances
        # the segmentation map is non-black exactly on object pixels, each instance in its table colour
        assert torch.equal(r.segmentation.bool().any(0), inst > 0)
        assert [c["id"] for c in r.instance_colors] == list(range(1, len(objs) + 1))
        assert len({tuple(c["color"]) for c in r.instance_colors}) == len(objs)
        bg, _ = render({**r.scene, "objects": []})
        for k, o in enumerate(objs):
            m = inst == k + 1
            assert int(m.sum()) == o["area"] > 0
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert o["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            seg_col = torch.tensor(r.instance_colors[k]["color"], dtype=torch.uint8)
            assert (r.segmentation[:, m] == seg_col[:, None]).all()
            img_col = torch.tensor(COLORS[o["color"]], dtype=torch.uint8)
            assert (r.image[:, m] == img_col[:, None]).all()
        # everything else is the background
        assert torch.equal(r.image[:, inst == 0], bg[:, inst == 0])
        # the image differs from the background exactly where the objects are
        assert torch.equal((r.image != bg).any(0), inst > 0)


def test_objects_never_touch(seed):
    """Two objects never share an 8-neighbourhood (connected components then separate them)."""
    w = _world(seed, size=64, max_objects=8)
    for i in _indices(seed, 10):
        inst = w[i].instances
        p = torch.nn.functional.pad(inst, (1, 1, 1, 1))
        H, W = inst.shape
        for dy, dx in itertools.product((0, 1, 2), repeat=2):
            nb = p[dy:dy + H, dx:dx + W]
            assert not ((inst > 0) & (nb > 0) & (nb != inst)).any()


def test_palette_and_backgrounds_are_far_apart():
    cols = list(COLORS.values())
    dmin = min(math.dist(a, b) for a, b in itertools.combinations(cols, 2))
    assert dmin >= 110
    # every grey the backgrounds can take is nearer the grey axis than to any palette colour, by a wide margin
    for g in range(min(v[0] for v in syn._GREYS.values()), max(v[1] for v in syn._GREYS.values()) + 1):
        assert min(math.dist((g, g, g), c) for c in cols) > syn.COLOR_TOL + 20
    pal = instance_palette(300)
    assert len(set(pal)) == 300 and (0, 0, 0) not in pal


# ----------------------------------------------------------------------------------------------- text and VQA
def _rederive(scene, item):
    """The answer to a VQA item, recomputed here from the scene description."""
    objs, q = scene["objects"], item["query"]
    if item["type"] == "color":
        (o,) = [o for o in objs if o["kind"] == q["kind"]]
        return o["color"]
    if item["type"] == "shape":
        (o,) = [o for o in objs if o["color"] == q["color"]]
        return o["kind"]
    if item["type"] == "count":
        return str(sum(all(o[k] == v for k, v in q.items()) for o in objs))
    if item["type"] == "position":
        (a,) = [o for o in objs if all(o[k] == v for k, v in q["a"].items())]
        (b,) = [o for o in objs if all(o[k] == v for k, v in q["b"].items())]
        (ax, ay), (bx, by) = _center(a["bbox"]), _center(b["bbox"])
        dx, dy = ax - bx, ay - by
        if abs(dx) > abs(dy):
            return "left" if dx < 0 else "right"
        return "above" if dy < 0 else "below"
    raise AssertionError(item["type"])


def test_vqa_answers_rederived_from_scene_and_pixels(seed):
    w = _world(seed, size=128, max_objects=5)
    types = set()
    for i in _indices(seed, 40):
        r = w[i]
        found = find_objects(r.image)
        for item in r.vqa:
            types.add(item["type"])
            assert len(item["options"]) == 4 and len(set(item["options"])) == 4
            assert item["options"]["ABCD".index(item["answer_letter"])] == item["answer"]
            assert _rederive(r.scene, item) == item["answer"], (i, item)
            text = syn.format_question(item)
            assert item["question"] in text and all(f"{L}. {o}" in text for L, o in zip("ABCD", item["options"]))
            if item["type"] == "count":  # from the pixels too
                n = sum(all(o[k] == v for k, v in item["query"].items()) for o in found)
                assert str(n) == item["answer"]
            if item["type"] == "color":
                assert [o["color"] for o in found if o["kind"] == item["query"]["kind"]] == [item["answer"]]
    assert types == {"color", "shape", "count", "position"}


def test_caption_names_every_group(seed):
    w = _world(seed, size=64)
    for i in _indices(seed, 10):
        r = w[i]
        for o in r.scene["objects"]:
            assert o["color"] in r.caption and o["kind"] in r.caption
        assert r.scene["background"]["names"][0] in r.caption


# ----------------------------------------------------------------------------------------------- the checker
@pytest.mark.parametrize("size", SIZES)
def test_checker_accepts_the_rendered_ground_truth(seed, size):
    w = _world(seed, size=size, max_objects=5)
    tags = set()
    for i in _indices(seed, 8 if size < 256 else 4):
        r = w[i]
        assert r.prompt in r.prompts
        for p in r.prompts:
            tags.add(p["tag"])
            res = check(p, r.image)
            assert res["score"] == 1.0 and res["correct"], (i, p["text"], res["details"]["groups"])
    assert tags and ({"single_object", "two_object"} <= tags or size == 256)


def _two_object_scene(size=128, a=("red", "circle"), b=("blue", "square")):
    h = size // 8
    return {"size": size, "background": {"kind": "plain", "names": ["gray"], "colors": [[128, 128, 128]]},
            "objects": [{"kind": a[1], "color": a[0], "box": [size // 4 - h, size // 2 - h, size // 4 + h, size // 2 + h]},
                        {"kind": b[1], "color": b[0],
                         "box": [3 * size // 4 - h, size // 2 - h, 3 * size // 4 + h, size // 2 + h]}]}


def test_checker_position_and_its_mirror():
    scene = _two_object_scene()
    img, _ = render(scene)
    spec = {"objects": [{"count": 1, "color": "red", "kind": "circle"}, {"count": 1, "color": "blue", "kind": "square"}],
            "relation": {"a": 0, "rel": "left of", "b": 1}}
    assert syn.prompt_text(spec) == "a red circle left of a blue square"
    assert check(spec, img)["score"] == 1.0
    flipped = check(spec, img.flip(-1))  # moved to the wrong side: counts still right, relation wrong
    assert flipped["score"] == pytest.approx(2 / 3) and not flipped["correct"]
    assert flipped["details"]["relation"] == {"rel": "left of", "ok": False}
    assert check({**spec, "relation": {"a": 0, "rel": "right of", "b": 1}}, img.flip(-1))["correct"]
    # the same picture as float in [0, 1], in [-1, 1], as numpy HWC and as PIL
    from PIL import Image
    f = img.float() / 255
    assert check(spec, f)["correct"] and check(spec, f * 2 - 1, value_range=(-1, 1))["correct"]
    assert check(spec, img.permute(1, 2, 0).numpy())["correct"]
    assert check(spec, Image.fromarray(img.permute(1, 2, 0).numpy()))["correct"]


def test_checker_rejects_perturbed_images(seed):
    w = _world(seed, size=128, max_objects=5)
    rng = random.Random(seed)
    n_removed = n_recoloured = n_moved = n_extra = 0
    for i in _indices(seed, 30):
        r = w[i]
        objs = r.scene["objects"]
        spec = rng.choice(r.prompts)
        named = [k for k, o in enumerate(objs)
                 if any(g["color"] == o["color"] and g["kind"] == o["kind"] for g in spec["objects"])]
        k = rng.choice(named)
        # object removed (re-rendered without it)
        removed = copy.deepcopy(r.scene)
        del removed["objects"][k]
        assert check(spec, render(removed)[0])["score"] < 1.0
        n_removed += 1
        # object recoloured in the pixels to a colour that the spec does not name with that shape
        wrong = [c for c in COLORS if not any(g["color"] == c and g["kind"] == objs[k]["kind"] for g in spec["objects"])]
        img = r.image.clone()
        img[:, r.instances == k + 1] = torch.tensor(COLORS[rng.choice(wrong)], dtype=torch.uint8)[:, None]
        assert check(spec, img)["score"] < 1.0
        n_recoloured += 1
        # a position prompt's picture mirrored: the relation fails
        if spec["relation"] and spec["relation"]["rel"] in ("left of", "right of"):
            res = check(spec, r.image.flip(-1))
            assert res["details"]["relation"]["ok"] is False and res["score"] < 1.0
            n_moved += 1
        # one more of a counted group, pasted into a free corner: that group's count fails
        g = spec["objects"][0]
        (src,) = [o for o in objs if o["color"] == g["color"] and o["kind"] == g["kind"]][:1]
        S, h = r.scene["size"], 8
        if not (r.instances[S - 2 * h - 8:, S - 2 * h - 8:] > 0).any():
            clone = {**src, "box": [S - 3 - 2 * h, S - 3 - 2 * h, S - 3, S - 3]}
            patch, pinst = render({**r.scene, "objects": [clone]})
            img2 = r.image.clone()
            img2[:, pinst > 0] = patch[:, pinst > 0]
            assert check(spec, img2)["details"]["groups"][0]["ok"] is False
            n_extra += 1
    assert n_removed == n_recoloured == 30 and n_extra > 0


@pytest.mark.parametrize("size,scale", [(64, 0.5), (64, 1.0), (64, 1.8), (128, 1.0), (128, 2.5)])
def test_min_object_area_is_half_the_smallest_object_drawn(size, scale):
    w = _world(3, size=size, max_objects=3, object_scale=scale)
    # independently: each kind rendered alone at the world's smallest size, through render()
    h = max(3, round(syn.SIZES["small"] * scale * size))
    c = size // 2
    areas = []
    for kind in w.kinds:
        scene = {"size": size, "background": {"kind": "plain", "names": ["gray"], "colors": [[128, 128, 128]]},
                 "objects": [{"kind": kind, "color": "red", "box": [c - h, c - h, c + h, c + h]}]}
        areas.append(int((render(scene)[1] == 1).sum()))
    assert w.min_object_area == max(4, min(areas) // 2)
    drawn = [int((r.instances == k + 1).sum()) for i in range(40) for r in [w[i]] for k in range(len(r.scene["objects"]))]
    assert min(drawn) >= min(areas) >= 2 * w.min_object_area     # every object of the world passes the threshold
    assert SyntheticWorld(size=size, object_scale=scale, kinds=("circle",)).min_object_area >= w.min_object_area


@pytest.mark.parametrize("size,scale,plain_above", [(64, 1.0, 0.05), (64, 1.8, 0.15), (128, 1.8, 0.02)])
def test_checker_with_the_worlds_min_area_keeps_objects_and_drops_confetti(size, scale, plain_above):
    w = _world(5, size=size, max_objects=2, object_scale=scale)
    recs = [w[i] for i in range(48)]
    for r in recs[:12]:                        # ground truth still scores 1 with the world's threshold
        for p in r.prompts:
            assert check(p, r.image, min_area=w.min_object_area)["correct"], p["text"]
    side = min(12, math.isqrt(w.min_object_area - 1))      # every fragment is smaller than the world's threshold
    confetti = [confetti_picture(k, size, side) for k in range(len(recs))]
    plain = [check(r.prompt, c)["score"] for r, c in zip(recs, confetti)]
    strict = [check(r.prompt, c, min_area=w.min_object_area)["score"] for r, c in zip(recs, confetti)]
    assert sum(plain) / len(plain) > plain_above   # the default threshold reads fragments as objects ...
    assert max(strict) == 0.0                   # ... the world's does not (every spec names >= 1 object)
    with pytest.raises(ValueError, match="min_area must be a positive int"):
        check(recs[0].prompt, recs[0].image, min_area=0)
    with pytest.raises(ValueError, match="min_area must be a positive int"):
        check(recs[0].prompt, recs[0].image, min_area=12.5)


def test_checker_errors_name_the_problem():
    img = torch.zeros(3, 32, 32, dtype=torch.uint8)
    good = {"objects": [{"count": 1, "color": "red", "kind": "circle"}], "relation": None}
    with pytest.raises(TypeError, match="prompt spec dict"):
        check("a red circle", img)
    with pytest.raises(ValueError, match="spec object 0"):
        check({"objects": [{"count": 1, "color": "teal", "kind": "circle"}]}, img)
    with pytest.raises(ValueError, match="relation must be"):
        check({**good, "relation": {"a": 0, "rel": "near", "b": 0}}, img)
    with pytest.raises(ValueError, match="shape \\(3, H, W\\)"):
        check(good, torch.zeros(4, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="value_range=\\(-1, 1\\)"):
        check(good, torch.full((3, 8, 8), -0.5))
    res = check(good, img)
    assert res["score"] == 0.0 and not res["correct"] and res["details"]["groups"][0]["found"] == 0


# ----------------------------------------------------------------------------------------------- degraded copies
def test_degraded_copies(seed):
    from umm_ops.data.degradations import DEGRADATIONS, degrade

    r = _world(seed, size=64)[_indices(seed, 1)[0]]
    d, kind = r.degraded("gaussian_noise", "high")
    assert kind == "gaussian_noise" and d.shape == r.image.shape and d.dtype == torch.uint8
    assert torch.equal(d, degrade(r.image[None], "gaussian_noise", "high", seed=r.seed, index=[r.index])[0])
    assert not torch.equal(d, r.image)
    d1, k1 = r.degraded()
    d2, k2 = r.degraded()
    assert k1 == k2 and k1 in DEGRADATIONS and torch.equal(d1, d2)


# ----------------------------------------------------------------------------------------------- packing
@pytest.mark.skipif(importlib.util.find_spec("umm_ops.data.packing") is None, reason="umm_ops.data.packing not there yet")
def test_to_samples(seed):
    r = _world(seed, size=64)[_indices(seed, 1)[0]]
    samples = syn.to_samples(r)
    tasks = [s.meta["task"] for s in samples]
    assert tasks.count("vqa") == len(r.vqa) and {"caption", "generate", "segment"} <= set(tasks)
    gen = samples[tasks.index("generate")]
    assert gen.items[0].text == r.prompt["text"] and gen.items[1].role == "generate"
    img = gen.items[1].image
    assert img.shape == r.image.shape and img.min() >= -1 and img.max() <= 1
    assert torch.equal(((img + 1) * 127.5).round().to(torch.uint8), r.image)
    seg = samples[tasks.index("segment")]
    assert seg.items[1].text == syn.SEGMENT_PROMPT
    assert torch.equal(((seg.items[2].image + 1) * 127.5).round().to(torch.uint8), r.segmentation)
    cap = samples[tasks.index("caption")]
    assert cap.items[-1].text == r.caption + "<|im_end|>" and cap.items[-1].loss and not cap.items[1].loss
    with pytest.raises(ValueError, match="tasks must be"):
        syn.to_samples(r, tasks=("captions",))
    deg = syn.to_samples(r, tasks=("degraded_vqa",))
    d, kind = r.degraded()
    assert len(deg) == len(r.vqa) and all(s.meta["degradation"] == kind for s in deg)
    assert torch.equal(((deg[0].items[0].image + 1) * 127.5).round().to(torch.uint8), d)


# ----------------------------------------------------------------------------------------------- the benchmark script
def test_degradation_bench_writes_results(tmp_path):
    import importlib.util as iu
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_degradations.py")
    spec = iu.spec_from_file_location("bench_degradations", path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "deg.json"
    assert mod.main(["--quick", "--device", "cpu", "-k", "dark_illumination", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "quick" and res["device_kind"] == "cpu"
    assert {(r["kind"], r["size"]) for r in res["results"]} == {("dark_illumination", 256), ("dark_illumination", 512)}
    assert all(r["images_per_s"] > 0 and r["batch"] >= 1 for r in res["results"])
