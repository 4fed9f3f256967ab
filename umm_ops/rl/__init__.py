"""Online RL for unified models: GRPO over text tokens and flow-matching SDE steps (issue 15).

    from umm_ops import rl
    ro = rl.rollout_images(model, prompts, group_size=8, seed=0, step=k, schedule=rl.SDESchedule("all"))
    r, parts = rl.score(rl.PixelCheckReward(), ro_trajectories)
    adv = rl.group_advantages(r, 8, scale="std")
    logp, kl = rl.image_logprobs(model, ro, reference=ref)
    loss, stats = rl.flow_pg_loss(logp, ro.logprobs, adv, kl=kl, kl_beta=0.01)

Losses (:mod:`.losses`), rollouts and log-prob recomputation (:mod:`.rollout`), interleaved text / image
trajectories (:mod:`.interleaved`), rewards (:mod:`.rewards`); the
recipe ``flow-grpo`` (:mod:`umm_ops.train.recipes.flow_grpo`) runs them on the training engine.
"""
from .interleaved import Seg, Trajectory, interleaved_logprobs, interleaved_pg_loss, rollout_interleaved
from .losses import NORMS, flow_pg_loss, group_advantages, kl_k3, ppo_clip_objective, token_pg_loss
from .rewards import (AnswerReward, DecisionReward, FormatReward, MeanColorReward, PixelCheckReward, WeightedReward,
                      extract_answer, score)
from .rollout import (ImageRollout, SDESchedule, TextRollout, image_logprobs, rollout_images, rollout_text,
                      sample_images, token_logprobs, trajectory_seed)

__all__ = ["group_advantages", "kl_k3", "ppo_clip_objective", "token_pg_loss", "flow_pg_loss", "NORMS",
           "SDESchedule", "TextRollout", "ImageRollout", "rollout_text", "rollout_images", "token_logprobs",
           "image_logprobs", "trajectory_seed", "sample_images", "Seg", "Trajectory", "rollout_interleaved",
           "interleaved_logprobs", "interleaved_pg_loss", "PixelCheckReward", "AnswerReward", "FormatReward", "DecisionReward",
           "MeanColorReward", "WeightedReward", "score", "extract_answer"]
