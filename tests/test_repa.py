"""REPA (Yu et al. 2024, representation alignment) for the tiny preset's conv stage: HeadConfig.conv_repa (the
head's projector), CheersModel.forward(..., repa_features=True), and the SFT recipe's recipe.repa_weight with its
frozen target tower and loss (umm_ops.train.recipes.sft.repa_loss) against the paper's formula computed by hand."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny_model_open_gates

import umm_ops
from umm_ops.data.packing import ROLES, ImageItem, Sample, TextItem, pack
from umm_ops.model.cheers import CheersModel
from umm_ops.model.config import HeadConfig, preset
from umm_ops.model.head import FlowHead, prompt_context

D, HQ, HKV, C, CH, OUT = 64, 4, 2, 48, 4, 32


@pytest.fixture(scope="module")
def model():
    return tiny_model_open_gates()


def _repa_model(model):
    cfg = dataclasses.replace(model.config, head=dataclasses.replace(model.config.head, conv_repa=True))
    m = CheersModel(cfg, tokenizer=model.tokenizer)
    missing, unexpected = m.load_state_dict(model.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("head.repa_projector.") for k in missing)
    with torch.no_grad():   # the conv stage's last conv starts at zero: open it so the velocity depends on the stage
        for p in m.head.conv_stage.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


@pytest.mark.parametrize("inputs", ["latent", "alone"])
def test_head_features_are_the_projected_second_level(seed, inputs):
    """features=True: the same velocity as without (bitwise), and f = repa_projector(the stage's second level after
    its attention), read here by a hook on that attention, flattened row-major: one row per ViT patch (N, 4n, C).
    Gradient of f reaches the projector and the stage's first two levels but not its way up.  Refused without the
    option; the option needs two levels."""
    cfg = HeadConfig(semantic_layers=2, detail_layers=2, conv_widths=(16, 32, 32), conv_context=True,
                     conv_inputs=inputs, conv_repa=True)
    head = FlowHead(D, HQ, HKV, C, CH, OUT, cfg).double()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 4, D, generator=g, dtype=torch.float64)
    t = torch.rand(2, generator=g, dtype=torch.float64)
    high = torch.randn(2, 16, C, generator=g, dtype=torch.float64)
    x_t = torch.randn(2, 16, OUT, generator=g, dtype=torch.float64)
    ctx, mask = prompt_context(torch.randn(9, D, generator=g, dtype=torch.float64), [(0, 5), (5, 9)])
    seen = []
    head.conv_stage.down_attn[1].register_forward_hook(lambda mod, args, out: seen.append(out))
    with umm_ops.use_backend("reference"):
        v0 = head(h, t, high, (2, 2), x_t, ctx, mask)
        v, f = head(h, t, high, (2, 2), x_t, ctx, mask, features=True)
    assert torch.equal(v, v0)
    level1 = seen[-1]                                              # (N, 32, 4, 4): the ViT grid of 16 patches
    assert level1.shape == (2, 32, 4, 4)
    rows = level1.permute(0, 2, 3, 1).reshape(2, 16, 32)           # row-major patches
    torch.testing.assert_close(f, head.repa_projector(rows), rtol=0, atol=0)
    assert f.shape == (2, 16, C)
    f.square().sum().backward()
    st = head.conv_stage
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.repa_projector.parameters())
    assert st.conv_in.weight.grad.abs().sum() > 0 and st.down[1].weight.grad.abs().sum() > 0
    assert st.conv_out.weight.grad is None and st.down[2].weight.grad is None
    plain = FlowHead(D, HQ, HKV, C, CH, OUT, dataclasses.replace(cfg, conv_repa=False))
    assert plain.repa_projector is None
    with pytest.raises(ValueError, match="features=True needs a head with HeadConfig.conv_repa"):
        plain(h.float(), t.float(), high.float(), (2, 2), x_t.float(), ctx.float(), mask, features=True)
    c = preset("tiny")
    c.head.conv_widths, c.head.conv_repa = (64,), True
    with pytest.raises(ValueError, match="conv_repa = True needs a convolutional stage of at least 2 levels"):
        c.validate()
    assert dataclasses.replace(preset("tiny").head, conv_repa=True).without_conv_stage().conv_repa is False


def _batch(model, size=64):
    samples = [Sample([TextItem("draw a red box"), ImageItem(_img(10, size), "generate")]),
               Sample([ImageItem(_img(11, size), "understand"), TextItem("what is it?"), TextItem("a box", loss=True)]),
               Sample([TextItem("two blue circles"), ImageItem(_img(12, size), "generate")])]
    b = pack(samples, model.pack_spec(), seed=3)[0]
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(model.latent_shape(img.shape[-2:]), generator=g) if r == ROLES["generate"] else None
             for img, r in zip(b.images, b.image_spans[:, 2].tolist())]
    return b, noise


def _img(seed, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g) * 2 - 1


def test_model_returns_features_per_generated_image(model):
    """forward(repa_features=True): the same losses; ``v_images`` names the generated images (in batch.images) of
    each head group and ``repa_features`` has one (n_vit, C) block per such image, equal to the head's features for
    that image run alone through the model; without the option it is refused."""
    m = _repa_model(model)
    b, noise = _batch(m)
    with torch.no_grad():
        plain = m(b, noise=noise)
        out = m(b, noise=noise, repa_features=True)
    assert torch.equal(plain["loss"], out["loss"])
    roles = b.image_spans[:, 2].tolist()
    gen = [i for i, r in enumerate(roles) if r == ROLES["generate"]]
    assert [i for g in out["v_images"] for i in g] == gen and len(gen) == 2
    n_vit = m.latent_shape((64, 64))[0]
    assert [tuple(f.shape) for f in out["repa_features"]] == [(2, n_vit, m.config.vit["hidden_size"])]
    # image 0 of the batch alone: the same features (its row in the packed batch is not mixed with the others)
    first = [s for s in range(len(b.images)) if roles[s] == ROLES["generate"]][0]
    one = pack([Sample([TextItem("draw a red box"), ImageItem(_img(10), "generate")])], m.pack_spec(), seed=3)[0]
    one.timesteps[:] = b.timesteps[first]
    with torch.no_grad():
        alone = m(one, noise=[noise[first]], repa_features=True)["repa_features"][0][0]
    torch.testing.assert_close(out["repa_features"][0][0], alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="repa_features=True needs a model whose head has HeadConfig.conv_repa"):
        model(b, noise=noise, repa_features=True)


def test_repa_loss_is_the_papers_formula(model):
    """repa_loss = -1/(N P) sum_n sum_p <h_np, y_np> / (|h_np| |y_np|) over the generated pictures only, y from a
    tower loaded here from the shipped weights on the clean pixels (computed patch by patch below); an understanding
    picture that reaches the head (und_flow_loss) is left out; a batch without generated pictures gives 0; the
    gradient reaches the projector and not the target tower."""
    from umm_ops.model.vit import SiglipViT
    from umm_ops.train.recipes.sft import RepaTargets, repa_loss

    m = _repa_model(model)
    m.config.und_flow_loss = True            # the understanding picture reaches the head, and must be left out
    b, noise = _batch(m)
    out = m(b, noise=noise, repa_features=True)
    roles = b.image_spans[:, 2].tolist()
    assert sorted(i for g in out["v_images"] for i in g) == list(range(len(b.images)))   # all three in the head
    targets = RepaTargets(m)
    got = repa_loss(out["repa_features"], out["v_images"], b, targets)
    tower = SiglipViT(m.config.vit_config())
    tower.load_pretrained(m.config.vit_weights)
    sims = []
    with torch.no_grad():
        for f, idx in zip(out["repa_features"], out["v_images"]):
            for j, i in enumerate(idx):
                if roles[i] != ROLES["generate"]:
                    continue
                y = tower(b.images[i][None].float())[0].double()
                hh = f[j].detach().double()
                for p in range(hh.shape[0]):
                    sims.append(float(hh[p] @ y[p]) / float(hh[p].norm() * y[p].norm()))
    want = -sum(sims) / len(sims)
    assert len(sims) == 2 * hh.shape[0]
    assert abs(float(got.detach()) - want) < 1e-5, (float(got.detach()), want)
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.head.repa_projector.parameters())
    assert all(p.grad is None and not p.requires_grad for p in targets.tower.parameters())
    assert targets.tower is not m.vit
    m.config.und_flow_loss = False
    und_only = pack([Sample([ImageItem(_img(11), "understand"), TextItem("what?"), TextItem("a box", loss=True)])],
                    m.pack_spec(), seed=3)[0]
    o = m(und_only, repa_features=True)
    assert o["repa_features"] == [] and float(repa_loss(o["repa_features"], o["v_images"], und_only, targets)) == 0.0


def test_recipe_repa_weight_trains_and_refuses_what_it_cannot_align(tmp_path, model):
    """recipe.repa_weight: a short run logs repa_loss and the step's loss is flow + text + weight x repa; without the
    head's projector, or with a randomly initialised tower, the run is refused with the setting to change."""
    from umm_ops.train import Config, ConfigError, train
    from umm_ops.train.recipes.sft import RepaTargets

    base = {"job.steps": 2, "job.device": "cpu", "job.progress": False, "recipe.image_size": 32, "data.budget": 384,
            "recipe.evaluate": False, "recipe.train_records": 200, "checkpoint.every": 2, "metrics.log_every": 1,
            "schedule.warmup": 1, "recipe.caption_first": 0, "recipe.tasks": ("generate", "caption")}
    cfg = Config.build("sft", values={**base, "job.out": str(tmp_path / "r"), "model.conv_repa": True,
                                      "recipe.repa_weight": 0.5})
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "repa_loss" in r]
    assert len(rows) == 2
    for r in rows:
        assert -1.0 <= r["repa_loss"] <= 1.0
        assert abs(r["loss"] - (r["flow_loss"] + r["text_loss"] + 0.5 * r["repa_loss"])) < 1e-4 * (1 + abs(r["loss"]))
    with pytest.raises(ConfigError, match="model.conv_repa=true"):
        train(Config.build("sft", values={**base, "job.out": str(tmp_path / "n"), "recipe.repa_weight": 0.5}))
    with pytest.raises(ConfigError, match="recipe.repa_weight = -1"):
        Config.build("sft", values={**base, "job.out": str(tmp_path / "m"), "recipe.repa_weight": -1.0})
    bare = _repa_model(model)
    bare.config.vit_weights = None
    with pytest.raises(ConfigError, match="needs a pretrained vision tower"):
        RepaTargets(bare)
