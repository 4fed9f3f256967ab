"""clear-grpo: CLEAR's interleaved GRPO (issue 16, stage 3; papers.md section 2) on the training engine.

    umm train --recipe clear-grpo --set recipe.init=runs/clear4 --steps 40 --out runs/cgrpo

Start from a model that knows CLEAR's generate-then-answer format (``clear-sft``).  Each micro-batch holds
``prompts_per_micro`` questions: record i of the world (i < train_records), one of its VQA questions, its picture
degraded at a level drawn from ``levels`` (one of the 16 MMD-Bench types drawn with CLEAR's weights; "clean" leaves
it as it is), asked with CLEAR's prompt (``clear_question``).  A step:

* rollouts (:func:`umm_ops.rl.rollout_interleaved`), G = ``group_size`` per question: [degraded picture, question]
  -> text (the reasoning, stopped at ``<image_restore>`` when the model asks for a restoration) -> only where it
  asked: the restoration (the SDE sampler with a constant sigma, ``restore_steps`` steps, the step recorded for the
  loss cycling through the first ``recordable`` ones from one optimizer step to the next: CLEAR's round robin) ->
  the restored picture read as an image to understand -> text (the reasoning about it and ``<answer>``);
* rewards: ``accuracy_weight`` x (the answer inside <answer> is right, scored as ``umm eval`` scores it) +
  ``format_weight`` x CLEAR's format reward (0.35 think + 0.35 answer + 0.3 order) + optional ``decision_weight``
  x CLEAR's decision table (restored & right 1.0, direct & right 0.6, restored & wrong 0.4, else -0.2) +
  optional ``latent_weight`` x the restoration's latent quality against the clean picture's latent
  (:func:`latent_quality`, the released formula; 0 without a restoration, as the released NaN is summed as 0).
  The released run sets accuracy 0.75, format 0.1, decision 0.15 and latent 0;
* Dr.GRPO advantages (reward - group mean, no std division), and one loss over each trajectory's text tokens and
  recorded image step with the same advantage (:func:`umm_ops.rl.interleaved_pg_loss`): token PPO-clip
  ``text_clip`` + k3 KL ``text_kl`` to a frozen copy of the initial weights, summed over tokens and divided by
  (trajectories x the token budget think_tokens + answer_tokens) as Dr.GRPO and CLEAR's trainer do, ``image_weight`` x PPO-clip
  ``image_clip`` on the recorded step's transition log-prob (mean over elements) (+ ``image_kl`` x flow_kl).

Scaled to the tiny model (CLEAR: 30 sampler steps of which 20 recordable, time shift 3.0; here ``restore_steps``
10 with 7 recordable and the model's own time shift).  Differences from the released trainer, by design: it picks
ONE (trajectory, step) per optimizer step among all of the batch's restorations; here every restored trajectory
records the same step index of the cycle, so each restoration gets a gradient every step.  It computes text logits
and image velocity in one shared forward; here they come from two packed forwards (the text tokens' contexts with
the restoration as an understood image, and the recorded (context, x_t, t) rows): the same log-probs, two
passes.  The released code has no image KL (``image_kl`` 0 by default).  Its accuracy reward is an LLM judge; the
synthetic world's answers are single words and option letters, scored exactly.

Everything random is seeded by (run seed, step, record index, sample, segment): a run resumes exactly.
"""
from __future__ import annotations

import copy
import random
import typing
from dataclasses import dataclass

import torch

from ...utils import seed_of
from ..spec import DataSource, Recipe, StepOutput, register
from .flow_grpo import _collate  # noqa: F401  (a micro-batch of prompt docs: flow-grpo's PromptBatch)

__all__ = ["ClearGRPORecipe", "ClearGRPOConfig", "ClearPromptDataset", "clear_reward", "LEVELS"]

LEVELS = ("clean", "low", "mid", "high")


@dataclass
class ClearGRPOConfig:
    init: str = ""                    # a clear-sft run / checkpoint (the model knows the format); "" = a fresh model
    image_size: int = 64
    train_records: int = 50_000       # questions of records 0 .. train_records - 1; later records are held out
    answers: str = "short"            # "short" (a word or phrase) or "choice" (an option letter)
    levels: tuple = LEVELS            # degradation levels drawn uniformly per question ("clean": undegraded)
    group_size: int = 8               # CLEAR: 8
    prompts_per_micro: int = 2
    think_tokens: int = 64            # budget of the first text (a direct answer is all of it)
    answer_tokens: int = 64           # budget of the text after a restoration
    temperature: float = 1.0
    top_k: typing.Optional[int] = None
    restore_steps: int = 10           # CLEAR: 30
    recordable: int = 7               # CLEAR: 20 of 30
    sigma: float = 0.3                # CLEAR: constant sigma 0.3
    cfg_scale: typing.Optional[float] = None   # the restoration's CFG (None: the model's)
    accuracy_weight: float = 1.0
    format_weight: float = 1.0
    decision_weight: float = 0.0      # CLEAR's optional decision reward
    latent_reward: str = "none"       # CLEAR's optional latent-quality reward (latent_quality): none | vae (the released
                                      # aggregate) | mse | cosine | local; the released run weights it 0 ("no
                                      # photo-level reconstruction incentive")
    latent_weight: float = 0.0
    latent_mse_scale: float = 0.5     # CLEAR: mse_scale 0.5 in exp(-mse_scale x MSE)
    text_clip: float = 0.2
    text_norm: str = "constant"       # Dr.GRPO (CLEAR): sum over tokens / (trajectories x token budget); "token" /
                                      # "sequence": token_pg_loss's other norms
    text_kl: float = 0.04             # CLEAR: k3 KL 0.04 to the SFT reference
    image_clip: float = 0.2
    image_kl: float = 0.0
    image_weight: float = 0.5         # CLEAR: 0.5
    evaluate: bool = True
    eval_items: int = 64              # held-out questions asked with clear / clear-short after training
    eval_steps: typing.Optional[int] = None    # sampler steps of the evaluation's restorations (None: the model's)

    def validate(self):
        from ..config import requirement

        need = requirement("recipe", self)
        need(self.image_size >= 32 and self.image_size % 32 == 0, "image_size", "must be a multiple of 32, >= 32")
        need(self.train_records >= 1, "train_records", "must be >= 1")
        need(self.answers in ("short", "choice"), "answers", "must be 'short' or 'choice'")
        need(bool(self.levels) and all(x in LEVELS for x in self.levels), "levels",
             f"must be a non-empty subset of {LEVELS}")
        need(self.group_size >= 2, "group_size", "must be >= 2 (advantages are relative to the group)")
        need(self.prompts_per_micro >= 1, "prompts_per_micro", "must be >= 1")
        need(self.think_tokens >= 1 and self.answer_tokens >= 1, "think_tokens",
             "think_tokens and answer_tokens must be >= 1")
        need(self.temperature > 0, "temperature", "must be > 0 (RL samples)")
        need(self.top_k is None or self.top_k >= 1, "top_k", "must be None or >= 1")
        need(self.restore_steps >= 2, "restore_steps", "must be >= 2 (the last step is deterministic)")
        need(1 <= self.recordable <= self.restore_steps - 1, "recordable",
             f"must be in [1, restore_steps - 1 = {self.restore_steps - 1}]")
        need(self.sigma > 0, "sigma", "must be > 0")
        need(self.cfg_scale is None or self.cfg_scale >= 1, "cfg_scale", "must be None or >= 1")
        need(self.text_norm in ("constant", "token", "sequence"), "text_norm",
             "must be 'constant' (Dr.GRPO), 'token' or 'sequence'")
        need(self.latent_reward in ("none",) + LATENT_REWARDS, "latent_reward",
             f"must be 'none' or one of {', '.join(LATENT_REWARDS)}")
        need(self.latent_mse_scale > 0, "latent_mse_scale", "must be > 0")
        for k in ("accuracy_weight", "format_weight", "decision_weight", "latent_weight", "text_clip", "text_kl",
                  "image_clip", "image_kl", "image_weight"):
            need(getattr(self, k) >= 0, k, "must be >= 0")
        need(self.eval_items >= 0, "eval_items", "must be >= 0")
        need(self.eval_steps is None or self.eval_steps >= 1, "eval_steps", "must be None or >= 1")
        return self


class ClearPromptDataset:
    """Map-style: record i of the world -> (i, the prompt Sample [degraded picture, CLEAR question], meta: answer,
    clean picture, level, degradation, question type).  The question, level and degradation type are drawn from
    (world seed, i): the same for every run on this world."""

    def __init__(self, world, records: int, answers: str = "short", levels=LEVELS):
        self.world, self.records, self.answers, self.levels = world, int(records), answers, tuple(levels)

    def __len__(self):
        return self.records

    def __getitem__(self, i):
        from ...data.clear_data import clear_question
        from ...data.degradations import degrade, sample_kind
        from ...data.packing import ImageItem, Sample, TextItem

        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.records:
            raise IndexError(f"ClearPromptDataset: index {i!r} out of range [0, {self.records})")
        rec = self.world[i]
        rng = random.Random(seed_of(rec.seed, i, "clear-grpo"))
        q = rec.vqa[rng.randrange(len(rec.vqa))]
        level = self.levels[rng.randrange(len(self.levels))]
        kind, picture = None, rec.image
        if level != "clean":
            kind = sample_kind(torch.Generator().manual_seed(seed_of(rec.seed, i, "clear-grpo-kind")))
            picture = degrade(rec.image[None], kind, level, seed=rec.seed, index=[i])[0]
        mc = self.answers == "choice"
        prompt = Sample([ImageItem(picture.float() / 127.5 - 1.0, "understand"), TextItem(clear_question(q, mc))])
        meta = {"answer": q["answer_letter"] if mc else q["answer"], "clean": rec.image.float() / 127.5 - 1.0,
                "level": level, "degradation": kind, "question_type": q["type"]}
        return i, prompt, meta


class ClearPromptDoc:
    def __init__(self, index: int, prompt, meta: dict, length: int):
        self.index, self.prompt, self.meta, self.length = index, prompt, meta, length


class _Encode:
    def __init__(self, length):
        self.length = length

    def __call__(self, item, index, seed):
        i, prompt, meta = item
        return ClearPromptDoc(i, prompt, meta, self.length)


def trajectory_text(traj) -> str:
    """Everything a CLEAR trajectory wrote, in order (the restoration marker included)."""
    return "".join(s["context_text"] for s in traj.segments if s["kind"] == "text")


LATENT_REWARDS = ("vae", "mse", "cosine", "local")


def latent_quality(restored: torch.Tensor, clean: torch.Tensor, kind: str, mse_scale: float = 0.5) -> float:
    """The restored latent tokens (n, C) against the clean picture's (n, C), as CLEAR's released
    ``latent_quality_reward`` (train/grpo/interleave_grpo.py, its "vae" mode) computes it: "mse" = exp(-mse_scale x
    mean squared error) in (0, 1]; "cosine" = max(0, cosine of the two flattened latents); "local" = the mean over
    tokens of max(0, the token's cosine); "vae" = 0.3 mse + 0.3 cosine + 0.4 local (the released aggregate; its
    "vit" / "both" modes, which add a ViT-feature cosine, are not built)."""
    if restored.shape != clean.shape:
        raise ValueError(f"latent_quality: restored latent {tuple(restored.shape)} and clean latent "
                         f"{tuple(clean.shape)} differ in shape")
    if kind not in LATENT_REWARDS:
        raise ValueError(f"latent_quality: kind must be one of {', '.join(LATENT_REWARDS)}, got {kind!r}")
    a, b = restored.float(), clean.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("latent_quality: the latents hold non-finite values")
    parts = {"mse": float(torch.exp(-float(mse_scale) * ((a - b) ** 2).mean())),
             "cosine": max(float(torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1))), 0.0),
             "local": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(min=0).mean())}
    if kind == "vae":
        return 0.3 * parts["mse"] + 0.3 * parts["cosine"] + 0.4 * parts["local"]
    return parts[kind]


def clear_reward(text: str, answer: str, restored: bool, multiple_choice: bool, *, accuracy_weight: float = 1.0,
                 format_weight: float = 1.0, decision_weight: float = 0.0, latent=None,
                 latent_weight: float = 0.0) -> tuple:
    """CLEAR's reward of one trajectory's text -> (total, parts).  accuracy: the answer inside <answer> is right
    (``parse_clear``'s answer, scored as ``umm eval`` scores it: the option letter or the normalised short answer);
    format: ``FormatReward`` (0.35 think + 0.35 answer + 0.3 order); decision: ``DecisionReward``'s table on
    (restored, right); latent: the latent quality of the restoration (None: none, counts 0)."""
    from ...data.clear_data import parse_clear
    from ...eval.tasks.vqa import score_answer, score_short_answer
    from ...rl.rewards import DecisionReward, FormatReward

    p = parse_clear(text)
    acc = (score_answer if multiple_choice else score_short_answer)(p["answer"], str(answer))
    fmt = FormatReward().total(p["format"])
    dec = DecisionReward.TABLE[(bool(restored), acc >= 0.5)]
    lat = 0.0 if latent is None else float(latent)
    total = accuracy_weight * acc + format_weight * fmt + decision_weight * dec + latent_weight * lat
    return total, {"accuracy": acc, "format": fmt, "decision": dec, "latent": lat, "restored": float(restored)}


@register
class ClearGRPORecipe(Recipe):
    name = "clear-grpo"
    config_class = ClearGRPOConfig
    run_defining = ("init", "image_size", "train_records", "answers", "levels", "group_size", "prompts_per_micro",
                    "think_tokens", "answer_tokens", "temperature", "top_k", "restore_steps", "recordable", "sigma",
                    "cfg_scale", "accuracy_weight", "format_weight", "decision_weight", "latent_reward",
                    "latent_weight", "latent_mse_scale", "text_clip", "text_norm", "text_kl", "image_clip", "image_kl", "image_weight")

    def __init__(self):
        self._reference = None

    def world_kwargs(self, cfg) -> dict:
        from .flow_grpo import FlowGRPORecipe

        return FlowGRPORecipe.world_kwargs(self, cfg)

    def build_model(self, cfg):
        from .flow_grpo import FlowGRPORecipe

        return FlowGRPORecipe.build_model(self, cfg)

    def _world(self, cfg, length):
        from ...data.synthetic import SyntheticWorld

        return SyntheticWorld(size=cfg.recipe.image_size, seed=cfg.job.seed, length=length, **self.world_kwargs(cfg))

    def build_data(self, cfg, model) -> DataSource:
        r = cfg.recipe
        if r.text_kl > 0 or r.image_kl > 0:
            # the engine has not loaded any checkpoint yet: `model` holds the initial (SFT) weights
            self._reference = copy.deepcopy(model).eval().requires_grad_(False)
        per = max(1, cfg.data.budget // r.prompts_per_micro)
        ds = ClearPromptDataset(self._world(cfg, r.train_records), r.train_records, r.answers, r.levels)
        return DataSource(ds, _Encode(per), _collate, length=lambda i: per)

    def engine_defaults(self) -> dict:
        return {"job.steps": 40, "optim.lr": 1e-5, "schedule.warmup": 0, "schedule.decay": "constant",
                "data.budget": 64, "checkpoint.every": 10, "optim.weight_decay": 0.0}

    def describe(self, cfg) -> str:
        r = cfg.recipe
        return (f"clear-grpo from {r.init or 'a fresh ' + cfg.model.preset}: G={r.group_size}, {r.answers} answers, "
                f"levels {','.join(r.levels)}, restoration {r.restore_steps} SDE steps (sigma {r.sigma})")

    # ------------------------------------------------------------------ the step
    def plan(self, r) -> list:
        """The rollout plan: think (stopped at the restoration marker) -> restoration -> answer, the last two only
        where the model asked for the restoration."""
        from ... import rl
        from ...data.clear_data import RESTORE_TAG

        def asked(t):
            return t.segments[0]["finish_reason"] == "stop"

        return [rl.Seg("text", max_new_tokens=r.think_tokens, temperature=r.temperature, top_k=r.top_k,
                       stop=(RESTORE_TAG,)),
                rl.Seg("image", steps=r.restore_steps, cfg_scale=r.cfg_scale, sigma=float(r.sigma),
                       schedule=rl.SDESchedule("cycle", recordable=r.recordable), height=r.image_size,
                       width=r.image_size, when=asked),
                rl.Seg("text", max_new_tokens=r.answer_tokens, temperature=r.temperature, top_k=r.top_k,
                       when=asked)]

    def rewards(self, model, trajs, r) -> tuple:
        """(rewards (B,), {part: mean}) of the trajectories."""
        clean_latents = {}
        vals, parts = [], {}
        for t in trajs:
            images = [s for s in t.segments if s["kind"] == "image"]
            lat = None
            if images and r.latent_reward != "none":
                if t.key not in clean_latents:
                    with torch.no_grad():
                        clean_latents[t.key] = model.vae.encode(t.meta["clean"][None].to(model.device))[0].cpu()
                lat = latent_quality(images[-1]["latent"], clean_latents[t.key], r.latent_reward,
                                     mse_scale=r.latent_mse_scale)
            v, p = clear_reward(trajectory_text(t), t.meta["answer"], bool(images), r.answers == "choice",
                                accuracy_weight=r.accuracy_weight, format_weight=r.format_weight,
                                decision_weight=r.decision_weight, latent=lat, latent_weight=r.latent_weight)
            vals.append(v)
            for k, x in p.items():
                parts.setdefault(k, []).append(x)
        return torch.tensor(vals, dtype=torch.float32), {k: sum(v) / len(v) for k, v in parts.items()}

    def rollout(self, model, batch, ctx) -> tuple:
        """The micro-batch's trajectories (G per question), their rewards (B,) and the mean of each reward part."""
        from ... import rl

        r = ctx.config.recipe
        docs = batch.docs
        with torch.no_grad():
            trajs = model(rl.rollout_interleaved, [d.prompt for d in docs], r.group_size, self.plan(r),
                          seed=ctx.seed, step=ctx.step, keys=[d.index for d in docs], meta=[d.meta for d in docs])
            rewards, parts = self.rewards(model, trajs, r)
        return trajs, rewards, parts

    def loss(self, model, trajs, rewards, r) -> tuple:
        """(loss, stats) of rollouts with their rewards: Dr.GRPO advantages and the interleaved PPO loss."""
        from ... import rl

        adv = rl.group_advantages(rewards, r.group_size, scale="none")
        lp = model(rl.interleaved_logprobs, trajs, reference=self._reference)
        return rl.interleaved_pg_loss(lp, adv, text_clip=r.text_clip, text_kl_beta=r.text_kl, text_norm=r.text_norm,
                                      text_max_len=r.think_tokens + r.answer_tokens, image_clip=r.image_clip,
                                      image_kl_beta=r.image_kl, image_weight=r.image_weight)

    def step(self, model, batch, ctx) -> StepOutput:
        r = ctx.config.recipe
        trajs, rewards, parts = self.rollout(model, batch, ctx)
        loss, st = self.loss(model, trajs, rewards, r)
        metrics = {"reward": float(rewards.mean()),
                   "reward_std": float(rewards.view(-1, r.group_size).std(1).mean()),
                   "text_kl": st["text_kl"], "image_kl": st.get("image_kl", 0.0),
                   "image_steps": st.get("image_steps", 0.0)}
        metrics.update(parts)
        return StepOutput(loss, metrics, {"trajectories": len(trajs)})

    def fsdp_units(self, model):
        return list(model.llm.model.layers)

    # ------------------------------------------------------------------ evaluation
    def wants_eval(self, cfg) -> bool:
        return cfg.recipe.evaluate and cfg.recipe.eval_items > 0

    def evaluate(self, model, cfg, out_dir) -> dict:
        from ...eval.runner import evaluate

        r = cfg.recipe
        task = "clear-short" if r.answers == "short" else "clear"
        res = evaluate(model, task, n=r.eval_items, seed=cfg.job.seed, image_size=r.image_size,
                       out_dir=f"{out_dir}/eval", world_kwargs=self.world_kwargs(cfg), first=r.train_records,
                       steps=r.eval_steps)
        out = dict(res["tasks"][task])
        out["task"] = task
        return out

    def report(self, results: dict) -> list:
        m = {k: v.get("score", 0.0) for k, v in results.get("metrics", {}).items()}
        return [f"eval {results.get('task', 'clear')}: degraded {results['score']:.3f}, clean {m.get('clean', 0):.3f};"
                f" restored first {m.get('restored', 0):.2f} (clean pictures {m.get('restored_clean', 0):.2f}); "
                f"format {m.get('format', 0):.2f}"]

    def shorthands(self) -> dict:
        return {"--init": ("recipe.init", "value", "clear-sft run / checkpoint to start from"),
                "--group-size": ("recipe.group_size", "value", "rollouts per question"),
                "--no-eval": ("recipe.evaluate", "false", "skip the evaluation after training")}
