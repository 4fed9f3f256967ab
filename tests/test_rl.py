"""Online RL (umm_ops.rl): the losses against independent computations of their formulas, rollouts that replay
exactly, log-prob recomputation that agrees with what the sampler recorded, and the rewards."""
import math

import pytest
import torch

import umm_ops
from umm_ops import rl


# ----------------------------------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 0.0, 0.0, 1.0])
    a = rl.group_advantages(r, 4)
    torch.testing.assert_close(a, torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0, 2, -1, -1, 0]))
    s = rl.group_advantages(r, 4, scale="std")
    sd = math.sqrt(((0.5 ** 2) * 4) / 3)                       # unbiased std of (1, 0, 0, 1)
    sd3 = math.sqrt((4 + 1 + 1 + 0) / 3)                       # of (3, 0, 0, 1), mean 1
    want = torch.tensor([.5 / (sd + 1e-4), -.5 / (sd + 1e-4), -.5 / (sd + 1e-4), .5 / (sd + 1e-4), 0, 0, 0, 0,
                         2 / (sd3 + 1e-4), -1 / (sd3 + 1e-4), -1 / (sd3 + 1e-4), 0])
    torch.testing.assert_close(s, want)
    # every group sums to zero
    assert torch.allclose(a.view(3, 4).sum(1), torch.zeros(3), atol=1e-6)


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="whole number of groups"):
        rl.group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="non-finite values at \\[2\\]"):
        rl.group_advantages(torch.tensor([0.0, 1.0, float("nan"), 1.0]), 2)
    with pytest.raises(ValueError, match="scale must be"):
        rl.group_advantages(torch.zeros(4), 2, scale="mean")
    with pytest.raises(ValueError, match="group_size"):
        rl.group_advantages(torch.zeros(4), 0)
    with pytest.raises(TypeError, match="floating-point"):
        rl.group_advantages(torch.zeros(4, dtype=torch.long), 2)


# ----------------------------------------------------------------------------------------------- text loss
def _policy(B=5, T=7, V=11, seed=0):
    """A tiny categorical policy: logits (B, T, V) as a parameter, sampled tokens, their log-probs."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[0] = True
    mask[1, 2:] = False                                        # a short sequence
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logits, tokens, mask, adv


def _logp(logits, tokens):
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]


@pytest.mark.parametrize("norm", ["token", "sequence", "constant"])
def test_token_pg_loss_first_epoch_is_the_policy_gradient(norm):
    logits, tokens, mask, adv = _policy()
    lp = _logp(logits, tokens)
    loss, stats = rl.token_pg_loss(lp, lp.detach(), adv, mask, norm=norm, max_len=9 if norm == "constant" else None)
    (g,) = torch.autograd.grad(loss, logits)
    # the plain policy-gradient objective, written independently: -A * logp averaged as the norm says
    lp2 = _logp(logits, tokens)
    m = mask.double()
    if norm == "token":
        obj = -(adv[:, None] * lp2 * m).sum() / m.sum()
    elif norm == "sequence":
        obj = torch.stack([-(adv[b] * lp2[b][mask[b]]).mean() for b in range(len(adv))]).mean()
    else:
        obj = -(adv[:, None] * lp2 * m).sum() / (len(adv) * 9)
    (g2,) = torch.autograd.grad(obj, logits)
    torch.testing.assert_close(g, g2, rtol=1e-12, atol=1e-14)
    assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0 and stats["tokens"] == float(mask.sum())
    if norm == "token":                                         # ratio 1: the value is -(mean advantage per token)
        torch.testing.assert_close(loss, -(adv[:, None] * m).sum() / m.sum())


def test_token_pg_loss_clipping_engages_exactly_where_it_should():
    # one token per case: ratio r = exp(d), advantage A; clipping range 0.2
    d = torch.tensor([[0.5, 0.5, -0.5, -0.5, 0.1, -0.1, 0.0, 0.3]], dtype=torch.float64).T   # (8, 1)
    A = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -2.0], dtype=torch.float64)
    old = torch.zeros(8, 1, dtype=torch.float64)
    lp = d.clone().requires_grad_(True)
    loss, stats = rl.token_pg_loss(lp, old, A, torch.ones(8, 1, dtype=torch.bool), clip=0.2)
    (g,) = torch.autograd.grad(loss, lp)
    r = torch.exp(d[:, 0])
    # clipped (no gradient): A > 0 and r > 1.2, or A < 0 and r < 0.8
    clipped = ((A > 0) & (r > 1.2)) | ((A < 0) & (r < 0.8))
    assert clipped.tolist() == [True, False, False, True, False, False, False, False]
    assert (g[clipped] == 0).all() and (g[~clipped] != 0).all()
    torch.testing.assert_close(g[~clipped, 0], -(A * r)[~clipped] / 8)
    assert stats["clip_frac"] == pytest.approx(2 / 8)
    # asymmetric (DAPO clip-higher): 0.5 -> r = 1.65 is clipped at high 0.28 but not at high 0.7
    _, s2 = rl.token_pg_loss(d, old, A, torch.ones(8, 1, dtype=torch.bool), clip=(0.2, 0.7))
    assert s2["clip_frac"] == pytest.approx(1 / 8)


def test_kl_k3_against_the_closed_form_on_small_categoricals():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
        q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
        kl = (p * (p.log() - q.log())).sum()
        # the expectation of k3 under the policy is exactly KL(p || q)
        torch.testing.assert_close((p * rl.kl_k3(p.log(), q.log())).sum(), kl)
        assert (rl.kl_k3(p.log(), q.log()) >= 0).all()


def test_token_pg_loss_kl_term_value_and_gradient():
    logits, tokens, mask, adv = _policy(seed=3)
    lp = _logp(logits, tokens)
    ref = lp.detach() + 0.3 * torch.randn_like(lp)
    beta = 0.04
    loss, stats = rl.token_pg_loss(lp, lp.detach(), torch.zeros_like(adv), mask, ref_logp=ref, kl_beta=beta)
    m = mask.double()
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    torch.testing.assert_close(loss, beta * (k3 * m).sum() / m.sum())
    assert stats["kl"] == pytest.approx(float((k3 * m).sum().detach() / m.sum()))
    (g,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(g, beta * (1 - torch.exp(ref - lp.detach())) * m / m.sum())
    with pytest.raises(ValueError, match="needs ref_logp"):
        rl.token_pg_loss(lp, lp, adv, mask, kl_beta=0.1)


def test_token_pg_loss_bad_input():
    lp = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="norm must be"):
        rl.token_pg_loss(lp, lp, torch.zeros(2), m, norm="mean")
    with pytest.raises(ValueError, match="advantages must be \\(2,\\)"):
        rl.token_pg_loss(lp, lp, torch.zeros(3), m)
    with pytest.raises(ValueError, match="mask must be"):
        rl.token_pg_loss(lp, lp, torch.zeros(2), m[:, :2])
    with pytest.raises(ValueError, match="clip must be"):
        rl.token_pg_loss(lp, lp, torch.zeros(2), m, clip=-0.1)
    with pytest.raises(ValueError, match="kl_beta"):
        rl.token_pg_loss(lp, lp, torch.zeros(2), m, kl_beta=float("nan"))


# ----------------------------------------------------------------------------------------------- image loss
def _flowgrpo_transition(x, v, t, t_next, a):
    """Flow-GRPO's SDE step written literally in its own convention (sigma = 1 - t is the noise level, its model
    output u = -v points to the noise, dt = sigma_next - sigma < 0, std_dev_t = a sqrt(sigma / (1 - sigma)))."""
    s, s_next = 1 - t, 1 - t_next
    dt = s_next - s
    std_dev_t = a * math.sqrt(s / (1 - s))
    u = -v
    mean = x * (1 + std_dev_t ** 2 / (2 * s) * dt) + u * (1 + std_dev_t ** 2 * (1 - s) / (2 * s)) * dt
    return mean, std_dev_t * math.sqrt(-dt)


def test_image_step_logprob_against_a_direct_gaussian_and_finite_differences():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, dtype=torch.float64, generator=g)
    v = torch.randn(3, 40, dtype=torch.float64, generator=g)
    t, tn, a = 0.3, 0.45, 0.7
    mean, std = _flowgrpo_transition(x, v, t, tn, a)
    z = torch.randn(3, 40, dtype=torch.float64, generator=g)
    x_next = mean + std * z
    with umm_ops.use_backend("reference"):
        vv = v.clone().requires_grad_(True)
        lp = umm_ops.flow_logprob(x, x_next, vv, t, tn, umm_ops.SigmaSchedule(a))
        direct = (-z ** 2 / 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(1)
        torch.testing.assert_close(lp.double(), direct, rtol=1e-6, atol=1e-6)
        (gv,) = torch.autograd.grad(lp.sum(), vv)
        # finite differences in v, a few elements
        for (i, j) in [(0, 0), (1, 17), (2, 39)]:
            e = torch.zeros_like(v)
            e[i, j] = 1e-5
            f = lambda vx: umm_ops.flow_logprob(x, x_next, vx, t, tn, umm_ops.SigmaSchedule(a)).double().sum()  # noqa
            fd = (f(v + e) - f(v - e)) / 2e-5
            assert float(gv[i, j]) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)


def test_flow_pg_loss_first_epoch_and_kl():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)   # stands in for the velocity
    lp = w * 0.5                                                                    # (B=6, S=3) log-probs
    adv = torch.randn(6, dtype=torch.float64, generator=g)
    kl = (w - 1) ** 2
    loss, stats = rl.flow_pg_loss(lp, lp.detach(), adv, kl=kl, kl_beta=0.1, clip=1e-4)
    (gw,) = torch.autograd.grad(loss, w)
    want = (-(adv[:, None] * 0.5) + 0.1 * 2 * (w.detach() - 1)) / 18
    torch.testing.assert_close(gw, want)
    assert stats["steps"] == 18 and stats["ratio_mean"] == 1.0
    # a mask drops steps; adv_clip clamps advantages
    mask = torch.zeros(6, 3, dtype=torch.bool)
    mask[:, 1] = True
    lp = w * 0.5
    loss2, _ = rl.flow_pg_loss(lp, lp.detach(), adv * 100, mask=mask, adv_clip=5.0)
    (gw2,) = torch.autograd.grad(loss2, w)
    assert (gw2[:, [0, 2]] == 0).all()
    torch.testing.assert_close(gw2[:, 1], -(adv * 100).clamp(-5, 5) * 0.5 / 6)


# ----------------------------------------------------------------------------------------------- schedules
def test_sde_schedules():
    S = rl.SDESchedule
    assert S("all").steps_for(6, 0, 1) == [0, 1, 2, 3, 4]
    assert [S("cycle", recordable=3).steps_for(6, k, 1) for k in range(5)] == [[0], [1], [2], [0], [1]]
    assert S("window", start=1, width=2).steps_for(6, 7, 1) == [1, 2]
    assert [S("window", start=0, width=2, shift_every=2).steps_for(6, k, 1)[0] for k in range(0, 12, 2)] == \
        [0, 1, 2, 3, 0, 1]
    draws = {S("random", low=1, high=4).steps_for(6, 0, s)[0] for s in range(40)}
    assert draws == {1, 2, 3}
    assert S("random").steps_for(6, 0, 5) == S("random").steps_for(6, 9, 5)      # per trajectory seed
    with pytest.raises(ValueError, match="kind"):
        S("none").validate(6)
    with pytest.raises(ValueError, match="width"):
        S("window", width=6).validate(6)
    with pytest.raises(ValueError, match=">= 2 sampler steps"):
        S().validate(1)


# ----------------------------------------------------------------------------------------------- rewards
def test_rewards():
    from umm_ops.data.synthetic import SyntheticWorld

    rec = SyntheticWorld(size=64, seed=0, max_objects=1, length=4)[0]
    img = rec.image.float() / 127.5 - 1
    tr = {"prompt": rec.prompt["text"], "meta": {"spec": rec.prompt}, "image": img}
    assert rl.PixelCheckReward()(tr) == (1.0, {"checker_correct": 1.0})
    assert rl.PixelCheckReward()(dict(tr, image=torch.zeros_like(img)))[0] < 1.0
    # a model whose pixels are in [0, 1] (the released Cheers profile): read in its range, the same verdict
    unit = dict(tr, image=rec.image.float() / 255.0)
    assert rl.PixelCheckReward(value_range=(0.0, 1.0))(unit) == (1.0, {"checker_correct": 1.0})
    assert rl.PixelCheckReward()(unit)[0] < 1.0         # read as [-1, 1] it is a different picture
    assert rl.AnswerReward("exact")({"meta": {"answer": "Red"}, "text": "<answer> red. </answer>"}) == 1.0
    assert rl.AnswerReward("choice")({"meta": {"answer": "B"}, "text": "the answer is B"}) == 1.0
    assert rl.AnswerReward("choice")({"meta": {"answer": "B"}, "text": "A"}) == 0.0
    assert rl.AnswerReward("numeric")({"meta": {"answer": "3"}, "text": "3.0 squares"}) == 1.0
    f = rl.FormatReward()
    assert f({"text": "<think>x</think><answer>y</answer>"}) == (1.0, {"format_ordered": 1.0})
    assert f({"text": "<answer>y</answer><think>x</think>"})[0] == pytest.approx(0.7)
    assert f({"text": "<think>x"})[0] == 0.0
    d = rl.DecisionReward()
    assert [d({"meta": {"answer": "a"}, "text": t, "restored": r}) for r, t in
            [(True, "a"), (False, "a"), (True, "b"), (False, "b")]] == [1.0, 0.6, 0.4, -0.2]
    red = torch.stack([torch.ones(4, 4), -torch.ones(4, 4), -torch.ones(4, 4)])
    assert rl.MeanColorReward(0)({"image": red}) == 2.0
    w = rl.WeightedReward({"fmt": (0.5, f), "acc": (1.0, rl.AnswerReward())})
    v, parts = w({"meta": {"answer": "y"}, "text": "<think>x</think><answer>y</answer>"})
    assert v == 1.5 and parts["fmt"] == 1.0 and parts["acc"] == 1.0
    r, p = rl.score(w, [{"meta": {"answer": "y"}, "text": "y"}, {"meta": {"answer": "y"}, "text": "n"}])
    assert r.tolist() == [1.0, 0.0] and p["acc"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="must be finite"):
        rl.score(lambda tr: float("nan"), [{"prompt": "p"}])


# ----------------------------------------------------------------------------------------------- rollouts
@pytest.fixture(scope="module")
def model():
    from conftest import tiny_eval_model

    return tiny_eval_model(64)


def test_text_rollout_replays_and_recomputes(model):
    prompts = ["a red circle", "two blue squares on the left"]
    kw = dict(seed=7, step=3, keys=["p0", "p1"], max_new_tokens=6, temperature=1.0)
    a = rl.rollout_text(model, prompts, 3, **kw)
    b = rl.rollout_text(model, prompts, 3, **kw)
    assert a.ids == b.ids and torch.equal(a.logprobs, b.logprobs)
    # a trajectory does not depend on the other prompts of the batch (sharding by prompt groups is exact)
    c = rl.rollout_text(model, prompts[1:], 3, **dict(kw, keys=["p1"]))
    assert c.ids == a.ids[3:]
    torch.testing.assert_close(c.logprobs, a.logprobs[3:, :c.logprobs.shape[1]], rtol=1e-5, atol=1e-5)
    assert len({tuple(i) for i in a.ids[:3]}) > 1                 # the group's samples differ
    # the differentiable recomputation agrees with what the sampler recorded
    lp, mask = rl.token_logprobs(model, a.prompts, a.ids, temperature=1.0)
    assert torch.equal(mask.cpu(), a.mask)
    torch.testing.assert_close(lp.detach()[mask], a.logprobs[a.mask], rtol=1e-4, atol=1e-4)
    assert lp.requires_grad


def test_image_rollout_replays_and_recomputes(model):
    prompts = ["a red circle", "two blue squares"]
    kw = dict(seed=1, step=2, keys=[10, 11], steps=4, cfg_scale=2.0, sigma=umm_ops.SigmaSchedule(0.7))
    a = rl.rollout_images(model, prompts, 2, **kw)
    b = rl.rollout_images(model, prompts, 2, **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.logprobs, b.logprobs)
    assert a.x.shape == (4, 3, 16, 128) and a.logprobs.shape == (4, 3)
    assert not torch.equal(a.latents[0], a.latents[1])           # samples of a group differ
    c = rl.rollout_images(model, prompts[1:], 2, **dict(kw, keys=[11]))
    torch.testing.assert_close(c.latents, a.latents[2:], rtol=1e-4, atol=1e-4)
    lp, kl = rl.image_logprobs(model, a, reference=model)
    torch.testing.assert_close(lp.detach(), a.logprobs, rtol=1e-4, atol=1e-4)
    assert float(kl.detach().abs().max()) < 1e-8 and lp.requires_grad
    # one stochastic step per trajectory (R3), a shared initial noise per group
    r = rl.rollout_images(model, prompts, 2, **dict(kw, schedule=rl.SDESchedule("random")), same_init_noise=True)
    assert r.x.shape[1] == 1 and set(r.steps[:, 0].tolist()) <= {0, 1, 2}
    w = rl.rollout_images(model, prompts, 2, **dict(kw, schedule=rl.SDESchedule("window", start=0, width=1)),
                          same_init_noise=True)
    assert torch.equal(w.x[0, 0], w.x[1, 0]) and not torch.equal(w.x[0, 0], w.x[2, 0])
    assert not torch.equal(w.x_next[0, 0], w.x_next[1, 0])      # the SDE noise still differs
    lp1, _ = rl.image_logprobs(model, r)
    torch.testing.assert_close(lp1.detach(), r.logprobs, rtol=1e-4, atol=1e-4)


def test_interleaved_rollout_replays_feeds_images_back_and_recomputes(model):
    from umm_ops.data.packing import ImageItem

    plan = [rl.Seg("text", max_new_tokens=5),
            rl.Seg("image", steps=4, cfg_scale=2.0, schedule=rl.SDESchedule("window", start=1, width=2)),
            rl.Seg("text", max_new_tokens=3),
            # a conditional segment: only for trajectories whose first text has an even number of tokens
            rl.Seg("image", steps=3, schedule=rl.SDESchedule("random"),
                   when=lambda tr: len(tr.segments[0]["ids"]) % 2 == 0)]
    kw = dict(seed=4, step=1, keys=["q0", "q1"])
    a = rl.rollout_interleaved(model, ["describe a red circle", "draw two squares"], 2, plan, **kw)
    b = rl.rollout_interleaved(model, ["describe a red circle", "draw two squares"], 2, plan, **kw)
    assert len(a) == 4
    for x, y in zip(a, b):
        assert [s.get("ids") for s in x.segments] == [s.get("ids") for s in y.segments]
        for s, t in zip(x.segments, y.segments):
            if s["kind"] == "image":
                assert torch.equal(s["image"], t["image"])
    for tr in a:
        kinds = [s["kind"] for s in tr.segments]
        assert kinds[:3] == ["text", "image", "text"]
        assert (len(kinds) == 4) == (len(tr.segments[0]["ids"]) % 2 == 0)
        # the image enters the next segment's context as an image to understand
        items = tr.segments[2]["context"].items
        imgs = [it for it in items if isinstance(it, ImageItem)]
        assert len(imgs) == 1 and imgs[0].role == "understand" and torch.equal(imgs[0].image, tr.segments[1]["image"])
    lp = rl.interleaved_logprobs(model, a, reference=model)
    m = lp["text_mask"]
    assert int(m.sum()) == sum(len(s["ids"]) for tr in a for s in tr.segments if s["kind"] == "text")
    torch.testing.assert_close(lp["text_logp"].detach()[m], lp["text_old"][m], rtol=1e-4, atol=1e-4)
    im = lp["image_mask"]
    assert int(im.sum()) == sum(2 if s["index"] == 1 else 1 for tr in a for s in tr.segments if s["kind"] == "image")
    torch.testing.assert_close(lp["image_logp"].detach()[im], lp["image_old"][im], rtol=1e-4, atol=1e-4)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, st = rl.interleaved_pg_loss(lp, adv, image_weight=0.5, text_kl_beta=0.04, image_kl_beta=0.01)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    assert st["text_ratio_mean"] == pytest.approx(1.0, abs=1e-3) and "image_pg_loss" in st
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------- profiles
@pytest.fixture(scope="module")
def cheers_model(tmp_path_factory):
    """A tiny model under the released Cheers conventions (chat template with system turn, <im_start> wrappers,
    <no_mean> null prompt, a dummy image in front of prompts without one, the released sampler grid, [0, 1])."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "helpers"))
    from cheers_released import tiny_cheers_model, write_qwen_like_tokenizer

    return tiny_cheers_model(write_qwen_like_tokenizer(tmp_path_factory.mktemp("qwen_like")))


@pytest.mark.parametrize("profile", ["umm", "cheers"])
def test_recomputed_logprobs_equal_the_sampled_ones_under_each_profile(profile, model, cheers_model):
    """Online RL's recomputation builds each context as generation built it (the model's profile): the decoder's
    recorded token log-probs equal token_logprobs', and the SDE rollout's recorded transition log-probs equal
    image_logprobs' (old == new at step 0), under this project's profile and the released Cheers one (where the
    dummy image of a prompt comes from its trajectory seed and the sampler runs on the released grid)."""
    m = model if profile == "umm" else cheers_model
    assert m.profile.name == profile
    prompts = ["a red circle", "two blue squares on the left"]
    a = rl.rollout_text(m, prompts, 2, seed=5, step=1, keys=["p0", "p1"], max_new_tokens=5, temperature=1.0)
    lp, mask = rl.token_logprobs(m, a.prompts, a.ids, temperature=1.0, seed=a.seeds)
    assert torch.equal(mask.cpu(), a.mask)
    torch.testing.assert_close(lp.detach().cpu()[mask.cpu()], a.logprobs[a.mask], rtol=1e-4, atol=1e-4)
    ro = rl.rollout_images(m, prompts, 2, seed=3, step=0, keys=[0, 1], steps=4, cfg_scale=2.0,
                           sigma=umm_ops.SigmaSchedule(0.7))
    assert ro.logprobs.shape == (4, 3) and bool((ro.logprobs != 0).all())      # every recorded step stochastic
    ilp, _ = rl.image_logprobs(m, ro)
    torch.testing.assert_close(ilp.detach().cpu(), ro.logprobs.cpu(), rtol=1e-4, atol=1e-4)
    if profile == "umm":
        return
    # the released grid: v at time_shift(linspace(0, 1, 4), a) - 4 points, the last at t = 1 (never recorded)
    sh = m.config.time_shift
    grid = torch.linspace(0, 1, 4)
    grid = (sh * grid) / (1.0 + (sh - 1.0) * grid)
    assert torch.equal(ro.t[0].float(), grid[:3]) and torch.equal(ro.t_next[0].float(), grid[1:])
    # what the old recomputation did - no dummy of the trajectory's seed - is off, and is now refused
    wrong, _ = rl.token_logprobs(m, a.prompts, a.ids, temperature=1.0, seed=[s + 1 for s in a.seeds])
    assert float((wrong.detach().cpu()[mask.cpu()] - a.logprobs[a.mask]).abs().max()) > 1e-2
    with pytest.raises(ValueError, match="pass seed="):
        rl.token_logprobs(m, a.prompts, a.ids, temperature=1.0)
    import dataclasses

    with pytest.raises(ValueError, match="ImageRollout.seeds"):
        rl.image_logprobs(m, dataclasses.replace(ro, seeds=[]))
    off = rl.image_logprobs(m, dataclasses.replace(ro, seeds=[s + 1 for s in ro.seeds]))[0]
    assert float((off.detach().cpu() - ro.logprobs.cpu()).abs().max()) > 1e-3


def test_interleaved_recomputation_under_the_cheers_profile(cheers_model):
    """Interleaved rollouts record each segment's seed and the recomputation passes it on: under the released
    Cheers conventions (a prompt without an image gets a dummy image drawn from the seed) the recomputed text and
    image log-probs equal the sampled ones."""
    m = cheers_model
    plan = [rl.Seg("text", max_new_tokens=4),
            rl.Seg("image", steps=4, cfg_scale=2.0, sigma=0.3, schedule=rl.SDESchedule("cycle", recordable=3)),
            rl.Seg("text", max_new_tokens=3)]
    a = rl.rollout_interleaved(m, ["a red circle", "two blue squares"], 2, plan, seed=2, step=1, keys=["q0", "q1"])
    assert all("seed" in s for t in a for s in t.segments)
    lp = rl.interleaved_logprobs(m, a)
    mt, mi = lp["text_mask"], lp["image_mask"]
    assert int(mt.sum()) > 0 and int(mi.sum()) == 4
    torch.testing.assert_close(lp["text_logp"].detach()[mt], lp["text_old"][mt], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp["image_logp"].detach()[mi], lp["image_old"][mi], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["flow-grpo", "r3"])
def test_checker_rewards_use_the_worlds_min_area(recipe):
    """The RL recipes read generated images with the world's ``min_object_area``: confetti (fragments far smaller
    than any object) earns nothing, where the checker's default threshold would pay for it."""
    from conftest import confetti_picture
    from umm_ops.train.config import Config
    from umm_ops.train.spec import get_recipe

    cfg = Config.from_dict({"recipe_name": recipe, "job": {"out": "unused", "device": "cpu", "steps": 2}})
    rec = get_recipe(recipe)
    world = rec._world(cfg, 64)
    assert rec._min_area is None
    rec.build_data(cfg, rec.build_model(cfg))
    assert rec._min_area == world.min_object_area > 0.004 * cfg.recipe.image_size ** 2
    side = math.isqrt(world.min_object_area - 1)
    trs = [{"meta": {"spec": world[k].prompt}, "image": confetti_picture(k, cfg.recipe.image_size, side).float()
            / 127.5 - 1} for k in range(32)]
    plain = rl.PixelCheckReward()
    assert sum(plain(t)[0] for t in trs) > 0                   # the default threshold pays for confetti ...
    if recipe == "flow-grpo":
        reward = rec._reward(cfg.recipe)
        assert reward.min_area == world.min_object_area and sum(reward(t)[0] for t in trs) == 0.0
    else:
        from umm_ops.eval.tasks.geneval import score_image
        assert sum(score_image(t["meta"]["spec"], t["image"], rec._pixel_range, rec._min_area)["score"]
                   for t in trs) == 0.0
