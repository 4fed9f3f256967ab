"""The r3 recipe (R3's alternating RL): both stages' rewards on hand-made cases, the rollout buffer's perfect-image
sampling, the shared initial noise of a group, the even-step rule, and a few-step run from the CLI."""
import pytest
import torch

from umm_ops import rl
from umm_ops.train.recipes.r3 import R3Recipe, stage_a_reward, stage_b_reward


def test_stage_rewards_by_hand():
    assert stage_a_reward("<think> draw a red circle </think>", 0.5, 0.2) == (0.7, {"format": 1.0, "score": 0.5})
    assert stage_a_reward("draw a red circle", 1.0, 0.2)[0] == 0.0            # no format: nothing
    # an edit: w_f f + (new - old) f
    v, p = stage_b_reward("<think> it is blue </think> change the blue circle to red", 0.5, 1.0, 0.2)
    assert v == pytest.approx(0.7) and p["improvement"] == 0.5 and p["stopped"] == 0.0
    assert stage_b_reward("<think> x </think> add a square", 1.0, 0.5, 0.2)[0] == pytest.approx(-0.3)
    # "no further edit needed": improvement 1 on a perfect image, 0 otherwise
    assert stage_b_reward("<think> ok </think> no further edit needed", 1.0, None, 0.2)[0] == pytest.approx(1.2)
    assert stage_b_reward("<think> ok </think> no further edit needed", 0.5, None, 0.2)[0] == pytest.approx(0.2)
    assert stage_b_reward("<think> ok </think>", 0.5, 0.5, 0.2)[0] == 0.0     # no instruction: format fails
    assert stage_b_reward("change it", 0.0, 1.0, 0.2)[0] == 0.0               # no think: nothing


class _Ctx:
    def __init__(self, step, micro_index=0, seed=0, **recipe):
        from umm_ops.train import Config

        self.step, self.micro_index, self.seed, self.world_size = step, micro_index, seed, 1
        self.config = Config.build("r3", overrides=[f"recipe.{k}={v}" for k, v in recipe.items()])


def test_buffer_draws_perfect_images_at_the_asked_rate(monkeypatch):
    rec = R3Recipe()
    buf = [{"prompt": "p", "spec": {}, "image": torch.zeros(3, 4, 4), "score": s, "key": i}
           for i, s in enumerate([1.0, 0.5, 0.0, 1.0, 0.25])]
    picked = []

    def fake_rollout(model_self, *a, **kw):
        picked.extend(m["old_score"] for m in kw["meta"])
        raise StopIteration

    class M:
        def __call__(self, fn, *a, **kw):
            return fake_rollout(self, *a, **kw)

    n = 0
    for step in range(1, 800, 2):
        rec._buffer, rec._pooled = {(step - 1, 0): buf}, {}
        with pytest.raises(StopIteration):
            rec._stage_b(M(), None, _Ctx(step, p_perfect=0.3, prompts_per_micro=2))
        n += 2
    share = sum(s >= 1.0 for s in picked) / n
    assert 0.25 < share < 0.35, share                          # 0.3 asked, 800 draws: 3 sigma ~ 0.05
    rec._buffer, rec._pooled = {(0, 0): [e for e in buf if e["score"] < 1]}, {}
    picked.clear()
    with pytest.raises(StopIteration):
        rec._stage_b(M(), None, _Ctx(1, p_perfect=1.0, prompts_per_micro=2))
    assert all(s < 1 for s in picked)                          # no perfect image: an imperfect one
    rec._buffer, rec._pooled = {}, {}
    with pytest.raises(RuntimeError, match="no rollout buffer"):
        rec._stage_b(M(), None, _Ctx(3))
    # R3's buffer holds the whole previous stage-(a) step (all micro-batches, all ranks): micro-batch 1 draws the
    # perfect images micro-batch 0 made, in order of micro-batches
    rec._buffer, rec._pooled = {(4, 1): [buf[1]], (4, 0): [buf[0], buf[3]]}, {}
    assert [e["key"] for e in rec._pool(_Ctx(5, micro_index=1))] == [0, 3, 1]
    picked.clear()
    with pytest.raises(StopIteration):
        rec._stage_b(M(), None, _Ctx(5, micro_index=1, p_perfect=1.0, prompts_per_micro=2))
    assert picked == [1.0, 1.0]


def test_stage_a_clears_the_buffer_of_older_steps(monkeypatch):
    """R3 clears its buffer at every stage-(a) step (online_rl.py rollout_buffer.clear()): after step 2's stage (a)
    only step 2's images are left, refined images never enter it."""
    import umm_ops.eval.tasks.geneval as geneval

    rec = R3Recipe()
    rec._buffer = {(0, 0): ["old"], (0, 1): ["old"]}
    rec._pooled = {0: ["old"]}

    class T:
        def __init__(self, k):
            self.segments = [{"context_text": "<think> x </think>"}, {"image": torch.zeros(3, 4, 4)}]
            self.meta, self.prompt, self.key = {"spec": {}}, "p", k

    class M:
        def __call__(self, fn, *a, **kw):
            return [T(0), T(1)]

    class B:
        docs = [type("D", (), {"text": "p", "index": 7, "spec": {}})()]

    monkeypatch.setattr(geneval, "score_image", lambda spec, img, rng, min_area: {"score": 0.5})
    rec._stage_a(M(), B(), _Ctx(2, micro_index=1, group_size=2, prompts_per_micro=1))
    assert list(rec._buffer) == [(2, 1)] and rec._pooled == {} and len(rec._buffer[(2, 1)]) == 2


def test_shared_initial_noise_within_a_group():
    from umm_ops.model.cheers import CheersModel

    torch.manual_seed(0)
    m = CheersModel("tiny")
    m.config.image_size = 32
    m.eval()
    plan = [rl.Seg("image", steps=3, schedule=rl.SDESchedule("window", start=0, width=1), shared_noise=True)]
    tr = rl.rollout_interleaved(m, ["a red circle", "a blue square"], 2, plan, seed=1)
    x = [t.segments[0]["x"][0] for t in tr]                    # the state before step 0: the initial noise
    assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[3]) and not torch.equal(x[0], x[2])
    assert not torch.equal(tr[0].segments[0]["x_next"], tr[1].segments[0]["x_next"])


def test_steps_must_be_even(tmp_path):
    from umm_ops.train import Config, train

    with pytest.raises(ValueError, match="must be even"):
        train(Config.build("r3", overrides=["job.steps=3", f"job.out={tmp_path}", "job.progress=false"]))


def test_a_few_steps_from_the_cli(tmp_path, capsys):
    from umm_ops.cli import main

    out = tmp_path / "r3"
    assert main(["train", "--recipe", "r3", "--steps", "2", "--out", str(out), "--set", "recipe.image_size=32",
                 "--set", "recipe.group_size=2", "--set", "recipe.prompts_per_micro=1", "--set",
                 "recipe.think_tokens=4", "--set", "recipe.reflect_tokens=4", "--set", "recipe.gen_steps=3",
                 "--set", "recipe.edit_steps=3", "--set", "recipe.eval_prompts=2", "--set", "recipe.eval_rounds=2",
                 "--set", "recipe.eval_steps=2", "--set", "checkpoint.every=2", "--set", "metrics.plot=false"]) == 0
    text = capsys.readouterr().out
    assert "a_reward" in text and "b_reward" in text and "eval refine" in text
    assert (out / "checkpoint-2").is_dir()


R3_SMALL = ["job.progress=false", "recipe.image_size=32", "recipe.group_size=2", "recipe.prompts_per_micro=1",
            "recipe.think_tokens=4", "recipe.reflect_tokens=4", "recipe.gen_steps=3", "recipe.edit_steps=3",
            "recipe.evaluate=false", "recipe.train_records=200", "metrics.log_every=100", "metrics.plot=false",
            "metrics.tensorboard=false", "optim.lr=1e-3", "data.budget=64", "data.global_tokens=128"]


def _metrics(out) -> list:
    from conftest import read_metrics

    return read_metrics(out)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Two micro-batches per step (stage (b) draws from both of step (a)'s), two-scale edits: 4 steps in one go
    equal 2 steps, a checkpoint, and a resume to 4."""
    from umm_ops.train import Config, train

    a, b = tmp_path / "a", tmp_path / "b"
    common = R3_SMALL + ["job.seed=2", "checkpoint.every=2", "checkpoint.keep_last=5"]
    train(Config.build("r3", overrides=common + ["job.steps=4", f"job.out={a}"]))
    train(Config.build("r3", overrides=common + ["job.steps=2", f"job.out={b}"]))
    train(Config.build("r3", overrides=common + ["job.steps=4", f"job.out={b}"]))
    ma, mb = _metrics(a), _metrics(b)
    assert len(ma) == len(mb) == 4 and "b_reward" in ma[1] and "b_reward" in ma[3]
    for x, y in zip(ma, mb):
        for k in ("loss", "grad_norm", "a_reward", "b_reward", "b_improvement", "text_kl", "image_kl"):
            assert x.get(k) == y.get(k), (k, x, y)


def test_two_ranks_equal_one_process(tmp_path):
    """2 gloo ranks, one micro-batch each: stage (b)'s buffer is gathered from both ranks (R3's all_gather), so
    the run equals one process doing both micro-batches."""
    from conftest import metrics_on_one_and_two_ranks

    outs = metrics_on_one_and_two_ranks(
        tmp_path, "r3", R3_SMALL + ["job.seed=4", "job.steps=2", "job.device=cpu", "checkpoint.every=0"], 900)
    assert len(outs[1]) == len(outs[2]) == 2
    for x, y in zip(outs[1], outs[2]):
        assert y["world_size"] == 2 and x["world_size"] == 1
        for k in ("a_reward", "b_reward", "b_improvement", "b_stopped"):
            assert x.get(k) == y.get(k), (k, x, y)
        for k in ("loss", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-9), (k, x, y)
