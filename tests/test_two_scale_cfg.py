"""Two-scale classifier-free guidance of edits (BAGEL / R3: text CFG, then image CFG): the guided velocity against
an independent computation from the three branch velocities, each scale switched off, the sampler's recorded SDE
log-probs recomputed under the same guidance, and the refusals."""
import os
import sys

import pytest
import torch

import umm_ops
from umm_ops import rl
from umm_ops.data.packing import ImageItem, Sample, TextItem
from umm_ops.model.generate import edit_image, velocity

INS = "change the red circle to blue"


@pytest.fixture(scope="module")
def model():
    from conftest import tiny_eval_model

    return tiny_eval_model(32)


def _picture(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g) * 2 - 1


def _by_hand(v, vt, vi, st, si, renorm):
    """BAGEL's _forward_flow / R3's apply_cfg, written out (cfg_renorm_min 0)."""
    a = vt + st * (v - vt)
    if renorm == "text_channel":
        a = a * torch.clamp(v.norm(dim=-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) + 1e-8), 0, 1)
    b = vi + si * (a - vi)
    if renorm == "global":
        b = b * torch.clamp(v.flatten(1).norm(dim=1)[:, None, None] / (b.flatten(1).norm(dim=1)[:, None, None] + 1e-8),
                            0, 1)
    if renorm == "channel":
        b = b * torch.clamp(v.norm(dim=-1, keepdim=True) / (b.norm(dim=-1, keepdim=True) + 1e-8), 0, 1)
    return b


@torch.no_grad()
def test_guided_velocity_against_the_three_branches(model):
    edits = [Sample([ImageItem(_picture(0), "understand"), TextItem(INS)]),
             Sample([ImageItem(_picture(1), "understand"), TextItem("add a green square")])]
    g = torch.Generator().manual_seed(3)
    n, C = model.latent_shape((32, 32))
    x = torch.randn(2, n, C, generator=g)
    t = torch.tensor([0.3, 0.7])
    v = velocity(model, edits, x, t)                                            # full: image + instruction
    vt = velocity(model, edits, x, t, cfg_scale=0.0)                            # the image, the text nulled
    vi = velocity(model, [Sample([TextItem(INS)]), Sample([TextItem("add a green square")])], x, t)   # no image
    assert float((v - vt).abs().max()) > 1e-4 and float((v - vi).abs().max()) > 1e-4
    for renorm in ("none", "text_channel", "global", "channel"):
        got = velocity(model, edits, x, t, cfg_scale=4.0, image_cfg_scale=1.5, cfg_renorm=renorm)
        torch.testing.assert_close(got, _by_hand(v, vt, vi, 4.0, 1.5, renorm), rtol=1e-4, atol=1e-5)
    # the renorms change something (the by-hand check above is not vacuous)
    plain = velocity(model, edits, x, t, cfg_scale=4.0, image_cfg_scale=1.5)
    assert float((plain - velocity(model, edits, x, t, cfg_scale=4.0, image_cfg_scale=1.5,
                                   cfg_renorm="text_channel")).abs().max()) > 1e-4
    # switching a scale off: the one-scale result, the image-only guidance, no guidance
    torch.testing.assert_close(velocity(model, edits, x, t, cfg_scale=4.0, image_cfg_scale=1.0),
                               vt + 4.0 * (v - vt), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(velocity(model, edits, x, t, cfg_scale=4.0, image_cfg_scale=1.0),
                               velocity(model, edits, x, t, cfg_scale=4.0), rtol=0, atol=0)
    torch.testing.assert_close(velocity(model, edits, x, t, cfg_scale=1.0, image_cfg_scale=1.5),
                               vi + 1.5 * (v - vi), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(velocity(model, edits, x, t, cfg_scale=1.0, image_cfg_scale=1.0, cfg_renorm="global"),
                               v, rtol=0, atol=0)


@torch.no_grad()
def test_cfg_interval_guides_only_inside_it(model):
    """BAGEL / R3's cfg_interval (0.4, 1.0] on their time (1 = noise) = noise level 1 - t here: a row at t = 0.3
    (noise level 0.7) is guided, one at t = 0.7 (0.3) takes the full branch's v."""
    from umm_ops.model.generate import guided_at

    edits = [Sample([ImageItem(_picture(0), "understand"), TextItem(INS)])] * 2
    n, C = model.latent_shape((32, 32))
    x = torch.randn(2, n, C, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.3, 0.7])
    g = dict(cfg_scale=4.0, image_cfg_scale=1.5, cfg_renorm="text_channel")
    full = velocity(model, edits, x, t)
    guided = velocity(model, edits, x, t, **g)
    got = velocity(model, edits, x, t, cfg_interval=(0.4, 1.0), **g)
    torch.testing.assert_close(got[0], guided[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], full[1], rtol=1e-4, atol=1e-5)      # (a 3-branch batch: rounding)
    assert float((guided[1] - full[1]).abs().max()) > 1e-4
    assert guided_at(torch.tensor([0.0, 0.3, 0.7, 1.0]), (0.4, 1.0)).tolist() == [True, True, False, False]
    assert guided_at(0.0, (0.0, 0.9)).item() is False                   # (lo, hi]: noise level 1 > 0.9
    with pytest.raises(ValueError, match="cfg_interval must be None or"):
        velocity(model, edits, x, t, cfg_interval=(0.5, 0.4), **g)


@torch.no_grad()
def test_edit_image_two_scales_and_switching_off(model):
    pics = [_picture(0), _picture(1)]
    ins = [INS, "add a green square"]
    kw = dict(steps=3, seed=[5, 6])
    one = edit_image(model, pics, ins, cfg_scale=4.0, **kw)["images"]
    assert torch.equal(edit_image(model, pics, ins, cfg_scale=4.0, image_cfg_scale=1.0, **kw)["images"], one)
    two = edit_image(model, pics, ins, cfg_scale=4.0, image_cfg_scale=1.5, cfg_renorm="text_channel", **kw)["images"]
    assert float((two - one).abs().max()) > 1e-3
    none = edit_image(model, pics, ins, cfg_scale=1.0, **kw)["images"]
    assert torch.equal(edit_image(model, pics, ins, cfg_scale=1.0, image_cfg_scale=1.0, **kw)["images"], none)
    # the sampler's cached path follows the guided velocity: an ODE step by hand from the same noise
    n, C = model.latent_shape((32, 32))
    x0 = torch.randn(2, n, C, generator=torch.Generator().manual_seed(9))
    out = edit_image(model, pics, ins, cfg_scale=4.0, image_cfg_scale=1.5, cfg_renorm="text_channel", steps=2,
                     init_noise=x0, return_trajectory=True)
    ts = out["timesteps"].float()
    samples = [Sample([ImageItem(p, "understand"), TextItem(s)]) for p, s in zip(pics, ins)]
    v0 = velocity(model, samples, x0, ts[0], cfg_scale=4.0, image_cfg_scale=1.5, cfg_renorm="text_channel")
    torch.testing.assert_close(out["trajectory"][:, 1], x0 + v0 * (ts[1] - ts[0]), rtol=1e-3, atol=1e-4)


def test_recomputed_image_logprobs_equal_the_sampled_ones_with_two_scales(model):
    """R3's stage (b): the edit's SDE log-probs as sampled (two scales, text_channel renorm) equal
    image_logprobs' recomputation, directly and through an interleaved rollout; one-scale recomputation is off."""
    import dataclasses

    edits = [Sample([ImageItem(_picture(0), "understand"), TextItem(INS)]),
             Sample([ImageItem(_picture(1), "understand"), TextItem("add a green square")])]
    g = dict(cfg_scale=4.0, image_cfg_scale=1.5, cfg_renorm="text_channel")
    ro = rl.sample_images(model, edits, [11, 12], steps=4, sigma=umm_ops.SigmaSchedule(0.7), **g)
    assert ro.image_cfg_scale == 1.5 and ro.cfg_renorm == "text_channel" and bool((ro.logprobs != 0).all())
    lp, kl = rl.image_logprobs(model, ro, reference=model)
    torch.testing.assert_close(lp.detach(), ro.logprobs, rtol=1e-4, atol=1e-4)
    assert float(kl.detach().abs().max()) < 1e-8
    off = rl.image_logprobs(model, dataclasses.replace(ro, image_cfg_scale=1.0))[0]
    assert float((off.detach() - ro.logprobs).abs().max()) > 1e-3
    # with R3's cfg_interval: the late steps (noise level <= 0.4) unguided, in the sampler and the recomputation
    ri = rl.sample_images(model, edits, [11, 12], steps=8, sigma=umm_ops.SigmaSchedule(0.7), cfg_interval=(0.4, 1.0),
                          **g)                                  # t = 0.6 (step 6, recorded): noise level 0.4, unguided
    assert ri.cfg_interval == (0.4, 1.0)
    lp = rl.image_logprobs(model, ri)[0]
    torch.testing.assert_close(lp.detach(), ri.logprobs, rtol=1e-4, atol=1e-4)
    off = rl.image_logprobs(model, dataclasses.replace(ri, cfg_interval=None))[0]
    assert float((off.detach() - ri.logprobs).abs().max()) > 1e-3
    # interleaved: [picture, question] -> text -> the edit conditioned on [picture, instruction]
    plan = [rl.Seg("text", max_new_tokens=3, temperature=1.0),
            rl.Seg("image", steps=3, schedule=rl.SDESchedule("random"), shared_noise=True, cfg_interval=(0.4, 1.0),
                   context=lambda tr: Sample([tr.prompt.items[0], TextItem(INS)]), **g)]
    trajs = rl.rollout_interleaved(model, edits, 2, plan, seed=2, keys=["a", "b"])
    assert all(tr.segments[1]["image_cfg_scale"] == 1.5 for tr in trajs)
    lp = rl.interleaved_logprobs(model, trajs)
    m = lp["image_mask"]
    assert int(m.sum()) == 4
    torch.testing.assert_close(lp["image_logp"].detach()[m], lp["image_old"][m], rtol=1e-4, atol=1e-4)


def test_two_scale_refusals(model):
    pic = _picture(0)
    with pytest.raises(ValueError, match="holds no image"):
        model.generate_image(["a red circle"], steps=2, image_cfg_scale=1.5)
    with pytest.raises(ValueError, match="cfg_renorm must be one of"):
        edit_image(model, [pic], [INS], steps=2, cfg_renorm="text-channel")
    with pytest.raises(ValueError, match="image_cfg_scale must be a finite number"):
        edit_image(model, [pic], [INS], steps=2, image_cfg_scale=float("nan"))


def test_two_scales_refused_under_the_cheers_profile(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
    from cheers_released import tiny_cheers_model, write_qwen_like_tokenizer

    m = tiny_cheers_model(write_qwen_like_tokenizer(tmp_path))
    pic = torch.rand(3, m.config.image_size, m.config.image_size)      # the released (0, 1) pixels
    with pytest.raises(ValueError, match="'cheers' profile"):
        edit_image(m, [pic], [INS], steps=2, cfg_scale=4.0, image_cfg_scale=1.5)
    # one scale still works there
    assert edit_image(m, [pic], [INS], steps=2, cfg_scale=4.0)["images"].shape[0] == 1
