"""SGT (recipe sgt, umm_ops.data.proxy, eval tasks probe / attention / seg-miou): the proxy targets are what they
claim, the loss sees only the target latent, the mix has its ratio, the probe and the attention share on hand-made
cases with known answers, and a few steps from the command line (train, resume, init, generate a map)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from umm_ops.data.proxy import (PROXIES, PROXY_PROMPTS, SEMANTIC_COLORS, edge_map, proxy_instruction, proxy_pair,
                                proxy_sample)
from umm_ops.data.synthetic import KINDS, SyntheticWorld, instance_palette
from umm_ops.eval.runner import default_world_kwargs

S = 64


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(size=S, seed=0, length=200, **{k: v for k, v in default_world_kwargs().items()
                                                          if k != "seed"})


def _records(world, n=12):
    return [world[i] for i in range(n)]


# ----------------------------------------------------------------------------------------------- proxy targets
def test_instance_map_colours_are_the_instances(world):
    for rec in _records(world):
        src, tgt = proxy_pair(rec, "instance_seg")
        assert torch.equal(src, rec.image)
        inst = rec.instances
        pal = instance_palette(len(rec.scene["objects"]))
        assert (tgt[:, inst == 0] == 0).all()                                   # background black
        for k in range(1, int(inst.max()) + 1):
            want = torch.tensor(pal[k - 1], dtype=torch.uint8)[:, None]
            assert (tgt[:, inst == k] == want).all()                            # instance k in colour k ...
            same = (tgt == want[:, :, None]).all(0)
            assert torch.equal(same, inst == k)                                 # ... and only instance k
        assert len({tuple(c) for c in pal}) == len(pal)                         # one colour per instance


def test_semantic_map_colours_are_the_kinds(world):
    assert len(set(SEMANTIC_COLORS.values())) == len(KINDS)
    seen_same_kind = False
    for rec in _records(world, 60):
        _, tgt = proxy_pair(rec, "semantic_seg")
        inst = rec.instances
        assert (tgt[:, inst == 0] == 0).all()
        kinds = [o["kind"] for o in rec.scene["objects"]]
        for k, kind in enumerate(kinds):
            assert (tgt[:, inst == k + 1] == torch.tensor(SEMANTIC_COLORS[kind], dtype=torch.uint8)[:, None]).all()
        seen_same_kind |= len(kinds) == 2 and kinds[0] == kinds[1]
    assert seen_same_kind    # two objects of one kind share a colour there (checked above): the case was covered


def test_referring_maps_are_the_named_objects(world):
    """referring_seg: the instruction names an object of the scene by its colour and shape; the target is white
    exactly on every object of that colour and shape (all of them, "every", when it repeats), black elsewhere;
    instruction and target come from the same draw, and draws differ."""
    seen_every, named = False, set()
    for rec in _records(world, 80):
        for draw in range(3):
            text = proxy_instruction(rec, "referring_seg", draw=draw)
            src, tgt = proxy_pair(rec, "referring_seg", draw=draw)
            assert torch.equal(src, rec.image)
            objs = rec.scene["objects"]
            words = text.removeprefix("Segment the ").removeprefix("Segment every ").removesuffix(".")
            color, kind = words.rsplit(" ", 1)
            ids = [k + 1 for k, o in enumerate(objs) if (o["color"], o["kind"]) == (color, kind)]
            assert ids or not objs                                    # a present object (or an empty scene)
            assert text.startswith("Segment every ") == (len(ids) > 1)
            seen_every |= len(ids) > 1
            want = torch.isin(rec.instances, torch.tensor(ids, dtype=torch.long))
            assert torch.equal(tgt, (want.to(torch.uint8) * 255)[None].expand(3, -1, -1))
            named.add((rec.index, words))
    assert seen_every and len(named) > 80                             # repeats covered; draws pick other objects
    # the same draw in the sample
    s = proxy_sample(world[5], "referring_seg", draw=2)
    assert s.items[1].text == proxy_instruction(world[5], "referring_seg", draw=2)


def _boundary(img: torch.Tensor) -> torch.Tensor:
    """Pixels with a 4-neighbour of another colour."""
    x = img.int()
    b = torch.zeros(img.shape[1:], dtype=torch.bool)
    dy = (x[:, 1:] != x[:, :-1]).any(0)
    dx = (x[:, :, 1:] != x[:, :, :-1]).any(0)
    b[1:] |= dy
    b[:-1] |= dy
    b[:, 1:] |= dx
    b[:, :-1] |= dx
    return b


def _flat3x3(img: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood (replicate padding) is one colour."""
    x = torch.nn.functional.pad(img.float()[None], (1, 1, 1, 1), mode="replicate")[0]
    hi = torch.nn.functional.max_pool2d(x[None], 3, 1)[0]
    lo = -torch.nn.functional.max_pool2d(-x[None], 3, 1)[0]
    return (hi == lo).all(0)


def test_edge_map_is_the_edges_of_the_clean_picture(world):
    # a hand-made picture: a 10 x 10 red square on grey -> edges exactly on the pixels next to its border
    img = torch.full((3, 32, 32), 120, dtype=torch.uint8)
    img[:, 10:20, 10:20] = torch.tensor([215, 25, 35], dtype=torch.uint8)[:, None, None]
    e = edge_map(img)
    assert e.dtype == torch.uint8 and e.shape == img.shape and set(e.unique().tolist()) == {0, 255}
    ring = torch.zeros(32, 32, dtype=torch.bool)
    ring[9:21, 9:21] = True
    ring[11:19, 11:19] = False
    assert torch.equal(e[0] > 0, ring)
    for rec in _records(world):
        src, tgt = proxy_pair(rec, "edge")
        assert torch.equal(src, rec.image)                         # the input is the clean picture
        edges = tgt[0] > 0
        assert (tgt[0] == tgt[1]).all() and (tgt[1] == tgt[2]).all() and set(tgt.unique().tolist()) <= {0, 255}
        assert not (edges & _flat3x3(rec.image)).any()             # nothing where the picture is flat
        b = _boundary(rec.image)
        assert b.any() and (edges[b].float().mean() > 0.97)       # the boundaries are edges
        # the edges of the clean picture, not of a degraded one
        noisy, _ = proxy_pair(rec, "denoising")
        assert not torch.equal(edge_map(noisy), tgt)


def test_restoration_pairs(world):
    for rec in _records(world, 6):
        img = rec.image
        x, y = proxy_pair(rec, "reconstruction")
        assert torch.equal(x, img) and torch.equal(y, img)
        # denoising: noisy input (CLEAR's Gaussian noise, std 75 x 0.45 before clipping), clean target
        x, y = proxy_pair(rec, "denoising")
        assert torch.equal(y, img)
        d = x.float() - img.float()
        assert 25 < float(d[(img > 60) & (img < 190)].std()) < 40
        x2, _ = proxy_pair(rec, "denoising", draw=1)
        assert not torch.equal(x, x2) and torch.equal(x, proxy_pair(rec, "denoising")[0])   # per draw, repeatable
        # deblurring: a smoother input (less gradient energy), clean target
        x, y = proxy_pair(rec, "deblurring")

        def energy(t):
            t = t.float()
            return float(((t[:, 1:] - t[:, :-1]) ** 2).sum() + ((t[:, :, 1:] - t[:, :, :-1]) ** 2).sum())
        assert torch.equal(y, img) and energy(x) < 0.8 * energy(img)
        # super-resolution: the input is constant on 4 x 4 blocks and equals their mean (rounded)
        x, y = proxy_pair(rec, "super_resolution")
        assert torch.equal(y, img)
        blocks = img.float().view(3, S // 4, 4, S // 4, 4).mean((2, 4))
        assert torch.equal(x, blocks.round().repeat_interleave(4, 1).repeat_interleave(4, 2).to(torch.uint8))
        # inpainting: the input is the picture except one grey rectangle; the target is the picture
        x, y = proxy_pair(rec, "inpainting")
        assert torch.equal(y, img)
        diff = (x != img).any(0)
        ys, xs = diff.nonzero(as_tuple=True)
        assert diff.any()
        box = x[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert (box == 128).all()                                   # the changed pixels lie in one grey rectangle
        assert int(ys.max() - ys.min() + 1) <= S // 2 and int(xs.max() - xs.min() + 1) <= S // 2


def test_proxy_sample_and_bad_names(world):
    rec = world[3]
    for p in PROXIES:
        s = proxy_sample(rec, p)
        a, t, b = s.items
        assert (a.role, b.role) == ("understand", "generate") and t.text == proxy_instruction(rec, p) and not t.loss
        assert p == "referring_seg" or t.text == PROXY_PROMPTS[p]
        src, tgt = proxy_pair(rec, p)
        assert torch.equal(a.image, src.float() / 127.5 - 1) and torch.equal(b.image, tgt.float() / 127.5 - 1)
    with pytest.raises(ValueError, match="expected one of reconstruction"):
        proxy_pair(rec, "depth")
    # the SFT task segment is the instance_seg proxy sample
    from umm_ops.data.synthetic import to_samples

    seg = to_samples(rec, ("segment",))[0]
    inst = proxy_sample(rec, "instance_seg")
    assert seg.items == inst.items and seg.meta["task"] == "segment"


# ----------------------------------------------------------------------------------------------- the loss
@pytest.fixture(scope="module")
def tiny():
    from umm_ops.model.cheers import CheersModel

    torch.manual_seed(0)
    return CheersModel("tiny").eval()


def test_the_loss_sees_only_the_target_latent(world, tiny):
    from umm_ops.data.packing import pack
    from umm_ops.model.losses import flow_target
    from umm_ops.train import policy

    model = tiny
    recs = [world[i] for i in range(3)]
    samples = [proxy_sample(r, "instance_seg") for r in recs]
    batch = pack(samples, model.pack_spec(), seed=5)[0]
    assert (batch.labels == -100).all()                       # no text loss: the prompt is not a target
    assert batch.image_spans[:, 2].tolist() == [0, 1] * 3     # input understood, target generated
    inputs = policy.training_inputs(model, batch, 7, 0.0)
    with torch.no_grad():
        out = model(batch, return_outputs=True, **inputs)
    assert out["text_tokens"] == 0 and out["flow_images"] == 3 and float(out["text_loss"]) == 0.0
    # the flow target is the target map's latent (x1 - noise) and nothing else
    noise = [z for z in inputs["noise"] if z is not None]
    with torch.no_grad():
        want = torch.stack([flow_target(model.vae.encode(s.items[2].image[None])[0], z) for s, z in
                            zip(samples, noise)])
    assert torch.allclose(out["v_target"][0], want, atol=1e-5)
    # another input picture: the same targets; another target: other targets
    swapped = [proxy_sample(r, "instance_seg") for r in recs]
    for s, r in zip(swapped, reversed(recs)):
        s.items[0].image = r.image.float() / 127.5 - 1
    b2 = pack(swapped, model.pack_spec(), seed=5)[0]
    with torch.no_grad():
        o2 = model(b2, return_outputs=True, noise=inputs["noise"])
    assert torch.equal(o2["v_target"][0], out["v_target"][0]) and not torch.equal(o2["v_pred"][0], out["v_pred"][0])
    edge = [proxy_sample(r, "edge") for r in recs]
    b3 = pack(edge, model.pack_spec(), seed=5)[0]
    with torch.no_grad():
        o3 = model(b3, return_outputs=True, noise=inputs["noise"])
    assert not torch.allclose(o3["v_target"][0], out["v_target"][0])


# ----------------------------------------------------------------------------------------------- the mix
def test_mix_ratio_and_config_errors():
    from umm_ops.train import Config, ConfigError
    from umm_ops.train.recipes.sgt import SGTDataset

    cfg = Config.build("sgt", values={"recipe.train_records": 10})
    r = cfg.recipe
    assert (r.proxy, r.proxy_ratio, r.tasks) == ("instance_seg", 2.0, ("caption", "vqa", "vqa_short"))
    assert (cfg.optim.lr, tuple(cfg.optim.lr_scales)) == (1e-4, ())
    ds = SGTDataset(32, 0, 10, r.proxy, r.proxy_slots(), r.tasks, task_weights=r.weights(), **r.world_kwargs())
    tasks = [ds[i].meta["task"] for i in range(len(ds))]
    n_proxy = tasks.count("proxy")
    assert n_proxy == 2 * (len(tasks) - n_proxy) and len(tasks) == 10 * 12
    assert {"caption", "vqa"} <= set(tasks)
    assert ds[5].meta == ds[5].meta and ds[0].items == SGTDataset(32, 0, 10, r.proxy, r.proxy_slots(), r.tasks,
                                                                  task_weights=r.weights(), **r.world_kwargs())[0].items
    none = SGTDataset(32, 0, 10, "none", 0, r.tasks, task_weights=r.weights(), **r.world_kwargs())
    assert "proxy" not in {none[i].meta["task"] for i in range(len(none))}
    with pytest.raises(ConfigError, match="recipe.proxy = 'depth'.*referring_seg or none"):
        Config.build("sgt", overrides=["recipe.proxy=depth"])
    with pytest.raises(ConfigError, match="whole number of proxy samples"):
        Config.build("sgt", overrides=["recipe.proxy_ratio=0.3"])


# ----------------------------------------------------------------------------------------------- probe
def test_probe_reads_what_is_there_and_not_what_is_not():
    from umm_ops.eval.tasks.probe import fit_probe

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    x = torch.randn(400, 32, generator=g)
    coded = x.clone()
    coded[:, :4] = 3.0 * torch.nn.functional.one_hot(y, 4)      # the label, exactly, in four of 32 dimensions
    assert fit_probe(coded, y, 4) >= 0.95
    acc = fit_probe(x, y, 4)                                     # features independent of the label
    assert acc < 0.4                                             # chance 0.25 (100 held-out rows)
    with pytest.raises(ValueError, match="labels must lie in"):
        fit_probe(x, y + 4, 4)


def test_probe_features_are_the_layers(world, tiny):
    from umm_ops.eval.tasks.probe import image_token_features

    model = tiny
    pix = [world[i].image.float() / 127.5 - 1 for i in range(3)]
    f = image_token_features(model, pix)
    assert f.shape == (len(model.llm.model.layers) + 1, 3, model.config.llm["hidden_size"])
    with torch.no_grad():
        x1 = model.vae.encode(torch.stack(pix))
        emb, _ = model.image_features(x1, (S, S))
    assert torch.allclose(f[0], emb.mean(1), atol=1e-5)          # layer 0: the LLM's inputs at the image tokens
    assert not torch.allclose(f[1], f[0])


def test_probe_task_end_to_end(tiny):
    from umm_ops.eval.runner import evaluate

    res = evaluate(tiny, "probe", n=64, seed=0, image_size=S, first=0)["tasks"]["probe"]
    layers = len(tiny.llm.model.layers) + 1
    assert set(res["per_layer"]) == {f"layer {k}" for k in range(layers)}
    assert "count" in res["per_type"] and 0 <= res["score"] <= 1 and res["ci_method"] == "wilson"
    assert res["splits"]["count"]["train"] == 48 and set(res["chance"]) >= {"count"}


# ----------------------------------------------------------------------------------------------- attention
def test_attention_share_on_hand_made_masks():
    from umm_ops.eval.tasks.attention import attention_probs, attention_share

    g = torch.Generator().manual_seed(0)
    L, img, ans = 12, list(range(2, 6)), [9, 10, 11]
    q, k = torch.randn(L, 4, 8, generator=g), torch.randn(L, 2, 8, generator=g)
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool))
    only = mask.clone()
    only[ans] = False
    only[torch.tensor(ans)[:, None], torch.tensor(img)[None]] = True        # answers see the image tokens only
    assert attention_share(q, k, only, ans, img) == pytest.approx(1.0, abs=1e-6)
    none = mask.clone()
    none[torch.tensor(ans)[:, None], torch.tensor(img)[None]] = False       # ... or everything but them
    assert attention_share(q, k, none, ans, img) == pytest.approx(0.0, abs=1e-7)
    zero_q = torch.zeros_like(q)                                             # uniform attention: |image| / |visible|
    assert attention_share(zero_q, k, mask, ans, img) == pytest.approx(np.mean([4 / 10, 4 / 11, 4 / 12]), abs=1e-6)
    p = attention_probs(q, k, mask)
    assert torch.allclose(p.sum(-1), torch.ones(4, L), atol=1e-6) and (p[:, ~mask] == 0).all()
    with pytest.raises(ValueError, match="multiple of"):
        attention_probs(torch.randn(L, 3, 8), k, mask)


def test_attention_recorder_reproduces_the_layer(world, tiny):
    """q and k recomputed from the hooked inputs give, with v, the attention module's own output."""
    from umm_ops.attention.layout import span_mask
    from umm_ops.data.packing import ImageItem, Sample, TextItem, pack
    from umm_ops.eval.tasks.attention import AttentionRecorder, attention_probs

    model = tiny
    rec = world[0]
    s = Sample([ImageItem(rec.image.float() / 127.5 - 1, "understand"), TextItem("What color is it?"),
                TextItem("red", loss=True)])
    batch = pack([s, s], model.pack_spec())[0]
    outs = []
    m0 = model.llm.model.layers[1].self_attn
    h = m0.register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    try:
        with torch.no_grad(), AttentionRecorder(model.llm) as r:
            model(batch)
            q, k, layout = r.qk(1)
            x = r.inputs[1][0]
            v = m0.v_proj(x).view(x.shape[0], m0.n_kv_heads, m0.head_dim)
            p = attention_probs(q, k, span_mask(layout))
            vv = v.repeat_interleave(m0.n_heads // m0.n_kv_heads, dim=1)
            o = torch.einsum("hqk,khd->qhd", p, vv).reshape(x.shape[0], -1)
            assert torch.allclose(m0.o_proj(o), outs[0], atol=1e-4)
    finally:
        h.remove()


def test_attention_task_end_to_end(tiny):
    from umm_ops.eval.runner import evaluate

    res = evaluate(tiny, "attention", n=4, seed=0, image_size=S, first=0)["tasks"]["attention"]
    assert res["n"] == 4 * len(tiny.llm.model.layers)
    assert set(res["per_type"]) == {f"layer {k + 1}" for k in range(len(tiny.llm.model.layers))}
    assert 0 < res["score"] < 1 and 0 < res["metrics"]["uniform"]["score"] < 1


# ----------------------------------------------------------------------------------------------- seg-miou
def test_seg_miou_scores(world):
    from umm_ops.eval.tasks.segment import score_segmentation

    rec = next(world[i] for i in range(50) if len(world[i].scene["objects"]) == 2)
    seg, inst = rec.segmentation, rec.instances
    assert score_segmentation(seg, inst)["miou"] == 1.0
    one = seg.clone()
    one[:, inst == 1] = 0
    assert score_segmentation(one, inst)["miou"] == pytest.approx(0.5)
    extra = seg.clone()
    extra[:, :6, :6] = torch.tensor(instance_palette(5)[4], dtype=torch.uint8)[:, None, None]   # a spurious region
    r = score_segmentation(extra, inst)
    if (inst[:6, :6] == 0).all():
        assert r["miou"] == 1.0 and r["score"] < 1.0


# ----------------------------------------------------------------------------------------------- the CLI
def test_a_few_steps_from_the_cli_resume_init_and_a_map(tmp_path, capsys):
    from PIL import Image

    from umm_ops.cli import main

    out = tmp_path / "sgt"
    small = ["--set", "recipe.image_size=32", "--set", "data.budget=256", "--set", "recipe.train_records=40",
             "--set", "metrics.plot=false", "--no-eval", "--device", "cpu"]
    common = small + ["--set", "checkpoint.every=2"]
    assert main(["train", "--recipe", "sgt", "--steps", "2", "--out", str(out), "--proxy", "edge", *common]) == 0
    assert (out / "checkpoint-2").is_dir()
    assert main(["train", "--recipe", "sgt", "--steps", "4", "--out", str(out), "--proxy", "edge", *common]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps_this_run"] == 2 and (out / "checkpoint-4").is_dir()
    capsys.readouterr()
    # another proxy on resume is refused (run-defining)
    assert main(["train", "--recipe", "sgt", "--steps", "6", "--out", str(out), "--proxy", "instance_seg",
                 *common]) != 0
    # a new run from it (recipe.init), instance maps
    out2 = tmp_path / "sgt2"
    assert main(["train", "--recipe", "sgt", "--steps", "1", "--out", str(out2), "--init", str(out / "checkpoint-4"),
                 "--set", "checkpoint.every=1", *small]) == 0
    pic = tmp_path / "pic.png"
    Image.fromarray(SyntheticWorld(size=32, length=1)[0].image.permute(1, 2, 0).numpy()).save(pic)
    m = tmp_path / "map.png"
    assert main(["generate", str(out2), "--image", str(pic), "--proxy", "instance_seg", "--out", str(m),
                 "--steps", "2"]) == 0
    assert Image.open(m).size == (32, 32)
    assert "Segment instances" in capsys.readouterr().out
    assert main(["generate", str(out2), "--image", str(pic), "--proxy", "depth", "--out", str(m)]) == 2
    assert "--proxy must be one of reconstruction" in capsys.readouterr().err
    assert main(["generate", str(out2), "--image", str(pic), "--proxy", "referring_seg", "--out", str(m)]) == 2
    assert "needs the object to segment as --prompt" in capsys.readouterr().err
    assert main(["generate", str(out2), "--image", str(pic), "--proxy", "referring_seg", "--prompt",
                 "Segment the red circle.", "--out", str(m), "--steps", "2"]) == 0
    assert "Segment the red circle." in capsys.readouterr().out
    assert main(["generate", str(out2), "--proxy", "edge", "--out", str(m)]) == 2
    assert "needs --image" in capsys.readouterr().err


def test_after_training_evaluation_scores_the_maps(tmp_path):
    from umm_ops.train import Config, train

    cfg = Config.build("sgt", values={
        "job.steps": 1, "job.out": str(tmp_path / "e"), "job.progress": False, "job.device": "cpu",
        "recipe.image_size": 32, "data.budget": 256, "recipe.train_records": 20, "metrics.plot": False,
        "recipe.eval_vqa": 2, "recipe.eval_images": 2, "recipe.eval_captions": 2, "recipe.eval_seg": 3,
        "recipe.eval_steps": 2})
    s = train(cfg)
    seg = s["eval"]["seg_miou"]
    assert seg["n"] == 3 and 0 <= seg["score"] <= 1 and "vqa" in s["eval"]
    assert (tmp_path / "e" / "eval" / "seg-miou" / "seg-miou.png").is_file()


# ----------------------------------------------------------------------------------------------- COCO data
def _coco_files(tmp_path):
    """Two 40 x 48 pictures with rectangle instances (two categories) and a COCO instances JSON."""
    from PIL import Image

    anns, images = [], []
    boxes = {1: [(4, 4, 20, 16, 1), (24, 10, 44, 30, 2)], 2: [(8, 20, 30, 36, 2)]}
    for iid in (1, 2):
        a = np.full((40, 48, 3), 90, np.uint8)
        for k, (x0, y0, x1, y1, cat) in enumerate(boxes[iid]):
            a[y0:y1, x0:x1] = (200, 40 * (k + 1), 30 * cat)
            anns.append({"id": 10 * iid + k, "image_id": iid, "category_id": cat, "iscrowd": 0,
                         "segmentation": [[x0, y0, x1 - 1, y0, x1 - 1, y1 - 1, x0, y1 - 1]]})
        Image.fromarray(a).save(tmp_path / f"p{iid}.png")
        images.append({"id": iid, "file_name": f"p{iid}.png", "height": 40, "width": 48})
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}))
    return path


def test_proxy_samples_from_coco_data(tmp_path):
    """recipe.proxy_data: proxy samples from a COCO-style file. The instance target is the reader's map resized
    with nearest neighbours (every pixel an instance's colour or black), the semantic target paints by category,
    the input the picture resized; understanding samples stay the world's."""
    import torch.nn.functional as F

    from umm_ops.data.proxy import coco_proxy_record, proxy_pair
    from umm_ops.data.readers import CocoReader
    from umm_ops.data.synthetic import instance_palette
    from umm_ops.train.recipes.sgt import SGTDataset

    path = _coco_files(tmp_path)
    reader = CocoReader(str(path))
    rec = reader[0]
    pr = coco_proxy_record(rec, 32, index=7, seed=3, categories=reader.categories)
    inst = F.interpolate(rec["instances"][None, None].float(), size=(32, 32), mode="nearest")[0, 0].long()
    src, tgt = proxy_pair(pr, "instance_seg")
    assert src.shape == tgt.shape == (3, 32, 32) and src.dtype == tgt.dtype == torch.uint8
    for c in rec["instance_colors"]:
        assert (tgt[:, inst == c["id"]] == torch.tensor(c["color"], dtype=torch.uint8)[:, None]).all()
    assert (tgt[:, inst == 0] == 0).all()
    _, sem = proxy_pair(pr, "semantic_seg")
    pal = instance_palette(2)
    for c in rec["instance_colors"]:
        want = torch.tensor(pal[c["category_id"] - 1], dtype=torch.uint8)[:, None]     # ids 1, 2 -> places 1, 2
        assert (sem[:, inst == c["id"]] == want).all()
    _, edges = proxy_pair(pr, "edge")
    assert edges.any() and not edges.all()
    noisy, clean = proxy_pair(pr, "denoising", seed=1)
    assert torch.equal(clean, src) and not torch.equal(noisy, src)
    from umm_ops.data.proxy import proxy_instruction

    for draw in range(4):
        text = proxy_instruction(pr, "referring_seg", draw=draw)
        _, ref = proxy_pair(pr, "referring_seg", draw=draw)
        name = text.removeprefix("Segment the ").removesuffix(".")
        assert name in ("cat", "dog")                                # one instance each in picture 0
        ids = [c["id"] for c in rec["instance_colors"] if c["category"] == name]
        assert torch.equal(ref[0] == 255, torch.isin(inst, torch.tensor(ids)))

    ds = SGTDataset(32, 0, 6, "instance_seg", 2, ("caption",), task_weights=(1,), max_objects=1, proxy_data=reader)
    assert ds.slots_per_record == 3
    seen = set()
    for r in range(6):
        s = ds[3 * r]
        assert s.meta["task"] == "proxy" and s.meta["source"] == str(path) and s.meta["index"] == r
        seen.add(round(float(s.items[0].image.mean()), 4))
        assert ds[3 * r + 2].meta["task"] == "caption"
    assert len(seen) == 2                                       # the two pictures, in turn
    with pytest.raises(ValueError, match="proxy_data needs a proxy task"):
        SGTDataset(32, 0, 6, "none", 0, ("caption",), max_objects=1, proxy_data=reader)


def test_sgt_on_coco_data_from_the_cli(tmp_path):
    from umm_ops.cli import main
    from umm_ops.train import Config, ConfigError

    path = _coco_files(tmp_path)
    out = tmp_path / "sgt"
    assert main(["train", "--recipe", "sgt", "--steps", "2", "--out", str(out), "--proxy", "instance_seg",
                 "--set", f"recipe.proxy_data={path}", "--set", "recipe.image_size=32", "--set", "data.budget=256",
                 "--set", "recipe.train_records=40", "--set", "metrics.plot=false", "--no-eval", "--device",
                 "cpu"]) == 0
    assert (out / "checkpoint-2").is_dir() and "proxy_data" in (out / "config.toml").read_text()
    with pytest.raises(ConfigError, match="proxy_data"):
        Config.build("sgt", overrides=["recipe.proxy=none", f"recipe.proxy_data={path}"])
