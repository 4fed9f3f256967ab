"""The cascaded flow head (umm_ops.model.head) against a plain-PyTorch transcription of the released Cheers head
(RMSNorm module + fp32 modulate, SDPA with repeat_kv per image, view/permute unpatchify, unfused HiGate)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import umm_ops
from umm_ops.model.config import HeadConfig
from umm_ops.model.head import FlowHead, TimestepEmbedder
from tolerance import assert_close_rule

D, HQ, HKV, C, CH, OUT = 64, 4, 2, 48, 4, 32     # LLM width / heads / kv heads, ViT width / heads, out channels


def make_head(dtype=torch.float32, randomize=True):
    head = FlowHead(D, HQ, HKV, C, CH, OUT, HeadConfig(semantic_layers=2, detail_layers=2)).to(dtype)
    if randomize:   # the adaLN / HiGate zero-inits would hide most of the computation
        with torch.no_grad():
            for p in head.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return head


# ------------------------------------------------------------------ plain transcription of the released head
def _up(x):                                    # the released code's .float(), never a downcast of float64
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rms(x, w, eps):
    xf = _up(x)
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _modulate(x, shift, scale):
    return (_up(x) * (1 + _up(scale)[:, None]) + _up(shift)[:, None]).to(x.dtype)


def _rope(x, pos, theta):                      # x (B, H, L, Dh), rotate-half; frequencies in float32 as released
    dh = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.int64).float() / dh))
    f = pos.float()[:, None] * inv[None]
    emb = torch.cat([f, f], -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _attn(blk, x, pos, theta):
    B, L, W = x.shape
    a = blk.attn
    q = a.q_proj(x).view(B, L, -1, a.head_dim).transpose(1, 2)
    k = a.k_proj(x).view(B, L, -1, a.head_dim).transpose(1, 2)
    v = a.v_proj(x).view(B, L, -1, a.head_dim).transpose(1, 2)
    q, k = _rope(q, pos, theta), _rope(k, pos, theta)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    o = F.scaled_dot_product_attention(q, k, v)
    return a.o_proj(o.transpose(1, 2).reshape(B, L, -1))


def _stage(stage, x, c, pos, theta=1e4):
    for blk in stage.diffusion_head_a:
        sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, -1)
        h = _modulate(_rms(x, blk.input_layernorm.weight, 1e-6), sh1, sc1)
        x = x + g1[:, None] * _attn(blk, h, pos, theta)
        h = _modulate(_rms(x, blk.post_attention_layernorm.weight, 1e-6), sh2, sc2)
        m = blk.mlp
        x = x + g2[:, None] * m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
    fl = stage.diffusion_head_b
    shift, scale = fl.adaLN_modulation(c).chunk(2, -1)
    return fl.linear(_modulate(_rms(x, fl.norm_final.weight, 1e-6), shift, scale))


def reference_head(head, h, t, high, grid):
    te = head.time_embed
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    tf = torch.cat([torch.cos(args), torch.sin(args)], -1).to(h.dtype)
    c1, c2 = te.mlp_1(tf), te.mlp_2(tf)
    N, n, _ = h.shape
    low = _stage(head.gen_projector, h, c1, torch.arange(n))
    gh, gw = grid
    P = 2
    Dv = low.shape[-1] // (P * P)
    low = low.view(N, gh, gw, P, P, Dv).permute(0, 1, 3, 2, 4, 5).reshape(N, gh * P * gw * P, Dv)
    hg = head.hi_gate
    x = F.layer_norm(low + hg.gate(low) * high, (Dv,), hg.layer_norm.weight, hg.layer_norm.bias, hg.layer_norm.eps)
    L = x.shape[1]
    return _stage(head.hi_projector, x, c2, torch.arange(L // 2).repeat(2))


# ------------------------------------------------------------------ tests
def _inputs(N, grid, dtype):
    n = grid[0] * grid[1]
    return torch.randn(N, n, D, dtype=dtype), torch.rand(N, dtype=dtype), torch.randn(N, 4 * n, C, dtype=dtype)


def test_head_matches_released_formulation_float64(seed):
    head = make_head(torch.float64)
    h, t, high = _inputs(3, (2, 3), torch.float64)
    with umm_ops.use_backend("reference"):
        out = head(h, t, high, (2, 3))
    ref = reference_head(head, h, t, high, (2, 3))
    assert out.shape == (3, 24, OUT)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_head_fused_float32_within_pytorch_error(seed):
    """Default backend in float32 vs the float64 transcription: at most 2x PyTorch's own float32 error (+ ulps)."""
    head64 = make_head(torch.float64)
    head32 = FlowHead(D, HQ, HKV, C, CH, OUT, HeadConfig(semantic_layers=2, detail_layers=2))
    head32.load_state_dict({k: v.float() for k, v in head64.state_dict().items()})
    h, t, high = _inputs(2, (2, 2), torch.float64)
    ref64 = reference_head(head64, h, t, high, (2, 2))
    ref32 = reference_head(head32, h.float(), t.float(), high.float(), (2, 2))
    out = head32(h.float(), t.float(), high.float(), (2, 2))
    assert_close_rule(out, ref64, ref32, torch.float32, "head velocity")


def test_images_in_one_call_do_not_interact(seed):
    head = make_head()
    h, t, high = _inputs(3, (2, 2), torch.float32)
    together = head(h, t, high, (2, 2))
    for i in range(3):
        alone = head(h[i:i + 1], t[i:i + 1], high[i:i + 1], (2, 2))
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_zero_init_as_released(seed):
    """adaLN projections and HiGate's last Linear start at zero: blocks are identities and the gate is closed."""
    head = make_head(randomize=False)
    for stage in (head.gen_projector, head.hi_projector):
        for blk in stage.diffusion_head_a:
            assert not blk.adaLN_modulation[1].weight.any() and not blk.adaLN_modulation[1].bias.any()
    low, high = torch.randn(2, 8, C), torch.randn(2, 8, C)
    hg = head.hi_gate
    torch.testing.assert_close(hg(low, high), F.layer_norm(low, (C,), hg.layer_norm.weight, hg.layer_norm.bias,
                                                           hg.layer_norm.eps), rtol=1e-5, atol=1e-5)


def test_timestep_features_cos_then_sin():
    te = TimestepEmbedder(8, 8, freq_dim=6)
    t = torch.tensor([0.0, 0.5, 1.0])
    f = te.features(t)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(3) / 3)
    torch.testing.assert_close(f[:, :3], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(f[:, 3:], torch.sin(t[:, None] * freqs))


def test_head_errors():
    head = make_head(randomize=False)
    h, t, high = _inputs(2, (2, 2), torch.float32)
    with pytest.raises(ValueError, match="expected gh\\*gw"):
        head(h, t, high, (2, 3))
    with pytest.raises(ValueError, match="high must be"):
        head(h, t, high[:, :8], (2, 2))


@pytest.mark.parametrize("latent_input,prediction", [(True, "velocity"), (False, "clean"), (True, "clean")])
def test_head_options_match_their_formulas(seed, latent_input, prediction):
    """The two options that are not Cheers': the latent input adds x_t W^T + b to HiGate's `high`; the clean
    prediction turns the detail stage's output o into v = (o - x_t) / max(1 - t, clean_min_gap)."""
    cfg = HeadConfig(semantic_layers=2, detail_layers=2, latent_input=latent_input, prediction=prediction,
                     clean_min_gap=0.05)
    head = FlowHead(D, HQ, HKV, C, CH, OUT, cfg).double()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    h, t, high = _inputs(4, (2, 2), torch.float64)
    t = torch.tensor([0.0, 0.5, 0.97, 1.0], dtype=torch.float64)    # two of them above 1 - clean_min_gap
    x_t = torch.randn(4, 16, OUT, dtype=torch.float64)
    with umm_ops.use_backend("reference"):
        v = head(h, t, high, (2, 2), x_t)
    high_in = high + x_t @ head.latent_embed.weight.T + head.latent_embed.bias if latent_input else high
    o = reference_head(head, h, t, high_in, (2, 2))
    want = (o - x_t) / torch.tensor([1.0, 0.5, 0.05, 0.05], dtype=torch.float64)[:, None, None] \
        if prediction == "clean" else o
    torch.testing.assert_close(v, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="need x_t"):
        head(h, t, high, (2, 2))
    with pytest.raises(ValueError, match="need x_t"):
        head(h, t, high, (2, 2), x_t[:, :8])
    # backward reaches the latent input's weights
    head.zero_grad()
    head(h, t, high, (2, 2), x_t).square().mean().backward()
    if latent_input:
        assert head.latent_embed.weight.grad.abs().sum() > 0


def test_head_option_errors():
    from umm_ops.model.config import preset
    c = preset("tiny")
    c.head.prediction = "x0"
    with pytest.raises(ValueError, match="head.prediction must be 'velocity' or 'clean', got 'x0'"):
        c.validate()
    c.head.prediction, c.head.clean_min_gap = "clean", 0.0
    with pytest.raises(ValueError, match="clean_min_gap must be in \\(0, 1\\]"):
        c.validate()


# ------------------------------------------------------------------ the convolutional stage (not in Cheers)
def _conv_head(widths=(16, 32), randomize=True, dtype=torch.float64):
    head = FlowHead(D, HQ, HKV, C, CH, OUT, HeadConfig(semantic_layers=2, detail_layers=2, conv_widths=widths,
                                                         conv_heads=4)).to(dtype)
    if randomize:
        with torch.no_grad():
            for p in head.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return head


def test_conv_stage_starts_as_cheers_and_adds_its_correction(seed):
    """With conv_widths the head is Cheers' head plus the stage's output; zero-initialised, that output is 0 and the
    head is the plain head to the bit (same weights elsewhere)."""
    plain = make_head(torch.float64)
    conv = _conv_head(randomize=False)
    missing, unexpected = conv.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(k.startswith("conv_stage.") for k in missing) and unexpected == []
    h, t, high = _inputs(3, (2, 3), torch.float64)
    x_t = torch.randn(3, 24, OUT, dtype=torch.float64)
    with umm_ops.use_backend("reference"):
        ref = plain(h, t, high, (2, 3))
        assert torch.equal(conv(h, t, high, (2, 3), x_t), ref)
        with torch.no_grad():
            for p in conv.conv_stage.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        got = conv(h, t, high, (2, 3), x_t)
        # the correction is the stage applied to (x_t, the plain head's velocity, HiGate's output tokens, c2)
        low = plain.gen_projector(h, plain.time_embed(t)[0], torch.arange(6), expand_grid=(4, 6))
        tokens = plain.hi_gate(low, high)
        want = ref + conv.conv_stage(x_t, ref, tokens, plain.time_embed(t)[1], (4, 6))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, ref)
    with pytest.raises(ValueError, match="need x_t"):
        conv(h, t, high, (2, 3))


def test_conv_stage_reads_the_latent_grid_in_the_packings_order(seed):
    """The stage's inputs are the packed tokens unpacked onto the latent grid: channels 0..c-1 of its first
    convolution's input are umm_ops.unpack_latents of x_t (identity statistics), c..2c-1 that of the velocity, then
    the coordinates (-1 .. 1 down the rows, across the columns)."""
    head = _conv_head()
    h, t, high = _inputs(2, (2, 3), torch.float64)
    x_t = torch.randn(2, 24, OUT, dtype=torch.float64)
    seen = {}
    hook = head.conv_stage.conv_in.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    head(h, t, high, (2, 3), x_t)
    hook.remove()
    c = OUT // 4
    zeros, ones = torch.zeros(OUT, dtype=torch.float64), torch.ones(OUT, dtype=torch.float64)
    unpack = lambda z: umm_ops.unpack_latents(z, (8, 12), zeros, ones - 1e-4, 2, 1e-4)
    x = seen["x"]
    assert x.shape == (2, 2 * c + 2, 8, 12)
    torch.testing.assert_close(x[:, :c], unpack(x_t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x[:, 2 * c], torch.linspace(-1, 1, 8, dtype=torch.float64)[:, None].expand(2, 8, 12))
    torch.testing.assert_close(x[:, 2 * c + 1], torch.linspace(-1, 1, 12, dtype=torch.float64).expand(2, 8, 12))
    # the correction is packed back in the same order: a correction of one latent pixel lands on its packed channel
    stage = head.conv_stage
    with torch.no_grad():
        stage.conv_out.weight.zero_()
        stage.conv_out.bias.zero_()
        stage.conv_out.bias[1] = 1.0                  # latent channel 1 everywhere
    out = stage(x_t, torch.zeros_like(x_t), torch.randn(2, 24, C, dtype=torch.float64),
                torch.randn(2, C, dtype=torch.float64), (4, 6))
    want = torch.zeros_like(out)
    want[..., 4:8] = 1.0                              # packed channels c*4 + di*2 + dj of c = 1
    assert torch.equal(out, want)


def test_conv_stage_gradients_reach_every_weight_and_match_finite_differences(seed):
    head = _conv_head(widths=(8, 16, 16))
    h, t, high = _inputs(2, (2, 2), torch.float64)
    x_t = torch.randn(2, 16, OUT, dtype=torch.float64)
    head(h, t, high, (2, 2), x_t).square().mean().backward()
    for name, p in head.conv_stage.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the stage alone, against finite differences, in every input it reads
    x_t, v = torch.randn(1, 4, OUT, dtype=torch.float64), torch.randn(1, 4, OUT, dtype=torch.float64)
    tokens, c = torch.randn(1, 4, C, dtype=torch.float64), torch.randn(1, C, dtype=torch.float64)
    args = [z.requires_grad_(True) for z in (x_t, v, tokens, c)]
    torch.autograd.gradcheck(lambda *a: head.conv_stage(*a, (2, 2)), args, eps=1e-6, atol=1e-6)


def test_conv_stage_errors():
    from umm_ops.model.config import preset
    head = _conv_head(widths=(8, 16, 16, 16))                  # halves the latent grid three times
    h, t, high = _inputs(1, (2, 3), torch.float64)
    with pytest.raises(ValueError, match="a latent grid of 8x12 cannot be halved 3 times"):
        head(h, t, high, (2, 3), torch.randn(1, 24, OUT, dtype=torch.float64))
    for bad in [(12,), (64, 128, 192, 256, 320), (64, 0), (64, 36)]:
        c = preset("tiny")
        c.head.conv_widths = bad
        with pytest.raises(ValueError, match="head.conv_widths must be"):
            c.validate()


def test_conv_context_reads_only_the_masked_prompt_and_starts_as_cheers(seed):
    """conv_context: the stage also attends to the prompt's hidden states where the mask is True and adds their
    masked mean to its FiLM vector.  Zero-initialised it changes nothing; opened, the output depends on the prompt
    but not on padded positions, and equals the same prompt given unpadded."""
    from umm_ops.model.head import prompt_context

    plain = make_head(torch.float64)
    head = FlowHead(D, HQ, HKV, C, CH, OUT, HeadConfig(semantic_layers=2, detail_layers=2, conv_widths=(16, 32),
                                                         conv_context=True)).double()
    head.load_state_dict(plain.state_dict(), strict=False)
    h, t, high = _inputs(2, (2, 2), torch.float64)
    x_t = torch.randn(2, 16, OUT, dtype=torch.float64)
    hidden = torch.randn(20, D, dtype=torch.float64)
    ctx, mask = prompt_context(hidden, [(0, 5), (9, 12)])
    assert ctx.shape == (2, 5, D) and mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert torch.equal(ctx[1, :3], hidden[9:12]) and torch.equal(ctx[1, 3:], torch.zeros(2, D, dtype=torch.float64))
    with umm_ops.use_backend("reference"):
        assert torch.equal(head(h, t, high, (2, 2), x_t, ctx, mask), plain(h, t, high, (2, 2)))
        with torch.no_grad():
            for p in head.conv_stage.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        v = head(h, t, high, (2, 2), x_t, ctx, mask)
        junk = ctx.clone()
        junk[1, 3:] = 1e3                                             # padded positions: ignored
        torch.testing.assert_close(head(h, t, high, (2, 2), x_t, junk, mask), v, rtol=1e-12, atol=1e-12)
        alone = head(h[1:], t[1:], high[1:], (2, 2), x_t[1:], ctx[1:, :3], mask[1:, :3])
        torch.testing.assert_close(alone, v[1:], rtol=1e-12, atol=1e-12)
        other = ctx.clone()
        other[1, 0] += 1.0
        assert not torch.allclose(head(h, t, high, (2, 2), x_t, other, mask)[1], v[1])
    with pytest.raises(ValueError, match="conv_context needs context"):
        head(h, t, high, (2, 2), x_t)
    with pytest.raises(ValueError, match="at least one prompt token"):
        head(h, t, high, (2, 2), x_t, ctx, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="non-empty prompt span"):
        prompt_context(hidden, [(3, 3)])
    from umm_ops.model.config import preset
    c = preset("tiny")
    c.head.conv_widths, c.head.conv_context_embeddings, c.head.conv_context = (), False, True
    with pytest.raises(ValueError, match="conv_context = True needs the convolutional stage"):
        c.validate()


def test_conv_stage_reading_the_latent_only(seed):
    """conv_inputs = "latent": the stage's correction depends on x_t, t and the prompt context, not on the detail
    stage's velocity or HiGate's tokens; it still starts as Cheers' head."""
    from umm_ops.model.head import prompt_context

    plain = make_head(torch.float64)
    head = FlowHead(D, HQ, HKV, C, CH, OUT, HeadConfig(semantic_layers=2, detail_layers=2, conv_widths=(16, 32),
                                                         conv_context=True, conv_inputs="latent")).double()
    head.load_state_dict(plain.state_dict(), strict=False)
    h, t, high = _inputs(2, (2, 2), torch.float64)
    x_t = torch.randn(2, 16, OUT, dtype=torch.float64)
    ctx, mask = prompt_context(torch.randn(9, D, dtype=torch.float64), [(0, 5), (5, 9)])
    with umm_ops.use_backend("reference"):
        assert torch.equal(head(h, t, high, (2, 2), x_t, ctx, mask), plain(h, t, high, (2, 2)))
    stage = head.conv_stage
    assert stage.token_map is None and stage.pool is None and stage.conv_in.in_channels == OUT // 4 + 2
    with torch.no_grad():
        for p in stage.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    c = torch.randn(2, C, dtype=torch.float64)
    a = stage(x_t, torch.randn_like(x_t), torch.randn(2, 16, C, dtype=torch.float64), c, (4, 4), ctx, mask)
    b = stage(x_t, torch.randn_like(x_t), torch.randn(2, 16, C, dtype=torch.float64), c, (4, 4), ctx, mask)
    assert torch.equal(a, b)
    assert not torch.allclose(stage(x_t, x_t, None, c, (4, 4), ctx + 0.5, mask), a)
    assert not torch.allclose(stage(x_t + 0.5, x_t, None, c, (4, 4), ctx, mask), a)
    from umm_ops.model.config import preset
    cfg = preset("tiny")
    cfg.head.conv_widths, cfg.head.conv_inputs = (64,), "pixels"
    with pytest.raises(ValueError, match="head.conv_inputs must be 'all', 'latent' or 'alone', got 'pixels'"):
        cfg.validate()


def test_conv_stage_alone_is_the_whole_velocity(seed):
    """conv_inputs = "alone": the head's velocity is the stage's output on x_t, t and the prompt context, computed
    with the timestep embedding the detail stage would get; the LLM's image states h and the ViT features do not
    matter, the token stages get no gradient, and prediction = "clean" maps the stage's output as for the token
    stages.  Without the prompt context it is refused."""
    from umm_ops.model.head import prompt_context

    cfg = HeadConfig(semantic_layers=2, detail_layers=2, conv_widths=(16, 32), conv_context=True,
                     conv_inputs="alone")
    head = FlowHead(D, HQ, HKV, C, CH, OUT, cfg).double()
    with torch.no_grad():
        for p in head.conv_stage.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    h, t, high = _inputs(2, (2, 2), torch.float64)
    x_t = torch.randn(2, 16, OUT, dtype=torch.float64)
    ctx, mask = prompt_context(torch.randn(9, D, dtype=torch.float64), [(0, 5), (5, 9)])
    with umm_ops.use_backend("reference"):
        v = head(h, t, high, (2, 2), x_t, ctx, mask)
        c2 = head.time_embed(t, torch.float64)[1]
        assert torch.equal(v, head.conv_stage(x_t, None, None, c2, (4, 4), ctx, mask))
        assert torch.equal(head(torch.randn_like(h), t, torch.randn_like(high), (2, 2), x_t, ctx, mask), v)
        assert not torch.allclose(head(h, t, high, (2, 2), x_t, ctx + 0.5, mask), v)
        head(h, t, high, (2, 2), x_t, ctx, mask).square().sum().backward()
    for name, p in head.named_parameters():
        if name.startswith("conv_stage."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif name.startswith(("gen_projector.", "hi_gate.", "hi_projector.")):
            assert p.grad is None, name
    clean = FlowHead(D, HQ, HKV, C, CH, OUT, HeadConfig(semantic_layers=2, detail_layers=2, conv_widths=(16, 32),
                                                         conv_context=True, conv_inputs="alone",
                                                         prediction="clean")).double()
    clean.load_state_dict(head.state_dict())
    with umm_ops.use_backend("reference"):
        gap = (1 - t).clamp_min(cfg.clean_min_gap)[:, None, None]
        torch.testing.assert_close(clean(h, t, high, (2, 2), x_t, ctx, mask), (v - x_t) / gap, rtol=1e-12, atol=1e-12)
    from umm_ops.model.config import preset
    c = preset("tiny")
    c.head.conv_widths, c.head.conv_inputs, c.head.conv_context = (64,), "alone", False
    c.head.conv_context_embeddings = False
    with pytest.raises(ValueError, match="conv_inputs = 'alone' needs head.conv_context = True"):
        c.validate()


def test_conv_context_embeddings_add_the_normed_input_embeddings(seed):
    """conv_context_embeddings: the stage's context is the prompt's final hidden states plus its input embeddings
    through the head's RMSNorm (weight included): the same velocity as a head without the option given that sum
    as its context; the norm's weight gets gradient; FlowHead.prompt_context cuts both from the packed rows; without
    the embeddings, or without conv_context, it is refused."""
    cfg = HeadConfig(semantic_layers=2, detail_layers=2, conv_widths=(16, 32), conv_context=True, conv_inputs="alone")
    plain = FlowHead(D, HQ, HKV, C, CH, OUT, cfg).double()
    head = FlowHead(D, HQ, HKV, C, CH, OUT, dataclasses.replace(cfg, conv_context_embeddings=True)).double()
    missing, unexpected = head.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["context_norm.weight"] and unexpected == []
    assert plain.context_norm is None
    with torch.no_grad():
        for p in head.conv_stage.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        head.context_norm.weight.copy_(torch.rand(D, dtype=torch.float64) + 0.5)
    plain.load_state_dict(head.state_dict(), strict=False)
    h, t, high = _inputs(2, (2, 2), torch.float64)
    x_t = torch.randn(2, 16, OUT, dtype=torch.float64)
    hidden, embeds = torch.randn(9, D, dtype=torch.float64), torch.randn(9, D, dtype=torch.float64) * 0.02
    kw = head.prompt_context(hidden, embeds, [(0, 5), (5, 9)])
    assert sorted(kw) == ["context", "context_embeds", "context_mask"]
    assert torch.equal(kw["context_embeds"][1, :4], embeds[5:9]) and torch.equal(kw["context"][0], hidden[:5])
    assert sorted(plain.prompt_context(hidden, None, [(0, 5), (5, 9)])) == ["context", "context_mask"]
    w = head.context_norm.weight.detach()
    normed = embeds * torch.rsqrt(embeds.square().mean(-1, keepdim=True) + cfg.norm_eps) * w   # by hand
    want = plain.prompt_context(hidden + normed, None, [(0, 5), (5, 9)])
    with umm_ops.use_backend("reference"):
        v = head(h, t, high, (2, 2), x_t, **kw)
        torch.testing.assert_close(v, plain(h, t, high, (2, 2), x_t, **want), rtol=1e-12, atol=1e-12)
        # the norm takes the embeddings' scale out (eps = 1e-6 moves it by <= 1e-6 / 400 at these scales)
        big = [head(h, t, high, (2, 2), x_t, **dict(kw, context_embeds=kw["context_embeds"] * k)) for k in (1e3, 4e3)]
        torch.testing.assert_close(big[0], big[1], rtol=1e-7, atol=1e-8)
        v.square().sum().backward()
    assert head.context_norm.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="conv_context_embeddings needs context_embeds"):
        head(h, t, high, (2, 2), x_t, kw["context"], kw["context_mask"])
    with pytest.raises(ValueError, match="needs the input embeddings"):
        head.prompt_context(hidden, embeds[:8], [(0, 5)])
    from umm_ops.model.config import preset
    c = preset("tiny")
    c.head.conv_widths, c.head.conv_context_embeddings, c.head.conv_context = (64,), True, False
    with pytest.raises(ValueError, match="conv_context_embeddings = True needs head.conv_context = True"):
        c.validate()
