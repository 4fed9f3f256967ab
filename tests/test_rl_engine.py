"""Online RL on the training engine: the flow-grpo recipe and a text GRPO loop learn rewards a tiny model can learn
fast (seeded, margins measured over seeds), PPO epochs reuse a rollout and resume exactly, and 2 gloo ranks
sharding the prompt groups give the same run as one process.

Margins.  flow-grpo, mean redness (32 px, G=4, 2 prompts, 4 sampler steps, no CFG, lr 1e-3, 12 steps): the mean
reward of the last 3 steps minus that of the first 3 was +0.115 / +0.102 / +0.097 for seeds 0 / 1 / 2, against
-0.023 / +0.025 / -0.016 with lr 1e-12 (no learning: the sampling noise of those means): the test asks for > 0.05.
(With CFG 4 the same 12 steps did not learn: docs/results/flow-grpo.)  Text ("start the answer with A", after 30 steps of
SFT on uniformly random letters A-D, G=8, 2 prompts, lr 1e-3): the first step's reward (P(A)) was 0.44 / 0.12 /
0.31 / 0.12 and the mean of the last 3 of 8 steps 1.0 / 0.96 / 0.98 / 0.88 for seeds 0-3: the test asks for a
first step below 0.6 and a last-3 mean of at least 0.8."""
from __future__ import annotations

import random

import pytest
import torch

from umm_ops import rl
from umm_ops.train import Config, train
from conftest import metrics_on_one_and_two_ranks, read_metrics

COMMON = ["job.progress=false", "recipe.image_size=32", "recipe.group_size=4", "recipe.sample_steps=4",
          "recipe.evaluate=false", "metrics.log_every=100", "metrics.plot=false", "recipe.train_records=200",
          "recipe.cfg_scale=1.0", "metrics.tensorboard=false"]


def test_flow_grpo_learns_redness(tmp_path):
    train(Config.build("flow-grpo", overrides=COMMON + [
        "job.seed=0", "job.steps=12", f"job.out={tmp_path}", "recipe.reward=redness", "optim.lr=1e-3",
        "checkpoint.every=0"]))
    r = [m["reward"] for m in read_metrics(tmp_path)]
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    assert last - first > 0.05, r


def test_text_grpo_learns_to_answer_a():
    from umm_ops.data.packing import Sample, TextItem, pack
    from umm_ops.model.cheers import CheersModel

    torch.manual_seed(0)
    m = CheersModel("tiny")
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-3)
    spec = m.pack_spec(budget=4096)
    rng = random.Random(0)
    prompts = ["Pick a letter.", "Choose one letter."]
    for _ in range(30):                       # a base that answers A, B, C or D uniformly
        samples = [Sample([TextItem(rng.choice(prompts)), TextItem(rng.choice("ABCD") + "<|im_end|>", loss=True)])
                   for _ in range(32)]
        (b,) = pack(samples, spec)
        opt.zero_grad()
        m(b)["loss"].backward()
        opt.step()
    opt = torch.optim.Adam(params, lr=1e-3)
    rewards = []
    for k in range(8):
        ro = rl.rollout_text(m, prompts, 8, seed=0, step=k, max_new_tokens=2, temperature=1.0)
        r = torch.tensor([float(t.strip().startswith("A")) for t in ro.texts])
        adv = rl.group_advantages(r, 8, scale="std")
        m.train()
        lp, _ = rl.token_logprobs(m, ro.prompts, ro.ids)
        loss, stats = rl.token_pg_loss(lp, ro.logprobs, adv, ro.mask)
        assert abs(stats["ratio_mean"] - 1) < 1e-3          # recorded and recomputed log-probs agree
        opt.zero_grad()
        loss.backward()
        opt.step()
        rewards.append(float(r.mean()))
    assert rewards[0] < 0.6 and sum(rewards[-3:]) / 3 >= 0.8, rewards


PPO = COMMON + ["job.seed=3", "recipe.reward=checker", "recipe.ppo_epochs=2", "recipe.kl_beta=0.01",
                "checkpoint.every=2", "checkpoint.keep_last=5", "optim.lr=1e-3", "recipe.old_logprobs=recompute",
                "recipe.clip=0.2"]


def test_flow_grpo_ppo_epochs_reuse_the_rollout_and_resume_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(Config.build("flow-grpo", overrides=PPO + ["job.steps=4", f"job.out={a}"]))
    ma = read_metrics(a)
    # steps 1 and 2 share a rollout (same rewards); the first update sees ratio 1, the second does not
    assert ma[0]["reward"] == ma[1]["reward"] and ma[2]["reward"] == ma[3]["reward"]
    assert ma[0]["ratio_max"] == pytest.approx(1.0, abs=1e-6) and ma[1]["ratio_max"] != ma[0]["ratio_max"]
    assert ma[1]["kl"] > 0 and ma[0]["kl"] == pytest.approx(0.0, abs=1e-9)
    train(Config.build("flow-grpo", overrides=PPO + ["job.steps=2", f"job.out={b}"]))
    train(Config.build("flow-grpo", overrides=PPO + ["job.steps=4", f"job.out={b}"]))
    mb = read_metrics(b)
    for x, y in zip(ma, mb):
        for k in ("loss", "reward", "kl", "grad_norm", "ratio_max"):
            assert x[k] == y[k], (k, x, y)


def test_flow_grpo_ppo_epochs_need_checkpoints_on_rollout_boundaries(tmp_path):
    with pytest.raises(ValueError, match="multiples of it"):
        train(Config.build("flow-grpo", overrides=PPO + ["job.steps=4", "checkpoint.every=3",
                                                         f"job.out={tmp_path}"]))


def test_flow_grpo_two_ranks_equal_one_process(tmp_path):
    args = COMMON + ["job.seed=5", "job.steps=3", "job.device=cpu", "recipe.reward=redness", "data.budget=64",
                     "data.global_tokens=128", "recipe.prompts_per_micro=1", "recipe.kl_beta=0.01",
                     "checkpoint.every=0", "optim.lr=1e-3"]
    outs = metrics_on_one_and_two_ranks(tmp_path, "flow-grpo", args, 600)
    assert len(outs[1]) == len(outs[2]) == 3 and outs[1][-1]["grad_norm"] > 0 and outs[1][-1]["kl"] > 0
    for x, y in zip(outs[1], outs[2]):
        assert y["world_size"] == 2 and x["world_size"] == 1
        assert x["reward"] == y["reward"] and x["images"] == y["images"] == 8
        for k in ("loss", "kl", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-9), (k, x, y)
