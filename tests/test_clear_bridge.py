"""CLEAR stage 2, the latent bridge (issue 16): the bridge losses against formulas written out here, the student /
teacher pairing of the packed batch, the per-layer hidden states, the recipe's step against a recomputation,
bridge inference (restored latent written into the KV cache) against one full forward over the same sequence,
and a few-step clear-bridge run from the CLI."""
import json
import math

import pytest
import torch

from umm_ops.data.clear_data import RESTORE_TAG, RESTORE_THOUGHT, clear_samples
from umm_ops.data.packing import ImageItem, Sample, TextItem, collate_docs, encode_sample
from umm_ops.data.synthetic import SyntheticWorld
from umm_ops.train.recipes.clear_bridge import (BridgeDoc, BridgeEncoder, bridge_kl, bridge_mse, bridge_pairs,
                                                collate, layer_weights, student_sample)


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def test_bridge_kl_against_the_formula():
    g = torch.Generator().manual_seed(0)
    L, D = 4, 6
    stu = [torch.randn(L, n, D, generator=g, dtype=torch.float64).requires_grad_() for n in (3, 5)]
    tea = [torch.randn(L, n, D, generator=g, dtype=torch.float64).requires_grad_() for n in (3, 5)]
    for stride, w in ((1, [0.1, 0.2, 0.3, 0.4]), (2, [0.0, 2 / 6, 0.0, 4 / 6]), (4, [0, 0, 0, 1.0]),
                      (3, [0.0, 0.0, 3 / 7, 4 / 7])):
        assert layer_weights(L, stride).tolist() == pytest.approx(w)
        # sum over layers of w_l * mean over tokens of sum_d p_t log(p_t / p_s), then the mean over the two pairs
        want = 0.0
        for s, t in zip(stu, tea):
            per_pair = 0.0
            for layer in range(L):
                toks = []
                for k in range(s.shape[1]):
                    ps, pt = _softmax(s[layer, k].tolist()), _softmax(t[layer, k].tolist())
                    toks.append(sum(b * math.log(b / a) for a, b in zip(ps, pt)))
                per_pair += w[layer] * sum(toks) / len(toks)
            want += per_pair / 2
        got = bridge_kl(stu, tea, layer_weights(L, stride))
        assert float(got.detach()) == pytest.approx(want, rel=1e-5, abs=1e-7)
    got.backward()
    assert stu[0].grad is not None and stu[0].grad.abs().sum() > 0
    assert tea[0].grad is None and tea[1].grad is None                # the teacher is detached
    assert float(bridge_kl(tea, tea, layer_weights(L)).detach()) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="weights"):
        bridge_kl(stu, tea, torch.ones(3))
    with pytest.raises(ValueError, match="same non-zero number"):
        bridge_kl(stu, tea[:1], layer_weights(L))
    with pytest.raises(ValueError, match="stride"):
        layer_weights(4, 0)


def test_bridge_mse_against_the_formula():
    g = torch.Generator().manual_seed(1)
    stu = [torch.randn(n, 5, generator=g).requires_grad_() for n in (2, 4)]
    tea = [torch.randn(n, 5, generator=g) for n in (2, 4)]
    want = 0.0
    for s, t in zip(stu, tea):
        ms = [sum(s[k, d].item() for k in range(s.shape[0])) / s.shape[0] for d in range(5)]
        mt = [sum(t[k, d].item() for k in range(t.shape[0])) / t.shape[0] for d in range(5)]
        want += sum((a - b) ** 2 for a, b in zip(ms, mt)) / 5 / 2
    assert float(bridge_mse(stu, tea).detach()) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="2-D"):
        bridge_mse([torch.zeros(2, 3)], [torch.zeros(3, 3)])


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(size=64, seed=0, max_objects=2, length=50, object_scale=1.8)


@pytest.fixture(scope="module")
def model():
    from conftest import tiny_eval_model

    return tiny_eval_model(64)


def _restore_and_direct(world):
    rs = [s for i in range(20) for s in clear_samples(world[i], p_direct=0.0)]
    ds = [s for i in range(20) for s in clear_samples(world[i], p_direct=1.0)]
    return rs[0], ds[0]


def test_student_documents_and_pairs(world, model):
    restore, direct = _restore_and_direct(world)
    spec = model.pack_spec()
    stu = student_sample(restore)
    assert student_sample(direct) is None
    # the student: the sample up to the restoration marker (no loss), then the clean picture to understand
    assert [type(i).__name__ for i in stu.items] == ["ImageItem", "TextItem", "TextItem", "ImageItem"]
    assert stu.items[2].text.endswith(RESTORE_TAG) and not any(i.loss for i in stu.items[1:3])
    assert stu.items[3].role == "understand" and torch.equal(stu.items[3].image, restore.items[4].image)
    enc = BridgeEncoder(spec, "clean")
    docs = [enc(direct, 0, 0), enc(restore, 1, 0)]
    assert not isinstance(docs[0], BridgeDoc) and isinstance(docs[1], BridgeDoc)
    assert docs[1].length == docs[1].doc.length + docs[1].student.length
    b = collate(docs)
    assert b.num_docs == 3 and bool((b.labels[b.doc_offsets[2]:] == -100).all())    # the student has no text loss
    (t, s, d), = bridge_pairs(b, "clean")
    spans = b.image_spans.tolist()
    # teacher: the understood copy after the generated image of document 1; student: document 2's image, at the
    # same place in its document as the generated span (same tokens before it)
    assert d == 1 and spans[t - 1][2] == 1 and spans[t][2] == 0 and s == len(spans) - 1
    o1, o2 = int(b.doc_offsets[1]), int(b.doc_offsets[2])
    gen_start = spans[t - 1][0]
    assert spans[s][0] - o2 == gen_start - o1
    assert torch.equal(b.input_ids[o2:spans[s][0]], b.input_ids[o1:gen_start])
    assert torch.equal(b.images[s], b.images[t])
    (t2, s2, d2), = bridge_pairs(b, "generated")
    assert (t2, s2, d2) == (t, t - 1, 1)
    plain = collate_docs([encode_sample(restore, spec)])
    with pytest.raises(ValueError, match="no student document"):
        bridge_pairs(plain, "clean")
    with pytest.raises(ValueError, match="student must be"):
        BridgeEncoder(spec, "noisy")


def test_layer_rows_are_the_layers_outputs(world, model):
    from umm_ops.train import policy

    restore, _ = _restore_and_direct(world)
    b = collate_docs([encode_sample(restore, model.pack_spec())])
    rows = torch.tensor([0, 3, int(b.image_spans[1, 0]), b.num_tokens - 1])
    inputs = policy.training_inputs(model, b, 0, 0.0)
    with torch.no_grad():
        out = model(b, **inputs, return_outputs=True, layer_rows=rows)
        plain = model(b, **inputs)
    assert out["layer_hidden"].shape == (4, 4, 256)
    torch.testing.assert_close(model.llm.model.norm(out["layer_hidden"][-1]), out["hidden"][rows])
    torch.testing.assert_close(out["loss"], plain["loss"])
    assert not torch.allclose(out["layer_hidden"][0], out["layer_hidden"][1])
    with pytest.raises(ValueError, match="layer_rows must index"):
        model(b, **inputs, layer_rows=torch.tensor([b.num_tokens]))


def test_recipe_step_against_a_recomputation(world, model):
    """The step's bridge loss = the formula applied to hidden states recomputed from one plain forward."""
    from types import SimpleNamespace

    from umm_ops.train import policy
    from umm_ops.train.recipes.clear_bridge import ClearBridgeRecipe, ClearBridgeRecipeConfig
    from umm_ops.train.spec import StepContext

    restore, direct = _restore_and_direct(world)
    restore2 = [s for i in range(20, 40) for s in clear_samples(world[i], p_direct=0.0)][0]
    enc = BridgeEncoder(model.pack_spec(), "clean")
    b = collate([enc(restore, 0, 0), enc(direct, 1, 0), enc(restore2, 2, 0)])
    for loss in ("kl", "mse"):
        r = ClearBridgeRecipeConfig(bridge_loss=loss, cfg_dropout=0.0).validate()
        ctx = StepContext(step=3, seed=0, micro_index=0, micro_per_step=1, device="cpu", module=model,
                          config=SimpleNamespace(recipe=r))
        with torch.no_grad():
            got = ClearBridgeRecipe().step(model, b, ctx)
            inputs = policy.training_inputs(model, b, __import__("umm_ops").utils.seed_of(0, 3, "sft-step"), 0.0)
            out = model(b, **inputs, return_outputs=True, layer_rows=torch.arange(b.num_tokens))
        assert got.counts["bridge_pairs"] == 2
        spans = b.image_spans.tolist()
        stu, tea = [], []
        for t, s, _ in bridge_pairs(b, "clean"):
            src = out["layer_hidden"] if loss == "kl" else out["hidden"]
            sl = (lambda i: slice(spans[i][0], spans[i][0] + spans[i][1]))
            stu.append(src[:, sl(s)] if loss == "kl" else src[sl(s)])
            tea.append(src[:, sl(t)] if loss == "kl" else src[sl(t)])
        want = bridge_kl(stu, tea, layer_weights(4)) if loss == "kl" else bridge_mse(stu, tea)
        assert float(want) > 0
        torch.testing.assert_close(got.metrics["bridge_loss"], want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.loss, out["loss"] + 0.4 * want, rtol=1e-4, atol=1e-6)
    # a teacher whose prompt was dropped for classifier-free guidance read a null prompt: its pair is left out
    r = ClearBridgeRecipeConfig(cfg_dropout=1.0).validate()
    ctx = StepContext(step=3, seed=0, micro_index=0, micro_per_step=1, device="cpu", module=model,
                      config=SimpleNamespace(recipe=r))
    with torch.no_grad():
        got = ClearBridgeRecipe().step(model, b, ctx)
    assert got.counts["bridge_pairs"] == 0 and float(got.metrics["bridge_loss"]) == 0.0


def _context(img, question):
    return Sample([ImageItem(img, "understand"), TextItem(question),
                   TextItem(f"<think> {RESTORE_THOUGHT} </think> {RESTORE_TAG}")])


def test_bridge_inference_equals_one_full_forward(world, model):
    """The restored latent written into the KV cache after the context gives the answer logits of one cache-free
    forward over [context, the latent's tokens at t = 1 (image_features), end token, answer]."""
    from umm_ops.attention import SpanLayout
    from umm_ops.model.clear import bridge_answer

    g = torch.Generator().manual_seed(3)
    imgs = [world[i].image.float() / 127.5 - 1 for i in (1, 2)]
    ctxs = [_context(imgs[0], "what colour is the circle?"), _context(imgs[1], "is there a square?")]
    lat = torch.randn(2, *model.latent_shape((64, 64)), generator=g)
    recs = bridge_answer(model, ctxs, lat, answer_tokens=7, seed=[1, 2])
    spec = model.pack_spec()
    for c, z, r in zip(ctxs, lat, recs):
        assert len(r["ids"]) >= 1
        e = encode_sample(Sample(c.items + [ImageItem(torch.zeros(3, 64, 64), "understand")]), spec)
        ans = torch.tensor(r["ids"], dtype=torch.long)
        ids = torch.cat([e.input_ids, ans])
        with torch.no_grad():
            emb = model.llm.embed(ids)
            (s0, n0, *_), (s1, n1, *_) = e.image_rows
            f0, _ = model.image_features(model.vae.encode(e.images[0][None]), (64, 64))
            f1, _ = model.image_features(z[None].to(model.dtype), (64, 64))
            emb[s0:s0 + n0], emb[s1:s1 + n1] = f0[0], f1[0]
            segs = e.segments[:-1] + [(e.segments[-1][0] + len(ans), "causal")]
            assert e.segments[-1] == (1, "causal") and e.segments[-2] == (n1, "full")
            h = model.llm.forward_packed(emb, torch.arange(len(ids)), SpanLayout.from_segments([segs]))
            logp = torch.log_softmax(model.llm.logits(h[e.length - 1:e.length - 1 + len(ans)]).float(), -1)
        assert logp.argmax(-1).tolist() == r["ids"]                               # greedy: the same tokens
        torch.testing.assert_close(r["logprobs"], logp.gather(1, ans[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="latents must be"):
        bridge_answer(model, ctxs, lat[:1])


def test_generate_then_answer_bridge_reuses_the_samplers_cache(world, model, monkeypatch):
    """bridge=True: the answer decoded from the sampler's own cache (CFG's null documents dropped) equals
    bridge_answer's from a fresh prefill of the same context with the returned latent; no image is decoded."""
    from umm_ops.model import generate as gen
    from umm_ops.model.clear import bridge_answer, generate_then_answer

    thought = f"<think> {RESTORE_THOUGHT} </think> "
    monkeypatch.setattr(gen, "decode", lambda model, prompts, **kw: [
        {"ids": [1], "text": thought, "logprobs": torch.zeros(1), "finish_reason": "stop"} for _ in prompts])
    monkeypatch.setattr(type(model.vae), "decode", lambda *a, **k: pytest.fail("the bridge decoded pixels"))
    imgs = torch.stack([world[i].image.float() / 127.5 - 1 for i in (4, 5)])
    qs = ["what colour is the circle?", "is there a square?"]
    out = generate_then_answer(model, imgs, qs, steps=2, answer_tokens=6, bridge=True, seed=7)
    for im, q, o in zip(imgs, qs, out):
        assert o["restored"] and o["image"] is None and o["latent"].shape == model.latent_shape((64, 64))
        ref = bridge_answer(model, [_context(im, q)], o["latent"][None], answer_tokens=6)[0]
        assert o["text"] == thought + RESTORE_TAG + ref["text"]
    # an oracle restoration enters as the VAE latent of the picture
    monkeypatch.undo()
    monkeypatch.setattr(gen, "decode", lambda model, prompts, **kw: [
        {"ids": [1], "text": thought, "logprobs": torch.zeros(1), "finish_reason": "stop"} for _ in prompts])
    o = generate_then_answer(model, imgs[:1], qs[:1], answer_tokens=6, bridge=True, restorations=imgs[1:])[0]
    with torch.no_grad():
        z = model.vae.encode(imgs[1:]).float()
    torch.testing.assert_close(o["latent"], z[0])


def test_clear_bridge_from_the_cli(tmp_path):
    from umm_ops.cli import main

    base = tmp_path / "base"
    assert main(["train", "--steps", "1", "--set", "recipe.caption_first=0", "--no-eval", "--out", str(base),
                 "--device", "cpu", "--set", "data.budget=256"]) == 0
    out = tmp_path / "bridge"
    assert main(["train", "--recipe", "clear-bridge", "--set", f"recipe.init={base}", "--steps", "2", "--no-eval",
                 "--set", "data.budget=768", "--tasks", "clear_short",
                 "--set", "recipe.task_weights=[1]", "--out", str(out), "--device", "cpu"]) == 0
    assert (out / "checkpoint-2").is_dir()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "bridge_loss" in r]
    assert steps and all(math.isfinite(r["bridge_loss"]) for r in steps)
    assert any(r["bridge_loss"] > 0 for r in steps)
    assert main(["train", "--recipe", "clear-bridge", "--set", f"recipe.init={base}", "--steps", "1", "--no-eval",
                 "--set", "recipe.bridge_loss=l2", "--out", str(tmp_path / "bad"), "--device", "cpu"]) != 0
    # umm generate --restore --bridge answers through the bridge; --bridge alone is refused
    from PIL import Image

    pic = tmp_path / "pic.png"
    Image.fromarray(SyntheticWorld(size=64, seed=0, length=1)[0].image.permute(1, 2, 0).numpy()).save(pic)
    gen = ["generate", str(out), "--text", "--image", str(pic), "--prompt", "what is it?", "--max-new-tokens", "4",
           "--steps", "2", "--out", str(tmp_path / "r.png"), "--device", "cpu"]
    assert main(gen + ["--restore", "--bridge"]) == 0
    assert main(gen + ["--bridge"]) == 2


def test_bridge_eval_task_pairs_with_clear_short(model, monkeypatch):
    """clear-short-bridge asks for the bridge with the seeds clear-short uses, and scores the PSNR of the restored
    latents decoded after the answers."""
    from umm_ops.eval.runner import evaluate

    calls = []

    def fake(self, images, questions, **kw):
        calls.append(kw)
        out = []
        for im in images:
            with torch.no_grad():
                z = self.vae.encode(im[None])[0].float()
            out.append({"text": "", "restored": True, "image": None if kw.get("bridge") else im,
                        "answer": "x", "format": {"think": True, "answer": True, "order": True},
                        **({"latent": z} if kw.get("bridge") else {})})
        return out

    monkeypatch.setattr(type(model), "generate_then_answer", fake, raising=False)
    res = evaluate(model, "clear-short,clear-short-bridge", n=3, image_size=64, world_kwargs={"max_objects": 2},
                   batch_size=3)
    assert [c.get("bridge", False) for c in calls] == [False, False, True, True]
    assert calls[0]["seed"] == calls[2]["seed"] and calls[1]["seed"] == calls[3]["seed"]
    t = res["tasks"]["clear-short-bridge"]
    # the "restorations" are the degraded inputs' latents: decoded, their PSNR is the VAE round trip's, finite
    assert all(math.isfinite(it["psnr"]) and it["psnr"] > 10 for it in t["items"])
