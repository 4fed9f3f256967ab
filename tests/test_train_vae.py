"""The vae recipe (umm_ops.train.recipes.vae) on the engine: data, loss against an independent computation, a short
run whose reconstruction error falls, export of the calibrated autoencoder that CheersVAE loads."""
from __future__ import annotations

import json

import pytest
import torch

from umm_ops.train import Config, ConfigError, train
from umm_ops.train.recipes.vae import VAETrainer, WorldImages, export_vae


def _cfg(out, **kw):
    ov = {"job.out": str(out), "job.steps": 8, "job.device": "cpu", "job.progress": False, "data.budget": 64,
          "recipe.sizes": (32, 64), "recipe.train_records": 200, "recipe.eval_images": 4, "checkpoint.every": 0,
          "metrics.log_every": 100, "schedule.warmup": 2, "optim.lr": 3e-3}
    ov.update({k.replace("__", "."): v for k, v in kw.items()})
    return Config.build("vae", values=ov)


def test_world_images_mix_sizes_and_maps():
    ds = WorldImages((32, 64), seed=0, records=10, max_objects=3, segmentation=True)
    assert len(ds) == 40
    sizes = [ds[i][0] for i in range(8)]
    assert sizes == [32, 64] * 4 and ds[0][1].shape == (3, 32, 32) and ds[1][1].shape == (3, 64, 64)
    assert not torch.equal(ds[0][1], ds[2][1])   # picture, then its instance map
    assert ds.length(0) == 4 and ds.length(1) == 16
    assert float(ds[3][1].min()) >= -1 and float(ds[3][1].max()) <= 1


def test_loss_matches_an_independent_computation():
    from umm_ops.model.config import preset

    torch.manual_seed(0)
    m = VAETrainer(preset("tiny").vae)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    noise = torch.randn(2, 32, 4, 4)
    out = m(x, noise, kl_weight=0.5)
    post = m.ae.encode(x).latent_dist
    mean, logvar = post.mean.double(), post.logvar.double()
    z = (mean + torch.exp(0.5 * logvar) * noise.double()).float()
    l1 = (m.ae.decode(z).sample.double() - x.double()).abs().mean()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum() / x.numel()
    torch.testing.assert_close(out["loss"].double(), l1 + 0.5 * kl, rtol=1e-5, atol=1e-6)


def test_short_run_learns_and_exports(tmp_path):
    out = tmp_path / "run"
    s = train(_cfg(out, job__steps=30))
    rows = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    first = sum(r["l1"] for r in rows[:5]) / 5
    last = sum(r["l1"] for r in rows[-5:]) / 5
    assert last < 0.8 * first, [r["l1"] for r in rows]
    assert set(s["eval"]) == {"32", "64"} and all(0 <= v["checker_score"] <= 1 for v in s["eval"].values())
    assert (out / "eval" / "vae-recon-64.png").is_file()
    f = tmp_path / "vae.safetensors"
    from umm_ops.cli import main

    assert main(["export", str(out), "--out", str(f)]) == 0
    info = json.loads((tmp_path / "vae.safetensors.json").read_text())
    assert info["step"] == 30
    from safetensors.torch import load_file

    from umm_ops.model.config import preset
    from umm_ops.model.vae import CheersVAE

    vae = CheersVAE(preset("tiny").vae)
    vae.frozen.load_state_dict(load_file(str(f)))
    assert float(vae.frozen.bn.running_var.min()) > 0 and not torch.all(vae.frozen.bn.running_mean == 0)
    with pytest.raises(ValueError, match="not a vae run"):
        export_vae(_sft_run(tmp_path), tmp_path / "x.safetensors")


def _sft_run(tmp_path):
    out = tmp_path / "sft"
    train(Config.build("sft", values={"job.out": str(out), "job.steps": 1, "job.device": "cpu",
                                      "job.progress": False, "recipe.image_size": 32, "data.budget": 384,
                                      "recipe.evaluate": False, "recipe.train_records": 50}))
    return out


def test_posterior_mode_decodes_the_mean():
    from umm_ops.model.config import preset

    torch.manual_seed(0)
    m = VAETrainer(preset("tiny").vae)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    out = m(x, None, kl_weight=0.0)
    want = (m.ae.decode(m.ae.encode(x).latent_dist.mean).sample - x).abs().mean()
    torch.testing.assert_close(out["loss"], want)


def test_config_errors():
    with pytest.raises(ConfigError, match="recipe.sizes = \\(64, 40\\): must be picture sides, multiples of 16"):
        Config.build("vae", overrides=["recipe.sizes=64,40"])
    with pytest.raises(ConfigError, match="recipe.kl_weight"):
        Config.build("vae", overrides=["recipe.kl_weight=-1"])
    with pytest.raises(ConfigError, match="recipe.posterior = 'mean': use 'mode' or 'sample'"):
        Config.build("vae", overrides=["recipe.posterior=mean"])


def test_color_weighted_loss_matches_an_independent_computation():
    from umm_ops.model.config import preset

    torch.manual_seed(0)
    m = VAETrainer(preset("tiny").vae)
    x = torch.full((2, 3, 32, 32), 0.1)       # grey background
    x[0, :, 5:9, 6:12] = torch.tensor([0.7, -0.8, -0.7])[:, None, None]   # a red patch
    x[1, :, 20:31, 0:3] = torch.tensor([-1.0, 0.6, 0.8])[:, None, None]   # a cyan patch at the border
    x[1, :, 0:4, 0:4] = 0.9                                              # a light grey patch: no colour
    out = m(x, None, kl_weight=0.0, color_weight=3.0)
    err = (m.ae.decode(m.ae.encode(x).latent_dist.mean).sample.double() - x.double()).abs()
    w = torch.ones(2, 32, 32, dtype=torch.float64)
    for n in range(2):
        for i in range(32):
            for j in range(32):
                near = x[n, :, max(0, i - 1):i + 2, max(0, j - 1):j + 2]
                if bool(((near.amax(0) - near.amin(0)) > 0.3).any()):
                    w[n, i, j] = 4.0
    assert int((w == 4).sum()) == 6 * 8 + 13 * 4   # the patches grown by one pixel (clipped at the border)
    want = (err * w[:, None]).sum() / (3 * w.sum())
    torch.testing.assert_close(out["loss"].double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["l1"].double(), err.mean(), rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="recipe.color_weight"):
        Config.build("vae", overrides=["recipe.color_weight=-1"])


def test_scale_equivariance_loss_matches_an_independent_computation():
    """se_weight: + w * mean over k = 2, 4 of L1(decode(z box-averaged k x k), picture box-averaged k x k), both by
    hand (loops over blocks), unweighted and colour-weighted; a zero weight adds nothing."""
    from umm_ops.model.config import preset

    torch.manual_seed(0)
    m = VAETrainer(preset("tiny").vae)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    noise = torch.randn(2, 32, 8, 8)
    base = m(x, noise, kl_weight=0.5)
    out = m(x, noise, kl_weight=0.5, se_weight=0.7)
    post = m.ae.encode(x).latent_dist
    z = post.mean + post.std * noise

    def box(a, k):   # average of each k x k block, by explicit slicing
        H, W = a.shape[-2] // k, a.shape[-1] // k
        out = torch.empty(*a.shape[:-2], H, W, dtype=torch.float64)
        for i in range(H):
            for j in range(W):
                out[..., i, j] = a[..., i * k:(i + 1) * k, j * k:(j + 1) * k].double().mean(dim=(-1, -2))
        return out

    se = sum((m.ae.decode(box(z, k).float()).sample.double() - box(x, k)).abs().mean() for k in (2, 4)) / 2
    torch.testing.assert_close(out["loss"].double(), base["loss"].double() + 0.7 * se, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["se"].double(), se, rtol=1e-5, atol=1e-6)
    assert "se" not in base and float(se.detach()) > 0
    # with the colour weight, the pooled picture's own mask weighs the pooled error
    from umm_ops.train.recipes.vae import color_mask

    cw = m(x, noise, kl_weight=0.0, color_weight=2.0, se_weight=1.0)
    want = 0.0
    for k in (2, 4):
        px = box(x, k)
        err = (m.ae.decode(box(z, k).float()).sample.double() - px).abs()
        w = 1.0 + 2.0 * color_mask(px.float()).double()
        want = want + (err * w).sum() / (w.sum() * 3) / 2
    torch.testing.assert_close(cw["se"].double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="recipe.se_weight"):
        Config.build("vae", overrides=["recipe.se_weight=-1"])


def _exported(tmp_path, trained=True):
    """A tiny-preset autoencoder state as `umm export` writes it (random weights, calibrated statistics)."""
    import dataclasses

    from safetensors.torch import save_file

    from umm_ops.model.config import preset
    from umm_ops.model.vae import CheersVAE

    torch.manual_seed(1)
    vae = CheersVAE(dataclasses.replace(preset("tiny").vae, weights=None))
    if trained:
        vae.calibrate(torch.rand(4, 3, 32, 32) * 2 - 1)
    f = tmp_path / ("ae.safetensors" if trained else "uncalibrated.safetensors")
    save_file({k: v.contiguous() for k, v in vae.frozen.state_dict().items()}, str(f))
    return f, vae


def test_cheers_vae_loads_weights_named_in_its_config(tmp_path):
    import dataclasses

    from umm_ops.model.config import preset
    from umm_ops.model.vae import CheersVAE

    f, src = _exported(tmp_path)
    cfg = dataclasses.replace(preset("tiny").vae, weights=str(f))
    torch.manual_seed(2)
    vae = CheersVAE(cfg)
    assert vae.pretrained
    for k, v in src.frozen.state_dict().items():
        assert torch.equal(vae.frozen.state_dict()[k], v), k
    # the trainable decoder copy starts from the loaded decoder and statistics
    assert torch.equal(vae.decoder_copy.decoder.conv_out.weight, src.frozen.decoder.conv_out.weight)
    assert torch.equal(vae.decoder_copy.bn.running_var, src.frozen.bn.running_var)
    assert vae.decoder_copy.decoder.conv_out.weight.requires_grad
    assert not vae.frozen.decoder.conv_out.weight.requires_grad
    # a config round trip keeps the name; a checkpoint's config then loads the same file
    from umm_ops.model.config import CheersConfig

    c = preset("tiny")
    c.vae = cfg
    assert CheersConfig.from_dict(c.to_dict()).vae.weights == str(f)


def test_cheers_vae_weights_errors(tmp_path):
    import dataclasses

    from umm_ops.model.config import preset
    from umm_ops.model.vae import CheersVAE

    with pytest.raises(FileNotFoundError, match="neither a file nor shipped weights"):
        CheersVAE(dataclasses.replace(preset("tiny").vae, weights="no-such-vae"))
    f, _ = _exported(tmp_path, trained=False)
    with pytest.raises(ValueError, match="statistics are the defaults"):
        CheersVAE(dataclasses.replace(preset("tiny").vae, weights=str(f)))
    f, _ = _exported(tmp_path)
    with pytest.raises(ValueError, match="not an autoencoder of this VAEConfig"):
        CheersVAE(dataclasses.replace(preset("tiny").vae, weights=str(f), block_out_channels=(32, 32, 64, 32)))


def test_the_shipped_vae_reconstructs_held_out_scenes():
    """The tiny preset's default autoencoder (umm_ops/assets/tiny-world-vae.safetensors, made by the vae recipe):
    loaded with no network, it reconstructs held-out scenes well enough for the pixel checker (a subset of the
    scores recorded beside it; the full evaluation is in docs/results/vae).  Random weights score 0."""
    import json

    from umm_ops.data.synthetic import SyntheticWorld
    from umm_ops.eval.checker import check
    from umm_ops.model.cheers import CheersModel
    from umm_ops.model.vae import SHIPPED_WEIGHTS

    info = json.loads((SHIPPED_WEIGHTS / "tiny-world-vae.safetensors.json").read_text())
    held_out = info["config"]["recipe"]["train_records"]
    vae = CheersModel("tiny").vae
    assert vae.pretrained and float(vae.frozen.bn.running_var.min()) > 0
    base = dict(max_objects=2, kinds=("circle", "square", "triangle", "cross"), two_tone=0.0)
    # floors below the recorded 256-picture scores (0.974 at 64 px on the base world, 1.0 at 128 px on the full one)
    for size, kw, floor in ((64, base, 0.85), (128, dict(max_objects=4), 0.95)):
        world = SyntheticWorld(size=size, seed=info["config"]["job"]["seed"], length=held_out + 24, **kw)
        recs = [world[held_out + k] for k in range(24)]
        pix = torch.stack([r.image.float() / 127.5 - 1 for r in recs])
        with torch.no_grad():
            rec = vae.decode(vae.encode(pix), (size, size))
        score = sum(check(r.prompt, x, value_range=(-1, 1))["score"] for r, x in zip(recs, rec)) / len(recs)
        assert score >= floor, (size, score)
        assert float((rec - pix).abs().mean()) * 127.5 < 8.0, size


def test_a_fresh_model_takes_vae_weights_and_its_checkpoints_keep_them(tmp_path):
    """model.vae_weights: a fresh SFT model's autoencoder is the given file's; its checkpoints hold the autoencoder,
    so they load, and the run resumes, after the file is gone; with recipe.init it is refused; a missing file is
    named (for a fresh model)."""
    from umm_ops.train.export import load_checkpoint_model

    f, src = _exported(tmp_path)
    out = tmp_path / "sft"
    vals = {"job.out": str(out), "job.steps": 1, "job.device": "cpu", "job.progress": False,
            "recipe.image_size": 32, "data.budget": 384, "recipe.evaluate": False, "recipe.train_records": 50,
            "model.vae_weights": str(f)}
    train(Config.build("sft", values=vals))

    def same(m):
        for k, v in src.frozen.state_dict().items():
            assert torch.equal(m.vae.frozen.state_dict()[k], v), k

    same(load_checkpoint_model(out))
    f.unlink()
    same(load_checkpoint_model(out))
    train(Config.build("sft", values={**vals, "job.steps": 2}))       # resuming does not need the file either
    same(load_checkpoint_model(out))
    s = json.loads((out / "summary.json").read_text())
    assert s["resumed_from_step"] == 1 and s["steps"] == 2
    with pytest.raises(ConfigError, match="model.vae_weights = .* applies to a fresh model"):
        train(Config.build("sft", values={**vals, "job.out": str(tmp_path / "b"), "recipe.init": str(out)}))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        train(Config.build("sft", values={**vals, "job.out": str(tmp_path / "c"),
                                          "model.vae_weights": str(tmp_path / "nope.safetensors")}))


def test_decoder_only_keeps_init_encoder_and_latent_statistics(tmp_path):
    """recipe.train = 'decoder': only post_quant_conv and the decoder train; the checkpoint's encoder, quant_conv
    and latent statistics are init's bit for bit, the export keeps init's statistics (no recalibration), and an
    export whose encoder no longer matches init is refused."""
    from safetensors.torch import load_file, save_file

    from umm_ops.cli import main
    from umm_ops.model.vae import resolve_vae_weights

    init = tmp_path / "init.safetensors"
    ref = load_file(resolve_vae_weights("tiny-world-vae"))
    save_file(ref, str(init))
    out = tmp_path / "run"
    s = train(_cfg(out, job__steps=3, recipe__init=str(init), recipe__train="decoder", recipe__sizes=(32,),
                   recipe__eval_images=2, optim__lr=1e-2))
    assert s["eval"]["32"]["n"] == 2
    f = tmp_path / "vae.safetensors"
    assert main(["export", str(out), "--out", str(f)]) == 0
    got = load_file(str(f))
    assert set(got) == set(ref)
    enc = [k for k in ref if k.split(".")[0] in ("encoder", "quant_conv", "bn")]
    dec = [k for k in ref if k.split(".")[0] in ("decoder", "post_quant_conv")]
    assert enc and dec and len(enc) + len(dec) == len(ref)
    assert all(torch.equal(got[k], ref[k]) for k in enc)
    assert any(not torch.equal(got[k], ref[k]) for k in dec)   # the decoder trained
    info = json.loads((tmp_path / "vae.safetensors.json").read_text())
    assert "kept from" in info["calibrated_on"] and len(info["init_blake2b"]) == 32
    bad = dict(ref)
    bad["encoder.conv_in.weight"] = ref["encoder.conv_in.weight"] + 1e-3
    save_file(bad, str(init))
    with pytest.raises(ValueError, match="encoder differs from recipe.init"):
        export_vae(out, tmp_path / "y.safetensors")


def test_decoder_only_trains_only_the_decoder():
    from umm_ops.model.config import preset

    m = VAETrainer(preset("tiny").vae, train="decoder")
    trained = {n.split(".")[1] for n, p in m.named_parameters() if p.requires_grad}
    assert trained == {"decoder", "post_quant_conv"}
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    m(x, torch.randn(2, 32, 4, 4), kl_weight=1e-6, color_weight=5.0)["loss"].backward()
    assert all(p.grad is None for n, p in m.named_parameters() if n.split(".")[1] in ("encoder", "quant_conv"))
    assert all(p.grad is not None for n, p in m.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="recipe.train = 'decoder' keeps the encoder of recipe.init"):
        Config.build("vae", overrides=["recipe.train=decoder"])
    with pytest.raises(ConfigError, match="recipe.train = 'encoder': use 'all' or 'decoder'"):
        Config.build("vae", overrides=["recipe.train=encoder"])


def test_one_size_on_the_command_line_is_a_one_item_tuple():
    assert Config.build("vae", overrides=["recipe.sizes=64"]).recipe.sizes == (64,)
    assert Config.build("vae", overrides=["recipe.sizes=64,128"]).recipe.sizes == (64, 128)
    with pytest.raises(ConfigError, match="recipe.sizes = True"):
        Config.build("vae", overrides=["recipe.sizes=true"])
