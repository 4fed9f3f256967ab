"""The released Cheers conventions (profile "cheers") against outputs recorded by running the RELEASED code.

tests/fixtures/cheers_released.{safetensors,json} were written by scripts/record_cheers_fixtures.py, which runs
AI9Stars/Cheers (commit da1cb77, Training/cheers_config/*.py, transformers 4.51.3) on a tiny random model whose
weights are tests/helpers/cheers_released.tiny_released_state(names, seed) in the released names; here the same
weights go through from_cheers_checkpoint (the released-name converter) and our public API must reproduce the
recorded ids, velocities, latents, pixels and logits to float32 tolerance.  Each convention switched off on its
own must then move the result far from the recording.
"""
import dataclasses
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
from cheers_released import tiny_released_state, write_qwen_like_tokenizer  # noqa: E402

from umm_ops.model import generate as G  # noqa: E402
from umm_ops.model.checkpoint import cheers_config_from_released, from_cheers_checkpoint  # noqa: E402
from umm_ops.model.profile import CHEERS_TOKEN_IDS, CHEERS_TOKENS, dummy_image, letterbox, square_resize  # noqa: E402

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "cheers_released")
# float32 tolerance: the released model and ours run the same float32 arithmetic in different kernel orders
# (sdpa vs span attention, einops vs pack_latents); measured worst (max abs error / max abs value): 2.5e-6
# on the velocities, 3.7e-6 on the final latent, 8.2e-6 on the pixels, 4e-7 on the logits
RTOL = 5e-5


def _close(got, want, what, rtol=RTOL):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs recorded {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * max(scale, 1e-3), f"{what}: max |ours - released| = {err:.3g} (scale {scale:.3g})"


def _far(got, want, what):
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        return
    err = (got - want).abs().max().item()
    assert err > 100 * RTOL * max(want.abs().max().item(), 1e-3), f"{what}: switching it off left the result at " \
                                                                     f"{err:.3g} from the released one"


@pytest.fixture(scope="module")
def rec():
    from safetensors.torch import load_file

    with open(FIX + ".json") as f:
        meta = json.load(f)
    return meta, load_file(FIX + ".safetensors")


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    return write_qwen_like_tokenizer(tmp_path_factory.mktemp("qwen_like"))


@pytest.fixture(scope="module")
def cheers(rec, tokdir):
    meta, _ = rec
    state = tiny_released_state(meta["names"], meta["seed"])
    model = from_cheers_checkpoint(state_dict=state, config=meta["config"], tokenizer=tokdir)
    assert model.config.image_size == meta["resolution"]        # the ViT's size, the processor's resolution here
    return model


@pytest.fixture
def model(cheers):
    """The module's model, its profile restored after each test (tests switch conventions off one by one)."""
    p = cheers.profile
    yield cheers
    cheers.profile = p


def _latent(z):
    """released (..., 128, h, w) -> ours (..., h*w, 128)"""
    return z.flatten(-2).transpose(-1, -2)


def _collapse_image(ids, model):
    """Our ids with each run of image placeholders written as the released processor's single -200."""
    pad = model.tokenizer.special("<image>")
    out, prev = [], None
    for t in ids.tolist():
        if t == pad:
            if prev != pad:
                out.append(-200)
        else:
            out.append(t)
        prev = t
    return torch.tensor(out)


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_gets_the_five_tokens_in_order(tokdir, tmp_path):
    from umm_ops.data.tokenizer import HFTokenizer, load_tokenizer

    plain = load_tokenizer(tokdir)
    assert all(t not in plain.tokenizer.get_vocab() for t in CHEERS_TOKENS)
    tok = load_tokenizer(tokdir, profile="cheers")
    assert [tok.special(t) for t in CHEERS_TOKENS] == list(CHEERS_TOKEN_IDS) == [151665, 151666, 151667, 151668,
                                                                                 151669]
    assert tok.encode("<im_start><image><im_end>") == [151667, 151665, 151668]
    # a folder that already has them (saved after the addition): kept, ids checked
    tok.tokenizer.save_pretrained(tmp_path / "with")
    again = load_tokenizer(tmp_path / "with", profile="cheers")
    assert [again.special(t) for t in CHEERS_TOKENS] == list(CHEERS_TOKEN_IDS)
    # present at other ids: refused, naming expected and given
    wrong = HFTokenizer(tokdir)
    wrong.tokenizer.add_tokens(["<pad_me>"], special_tokens=True)
    for t in CHEERS_TOKENS:
        wrong.tokenizer.add_tokens([t], special_tokens=True)
    wrong.tokenizer.save_pretrained(tmp_path / "wrong")
    with pytest.raises(ValueError, match=r"have ids \[151666.*expected \[151665"):
        load_tokenizer(tmp_path / "wrong", profile="cheers")
    # some present, some not: refused
    part = HFTokenizer(tokdir)
    part.tokenizer.add_tokens(["<image>"], special_tokens=True)
    part.tokenizer.save_pretrained(tmp_path / "part")
    with pytest.raises(ValueError, match="expected all of"):
        load_tokenizer(tmp_path / "part", profile="cheers")
    with pytest.raises(ValueError, match="needs a Hugging Face tokenizer folder"):
        load_tokenizer("byte", profile="cheers")


# ------------------------------------------------------------------------------------------------ text to image
def test_t2i_prompt_ids_of_both_branches(model, rec):
    meta, fx = rec
    t = meta["t2i"]
    ids = G.prompt_ids(model, t["prompt"], image=True)
    assert ids.tolist() == fx["t2i.input_ids"].tolist()
    assert model.tokenizer.decode(ids) == t["text"] + "<im_start>"
    assert model.null_prompt_ids(ids).tolist() == fx["t2i.uncond_ids"].tolist()


def test_dummy_image_is_the_released_draw(model, rec):
    meta, fx = rec
    d = dummy_image(meta["seed"], meta["resolution"], model.profile)
    assert torch.equal((d * 255).round().to(torch.uint8), fx["t2i.dummy"])
    d = dummy_image(meta["seed"] + 2, meta["resolution"], model.profile)
    assert torch.equal((d * 255).round().to(torch.uint8), fx["t2t.dummy"])


def test_t2i_per_step_velocities_of_both_branches(model, rec):
    meta, fx = rec
    t = meta["t2i"]
    dummy = fx["t2i.dummy"].float() / 255
    for n in range(t["steps"]):
        x = _latent(fx["t2i.x_t"][n])[None]
        tn = float(fx["t2i.t"][n])
        v_c = G.velocity(model, t["prompt"], x, tn, cfg_scale=1.0, dummy_image=dummy)
        v_u = G.velocity(model, t["prompt"], x, tn, cfg_scale=0.0, dummy_image=dummy)
        _close(v_c[0], _latent(fx["t2i.v_cond"][n]), f"conditional velocity at step {n}")
        _close(v_u[0], _latent(fx["t2i.v_uncond"][n]), f"unconditional velocity at step {n}")


def _t2i(model, meta, fx, **kw):
    t = meta["t2i"]
    return model.generate_image(t["prompt"], steps=t["steps"], cfg_scale=t["cfg_scale"], time_shift=t["alpha"],
                                seed=meta["seed"], init_noise=_latent(fx["t2i.x_t"][0])[None], **kw)


def test_t2i_grid_final_latent_and_pixels(model, rec):
    meta, fx = rec
    out = _t2i(model, meta, fx)
    assert torch.equal(out["timesteps"].double(), fx["t2i.t"])        # the float32 grid, exactly
    _close(out["latents"][0], _latent(fx["t2i.latent"]), "final latent")
    assert float(out["images"].min()) >= 0.0 and float(out["images"].max()) <= 1.0
    _close(out["images"][0], fx["t2i.pixels"], "decoded pixels (clamped to [0, 1])")


def test_edit_from_the_image_ids_grid_latent_pixels(model, rec):
    """generate(edit_image=True) of the released code: the prompt [<im_start><image><im_end> instruction] in the
    template, the null prompt keeping the image, x = 0.1 z_image + 0.9 noise, int(0.9 steps) points from 0.1."""
    meta, fx = rec
    e = meta["edit"]
    img = letterbox(fx["edit.image"].numpy(), meta["resolution"])
    assert torch.equal(img, fx["edit.pixels_in"])
    instruction = e["content"].split("<im_end>", 1)[1]
    from umm_ops.data.packing import ImageItem, Sample, TextItem

    ids = G.prompt_ids(model, Sample([ImageItem(img), TextItem(instruction)]), image=True)
    assert _collapse_image(ids, model).tolist() == fx["edit.input_ids"].tolist()
    assert _collapse_image(model.null_prompt_ids(ids), model).tolist() == fx["edit.uncond_ids"].tolist()
    out = model.edit_image(img, instruction, steps=e["steps"], cfg_scale=e["cfg_scale"], time_shift=e["alpha"],
                           start_t=e["start_t"], init_noise=_latent(fx["edit.noise"])[None], return_trajectory=True)
    assert torch.equal(out["timesteps"].double(), fx["edit.t"])
    for n in range(fx["edit.t"].numel()):
        _close(out["trajectory"][0, n], _latent(fx["edit.x_t"][n]), f"edit: x at point {n}")
    _close(out["latents"][0], _latent(fx["edit.latent"]), "edit: final latent")
    _close(out["images"][0], fx["edit.pixels"], "edit: decoded pixels")
    # from noise instead (start_t off): far from the released edit
    _far(model.edit_image(img, instruction, steps=e["steps"], cfg_scale=e["cfg_scale"], time_shift=e["alpha"],
                          init_noise=_latent(fx["edit.noise"])[None])["latents"][0], _latent(fx["edit.latent"]),
         "edit start")
    with pytest.raises(ValueError, match="needs sampler='cheers' and 0 < start_t < 1"):
        model.edit_image(img, instruction, steps=2, start_t=1.5)


# ------------------------------------------------------------------------------------------------ understanding
def _i2t_prompt(meta, fx, profile_pre=letterbox):
    from umm_ops.data.packing import ImageItem, Sample, TextItem

    img = profile_pre(fx["i2t.image"].numpy(), meta["resolution"])
    return Sample([ImageItem(img), TextItem(meta["i2t"]["content"].split("<im_end>", 1)[1])]), img


def _logits_match(logits, fx, key, what):
    _close(logits[fx[f"{key}.logit_ids"]], fx[f"{key}.logits"], what)
    _close(torch.logsumexp(logits.double(), 0).reshape(1), fx[f"{key}.logsumexp"], what + " (logsumexp)")


def test_i2t_preprocessing_ids_logits_and_greedy(model, rec):
    meta, fx = rec
    prompt, img = _i2t_prompt(meta, fx)
    assert torch.equal(img, fx["i2t.pixels"])                    # letterbox: bicubic, centred on black, [0, 1]
    ids = G.prompt_ids(model, prompt)
    assert _collapse_image(ids, model).tolist() == fx["i2t.input_ids"].tolist()
    _logits_match(G.next_token_logits(model, prompt)[0], fx, "i2t", "first-token logits")
    n = fx["i2t.generated"].numel()
    _, gen = model.generate_text(prompt, max_new_tokens=n, return_ids=True)
    assert gen[0] == fx["i2t.generated"].tolist()


def test_t2t_ids_logits_and_greedy(model, rec):
    meta, fx = rec
    t = meta["t2t"]
    assert G.prompt_ids(model, t["content"]).tolist() == fx["t2t.input_ids"].tolist()
    seed = meta["seed"] + 2
    _logits_match(G.next_token_logits(model, t["content"], seed=seed)[0], fx, "t2t", "first-token logits")
    n = fx["t2t.generated"].numel()
    _, gen = model.generate_text(t["content"], max_new_tokens=n, seed=seed, return_ids=True)
    assert gen[0] == fx["t2t.generated"].tolist()
    # token-id prompts: the same prompt as ids (as the released processor gives them) decodes the same
    _logits_match(G.next_token_logits(model, fx["t2t.input_ids"], seed=seed)[0], fx, "t2t", "logits from ids")


# ------------------------------------------------------------------------------------------------ each convention
def _switch(model, **kw):
    model.profile = dataclasses.replace(model.profile, **kw)


def test_without_the_system_turn(model, rec):
    meta, fx = rec
    _switch(model, system_prompt=None)
    assert G.prompt_ids(model, meta["t2i"]["prompt"], image=True).tolist() != fx["t2i.input_ids"].tolist()


def test_without_the_chat_template(model, rec):
    meta, fx = rec
    _switch(model, chat=False)
    assert G.prompt_ids(model, meta["t2i"]["prompt"], image=True).tolist() != fx["t2i.input_ids"].tolist()


def test_without_the_cheers_image_tokens(model, rec):
    meta, fx = rec
    _switch(model, image_start="<|vision_start|>", image_end="<|vision_end|>", image_pad="<|image_pad|>")
    assert G.prompt_ids(model, meta["t2i"]["prompt"], image=True).tolist() != fx["t2i.input_ids"].tolist()
    prompt, _ = _i2t_prompt(meta, fx)
    _far(G.next_token_logits(model, prompt)[0][fx["i2t.logit_ids"]], fx["i2t.logits"], "image tokens")


def test_without_the_no_mean_null_prompt(model, rec):
    meta, fx = rec
    t = meta["t2i"]
    _switch(model, null_token=None)
    ids = G.prompt_ids(model, t["prompt"], image=True)
    assert model.null_prompt_ids(ids).tolist() != fx["t2i.uncond_ids"].tolist()
    x = _latent(fx["t2i.x_t"][1])[None]
    v_u = G.velocity(model, t["prompt"], x, float(fx["t2i.t"][1]), cfg_scale=0.0,
                     dummy_image=fx["t2i.dummy"].float() / 255)
    _far(v_u[0], _latent(fx["t2i.v_uncond"][1]), "null prompt")


def test_without_the_dummy_image(model, rec):
    meta, fx = rec
    _switch(model, dummy_image=False)
    _far(G.next_token_logits(model, meta["t2t"]["content"], seed=meta["seed"] + 2)[0][fx["t2t.logit_ids"]],
         fx["t2t.logits"], "dummy image (text-only chat)")
    _far(_t2i(model, meta, fx)["latents"][0], _latent(fx["t2i.latent"]), "dummy image (text to image)")


def test_without_the_released_sampler_grid(model, rec):
    meta, fx = rec
    _switch(model, sampler="euler")
    _far(_t2i(model, meta, fx)["latents"][0], _latent(fx["t2i.latent"]), "sampler grid")


def test_without_the_0_1_pixel_range(model, rec):
    meta, fx = rec
    _switch(model, pixel_range=(-1.0, 1.0))
    _far(G.next_token_logits(model, meta["t2t"]["content"], seed=meta["seed"] + 2)[0][fx["t2t.logit_ids"]],
         fx["t2t.logits"], "pixel range (dummy image input)")
    out = _t2i(model, meta, fx)
    assert float(out["images"].min()) < 0.0                      # no longer clamped to [0, 1]
    _far(out["images"][0], fx["t2i.pixels"], "pixel range (output)")


def test_without_the_letterbox(model, rec):
    meta, fx = rec
    _, img = _i2t_prompt(meta, fx, square_resize)
    _far(img, fx["i2t.pixels"], "letterbox preprocessing")


# ------------------------------------------------------------------------------------------------ loading, saving
def test_released_config_reads_the_vae_geometry(rec):
    meta, _ = rec
    cfg = cheers_config_from_released(meta["config"])
    assert (cfg.vae.latent_channels, cfg.vae.block_out_channels, cfg.vae.layers_per_block) == (32, (128,) * 4, 1)
    assert cfg.profile == "cheers" and cfg.image_size == 64
    full = cheers_config_from_released({})                      # configuration_umm.py's defaults: the FLUX.2 VAE
    assert full.vae.block_out_channels == (128, 256, 512, 512) and full.vae.layers_per_block == 2
    bad = json.loads(json.dumps(meta["config"]))
    bad["vae_decoder_config"]["ch"] = 64
    with pytest.raises(ValueError, match="differ"):
        cheers_config_from_released(bad)
    bad["vae_encoder_config"]["ch"] = 64
    with pytest.raises(ValueError, match=r"ch == 4 \* z_channels"):
        cheers_config_from_released(bad)


@pytest.fixture(scope="module")
def released_folder(rec, tokdir, tmp_path_factory):
    """A folder laid out as the released checkpoint: config.json (model_type "umm"), model.safetensors in the
    released names, the tokenizer files (without the five Cheers tokens: they are added on load)."""
    from safetensors.torch import save_file

    meta, _ = rec
    folder = tmp_path_factory.mktemp("released")
    save_file(tiny_released_state(meta["names"], meta["seed"]), str(folder / "model.safetensors"))
    with open(folder / "config.json", "w") as f:
        json.dump(dict(meta["config"], model_type="umm", architectures=["Cheers"]), f)
    for n in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tokdir, n)) as src, open(folder / n, "w") as dst:
            dst.write(src.read())
    return folder


def test_single_file_folder_and_saved_model(cheers, rec, tokdir, released_folder, tmp_path):
    from safetensors.torch import save_file

    from umm_ops.model.cheers import CheersModel

    meta, fx = rec
    state = tiny_released_state(meta["names"], meta["seed"])
    ref = cheers.state_dict()
    # one safetensors file (config given) and a released-style folder (config.json + weights + tokenizer)
    save_file(state, str(tmp_path / "cheers.safetensors"))
    one = from_cheers_checkpoint(tmp_path / "cheers.safetensors", config=meta["config"], tokenizer=tokdir)
    fold = from_cheers_checkpoint(released_folder)
    for m in (one, fold):
        assert m.profile.name == "cheers"
        assert all(torch.equal(ref[k], v) for k, v in m.state_dict().items())
    # a saved model records its profile and reloads with it
    cheers.save_pretrained(tmp_path / "ours")
    with open(tmp_path / "ours" / "config.json") as f:
        assert json.load(f)["config"]["profile"] == "cheers"
    back = CheersModel.from_pretrained(tmp_path / "ours")
    assert back.profile.name == "cheers" and back.tokenizer.special("<no_mean>") == 151669
    seed = meta["seed"] + 2
    _logits_match(G.next_token_logits(back, meta["t2t"]["content"], seed=seed)[0], fx, "t2t", "reloaded logits")
    # bad inputs name what was expected
    with pytest.raises(ValueError, match="exactly one of source"):
        from_cheers_checkpoint()
    with pytest.raises(ValueError, match="no config"):
        from_cheers_checkpoint(state_dict=state, tokenizer=tokdir)
    with pytest.raises(ValueError, match="needs a Hugging Face tokenizer folder"):
        from_cheers_checkpoint(state_dict=state, config=meta["config"])


def test_bad_inputs_under_the_cheers_profile(model, rec):
    meta, fx = rec
    img = torch.zeros(3, 64, 64) - 0.5
    with pytest.raises(ValueError, match=r"in \[0, 1\] \(profile 'cheers'\), got min -0.5"):
        model.edit_image(img, "make it red", steps=1)
    with pytest.raises(ValueError, match="must end with the image start token '<im_start>' \\(id 151667\\)"):
        model.generate_image(fx["t2i.input_ids"][:-1], steps=1)
    with pytest.raises(ValueError, match="dummy_image must be a \\(3, 64, 64\\) tensor"):
        model.generate_image("x", steps=1, dummy_image=torch.zeros(3, 32, 32))
    # mode "sde" runs on the released grid (online RL): the steps t_n -> t_{n+1} stochastic, the final
    # x + v(1) / steps deterministic (log-prob 0)
    out = model.generate_image("x", steps=3, mode="sde", cfg_scale=1.0)
    assert out["logprobs"].shape == (1, 3) and float(out["logprobs"][0, 2]) == 0.0
    assert bool((out["logprobs"][0, :2] != 0).all()) and out["trajectory"].shape[1] == 4
    ode = model.generate_image("x", steps=3, cfg_scale=1.0)
    assert not torch.equal(out["latents"], ode["latents"])
    with pytest.raises(ValueError, match=r"sde_steps must be step indices in \[0, 3\)"):
        model.generate_image("x", steps=3, mode="sde", sde_steps={3})


def test_project_profile_stays_the_default():
    from umm_ops.model.cheers import CheersModel

    m = CheersModel("tiny")
    assert m.config.profile == "umm" and m.profile.name == "umm"
    assert m.pack_spec().image_token_names == ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
    assert m.profile.sampler == "euler" and m.profile.pixel_range == (-1.0, 1.0) and not m.profile.dummy_image


def test_cli_on_the_released_folder(cheers, rec, released_folder, tmp_path, capsys):
    """`umm generate` on a released folder: loaded with the "cheers" profile; --text --image letterboxes the picture
    into [0, 1]; the written PNG is the API's image ([0, 1] -> 8 bits)."""
    import numpy as np
    from PIL import Image

    from umm_ops.cli import main
    from umm_ops.data.packing import ImageItem, Sample, TextItem

    meta, fx = rec
    pic = tmp_path / "pic.png"
    Image.fromarray(fx["i2t.image"].numpy()).save(pic)
    args = ["generate", str(released_folder), "--max-new-tokens", "3", "--seed", "5"]
    assert main(args + ["--text", "--prompt", "What is it?", "--image", str(pic)]) == 0
    img = letterbox(fx["i2t.image"].numpy(), meta["resolution"])
    want = cheers.generate_text(Sample([ImageItem(img), TextItem("What is it?")]), max_new_tokens=3, seed=5)[0]
    assert capsys.readouterr().out == want + "\n"
    png = tmp_path / "out.png"
    assert main(["generate", str(released_folder), "--prompt", "a cube", "--steps", "2", "--cfg", "2",
                 "--seed", "3", "--out", str(png)]) == 0
    x = cheers.generate_image("a cube", steps=2, cfg_scale=2.0, seed=3)["images"][0]
    got = torch.from_numpy(np.asarray(Image.open(png)).copy()).permute(2, 0, 1)
    assert torch.equal(got, (x * 255).round().to(torch.uint8))


def test_packer_labels_under_each_profile(cheers):
    """Training layout: under "cheers" an image is <im_start> <image>*n <im_end> and the <im_start> of a generated
    image is the target after the prompt (released labels); <im_end> never is.  Under "umm" no wrapper is."""
    from umm_ops.data.packing import ImageItem, Sample, TextItem, encode_sample
    from umm_ops.model.cheers import CheersModel

    sample = Sample([TextItem("draw"), ImageItem(torch.zeros(3, 64, 64), "generate"), TextItem("done", loss=True)])
    d = encode_sample(sample, cheers.pack_spec(), 0)
    ids, labels = d.input_ids.tolist(), d.labels.tolist()
    start, end = ids.index(151667), ids.index(151668)
    assert ids[start + 1:end] == [151665] * 4 and labels[start - 1] == 151667 and 151668 not in labels
    tiny = CheersModel("tiny")
    d = encode_sample(sample, tiny.pack_spec(), 0)
    vs = tiny.tokenizer.special("<|vision_start|>")
    assert vs in d.input_ids.tolist() and vs not in d.labels.tolist()
    switched = encode_sample(sample, cheers.pack_spec(label_image_start=False), 0)
    assert 151667 not in switched.labels.tolist()


def test_lower_level_entry_points(model, rec):
    """Token-id prompts (the released processor's ids) give the released latent too; a caller's torch.Generator
    draws the initial noise (the same as init_noise drawn from it) and the text sampling."""
    meta, fx = rec
    t = meta["t2i"]
    kw = dict(steps=t["steps"], cfg_scale=t["cfg_scale"], time_shift=t["alpha"])
    out = model.generate_image(fx["t2i.input_ids"], seed=meta["seed"], init_noise=_latent(fx["t2i.x_t"][0])[None],
                               **kw)
    _close(out["latents"][0], _latent(fx["t2i.latent"]), "final latent from token ids")
    n, C = model.latent_shape((64, 64))
    a = model.generate_image("a cube", seed=torch.Generator().manual_seed(7), dummy_image=fx["t2i.dummy"] / 255,
                             **kw)
    b = model.generate_image("a cube", init_noise=torch.randn(1, n, C, generator=torch.Generator().manual_seed(7)),
                             dummy_image=fx["t2i.dummy"] / 255, **kw)
    assert torch.equal(a["latents"], b["latents"])
    x = model.generate_text("hi", max_new_tokens=3, temperature=1.0, seed=torch.Generator().manual_seed(3),
                            return_ids=True)[1]
    y = model.generate_text("hi", max_new_tokens=3, temperature=1.0, seed=torch.Generator().manual_seed(3),
                            return_ids=True)[1]
    assert x == y
    with pytest.raises(ValueError, match="token ids must be a 1-D integer tensor"):
        model.generate_image(G.PromptIds(torch.zeros(3)), steps=1)


def test_unpack_under_each_profile(cheers):
    """unpack finds the profile's image placeholder (<image> under "cheers", <|image_pad|> under "umm")."""
    from umm_ops.data.packing import ImageItem, Sample, TextItem, pack, unpack

    sample = Sample([TextItem("look"), ImageItem(torch.zeros(3, 64, 64), "understand"), TextItem("ok", loss=True)])
    spec = cheers.pack_spec()
    (b,) = pack([sample], spec)
    assert 151665 in b.input_ids.tolist()
    got = unpack(b, spec.tokenizer)
    assert got[0].items[1].role == "understand" and torch.equal(got[0].items[1].image, sample.items[1].image)
    assert unpack(b, spec.tokenizer, image_token="<image>")[0].items[2].text == "ok"
    with pytest.raises(ValueError, match="does not hold one placeholder id"):
        unpack(b, spec.tokenizer, image_token="<|image_pad|>")


# ------------------------------------------------------------------------------------------------ training: text-only
@pytest.fixture(scope="module")
def rec_train():
    """tests/fixtures/cheers_released_train.*: `python scripts/record_cheers_fixtures.py train` (the released
    Cheers.forward with labels on a text-only chat sample, as train_cheers.py process_sample prepares it)."""
    from safetensors.torch import load_file

    with open(FIX + "_train.json") as f:
        meta = json.load(f)
    return meta, load_file(FIX + "_train.safetensors")


def _text_only(meta):
    from umm_ops.data.packing import Sample, TextItem

    return Sample([TextItem(t, loss=bool(trained)) for t, trained in meta["case"]["turns"]])


def _grad_norm(model, prefix):
    gs = [p.grad.double().pow(2).sum() for n, p in model.named_parameters() if n.startswith(prefix)
          and p.grad is not None]
    return float(torch.stack(gs).sum().sqrt())


def test_training_text_only_sample_gets_the_released_black_image(cheers, rec_train):
    """Released training (train_cheers.py process_sample, modeling_umm.py): a sample without images gets a black
    image of the model's size at t = 0 in front - causal, no wrappers, no labels - whose head output is trained
    against x1 - noise.  Packed with the model's pack_spec, our training forward reproduces the released one:
    ids, labels, the head's output and target, text / image / total loss and the gradients."""
    from umm_ops.data.packing import pack

    meta, fx = rec_train
    case = meta["case"]
    model = cheers
    n = (meta["resolution"] // model.config.pixels_per_token) ** 2
    batch = pack([_text_only(meta)], model.pack_spec())[0]
    assert batch.input_ids[:n].tolist() == [model.tokenizer.special("<image>")] * n
    assert torch.equal(batch.input_ids[n:], fx["input_ids"])
    # released labels are the target ids in place; ours are shifted (labels[i] = the target token i + 1)
    assert torch.equal(batch.labels[n - 1:-1], fx["labels"]) and set(batch.labels[:n - 1].tolist()) == {-100}
    assert batch.image_spans.tolist() == [[0, n, 1]] and batch.timesteps.tolist() == [0.0]
    assert torch.equal(batch.images[0], fx["pixel_values"]) and float(fx["pixel_values"].abs().max()) == 0.0
    assert batch.text_only_image.tolist() == [True]
    was = model.training
    model.zero_grad(set_to_none=True)
    try:
        out = model(batch, noise=[fx["noise"]], return_outputs=True)
        out["loss"].backward()
        _close(out["v_pred"][0][0].detach(), fx["v"], "head output on the black image")
        _close(out["v_target"][0][0], fx["target"], "its flow target x1 - noise")
        _close(out["text_loss"].reshape(1), torch.tensor([case["text_loss"]]), "text loss")
        _close(out["flow_loss"].reshape(1), torch.tensor([case["image_loss"]]), "image loss")
        _close(out["loss"].detach().reshape(1), torch.tensor([case["loss"]]), "total loss")
        assert out["flow_images"] == 1
        for released, ours in (("model.gen_projector", "head.gen_projector."), ("model.hi_gate", "head.hi_gate."),
                               ("model.hi_projector", "head.hi_projector."),
                               ("model.language_model.embed_tokens", "llm.model.embed_tokens.")):
            _close(torch.tensor([_grad_norm(model, ours)]), torch.tensor([case["grad_norms"][released]]),
                   f"gradient norm of {ours}", rtol=1e-4)
        # switched off: no black image, nothing for the head, and the text sees another context
        off = model(pack([_text_only(meta)], model.pack_spec(text_only_image=None))[0])
        assert off["flow_images"] == 0
        _far(off["text_loss"].reshape(1), torch.tensor([case["text_loss"]]), "text loss without the black image")
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)


def test_text_only_image_is_training_only_and_cheers_only(cheers, rec_train):
    """Only the cheers profile's training packer adds it: the umm profile packs a text-only sample unchanged,
    generation builds prompts without it, unpack gives the sample back without it, CFG dropout leaves its sample
    alone (released: only samples with a generated image become CFG data), and the SFT encoder adds it."""
    from umm_ops.data.packing import ImageItem, PackSpec, Sample, TextItem, pack, unpack
    from umm_ops.model.cheers import CheersModel
    from umm_ops.train import policy
    from umm_ops.train.recipes.sft import Encoder

    meta, _ = rec_train
    sample = _text_only(meta)
    tiny = CheersModel("tiny")
    assert tiny.pack_spec().text_only_image is None and tiny.profile.text_only_image is False
    assert pack([Sample([TextItem("hello", loss=True)])], tiny.pack_spec())[0].images == []
    assert cheers.pack_spec().text_only_image == (meta["resolution"], 0.0)
    t2i = Sample([TextItem("draw"), ImageItem(torch.rand(3, 64, 64), "generate")])
    batch = pack([sample, t2i], cheers.pack_spec())[0]
    assert batch.text_only_image.tolist() == [True, False]
    got = unpack(batch, cheers.tokenizer)
    assert got[0].items == sample.items and got[1].items[1] == t2i.items[1]
    ids = policy.cfg_dropout(cheers, batch, 1.0, seed=0)
    o = batch.doc_offsets.tolist()
    assert torch.equal(ids[:o[1]], batch.input_ids[:o[1]])                         # the text-only sample: kept
    assert not torch.equal(ids[o[1]:], batch.input_ids[o[1]:])                     # the text-to-image one: dropped
    doc = Encoder(cheers.pack_spec())(sample, 3, 0)
    assert doc.text_only_image and doc.timesteps == [0.0] and doc.segments[0][1] == "causal"
    # generation's prompts never hold it (the dummy image of the released inference is another thing: t = 1)
    assert G.prompt_ids(cheers, "hello").tolist().count(cheers.tokenizer.special("<image>")) == 0
    with pytest.raises(ValueError, match="text_only_image must be None or"):
        PackSpec(tokenizer=cheers.tokenizer, text_only_image=(50, 0.0))


def test_cli_eval_on_the_released_folder(cheers, released_folder, tmp_path, capsys):
    """`umm eval` on a released folder: loaded with the "cheers" profile, its tasks feed and read [0, 1] pixels
    (vqa's images pass the model's range check; geneval's images are the API's, read in [0, 1])."""
    from umm_ops.cli import main

    js = tmp_path / "res.json"
    assert main(["eval", str(released_folder), "--tasks", "vqa,geneval", "--n", "2", "--image-size", "64",
                 "--steps", "2", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert set(res["tasks"]) == {"vqa", "geneval"} and res["tasks"]["vqa"]["n"] == 2
    assert str(released_folder) in capsys.readouterr().out
