"""CLEAR stage 3 (issue 16): the clear-grpo recipe - its reward against the paper's table and weights computed by
hand, the latent-quality reward against its formula, the prompt data, a rollout that restores exactly when the
model writes the marker (and records the cycle's step), the loss of a fixed rollout against an independent
computation of Dr.GRPO's PPO terms, and a few-step run from the CLI."""
import copy
import math

import pytest
import torch

from umm_ops.data.clear_data import RESTORE_TAG
from umm_ops.data.synthetic import SyntheticWorld
from umm_ops.train.recipes.clear_grpo import (ClearGRPORecipe, ClearPromptDataset, clear_reward, latent_quality,
                                              trajectory_text)


def test_clear_reward_by_hand():
    # (text, answer, restored, multiple choice) -> accuracy, format (0.35 think + 0.35 answer + 0.3 order), decision
    cases = [
        ("<think> a red circle </think><answer>red</answer>", "red", False, False, 1.0, 1.0, 0.6),
        (f"<think> degraded </think> {RESTORE_TAG}<think> blue </think><answer>blue</answer>", "red", True, False,
         0.0, 1.0, 0.4),
        (f"<think> x </think> {RESTORE_TAG}<think> y </think><answer> Red. </answer>", "red", True, False,
         1.0, 1.0, 1.0),
        ("<answer>red</answer><think> late </think>", "red", False, False, 1.0, 0.7, 0.6),       # order wrong
        ("red", "red", False, False, 0.0, 0.0, -0.2),                                            # no answer tag
        ("<think> t </think><answer>B</answer>", "B", False, True, 1.0, 1.0, 0.6),
        ("<think> t </think><answer>C</answer>", "B", True, True, 0.0, 1.0, 0.4),
        ("<think> unclosed", "B", False, True, 0.0, 0.0, -0.2),
    ]
    for text, ans, restored, mc, acc, fmt, dec in cases:
        total, parts = clear_reward(text, ans, restored, mc)
        assert parts["accuracy"] == acc and parts["format"] == pytest.approx(fmt) and parts["decision"] == dec, text
        assert total == pytest.approx(acc + fmt)                    # default weights: accuracy + format
        total, _ = clear_reward(text, ans, restored, mc, accuracy_weight=2.0, format_weight=0.5,
                                decision_weight=0.25, latent=0.8, latent_weight=0.1)
        assert total == pytest.approx(2.0 * acc + 0.5 * fmt + 0.25 * dec + 0.1 * 0.8)


def test_latent_quality_against_its_formula():
    """CLEAR's released latent_quality_reward ("vae" mode), computed here element by element: r_mse =
    exp(-0.5 MSE), r_cos = max(0, cosine of the flattened latents), r_local = mean over tokens of max(0, cosine),
    score = 0.3 r_mse + 0.3 r_cos + 0.4 r_local."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    b[:8] = a[:8] + 0.3 * b[:8]                      # half the tokens alike, so clamping and the parts matter
    toks = [float(a[i] @ b[i] / (a[i].norm() * b[i].norm())) for i in range(16)]
    local = sum(max(c, 0.0) for c in toks) / 16
    flat = float((a * b).sum() / (a.norm() * b.norm()))
    mse = sum(float(((a[i] - b[i]) ** 2).sum()) for i in range(16)) / a.numel()
    assert min(toks) < 0 < flat                       # a negative token cosine is clamped, not averaged in
    assert latent_quality(a, b, "local") == pytest.approx(local, abs=1e-6)
    assert latent_quality(a, b, "cosine") == pytest.approx(max(flat, 0.0), abs=1e-6)
    assert latent_quality(a, -a, "cosine") == 0.0
    assert latent_quality(a, b, "mse") == pytest.approx(math.exp(-0.5 * mse), rel=1e-5)
    assert latent_quality(a, b, "mse", mse_scale=2.0) == pytest.approx(math.exp(-2.0 * mse), rel=1e-5)
    want = 0.3 * math.exp(-0.5 * mse) + 0.3 * max(flat, 0.0) + 0.4 * local
    assert latent_quality(a, b, "vae") == pytest.approx(want, rel=1e-5)
    assert latent_quality(a, a, "vae") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        latent_quality(a, b[:4], "cosine")
    with pytest.raises(ValueError, match="one of vae, mse, cosine, local"):
        latent_quality(a, b, "l1")
    with pytest.raises(ValueError, match="non-finite"):
        latent_quality(a, b.clone().fill_(float("nan")), "vae")


def test_prompt_data():
    w = SyntheticWorld(size=64, seed=0, max_objects=2, length=20)
    ds = ClearPromptDataset(w, 20, "short", ("clean", "low", "mid", "high"))
    i, p, meta = ds[3]
    i2, p2, meta2 = ClearPromptDataset(w, 20, "short")[3]
    assert i == 3 and torch.equal(p.items[0].image, p2.items[0].image) and meta["answer"] == meta2["answer"]
    rec = w[3]
    assert meta["answer"] in [q["answer"] for q in rec.vqa] and meta["level"] in ("clean", "low", "mid", "high")
    assert torch.equal(meta["clean"], rec.image.float() / 127.5 - 1.0)
    assert p.items[0].role == "understand" and "<answer>" in p.items[1].text
    clean = ClearPromptDataset(w, 20, "choice", ("clean",))
    for k in range(5):
        _, pk, mk = clean[k]
        assert torch.equal(pk.items[0].image, mk["clean"]) and mk["degradation"] is None
        assert mk["answer"] in "ABCD" and len(mk["answer"]) == 1
    high = ClearPromptDataset(w, 20, "short", ("high",))
    changed = [not torch.equal(high[k][1].items[0].image, high[k][2]["clean"]) for k in range(8)]
    assert sum(changed) >= 6 and all(high[k][2]["level"] == "high" for k in range(8))
    with pytest.raises(IndexError, match="out of range"):
        ds[20]


class _Ctx:
    def __init__(self, step, seed=0, **recipe):
        from umm_ops.train import Config

        self.step, self.micro_index, self.seed = step, 0, seed
        self.config = Config.build("clear-grpo", overrides=[f"recipe.{k}={v}" for k, v in recipe.items()])


class _Policy:
    """model(fn, *args) -> fn(model, *args), as the engine's PolicyModel does."""

    def __init__(self, model):
        self.model = model

    def __call__(self, fn, *a, **kw):
        return fn(self.model, *a, **kw)

    def __getattr__(self, k):
        return getattr(self.model, k)


@pytest.fixture(scope="module")
def model():
    from umm_ops.model.cheers import CheersModel, with_tokenizer

    torch.manual_seed(0)
    m = with_tokenizer(CheersModel("tiny"), "world+clear")
    m.config.image_size = 32
    return m.eval()


def _batch(n=2, levels="clean,high"):
    from umm_ops.train.recipes.clear_grpo import _collate, _Encode

    w = SyntheticWorld(size=32, seed=0, max_objects=2, length=10)
    ds = ClearPromptDataset(w, 10, "short", tuple(levels.split(",")))
    return _collate([_Encode(1)(ds[k], k, 0) for k in range(n)])


def _bias(model, value):
    """A forward hook on the LM head that adds `value` to the restoration marker's logit."""
    tag = model.tokenizer.encode(RESTORE_TAG)
    assert len(tag) == 1
    b = torch.zeros(model.llm.lm_head.weight.shape[0])
    b[tag[0]] = value
    return model.llm.lm_head.register_forward_hook(lambda mod, inp, out: out + b.to(out.dtype))


RECIPE = dict(group_size=2, think_tokens=4, answer_tokens=3, restore_steps=4, recordable=3, image_size=32)


def test_rollout_restores_exactly_when_the_marker_is_written(model):
    recipe, batch = ClearGRPORecipe(), _batch()
    h = _bias(model, 40.0)               # the marker is the likeliest token: every trajectory asks at once
    try:
        trajs, rewards, parts = recipe.rollout(_Policy(model), batch, _Ctx(5, **RECIPE))
    finally:
        h.remove()
    assert len(trajs) == 4 and parts["restored"] == 1.0
    for t in trajs:
        kinds = [s["kind"] for s in t.segments]
        assert kinds == ["text", "image", "text"]
        assert t.segments[0]["context_text"] == RESTORE_TAG
        img = t.segments[1]
        assert img["steps"].tolist() == [5 % 3]            # the cycle's step of optimizer step 5
        assert img["latent"].shape == img["x"].shape[1:]
        # the answer reads the restoration as an image to understand, after the marker
        items = t.segments[2]["context"].items
        assert items[-1].role == "understand" and torch.equal(items[-1].image, img["image"])
        assert trajectory_text(t).startswith(RESTORE_TAG)
    h = _bias(model, -40.0)              # never the marker: one text, no restoration
    try:
        trajs, rewards, parts = recipe.rollout(_Policy(model), batch, _Ctx(5, **RECIPE))
    finally:
        h.remove()
    assert parts["restored"] == 0.0 and all([s["kind"] for s in t.segments] == ["text"] for t in trajs)
    assert rewards.shape == (4,) and parts["decision"] == -0.2     # a random model answers nothing right


def test_loss_of_a_fixed_rollout_against_an_independent_computation(model):
    from umm_ops import rl

    torch.manual_seed(1)
    recipe, batch = ClearGRPORecipe(), _batch()
    r = _Ctx(2, **RECIPE, text_kl=0.04, image_weight=0.5).config.recipe
    h = _bias(model, 5.0)                # some trajectories restore, some answer directly (3 of 4 here)
    try:
        trajs, _, _ = recipe.rollout(_Policy(model), batch, _Ctx(2, **RECIPE))
    finally:
        h.remove()
    n_img = sum(len(t.segments) > 1 for t in trajs)
    assert 0 < n_img < len(trajs), "the fixed rollout should mix restored and direct trajectories"
    rewards = torch.tensor([1.0, 0.0, 0.3, 1.7])
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    recipe._reference = ref
    loss, st = recipe.loss(_Policy(model), trajs, rewards, r)

    # independent: per trajectory, the log-probs of each segment on its own, then Dr.GRPO's terms by hand
    adv = torch.tensor([0.5, -0.5, -0.7, 0.7])             # reward - group mean, groups of 2, no std
    budget = r.think_tokens + r.answer_tokens
    text_sum, img_terms = 0.0, []
    with torch.no_grad():
        for b, t in enumerate(trajs):
            for s in t.segments:
                if s["kind"] == "text" and s["ids"]:
                    lp, _ = rl.token_logprobs(model, [s["context"]], [s["ids"]])
                    lr, _ = rl.token_logprobs(ref, [s["context"]], [s["ids"]])
                    lp, lr = lp[0, :len(s["ids"])], lr[0, :len(s["ids"])]
                    ratio = torch.exp(lp - s["logprobs"])
                    pg = -torch.minimum(ratio * adv[b], ratio.clamp(0.8, 1.2) * adv[b])
                    k3 = torch.exp(lr - lp) - (lr - lp) - 1
                    text_sum += float((pg + 0.04 * k3).sum())
                elif s["kind"] == "image":
                    ro = rl.ImageRollout([s["context"]], [0], 1, s["image"][None], None, s["x"][None],
                                         s["x_next"][None], s["t"][None], s["t_next"][None], s["logprobs"][None],
                                         s["steps"][None], s["sigma"], s["cfg_scale"], *s["hw"], [])
                    lp, _ = rl.image_logprobs(model, ro)
                    ratio = torch.exp(lp[0] - s["logprobs"])
                    img_terms += (-torch.minimum(ratio * adv[b], ratio.clamp(0.8, 1.2) * adv[b])).tolist()
    want = text_sum / (len(trajs) * budget) + 0.5 * sum(img_terms) / len(img_terms)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert st["image_steps"] == n_img
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_config_refusals():
    from umm_ops.train import Config
    from umm_ops.train.config import ConfigError

    for bad, what in (("recipe.recordable=10", "recordable"), ("recipe.answers=long", "answers"),
                      ("recipe.levels=['dark']", "levels"), ("recipe.text_norm=seq", "text_norm"),
                      ("recipe.latent_reward=l2", "latent_reward")):
        with pytest.raises(ConfigError, match=what):
            Config.build("clear-grpo", overrides=[bad]).validate()


def test_a_few_steps_from_the_cli(tmp_path, capsys):
    from umm_ops.cli import main

    out = tmp_path / "cg"
    assert main(["train", "--recipe", "clear-grpo", "--steps", "2", "--out", str(out), "--set",
                 "recipe.image_size=32", "--set", "recipe.group_size=2", "--set", "recipe.prompts_per_micro=1",
                 "--set", "recipe.think_tokens=4", "--set", "recipe.answer_tokens=3", "--set",
                 "recipe.restore_steps=3", "--set", "recipe.recordable=2", "--set", "recipe.eval_items=2",
                 "--set", "recipe.eval_steps=2", "--set", "recipe.decision_weight=0.5", "--set",
                 "recipe.latent_reward=vae", "--set", "recipe.latent_weight=0.2", "--set", "checkpoint.every=2",
                 "--set", "metrics.plot=false"]) == 0
    text = capsys.readouterr().out
    assert "reward" in text and "restored" in text and "eval clear-short" in text
    assert (out / "checkpoint-2").is_dir()
