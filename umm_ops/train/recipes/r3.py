"""r3: R3's alternating RL (reason + generate, reflect + refine; papers.md section 4) on the training engine.

    umm train --recipe r3 --set recipe.init=runs/r3sft --steps 40 --out runs/r3

Start from a model that knows R3's format (``umm train --recipe sft --set recipe.init=runs/base --set
recipe.tasks=...,r3_plan,r3_reflect,r3_edit``).  Steps alternate:

* even steps, stage (a) reason + generate: per prompt of the micro-batch G trajectories [prompt] -> text (the plan,
  up to ``think_tokens``, stopped at ``</think>``) -> image (SDE, ONE stochastic step per trajectory, the same
  initial noise for the group); reward r * f + w_f * f (r: the checker's score of the image, f: the text has
  ``<think> ... </think>``).  The images and their scores fill this micro-batch's rollout buffer.
* odd steps, stage (b) reflect + refine: per prompt slot an image of the previous step's buffer (a perfect one with
  probability ``p_perfect`` when there is one, else an imperfect one), G trajectories [image, R3's reflection prompt]
  -> text (think + one instruction) -> unless it says "no further edit needed", the edit ([image, instruction] ->
  image, as ``generate_refined``, with two-scale CFG: ``cfg_scale`` on the instruction, ``image_cfg_scale`` on the
  image, ``cfg_renorm``); reward w_f * f + (r_new - r_old) * f, where saying no edit is needed counts as
  improvement 1 on a perfect image and 0 otherwise.

The rollout buffer is R3's (train/online_rl.py at sen-ye/R3 e9912ac): ``RolloutBuffer`` is cleared at every
stage-(a) step (``rollout_buffer.clear()`` under ``curr_step % rounds == 0``), filled only there with that step's
generated images and their rewards (``rollout_buffer.update``; refined images never go back into it), gathered over
all ranks (``all_gather``), split into perfect (reward == 1) and imperfect images, and stage (b) draws from it with
P(perfect) = 0.15 (the other pool when one is empty).  So here: the buffer of stage (b) at step s is every image of
step s - 1's stage (a) - all its micro-batches, of every rank (gathered) - and nothing older; it never outlives a
(b) step, so a checkpoint after a (b) step needs no buffer state.

Advantages: reward - group mean (no std).  Loss: token PPO-clip + k3 KL (text) + ``image_weight`` x (PPO-clip on the
recorded step + flow_kl) with the same advantage (:func:`umm_ops.rl.interleaved_pg_loss`), KL to a frozen copy of
the initial weights.  Checkpoints fall after odd steps (job.steps and checkpoint.every even), when the buffer is
empty, so a resumed run continues exactly.
"""
from __future__ import annotations

import copy
import random
import re
import typing
from dataclasses import dataclass

import torch

from ...utils import seed_of
from ..spec import DataSource, Recipe, StepOutput, register
from .flow_grpo import PromptDataset, _collate, _Encode

__all__ = ["R3Recipe", "R3Config", "stage_a_reward", "stage_b_reward"]

_THINK = re.compile(r"<think>.*?</think>", re.S)


def stage_a_reward(text: str, score: float, w_f: float) -> tuple:
    """R3 stage (a): r * f + w_f * f with f = the text holds <think> ... </think>."""
    f = 1.0 if _THINK.search(text or "") else 0.0
    return score * f + w_f * f, {"format": f, "score": score}


def stage_b_reward(text: str, old_score: float, new_score: float | None, w_f: float) -> tuple:
    """R3 stage (b): w_f * f + improvement * f.  new_score None: the model said no further edit is needed
    (improvement 1 on a perfect image, 0 otherwise); f = <think> ... </think> and then an instruction or the stop
    phrase."""
    from ...model.refine import instruction_of, is_stop

    stop = is_stop(text or "")
    f = 1.0 if _THINK.search(text or "") and (stop or instruction_of(text)) else 0.0
    if new_score is None:
        imp = 1.0 if old_score >= 1.0 else 0.0
    else:
        imp = new_score - old_score
    return w_f * f + imp * f, {"format": f, "improvement": imp, "stopped": float(stop)}


@dataclass
class R3Config:
    init: str = ""                    # a run / checkpoint that knows R3's format (SFT with the r3_* tasks)
    image_size: int = 64
    train_records: int = 50_000
    group_size: int = 8               # R3: 16
    prompts_per_micro: int = 2
    think_tokens: int = 24            # R3: 196 (plan) / 384 (reflection), scaled to the tiny model
    reflect_tokens: int = 48
    temperature: float = 0.9
    top_k: typing.Optional[int] = 50
    gen_steps: int = 10               # R3: 16 (generate) / 21 (edit)
    edit_steps: int = 10
    cfg_scale: typing.Optional[float] = None   # text guidance (R3: 4.0); None: the model's (tiny: 4.0)
    # image guidance of stage (b)'s edits (R3: cfg_img_scale 1.5; BAGEL's formula, umm_ops.model.generate.guide).
    # Not scaled: it multiplies a difference of velocities, and the tiny model's text scale is R3's 4.0 already
    image_cfg_scale: float = 1.5
    cfg_renorm: str = "text_channel"  # R3's cfg_renorm_type_edit (scripts/train_rl.sh), renorm_min 0
    cfg_interval_low: float = 0.4     # R3's cfg_interval (0.4, 1.0): guidance of both stages' images only at noise
    cfg_interval_high: float = 1.0    # levels 1 - t in (low, high] (low 0, high 1: everywhere but the clean end)
    sigma: float = 0.7                # Flow-GRPO's noise level a of sigma_t = a sqrt((1 - t) / t)
    format_weight: float = 0.2        # w_f
    p_perfect: float = 0.15
    text_clip: float = 0.2
    text_kl: float = 0.001
    image_clip: float = 0.2
    image_kl: float = 0.001
    image_weight: float = 2.0
    same_init_noise: bool = True
    evaluate: bool = True
    eval_prompts: int = 32            # held-out prompts through R3's loop after training (umm eval task refine)
    eval_rounds: int = 3
    eval_steps: int = 12

    def validate(self):
        from ..config import requirement

        need = requirement("recipe", self)

        need(self.image_size >= 32 and self.image_size % 32 == 0, "image_size", "must be a multiple of 32, >= 32")
        need(self.train_records >= 1, "train_records", "must be >= 1")
        need(self.group_size >= 2, "group_size", "must be >= 2")
        need(self.prompts_per_micro >= 1, "prompts_per_micro", "must be >= 1")
        need(self.think_tokens >= 1 and self.reflect_tokens >= 1, "think_tokens", "token budgets must be >= 1")
        need(self.temperature > 0, "temperature", "must be > 0 (RL samples)")
        need(self.gen_steps >= 2 and self.edit_steps >= 2, "gen_steps", "sampler steps must be >= 2")
        need(self.cfg_scale is None or self.cfg_scale >= 1, "cfg_scale", "must be None or >= 1")
        need(self.image_cfg_scale >= 1, "image_cfg_scale", "must be >= 1 (1: one-scale guidance of edits)")
        from ...model.generate import CFG_RENORMS

        need(self.cfg_renorm in CFG_RENORMS, "cfg_renorm", f"must be one of {', '.join(CFG_RENORMS)}")
        need(0 <= self.cfg_interval_low < self.cfg_interval_high <= 1, "cfg_interval_low",
             "need 0 <= cfg_interval_low < cfg_interval_high <= 1")
        need(self.sigma > 0, "sigma", "must be > 0")
        need(0 <= self.p_perfect <= 1, "p_perfect", "must be a probability")
        for k in ("format_weight", "text_clip", "text_kl", "image_clip", "image_kl", "image_weight"):
            need(getattr(self, k) >= 0, k, "must be >= 0")
        need(self.eval_prompts >= 0 and self.eval_rounds >= 1 and self.eval_steps >= 1, "eval_prompts",
             "eval_prompts >= 0, eval_rounds >= 1, eval_steps >= 1")
        return self


@register
class R3Recipe(Recipe):
    name = "r3"
    config_class = R3Config
    run_defining = ("init", "image_size", "train_records", "group_size", "prompts_per_micro", "think_tokens",
                    "reflect_tokens", "temperature", "top_k", "gen_steps", "edit_steps", "cfg_scale", "image_cfg_scale",
                    "cfg_renorm", "cfg_interval_low", "cfg_interval_high", "sigma",
                    "format_weight", "p_perfect", "text_clip", "text_kl", "image_clip", "image_kl", "image_weight",
                    "same_init_noise")

    def __init__(self):
        self._reference = None
        self._buffer: dict = {}             # (step, micro_index) -> that micro-batch's stage-(a) images
        self._pooled: dict = {}             # step -> the step's images of all micro-batches and ranks
        self._pixel_range = (-1.0, 1.0)     # the model's (set by build_model): what the checker reads images in
        self._min_area = None               # the checker's, for this run's world (set by build_data)

    def world_kwargs(self, cfg) -> dict:
        from .flow_grpo import FlowGRPORecipe

        return FlowGRPORecipe.world_kwargs(self, cfg)

    def _world(self, cfg, length):
        from ...data.synthetic import SyntheticWorld

        return SyntheticWorld(size=cfg.recipe.image_size, seed=cfg.job.seed, length=length, **self.world_kwargs(cfg))

    def build_model(self, cfg):
        from .flow_grpo import FlowGRPORecipe

        return FlowGRPORecipe.build_model(self, cfg)

    def build_data(self, cfg, model) -> DataSource:
        r = cfg.recipe
        self._min_area = self._world(cfg, 1).min_object_area
        if cfg.job.steps % 2 or (cfg.checkpoint.every and cfg.checkpoint.every % 2):
            raise ValueError(f"r3: job.steps ({cfg.job.steps}) and checkpoint.every ({cfg.checkpoint.every}) must be "
                             f"even: stage (b) reads the rollout buffer of the stage-(a) step before it, so "
                             f"checkpoints fall after a (b) step")
        if r.text_kl > 0 or r.image_kl > 0:
            self._reference = copy.deepcopy(model).eval().requires_grad_(False)
        per = max(1, cfg.data.budget // r.prompts_per_micro)
        return DataSource(PromptDataset(self._world(cfg, r.train_records), r.train_records), _Encode(per), _collate,
                          length=lambda i: per)

    def engine_defaults(self) -> dict:
        return {"job.steps": 40, "optim.lr": 5e-5, "schedule.warmup": 0, "schedule.decay": "constant",
                "data.budget": 64, "checkpoint.every": 10, "optim.weight_decay": 0.0}

    def describe(self, cfg) -> str:
        r = cfg.recipe
        return f"r3 from {r.init or 'a fresh ' + cfg.model.preset}: G={r.group_size}, alternating (a) / (b)"

    # ------------------------------------------------------------------ the step
    @staticmethod
    def _interval(r):
        return (float(r.cfg_interval_low), float(r.cfg_interval_high))

    def _sigma(self, r):
        import umm_ops

        return umm_ops.SigmaSchedule(r.sigma)

    def _stage_a(self, model, batch, ctx):
        from ... import rl
        from ...eval.tasks.geneval import score_image

        r = ctx.config.recipe
        docs = batch.docs
        plan = [rl.Seg("text", max_new_tokens=r.think_tokens, temperature=r.temperature, top_k=r.top_k,
                       stop=("</think>",)),
                rl.Seg("image", steps=r.gen_steps, cfg_scale=r.cfg_scale, cfg_interval=self._interval(r),
                       sigma=self._sigma(r),
                       schedule=rl.SDESchedule("random"), shared_noise=r.same_init_noise)]
        with torch.no_grad():
            trajs = model(rl.rollout_interleaved, [d.text for d in docs], r.group_size, plan, seed=ctx.seed,
                          step=ctx.step, keys=[d.index for d in docs], meta=[{"spec": d.spec} for d in docs])
        rewards, parts, buf = [], {"format": [], "score": []}, []
        for t in trajs:
            img = t.segments[-1]["image"]
            sc = score_image(t.meta["spec"], img, self._pixel_range, self._min_area)["score"]
            v, p = stage_a_reward(t.segments[0]["context_text"], sc, r.format_weight)
            rewards.append(v)
            for k in parts:
                parts[k].append(p[k])
            buf.append({"prompt": t.prompt, "spec": t.meta["spec"], "image": img, "score": sc, "key": t.key})
        # R3 clears its buffer at every stage-(a) step: only this step's images stay
        self._buffer = {k: v for k, v in self._buffer.items() if k[0] == ctx.step}
        self._pooled = {}
        self._buffer[(ctx.step, ctx.micro_index)] = buf
        return trajs, torch.tensor(rewards), {k: sum(v) / len(v) for k, v in parts.items()}

    def _pool(self, ctx) -> list:
        """Stage (b)'s buffer: every stage-(a) image of the previous step, over its micro-batches (in micro-batch
        order) and, with several ranks, gathered from all of them (R3's all_gather): the same for any world size."""
        prev = ctx.step - 1
        if prev in self._pooled:
            return self._pooled[prev]
        mine = {k[1]: v for k, v in self._buffer.items() if k[0] == prev}
        if not mine:
            raise RuntimeError(f"r3: stage (b) at step {ctx.step + 1} found no rollout buffer of step {ctx.step}; "
                               f"checkpoints must fall after (b) steps")
        world = getattr(ctx, "world_size", 1)
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            local = {i: [{**e, "image": e["image"].cpu()} for e in v] for i, v in mine.items()}
            parts = [None] * world
            torch.distributed.all_gather_object(parts, local)
            mine = {i: v for part in parts for i, v in part.items()}
        pool = [e for i in sorted(mine) for e in mine[i]]
        self._pooled[prev] = pool
        return pool

    def _stage_b(self, model, batch, ctx):
        from ... import rl
        from ...data.packing import ImageItem, Sample, TextItem
        from ...eval.tasks.geneval import score_image
        from ...model.refine import REFLECT_PROMPT, instruction_of, is_stop

        r = ctx.config.recipe
        buf = self._pool(ctx)
        picks = []
        perfect = [e for e in buf if e["score"] >= 1.0]
        other = [e for e in buf if e["score"] < 1.0]
        for j in range(r.prompts_per_micro):
            rng = random.Random(seed_of(ctx.seed, ctx.step, ctx.micro_index, j, "r3-buffer"))
            pool = perfect if perfect and (rng.random() < r.p_perfect or not other) else (other or perfect)
            picks.append(pool[rng.randrange(len(pool))])
        prompts = [Sample([ImageItem(e["image"], "understand"), TextItem(REFLECT_PROMPT.format(prompt=e["prompt"]))])
                   for e in picks]

        def edit_context(t):
            return Sample([ImageItem(t.meta["old_image"], "understand"),
                           TextItem(instruction_of(t.segments[0]["text"]))])

        plan = [rl.Seg("text", max_new_tokens=r.reflect_tokens, temperature=r.temperature, top_k=r.top_k),
                rl.Seg("image", steps=r.edit_steps, cfg_scale=r.cfg_scale, image_cfg_scale=r.image_cfg_scale,
                       cfg_renorm=r.cfg_renorm, cfg_interval=self._interval(r), sigma=self._sigma(r),
                       schedule=rl.SDESchedule("random"), shared_noise=r.same_init_noise, context=edit_context,
                       when=lambda t: not is_stop(t.segments[0]["text"]))]
        keys = [f"b{ctx.micro_index}.{j}:{e['key']}" for j, e in enumerate(picks)]
        with torch.no_grad():
            trajs = model(rl.rollout_interleaved, prompts, r.group_size, plan, seed=ctx.seed, step=ctx.step,
                          keys=keys, meta=[{"spec": e["spec"], "old_image": e["image"], "old_score": e["score"]}
                                           for e in picks])
        rewards, parts = [], {"format": [], "improvement": [], "stopped": []}
        for t in trajs:
            text = t.segments[0]["context_text"]
            new = (score_image(t.meta["spec"], t.segments[1]["image"], self._pixel_range, self._min_area)["score"]
                   if len(t.segments) > 1 else None)
            v, p = stage_b_reward(text, t.meta["old_score"], new, r.format_weight)
            rewards.append(v)
            for k in parts:
                parts[k].append(p[k])
        return trajs, torch.tensor(rewards), {k: sum(v) / len(v) for k, v in parts.items()}

    def step(self, model, batch, ctx) -> StepOutput:
        from ... import rl

        r = ctx.config.recipe
        stage = "a" if ctx.step % 2 == 0 else "b"
        trajs, rewards, parts = (self._stage_a if stage == "a" else self._stage_b)(model, batch, ctx)
        adv = rl.group_advantages(rewards, r.group_size, scale="none")
        lp = model(rl.interleaved_logprobs, trajs, reference=self._reference)
        loss, st = rl.interleaved_pg_loss(lp, adv, text_clip=r.text_clip, text_kl_beta=r.text_kl,
                                          image_clip=r.image_clip, image_kl_beta=r.image_kl,
                                          image_weight=r.image_weight)
        metrics = {f"{stage}_reward": float(rewards.mean()), "text_kl": st["text_kl"],
                   "image_kl": st.get("image_kl", 0.0)}
        metrics.update({f"{stage}_{k}": v for k, v in parts.items()})
        return StepOutput(loss, metrics, {"trajectories": len(trajs)})

    def fsdp_units(self, model):
        return list(model.llm.model.layers)

    # ------------------------------------------------------------------ evaluation
    def wants_eval(self, cfg) -> bool:
        return cfg.recipe.evaluate and cfg.recipe.eval_prompts > 0

    def evaluate(self, model, cfg, out_dir) -> dict:
        from ...eval.runner import evaluate

        r = cfg.recipe
        res = evaluate(model, "refine", n=r.eval_prompts, seed=cfg.job.seed, image_size=r.image_size,
                       out_dir=f"{out_dir}/eval", world_kwargs=self.world_kwargs(cfg), first=r.train_records,
                       steps=r.eval_steps, refine_rounds=r.eval_rounds, cfg_scale=r.cfg_scale,
                       image_cfg_scale=r.image_cfg_scale, cfg_renorm=r.cfg_renorm,
                       cfg_interval=self._interval(r))
        return res["tasks"]["refine"]

    def report(self, results: dict) -> list:
        m = {k: v.get("score", 0.0) for k, v in results.get("metrics", {}).items()}
        after = [round(x, 3) for x in results.get("score_after_round", [])]
        return [f"eval refine: final {results['score']:.3f} (round 1 {m.get('round1', 0):.3f}); score after each "
                f"round {after}; stopped {m.get('stopped', 0):.2f}, an edit made it worse {m.get('worse', 0):.2f}"]

    def shorthands(self) -> dict:
        return {"--init": ("recipe.init", "value", "R3-format SFT run / checkpoint to start from"),
                "--no-eval": ("recipe.evaluate", "false", "skip the evaluation after training")}
