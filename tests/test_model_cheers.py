"""CheersModel (tiny preset) at model level: masks, packing independence, fused vs reference ops, gradients,
the forward's explicit inputs (noise, input_ids), seeded generation, KV-cache decoding, overfitting, presets and
their parameter counts.  The training policy that draws noise / CFG dropout: tests/test_train_policy.py."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import tiny_model_open_gates, with_cheers_head

import umm_ops
from umm_ops.data.packing import ROLES, ImageItem, Sample, TextItem, pack
from umm_ops.model.cheers import CheersModel
from umm_ops.model.config import CheersConfig, preset
from tolerance import assert_close_rule


def _img(seed, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def model():
    return tiny_model_open_gates()


def _noise(model, batch, seed=0):
    """Explicit flow noise for the batch's generated images (None for the others); a training recipe draws it with
    umm_ops.train.policy.flow_noise."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(model.latent_shape(img.shape[-2:]), generator=g) if role == ROLES["generate"] else None
            for img, role in zip(batch.images, batch.image_spans[:, 2].tolist())]


def _samples(size=32):
    return [Sample([TextItem("draw a red box"), ImageItem(_img(10, size), "generate")]),
            Sample([ImageItem(_img(11, size), "understand"), TextItem("what is it?"), TextItem("a box", loss=True)])]


def _hidden(model, samples, **kw):
    b = pack(samples, model.pack_spec(**kw))[0]
    out = model(b, noise=_noise(model, b), return_outputs=True)
    return b, out


# ------------------------------------------------------------------ masks at model level
def test_later_text_never_changes_earlier_states(model):
    a = Sample([TextItem("hello there"), ImageItem(_img(1), "understand"), TextItem("abc", loss=True)])
    b = Sample([TextItem("hello there"), ImageItem(_img(1), "understand"), TextItem("abX", loss=True)])
    with torch.no_grad():
        _, oa = _hidden(model, [a])
        _, ob = _hidden(model, [b])
    L = oa["hidden"].shape[0]
    torch.testing.assert_close(oa["hidden"][:L - 1], ob["hidden"][:L - 1], rtol=0, atol=0)
    assert not torch.equal(oa["hidden"][L - 1], ob["hidden"][L - 1])


def test_image_tokens_see_each_other(model):
    """Changing only the bottom-right quarter of an understood image changes the state of the image's FIRST token
    (it sees later tokens of its own block), and every later text token."""
    x = _img(2)
    y = x.clone()
    y[:, 32:, 32:] = -y[:, 32:, 32:]
    with torch.no_grad():
        ba, oa = _hidden(model, [Sample([TextItem("look"), ImageItem(x, "understand"), TextItem("ok")])])
        _, ob = _hidden(model, [Sample([TextItem("look"), ImageItem(y, "understand"), TextItem("ok")])])
    start = int(ba.image_spans[0, 0])
    torch.testing.assert_close(oa["hidden"][:start], ob["hidden"][:start], rtol=0, atol=0)
    assert (oa["hidden"][start] - ob["hidden"][start]).abs().max() > 1e-4


@pytest.mark.parametrize("gen_mode", ["full", "noise"])
def test_noise_block_invisible_to_other_tokens(model, gen_mode):
    """BAGEL's noise mode hides a generated image from every later token; Cheers' full mode does not."""
    cfg = dataclasses.replace(model.config, gen_mode=gen_mode)
    old = model.config
    model.config = cfg
    try:
        with torch.no_grad():
            s = lambda im: [Sample([TextItem("make"), ImageItem(im, "generate"), TextItem("after")])]  # noqa: E731
            b, oa = _hidden(model, s(_img(3)))
            _, ob = _hidden(model, s(_img(4)))
    finally:
        model.config = old
    start, n = (int(v) for v in b.image_spans[0, :2])
    after = slice(start + n, None)
    diff = (oa["hidden"][after] - ob["hidden"][after]).abs().max()
    if gen_mode == "noise":
        assert diff == 0
    else:
        assert diff > 1e-4


def test_packed_batch_equals_each_sample_alone(model):
    """Documents of one packed batch do not interact: hidden states, text loss and (given the same noise for the
    generated image) the flow velocity of each sample equal those of the sample packed alone.  (The policy that draws
    that same noise for a sample in any batch: test_train_policy.py.)"""
    s0 = Sample([ImageItem(_img(5), "understand"), TextItem("q?"), TextItem("yes", loss=True)])
    s1 = Sample([TextItem("just text here"), TextItem(" and more", loss=True)])
    s2 = Sample([TextItem("hi"), ImageItem(_img(6, 96), "understand"), TextItem("wide")])
    s3 = Sample([TextItem("paint"), ImageItem(_img(9), "generate")])
    samples = [s0, s1, s2, s3]
    spec = model.pack_spec()
    with torch.no_grad():
        b = pack(samples, spec, seed=4)[0]
        noise = _noise(model, b, 11)
        packed = model(b, noise=noise, return_outputs=True)
        offs = b.doc_offsets.tolist()
        doc_of_image = (torch.searchsorted(b.doc_offsets, b.image_spans[:, 0].contiguous(), right=True) - 1).tolist()
        losses = []
        for d, s in enumerate(samples):
            alone_b = pack([s], spec, seed=4, sample_ids=[d])[0]
            alone = model(alone_b, noise=[z for z, di in zip(noise, doc_of_image) if di == d], return_outputs=True)
            # float32 rounding of the VAE / ViT calls batched with the other images of the same size: up to 1.05e-5
            # measured (2-core AMD EPYC, the committed code too); a leak between documents is O(1)
            torch.testing.assert_close(packed["hidden"][offs[d]:offs[d + 1]], alone["hidden"], rtol=1e-5, atol=2e-5)
            losses.append((alone["text_loss"] * alone["text_tokens"], alone["text_tokens"]))
            if d == 3:
                # (the head's conv stage reads the prompt's hidden states, equal within 2e-5 as above)
                torch.testing.assert_close(packed["v_pred"][0], alone["v_pred"][0], rtol=1e-5, atol=4e-5)
                torch.testing.assert_close(packed["flow_loss"], alone["flow_loss"], rtol=1e-5, atol=1e-6)
    total = sum(l for l, _ in losses) / sum(n for _, n in losses)
    torch.testing.assert_close(packed["text_loss"], total, rtol=1e-5, atol=1e-6)


def test_input_ids_replace_the_batch_ids(model):
    """input_ids= runs the model on other tokens of the same shape (e.g. the null prompt of CFG dropout, which
    umm_ops.train.policy.cfg_dropout draws): exactly as a batch holding those ids."""
    b = pack(_samples(), model.pack_spec(), seed=1)[0]
    null_ids = model.null_prompt_ids(b.input_ids)
    null = dataclasses.replace(b, input_ids=null_ids)
    noise = _noise(model, b)
    with torch.no_grad():
        via_arg = model(b, noise=noise, input_ids=null_ids, return_outputs=True)
        via_batch = model(null, noise=noise, return_outputs=True)
        ref = model(b, noise=noise, return_outputs=True)
        int32 = model(b, noise=noise, input_ids=null_ids.int(), return_outputs=True)
    for k in ("hidden", "loss", "flow_loss"):
        assert torch.equal(via_arg[k], via_batch[k]) and torch.equal(via_arg[k], int32[k]), k
    prompt = slice(0, int(b.image_spans[0, 0]))
    assert not torch.equal(via_arg["hidden"][prompt], ref["hidden"][prompt])


def test_noise_input_dtype_and_understanding_images(model):
    """The noise is converted to the latents' dtype / device; an understanding image runs at x_t = x1 with zero noise
    whatever tensor is given for it; a generated image's noise changes its x_t and target."""
    b = pack(_samples(), model.pack_spec(), seed=1)[0]
    noise = _noise(model, b)
    gen, und = (b.image_spans[:, 2] == ROLES["generate"]).tolist().index(True), 1
    assert noise[und] is None
    with torch.no_grad():
        ref = model(b, noise=noise, return_outputs=True)
        f64 = model(b, noise=[None if z is None else z.double() for z in noise], return_outputs=True)
        given = list(noise)
        given[und] = torch.randn(model.latent_shape(b.images[und].shape[-2:]))
        und_given = model(b, noise=given, return_outputs=True)
        other = list(noise)
        other[gen] = -noise[gen]
        other_out = model(b, noise=other, return_outputs=True)
    for out in (f64, und_given):
        assert torch.equal(out["hidden"], ref["hidden"]) and torch.equal(out["loss"], ref["loss"])
    assert not torch.equal(other_out["v_target"][0], ref["v_target"][0])


def test_forward_input_errors(model):
    """Missing or mis-shaped noise / input_ids: ValueErrors naming the image, the expected shape and what was given."""
    b = pack([Sample([TextItem("x"), ImageItem(_img(1, 32), "understand")]),
              Sample([TextItem("draw"), ImageItem(_img(2, 64), "generate")])], model.pack_spec())[0]
    with torch.no_grad():   # a latent token per 16x16 px (VAE 8x down, 2x2 packing): 32 px -> 4, 64 px -> 16
        model(b, noise=[None, torch.zeros(16, 128)])
    with pytest.raises(ValueError, match=r"image 1 is generated .* needs flow noise of shape \(16, 128\), but "
                                         r"noise=None was given"):
        model(b)
    with pytest.raises(ValueError, match=r"noise\[1\]: image 1 is generated .* shape \(16, 128\), got None"):
        model(b, noise=[None, None])
    with pytest.raises(ValueError, match=r"noise\[1\]: image 1 \(64x64 px\) needs flow noise of shape \(16, 128\) "
                                         r"\(n_vit, packed_channels\), got \(4, 128\)"):
        model(b, noise=[None, torch.zeros(4, 128)])
    with pytest.raises(ValueError, match=r"noise\[0\]: image 0 \(32x32 px\) needs flow noise of shape \(4, 128\)"):
        model(b, noise=[torch.zeros(16, 128), torch.zeros(16, 128)])
    with pytest.raises(ValueError, match=r"aligned with batch.images \(2 entries.*got list of 1"):
        model(b, noise=[torch.zeros(16, 128)])
    with pytest.raises(ValueError, match=r"noise\[1\]: flow noise must be a floating tensor"):
        model(b, noise=[None, torch.zeros(16, 128, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"input_ids must have the batch's shape \(%d,\)" % b.num_tokens):
        model(b, noise=[None, torch.zeros(16, 128)], input_ids=b.input_ids[:-1])
    with pytest.raises(ValueError, match=r"input_ids must hold integer token ids"):
        model(b, noise=[None, torch.zeros(16, 128)], input_ids=b.input_ids.float())


def test_und_flow_loss_adds_understanding_images_with_zero_target(model):
    b = pack(_samples(), model.pack_spec(), seed=2)[0]
    old = model.config.und_flow_loss
    try:
        with torch.no_grad():
            model.config.und_flow_loss = False
            a = model(b, noise=_noise(model, b), return_outputs=True)
            model.config.und_flow_loss = True
            c = model(b, noise=_noise(model, b), return_outputs=True)
    finally:
        model.config.und_flow_loss = old
    assert a["flow_images"] == 1 and c["flow_images"] == 2
    targets = torch.cat([t.flatten(1) for t in c["v_target"]])
    preds = torch.cat([v.flatten(1) for v in c["v_pred"]])
    und = (targets == 0).all(1)
    assert und.sum() == 1                                        # the understanding image: t = 1, target 0
    expected = ((preds - targets) ** 2).mean()
    torch.testing.assert_close(c["flow_loss"], expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a["flow_loss"], ((preds[~und] - targets[~und]) ** 2).mean(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ fused vs reference, gradients
def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch, noise=_noise(model, batch, 7))
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_fused_text_loss_switch(model):
    """config.fused_text_loss (default True): the text loss through umm_ops.linear_cross_entropy, no logits; False:
    the plain lm_head + F.cross_entropy path.  Same losses and gradients to float32 rounding."""
    assert model.config.fused_text_loss
    batch = pack(_samples(), model.pack_spec(), seed=3)[0]
    model.train()
    try:
        out_f, g_f = _loss_and_grads(model, batch)
        model.config.fused_text_loss = False
        out_p, g_p = _loss_and_grads(model, batch)
    finally:
        model.config.fused_text_loss = True
        model.eval()
        model.zero_grad(set_to_none=True)
    assert out_f["text_tokens"] == out_p["text_tokens"] > 0
    torch.testing.assert_close(out_f["text_loss"], out_p["text_loss"], rtol=1e-5, atol=1e-6)
    assert set(g_f) == set(g_p)
    for n in g_f:
        torch.testing.assert_close(g_f[n], g_p[n], rtol=1e-4, atol=1e-6, msg=n)


def test_token_logprobs_fused_and_plain(model):
    """losses.token_logprobs (RL's per-token log-probs / entropies of the labelled tokens): the fused path
    (linear_logprob on the head's weight) equals the plain log_softmax path, values and gradients."""
    from umm_ops.model.losses import token_logprobs

    batch = pack(_samples(), model.pack_spec(), seed=3)[0]
    with torch.no_grad():
        hidden = model(batch, noise=_noise(model, batch, 7), return_outputs=True)["hidden"]
    res = []
    for fused in (True, False):
        h = hidden.detach().clone().requires_grad_(True)
        w = model.llm.lm_head.weight if fused else None
        lp, ent = token_logprobs(h, batch.labels, model.llm.logits, w, temperature=0.9, return_entropy=True)
        (g,) = torch.autograd.grad(lp.sum() + 0.1 * ent.sum(), [h])
        res.append((lp, ent, g))
    assert res[0][0].shape == (int((batch.labels != -100).sum()),)
    for a, b in zip(res[0], res[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fused_vs_reference_ops_same_loss_and_grads(model):
    """Whole model, default (fused) backend vs umm_ops.use_backend("reference"), both float32, judged against a
    float64 run with the tolerance rule on the loss and on the gradient of every trainable part."""
    batch = pack(_samples(), model.pack_spec(), seed=3)[0]
    model.train()
    try:
        out_f, g_f = _loss_and_grads(model, batch)
        with umm_ops.use_backend("reference"):
            out_r, g_r = _loss_and_grads(model, batch)
            m64 = model.double()
            try:
                out_64, g_64 = _loss_and_grads(m64, batch)
            finally:
                model.float()
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    for k in ("loss", "text_loss", "flow_loss"):
        assert_close_rule(out_f[k].detach().reshape(1), out_64[k].detach().reshape(1),
                          out_r[k].detach().reshape(1), torch.float32, k, ulps=256)
    assert set(g_f) == set(g_r) == set(g_64)
    for part in ("llm.", "vit.", "vae.decoder_copy.", "und_projector.", "head.gen_projector.", "head.hi_gate.",
                 "head.hi_projector.", "head.time_embed."):
        names = [n for n in g_f if n.startswith(part)]
        assert names, part
        f = torch.cat([g_f[n].flatten() for n in names])
        r = torch.cat([g_r[n].flatten() for n in names])
        ref = torch.cat([g_64[n].flatten() for n in names])
        assert_close_rule(f, ref, r, torch.float32, f"grad {part}", ulps=256)


def test_gradients_reach_every_trainable_part_and_never_the_frozen_vae(model):
    batch = pack(_samples(), model.pack_spec(), seed=4)[0]
    model.train()
    try:
        _, grads = _loss_and_grads(model, batch)
    finally:
        model.eval()
    frozen = [n for n, p in model.named_parameters() if n.startswith("vae.frozen.")]
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    assert not any(n in grads for n in frozen)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (n not in grads
                                                                               or not grads[n].abs().sum() > 0)]
    # the ViT's position embedding table (8x8) resized bicubically to the 2x2 grid of 32 px images: every row is a tap
    assert no_grad == [], no_grad
    model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------ generation
def test_generate_image_is_seeded_and_reproducible(model):
    kw = dict(height=64, width=32, steps=2, cfg_scale=3.0)
    a = model.generate_image(["a red box", "blue"], seed=5, **kw)
    b = model.generate_image(["a red box", "blue"], seed=5, **kw)
    c = model.generate_image(["a red box", "blue"], seed=6, **kw)
    assert a["images"].shape == (2, 3, 64, 32) and a["images"].abs().max() <= 1
    assert torch.equal(a["latents"], b["latents"]) and not torch.equal(a["latents"], c["latents"])
    # sampling builds no autograd graph (even with grad enabled and trainable parameters)
    assert torch.is_grad_enabled() and not (a["images"].requires_grad or a["latents"].requires_grad)
    sde = model.generate_image(["a red box"], seed=5, mode="sde", sigma=0.3, **kw)
    assert sde["trajectory"].shape == (1, 3, 8, 128) and sde["logprobs"].shape == (1, 2)
    assert torch.isfinite(sde["logprobs"]).all()
    ts = sde["timesteps"].tolist()
    x0, x1 = sde["trajectory"][:, 0], sde["trajectory"][:, 1]
    assert x1.shape == x0.shape and not torch.equal(x0, x1) and ts[0] == 0.0 and ts[-1] == 1.0


def test_generate_text_cache_matches_full_recompute(model):
    """Greedy decoding through the KV cache (span attention's cache case) == argmax of a full forward each step."""
    prompts = ["hello", Sample([ImageItem(_img(7), "understand"), TextItem("what?")])]
    texts, ids = model.generate_text(prompts, max_new_tokens=4, return_ids=True)
    spec = model.pack_spec()
    for p, got in zip(prompts, ids):
        s = p if isinstance(p, Sample) else Sample([TextItem(p)])
        ref = []
        for _ in range(len(got)):
            items = list(s.items) + ([TextItem(model.tokenizer.decode(ref))] if ref else [])
            b = pack([Sample(items)], spec)[0]
            with torch.no_grad():
                from umm_ops.model.generate import _embed_doc
                from umm_ops.data.packing import encode_sample
                doc = encode_sample(Sample(items), spec)
                emb = _embed_doc(model, doc, model.device)
                h = model.llm.forward_packed(emb, b.position_ids, b.layout)
            ref.append(int(model.llm.logits(h[-1:]).argmax(-1)))
        assert got == ref
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # stop strings cut the text before them
    stop = model.tokenizer.decode(ids[0][2:3])
    out = model.generate_text(["hello"], max_new_tokens=4, stop=[stop])
    assert out[0] == texts[0][:texts[0].index(stop)]
    # sampling (temperature / top-k / top-p) is reproducible with a seed
    kw = dict(max_new_tokens=3, temperature=1.0, top_k=20, top_p=0.9)
    assert model.generate_text(["hi"], seed=3, **kw) == model.generate_text(["hi"], seed=3, **kw)


def test_edit_image_shapes(model):
    out = model.edit_image(_img(8, 32), "make it blue", steps=1, cfg_scale=1.0)
    assert out["images"].shape == (1, 3, 32, 32)


# ------------------------------------------------------------------ training
def test_tiny_overfits_a_handful_of_samples():
    """Fixed noise and timesteps (same every step, no CFG dropout): the loss of 3 samples must fall clearly in 12
    steps."""
    torch.manual_seed(0)
    m = CheersModel("tiny")
    red = torch.zeros(3, 32, 32)
    red[0] = 0.8
    samples = [Sample([TextItem("red"), ImageItem(red, "generate")]),
               Sample([TextItem("Say hi."), TextItem("hi there", loss=True)]),
               Sample([ImageItem(-red, "understand"), TextItem("Color?"), TextItem("cyan", loss=True)])]
    m.vae.calibrate(torch.stack([red, -red]))
    batch = pack(samples, m.pack_spec(), seed=0)[0]
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=3e-3, weight_decay=0.0)
    m.train()
    noise = _noise(m, batch)
    hist = []
    for _ in range(12):
        out = m(batch, noise=noise)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        hist.append((out["loss"].item(), out["text_loss"].item(), out["flow_loss"].item()))
    first, last = hist[0], hist[-1]
    # measured (seed 0, CPU): total 7.7 -> 1.2, text 5.6 -> 1.1, flow 2.1 -> 0.02
    assert last[0] < 0.3 * first[0], hist
    assert last[1] < 0.35 * first[1], hist
    assert last[2] < 0.1 * first[2], hist


# ------------------------------------------------------------------ presets
def test_presets_validate_and_round_trip():
    for name in ("tiny", "small", "cheers-1.5b"):
        cfg = preset(name)
        assert CheersConfig.from_dict(cfg.to_dict()) == cfg
    bad = preset("tiny").to_dict()
    bad["vit"]["patch_size"] = 14
    with pytest.raises(ValueError, match="ViT patch"):
        CheersConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_tiny_size(model):
    n = sum(p.numel() for p in model.parameters())
    assert 10e6 <= n <= 30e6, n


def test_cheers_1_5b_parameter_count_on_meta_device():
    """Expected count from the released checkpoint itself (AI9Stars/Cheers Training/cheers_config/
    model.safetensors.index.json): total_size = 5,609,423,890 bytes over 1321 tensors, all stored in bfloat16
    (2 bytes each, BatchNorm counters included) -> 2,804,711,945 elements.  Remove what our model does not hold:
    the duplicate tied lm_head (151936 x 1536), SigLIP2's unused pooling head (probe C, attention in_proj 3C^2+3C,
    out_proj C^2+C, LayerNorm 2C, MLP C*I+I + I*C+C with C=1152, I=4304: 15,238,352) and the BatchNorm buffers
    (2 x (128 mean + 128 var + 1 counter) = 514): 2,556,099,383 parameters.  This equals the sum of the parts:
    Qwen2.5-1.5B 1,543,714,304 (its model card: 1.54B) + SigLIP2-so400m-16-512 vision tower without the pooling head
    + two FLUX.2 VAE decoders and one encoder + projector + head."""
    with torch.device("meta"):
        m = CheersModel("cheers-1.5b")
    C, I = 1152, 4304
    pool = C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (C * I + I) + (I * C + C)
    assert pool == 15_238_352
    expected = 5_609_423_890 // 2 - 151936 * 1536 - pool - 2 * (128 + 128 + 1)
    assert sum(p.numel() for p in m.parameters()) == expected == 2_556_099_383
    assert sum(p.numel() for p in m.llm.parameters()) == 1_543_714_304


def test_clear_errors(model):
    from umm_ops.data.packing import PackSpec

    b = pack([Sample([TextItem("x"), ImageItem(_img(1, 32), "understand")])],
             PackSpec(tokenizer=model.tokenizer, patch=16))[0]
    with pytest.raises(ValueError, match=r"gives 1 LLM tokens but its span in the batch has 4: pack with "
                                         r"model.pack_spec\(\) \(patch = 32\)"):
        model(b)
    with pytest.raises(ValueError, match="multiples of 32 px .* got 48x32"):
        model.generate_image("x", height=48, width=32, steps=1)
    with pytest.raises(ValueError, match="mode must be 'ode'"):
        model.generate_image("x", height=32, width=32, steps=1, mode="euler")
    cfg = preset("tiny").to_dict()
    cfg["gen_mode"] = "hidden"
    with pytest.raises(ValueError, match="gen_mode must be 'full' or 'noise'"):
        CheersConfig.from_dict(cfg)
    with pytest.raises(ValueError, match="unknown keys"):
        CheersConfig.from_dict({**preset("tiny").to_dict(), "widht": 3})


# ------------------------------------------------------------------ the latent input (not in Cheers)
def _with_head_options(model, **options):
    """A copy of `model` with these HeadConfig options, every weight it shares with `model` loaded; returns the
    model (eval mode) and the names of its weights `model` does not have."""
    cfg = dataclasses.replace(model.config, head=dataclasses.replace(model.config.head, **options))
    m = CheersModel(cfg, tokenizer=model.tokenizer)
    missing, unexpected = m.load_state_dict(model.state_dict(), strict=False)
    assert unexpected == []
    return m.eval(), missing


def _with_latent_input(model):
    """A copy of `model` whose head also reads x_t (HeadConfig.latent_input), every other weight shared."""
    m, missing = _with_head_options(model, latent_input=True)
    assert sorted(missing) == ["head.latent_embed.bias", "head.latent_embed.weight"]
    return m


def test_latent_input_starts_as_cheers_and_then_reads_the_noisy_latent(model):
    m = _with_latent_input(model)
    assert m.head.latent_embed.weight.abs().sum() == 0 and m.head.latent_embed.bias.abs().sum() == 0
    batch = pack(_samples(), model.pack_spec(), seed=4)[0]
    noise = _noise(model, batch)
    with torch.no_grad():
        ref = model(batch, noise=noise, return_outputs=True)
        got = m(batch, noise=noise, return_outputs=True)
    # zero-initialised: the same function as the Cheers head, to the bit
    assert torch.equal(ref["v_pred"][0], got["v_pred"][0]) and torch.equal(ref["loss"], got["loss"])
    # its gradient is not zero (the opened HiGate passes `high`'s gradient), and the velocity moves with x_t there
    m.train()
    m.zero_grad(set_to_none=True)
    m(batch, noise=noise)["loss"].backward()
    assert m.head.latent_embed.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        m.head.latent_embed.weight.normal_(0, 0.05)
        a = m(batch, noise=noise, return_outputs=True)["v_pred"][0]
        other = [z if z is None else z + 0.5 for z in noise]
        b = m(batch, noise=other, return_outputs=True)["v_pred"][0]
        b_ref = model(batch, noise=other, return_outputs=True)["v_pred"][0]
    assert not torch.allclose(a, got["v_pred"][0])
    # what the latent path adds is x_t-dependent: the difference to the Cheers head changes with the noise
    assert not torch.allclose(a - got["v_pred"][0], b - b_ref, atol=1e-4)
    # the sampler goes through the same path: seeded, and different from the Cheers head's images
    kw = dict(height=64, width=64, steps=2, cfg_scale=2.0, seed=3)
    s1, s2 = m.generate_image(["a red box"], **kw), m.generate_image(["a red box"], **kw)
    assert torch.equal(s1["latents"], s2["latents"])
    assert not torch.equal(s1["latents"], model.generate_image(["a red box"], **kw)["latents"])


def test_latent_input_round_trips_through_save_pretrained(model, tmp_path):
    m = _with_latent_input(model)
    with torch.no_grad():
        m.head.latent_embed.weight.normal_(0, 0.05)
    m.save_pretrained(tmp_path / "m")
    back = CheersModel.from_pretrained(tmp_path / "m")
    assert back.config.head.latent_input is True
    assert torch.equal(back.head.latent_embed.weight, m.head.latent_embed.weight)
    assert not hasattr(CheersModel(preset("tiny")).head, "latent_embed")   # the presets stay Cheers' design


# ------------------------------------------------------------------ the LLM's latent input (not in Cheers)
def _with_latent_to_llm(model):
    """A copy of `model` whose LLM also reads every image's latent and t (CheersConfig.latent_to_llm)."""
    m = CheersModel(dataclasses.replace(model.config, latent_to_llm=True), tokenizer=model.tokenizer)
    missing, unexpected = m.load_state_dict(model.state_dict(), strict=False)
    assert sorted(missing) == ["latent_to_llm.proj.bias", "latent_to_llm.proj.weight", "latent_to_llm.time.bias",
                               "latent_to_llm.time.weight"] and unexpected == []
    return m.eval()


def _latent_to_llm_by_hand(lin_x, lin_t, x_t, grid, t):
    """Each LLM token (r, c) of the (gh/2, gw/2) grid: proj(the four packed-latent tokens (2r + di, 2c + dj), di, dj
    in row-major order, concatenated) + time([cos(t f_k), sin(t f_k)]), f_k = 1e4^(-k/128), k < 128."""
    gh, gw = grid
    f = torch.exp(-math.log(1e4) * torch.arange(128, dtype=torch.float64) / 128)
    rows = []
    for n in range(x_t.shape[0]):
        feat = torch.cat([torch.cos(float(t[n]) * f), torch.sin(float(t[n]) * f)])
        tv = lin_t.weight.double() @ feat + lin_t.bias.double()
        for r in range(gh // 2):
            for c in range(gw // 2):
                v = torch.cat([x_t[n, (2 * r + di) * gw + 2 * c + dj].double() for di in (0, 1) for dj in (0, 1)])
                rows.append(lin_x.weight.double() @ v + lin_x.bias.double() + tv)
    return torch.stack(rows).view(x_t.shape[0], (gh // 2) * (gw // 2), -1)


def test_latent_to_llm_starts_as_cheers_and_matches_its_formula(model):
    m = _with_latent_to_llm(model)
    batch = pack(_samples(), model.pack_spec(), seed=4)[0]
    noise = _noise(model, batch)
    with torch.no_grad():
        ref = model(batch, noise=noise, return_outputs=True)
        got = m(batch, noise=noise, return_outputs=True)
    # zero-initialised: Cheers to the bit (hidden states of text and images, velocity, both losses)
    assert torch.equal(ref["hidden"], got["hidden"]) and torch.equal(ref["v_pred"][0], got["v_pred"][0])
    assert torch.equal(ref["loss"], got["loss"]) and torch.equal(ref["text_loss"], got["text_loss"])
    # the training loss reaches both Linears
    m.train()
    m.zero_grad(set_to_none=True)
    m(batch, noise=noise)["loss"].backward()
    assert m.latent_to_llm.proj.weight.grad.abs().sum() > 0 and m.latent_to_llm.time.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        for p in m.latent_to_llm.parameters():
            p.normal_(0, 0.05)
        g = torch.Generator().manual_seed(5)
        x_t = torch.randn(3, 16, 128, generator=g)
        t = torch.tensor([0.1, 0.5, 0.9])
        base, _ = model.image_features(x_t, (64, 64))
        emb, _ = m.image_features(x_t, (64, 64), t=t)
        want = _latent_to_llm_by_hand(m.latent_to_llm.proj, m.latent_to_llm.time, x_t, (4, 4), t)
        torch.testing.assert_close((emb - base).double(), want, rtol=1e-5, atol=1e-5)
        # images to understand: t = 1
        one, _ = m.image_features(x_t, (64, 64))
        torch.testing.assert_close(one, m.image_features(x_t, (64, 64), t=torch.ones(3))[0], rtol=0, atol=0)
        assert not torch.allclose(one, emb)
        # the training forward gives each generated image its t and each understood one t = 1
        seen = []
        hook = m.latent_to_llm.register_forward_hook(lambda mod, args, out: seen.append(args[2].clone()))
        m(batch, noise=noise)
        hook.remove()
    roles = batch.image_spans[:, 2].tolist()
    want_t = [float(batch.timesteps[i]) if r == ROLES["generate"] else 1.0 for i, r in enumerate(roles)]
    assert sorted(torch.cat(seen).tolist()) == sorted(want_t) and min(want_t) < 1.0
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        m.latent_to_llm(x_t, (4, 4), torch.ones(2))


def test_latent_to_llm_sampler_paths_agree_and_round_trip(model, tmp_path):
    """The sampler's cached path and the differentiable velocity() (what RL trains through) both give the LLM the
    step's t: the SDE log-probs the sampler records are recomputed exactly; seeded; saved and loaded with it."""
    from umm_ops import rl

    m = _with_latent_to_llm(model)
    with torch.no_grad():
        for p in m.latent_to_llm.parameters():
            p.normal_(0, 0.05)
    kw = dict(seed=1, step=2, keys=[10, 11], steps=3, cfg_scale=2.0, sigma=umm_ops.SigmaSchedule(0.7), height=64,
              width=64)
    a = rl.rollout_images(m, ["a red circle", "two blue squares"], 2, **kw)
    lp, _ = rl.image_logprobs(m, a)
    torch.testing.assert_close(lp.detach(), a.logprobs, rtol=1e-4, atol=1e-4)
    plain = rl.rollout_images(model, ["a red circle", "two blue squares"], 2, **kw)
    assert not torch.allclose(plain.latents, a.latents)
    m.save_pretrained(tmp_path / "m")
    back = CheersModel.from_pretrained(tmp_path / "m")
    assert back.config.latent_to_llm is True
    assert torch.equal(back.latent_to_llm.time.weight, m.latent_to_llm.time.weight)
    assert not hasattr(CheersModel(preset("tiny")), "latent_to_llm")   # the presets stay Cheers' design


# ------------------------------------------------------------------ the head's convolutional stage (not in Cheers)
def test_conv_stage_starts_as_cheers_trains_samples_and_round_trips(model, tmp_path):
    """A model with HeadConfig.conv_widths, every other weight shared: the same losses and velocities to the bit at
    initialisation; the stage's weights get gradient from the flow loss; the sampler (cached path) and the
    differentiable velocity() (RL) agree through it; save_pretrained / from_pretrained keep it."""
    from umm_ops import rl

    model = with_cheers_head(model)
    m, missing = _with_head_options(model, conv_widths=(16, 32))
    assert missing and all(k.startswith("head.conv_stage.") for k in missing)
    batch = pack(_samples(), model.pack_spec(), seed=4)[0]
    noise = _noise(model, batch)
    with torch.no_grad():
        ref = model(batch, noise=noise, return_outputs=True)
        got = m(batch, noise=noise, return_outputs=True)
    assert torch.equal(ref["v_pred"][0], got["v_pred"][0]) and torch.equal(ref["loss"], got["loss"])
    m.train()
    m(batch, noise=noise)["loss"].backward()
    assert m.head.conv_stage.conv_out.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        for p in m.head.conv_stage.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    kw = dict(seed=1, step=2, keys=[10, 11], steps=3, cfg_scale=2.0, sigma=umm_ops.SigmaSchedule(0.7), height=64,
              width=64)
    a = rl.rollout_images(m, ["a red circle", "two blue squares"], 2, **kw)
    lp, _ = rl.image_logprobs(m, a)
    torch.testing.assert_close(lp.detach(), a.logprobs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(rl.rollout_images(model, ["a red circle", "two blue squares"], 2, **kw).latents,
                              a.latents)
    m.save_pretrained(tmp_path / "m")
    back = CheersModel.from_pretrained(tmp_path / "m")
    assert back.config.head.conv_widths == (16, 32)
    assert torch.equal(back.head.conv_stage.conv_out.weight, m.head.conv_stage.conv_out.weight)
    # the tiny preset has such a stage (beside the token stages, with the prompt); the other presets are Cheers'
    tiny = CheersModel(preset("tiny"))
    assert tiny.head.conv_stage is not None and tiny.head.context_norm is not None and not tiny.head.conv_alone
    assert tiny.head.conv_stage.conv_out.weight.abs().sum() == 0          # it starts as Cheers' head
    assert preset("small").head.conv_widths == () == preset("cheers-1.5b").head.conv_widths


@pytest.mark.parametrize("embeddings", [False, True], ids=["states", "states+embeddings"])
def test_conv_context_is_each_images_own_prompt(model, embeddings):
    """With HeadConfig.conv_context the head reads, for each generated image, the LLM hidden states of its own
    document's tokens before the image (with conv_context_embeddings also those tokens' input embeddings): the
    velocity of an image packed with other documents (of other prompt lengths) equals its velocity packed alone;
    the sampler's cached path and velocity() (RL) agree."""
    from umm_ops import rl

    m, _ = _with_head_options(with_cheers_head(model), conv_widths=(16, 32), conv_context=True,
                              conv_context_embeddings=embeddings)
    with torch.no_grad():
        for p in m.head.conv_stage.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    seen, seen_embeds = [], []
    m.head.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["context_mask"].sum(1).tolist()),
                                     with_kwargs=True)
    m.head.register_forward_pre_hook(lambda mod, args, kw: seen_embeds.append(kw.get("context_embeds")),
                                     with_kwargs=True)
    a = Sample([TextItem("draw a red box"), ImageItem(_img(10, 32), "generate")])
    b = Sample([ImageItem(_img(11, 32), "understand"), TextItem("what is it?"), TextItem("a box", loss=True)])
    c = Sample([TextItem("now two small blue circles on the left"), ImageItem(_img(12, 32), "generate")])
    spec = model.pack_spec()
    both = pack([a, b, c], spec, seed=4)[0]
    lens = []
    for i, (s, _, role) in enumerate(both.image_spans.tolist()):
        if role == ROLES["generate"]:
            d = int((both.doc_offsets <= s).sum()) - 1
            lens.append(s - int(both.doc_offsets[d]))
    with torch.no_grad():
        v_both = m(both, noise=_noise(m, both), return_outputs=True)["v_pred"][0]
    assert seen[-1] == lens and lens[0] != lens[1]
    if embeddings:   # the prompts' token embeddings, as the LLM's first layer got them
        starts = [int(both.doc_offsets[0]), int(both.doc_offsets[2])]
        for i, (s0, n) in enumerate(zip(starts, lens)):
            want = m.llm.embed(both.input_ids[s0:s0 + n].to(m.device))
            torch.testing.assert_close(seen_embeds[-1][i, :n], want, rtol=0, atol=0)
    else:
        assert seen_embeds[-1] is None
    singles = []
    for s in (a, c):
        one = pack([s], spec, seed=4)[0]
        one.timesteps[:] = both.timesteps[[j for j, sp in enumerate(both.image_spans.tolist())
                                           if sp[2] == ROLES["generate"]][len(singles)]]
        noise = [_noise(m, both)[[j for j, sp in enumerate(both.image_spans.tolist())
                                  if sp[2] == ROLES["generate"]][len(singles)]]]
        with torch.no_grad():
            singles.append(m(one, noise=noise, return_outputs=True)["v_pred"][0][0])
    torch.testing.assert_close(v_both, torch.stack(singles), rtol=1e-4, atol=1e-5)
    kw = dict(seed=1, step=2, keys=[10, 11], steps=3, cfg_scale=2.0, sigma=umm_ops.SigmaSchedule(0.7), height=64,
              width=64)
    r = rl.rollout_images(m, ["a red circle", "two blue squares on the left"], 2, **kw)
    lp, _ = rl.image_logprobs(m, r)
    torch.testing.assert_close(lp.detach(), r.logprobs, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ the frozen VAE's compute dtype
def test_frozen_vae_computes_in_bf16_when_asked(model):
    """vae.compute_dtype = "bfloat16": the frozen encoder and a frozen decoder copy compute under bf16 autocast.
    Outputs stay float32; their error against the float32 computation is at most twice the error of the same modules
    with their weights cast to bf16 (PyTorch's own bf16 error for this network; measured: the two are level, ~0.3% of
    the latents' spread), and not zero (the switch acts).  A decoder copy that is trained computes in float32,
    bitwise as before; gradients still reach a frozen copy's input."""
    import copy

    vae = model.vae
    x = torch.stack([_img(s) for s in range(6)])
    hw = x.shape[-2:]
    dc = vae.decoder_copy
    trained = [p.requires_grad for p in dc.parameters()]
    try:
        dc.requires_grad_(False)
        z32 = vae.encode(x)
        pix32 = vae.decode_trainable(z32, hw)
        # PyTorch's own bf16 error: the modules with bf16 weights, inputs in bf16
        enc16 = copy.deepcopy(vae.frozen).to(torch.bfloat16)
        z16 = enc16.encode(x.to(torch.bfloat16)).latent_dist.mode().float()
        zref = vae.latents(x)
        dc16 = copy.deepcopy(dc).to(torch.bfloat16)
        dc16.bn.float()   # the latent statistics: float32 buffers, as the op reads them
        pix16 = dc16.decoder(dc16.post_quant_conv(umm_ops.unpack_latents(
            z32, vae.latent_hw(hw), dc.bn.running_mean, dc.bn.running_var, vae.cfg.patch,
            vae.cfg.bn_eps).to(torch.bfloat16))).float()
        vae.cfg.compute_dtype = "bfloat16"
        zb = vae.latents(x)
        pixb = vae.decode_trainable(z32, hw)
        assert zb.dtype == torch.float32 and pixb.dtype == torch.float32
        err_z, own_z = (zb - zref).abs().mean(), (z16 - zref).abs().mean()
        err_p, own_p = (pixb - pix32).abs().mean(), (pix16 - pix32).abs().mean()
        assert 0 < err_z <= 2 * own_z and err_z < 0.02 * zref.std(), (err_z, own_z)
        assert 0 < err_p <= 2 * own_p, (err_p, own_p)
        t = z32.clone().requires_grad_(True)
        vae.decode_trainable(t, hw).square().sum().backward()
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
        dc.requires_grad_(True)        # a trained copy: float32, as without the setting
        assert torch.equal(vae.decode_trainable(z32, hw), pix32)
    finally:
        vae.cfg.compute_dtype = None
        for p, r in zip(dc.parameters(), trained):
            p.requires_grad_(r)
    with pytest.raises(ValueError, match="vae.compute_dtype must be None .* or 'bfloat16', got 'float16'"):
        c = preset("tiny")
        c.vae.compute_dtype = "float16"
        c.validate()
