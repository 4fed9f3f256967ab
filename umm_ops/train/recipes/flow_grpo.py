"""flow-grpo: text-to-image RL with the synthetic world's pixel checker as reward (Flow-GRPO on the training engine).

    umm train --recipe flow-grpo --set recipe.init=runs/base --steps 40 --out runs/fgrpo

Each micro-batch holds ``prompts_per_micro`` prompts of the world (the generation prompt of records 0 ..
train_records - 1, keyed by record index).  A step: G = ``group_size`` images per prompt from the SDE sampler
(:func:`umm_ops.rl.rollout_images`, the stochastic steps chosen by ``schedule``, CFG as ``cfg_scale``), rewards
(:class:`umm_ops.rl.PixelCheckReward`, or ``reward = "redness"``), group advantages, then the policy's log-probs of
the recorded transitions recomputed with gradient (one packed forward of all (prompt, x_t, t) rows) and
:func:`umm_ops.rl.flow_pg_loss` (PPO-clip + ``kl_beta`` x flow_kl to a frozen reference copy of the initial
weights).  ``ppo_epochs`` > 1 reuses a rollout for that many optimizer steps (the engine then fetches a new
batch every ppo_epochs steps; checkpoints fall on rollout boundaries).

Everything random is seeded by (run seed, rollout step, record index, sample): a run resumes exactly and gives the
same steps on any number of ranks (prompt groups are sharded, never split).  The data budget: each prompt counts
``data.budget // prompts_per_micro`` "tokens", so a micro-batch holds exactly ``prompts_per_micro`` prompts and a
step ``data.global_tokens / data.budget`` micro-batches of them.
"""
from __future__ import annotations

import copy
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from ..spec import DataSource, Recipe, StepOutput, register

__all__ = ["FlowGRPORecipe", "FlowGRPOConfig", "policy_model"]

_POLICY = None


def policy_model():
    """The PolicyModel class (built on first use: the model module imports heavy dependencies)."""
    global _POLICY
    if _POLICY is None:
        _POLICY = _policy_class()
    return _POLICY


def _policy_class():
    from ...model.cheers import CheersModel

    class PolicyModel(CheersModel):
        """CheersModel whose ``forward(fn, *args)`` calls ``fn(self, *args)``: the RL computations (rollouts,
        log-prob recomputation) then run through the DDP / FSDP2 wrapper's forward like a training forward
        (gradient sync and parameter unsharding happen there).  Same parameters and names as CheersModel:
        its checkpoints load anywhere a CheersModel's do."""

        def forward(self, *args, **kw):
            if args and callable(args[0]) and not isinstance(args[0], torch.nn.Module):
                return args[0](self, *args[1:], **kw)
            return super().forward(*args, **kw)

    return PolicyModel


@dataclass
class FlowGRPOConfig:
    init: str = ""                    # SFT run folder / checkpoint / save_pretrained folder to start from (its world
                                      # is read back from its config); "" = the preset's fresh model
    image_size: int = 64
    train_records: int = 50_000       # prompts of records 0 .. train_records - 1 are trained on, later ones held out
    group_size: int = 8               # images per prompt (G)
    prompts_per_micro: int = 2        # prompts per micro-batch
    sample_steps: int = 10            # sampler steps of a rollout
    cfg_scale: typing.Optional[float] = None   # CFG during rollout and in the recomputed velocity (None: the
                                               # model's, as the evaluation samples; 1 = off, half the cost)
    sigma: float = 0.7                # noise level: Flow-GRPO's a of sigma_t = a sqrt((1 - t) / t), or the constant
    sigma_kind: str = "flow-grpo"     # "flow-grpo" (the schedule above) or "constant" (CLEAR: 0.3)
    schedule: str = "all"             # stochastic steps: all | window | cycle | random (umm_ops.rl.SDESchedule)
    window_start: int = 0
    window_width: int = 2
    shift_every: int = 0
    recordable: int = 0
    same_init_noise: bool = False     # every sample of a group starts from the same noise (R3)
    reward: str = "checker"           # "checker" (score of the prompt's constraints), "checker-strict" (1 when all
                                      # met), "redness" (mean red minus the other channels: a sanity reward),
                                      # "random" (uniform, independent of the image: the null control that shows
                                      # what the updates do without any signal)
    adv_scale: str = "std"            # "std" (GRPO) or "none" (Dr.GRPO)
    adv_clip: float = 5.0             # |advantage| clamp (Flow-GRPO); 0 = off
    clip: float = 1e-4                # PPO clip range on the per-step ratio (Flow-GRPO: 1e-4)
    kl_beta: float = 0.0              # weight of flow_kl to the frozen initial weights (0: no reference model)
    reference_dtype: str = "float32"  # the reference copy's dtype: "bfloat16" halves its memory (its rounding alone
                                      # gives a KL floor of ~5e-5 per step on the tiny model)
    ppo_epochs: int = 1               # optimizer steps per rollout
    old_logprobs: str = "rollout"     # "rollout" (recorded by the sampler) or "recompute" (the packed forward)
    evaluate: bool = True
    eval_images: int = 32             # held-out prompts generated (ODE, eval_steps) and scored after training
    eval_steps: int = 12

    def validate(self):
        from ..config import ConfigError, requirement

        need = requirement("recipe", self)

        need(self.image_size >= 32 and self.image_size % 32 == 0, "image_size", "must be a multiple of 32, >= 32")
        need(self.train_records >= 1, "train_records", "must be >= 1")
        need(self.group_size >= 2, "group_size", "must be >= 2 (advantages are relative to the group)")
        need(self.prompts_per_micro >= 1, "prompts_per_micro", "must be >= 1")
        need(self.sample_steps >= 2, "sample_steps", "must be >= 2 (the last step is deterministic)")
        need(self.cfg_scale is None or self.cfg_scale >= 1.0, "cfg_scale", "must be None or >= 1 (1 = no guidance)")
        need(self.sigma > 0, "sigma", "must be > 0")
        need(self.sigma_kind in ("flow-grpo", "constant"), "sigma_kind", "must be 'flow-grpo' or 'constant'")
        need(self.reward in ("checker", "checker-strict", "redness", "random"), "reward",
             "must be 'checker', 'checker-strict', 'redness' or 'random'")
        need(self.adv_scale in ("std", "none"), "adv_scale", "must be 'std' or 'none'")
        need(self.adv_clip >= 0, "adv_clip", "must be >= 0 (0: off)")
        need(self.clip >= 0, "clip", "must be >= 0")
        need(self.kl_beta >= 0, "kl_beta", "must be >= 0")
        need(self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1")
        need(self.reference_dtype in ("float32", "bfloat16"), "reference_dtype", "must be 'float32' or 'bfloat16'")
        need(self.old_logprobs in ("rollout", "recompute"), "old_logprobs", "must be 'rollout' or 'recompute'")
        need(self.eval_images >= 0 and self.eval_steps >= 1, "eval_images", "eval_images >= 0, eval_steps >= 1")
        try:
            self.sde_schedule().validate(self.sample_steps)
        except ValueError as e:
            raise ConfigError(f"recipe.schedule = {self.schedule!r}: {e}") from None
        return self

    def sde_schedule(self):
        from ...rl.rollout import SDESchedule

        return SDESchedule(self.schedule, start=self.window_start, width=self.window_width,
                           shift_every=self.shift_every, recordable=self.recordable)

    def sigma_value(self):
        import umm_ops

        return umm_ops.SigmaSchedule(self.sigma) if self.sigma_kind == "flow-grpo" else float(self.sigma)


def _init_config(init: str):
    """(trainer config dict or None, path) of the init run / checkpoint (None for a save_pretrained folder)."""
    from ..engine.checkpoint import read_trainer_state
    from ..export import resolve_checkpoint

    p = Path(init)
    if (p / "config.json").is_file():
        return None
    return read_trainer_state(resolve_checkpoint(p))["config"]


class _NullReward:
    """Uniform in [0, 1] from the trajectory's seed, independent of the image."""

    def __call__(self, tr):
        from ...utils import generator

        return float(torch.rand((), generator=generator(tr["seed"], "null-reward")))


class PromptDoc:
    """One prompt of a micro-batch: the record index (its key), the prompt text and checker spec."""

    def __init__(self, index: int, text: str, spec: dict, length: int):
        self.index, self.text, self.spec, self.length = index, text, spec, length


class PromptBatch:
    def __init__(self, docs):
        self.docs = list(docs)
        self.num_tokens = 0            # no packed tokens: the engine's token count stays 0 for RL steps
        self.num_docs = len(self.docs)

    def to(self, device):
        return self


class PromptDataset:
    """Map-style: record i of the world -> (i, its generation prompt text, its checker spec)."""

    def __init__(self, world, records: int):
        self.world, self.records = world, records

    def __len__(self):
        return self.records

    def __getitem__(self, i):
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.records:
            raise IndexError(f"PromptDataset: index {i!r} out of range [0, {self.records})")
        p = self.world[i].prompt
        return i, p["text"], p


class _Encode:
    def __init__(self, length):
        self.length = length

    def __call__(self, item, index, seed):
        i, text, spec = item
        return PromptDoc(i, text, spec, self.length)


def _collate(docs):
    return PromptBatch(docs)


@register
class FlowGRPORecipe(Recipe):
    name = "flow-grpo"
    config_class = FlowGRPOConfig
    run_defining = ("init", "image_size", "train_records", "group_size", "prompts_per_micro", "sample_steps",
                    "cfg_scale", "sigma", "sigma_kind", "schedule", "window_start", "window_width", "shift_every",
                    "recordable", "same_init_noise", "reward", "adv_scale", "adv_clip", "clip", "kl_beta",
                    "ppo_epochs", "old_logprobs", "reference_dtype")

    def __init__(self):
        self._reference = None
        self._cache: dict = {}
        self._pixel_range = (-1.0, 1.0)
        self._min_area = None       # the checker's, for this run's world (set by build_data)

    # ------------------------------------------------------------------ world and model
    def world_kwargs(self, cfg) -> dict:
        """The init run's world (what its model learned to draw: an SFT-family run's), else the SFT recipe's
        defaults."""
        from ..spec import get_recipe, recipe_names
        from .sft import SFTRecipeConfig

        r = cfg.recipe
        if r.init:
            saved = _init_config(r.init)
            name = saved.get("recipe_name") if saved is not None else None
            cls = get_recipe(name).config_class if name in recipe_names() else None
            if cls is not None and issubclass(cls, SFTRecipeConfig):      # sft, clear-sft, ...
                s = cls(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in saved["recipe"].items() if k in cls.__dataclass_fields__})
                return s.world_kwargs()
        return SFTRecipeConfig().world_kwargs()

    def _world(self, cfg, length):
        from ...data.synthetic import SyntheticWorld

        return SyntheticWorld(size=cfg.recipe.image_size, seed=cfg.job.seed, length=length, **self.world_kwargs(cfg))

    def build_model(self, cfg):
        PolicyModel = policy_model()
        r = cfg.recipe
        if r.init:
            from ..export import load_checkpoint_model

            src = load_checkpoint_model(r.init)
            cfg.model.check_init(src.config, r.init)
            model = PolicyModel(src.config, tokenizer=src.tokenizer)
            model.load_state_dict(src.state_dict())
        else:
            model = PolicyModel(cfg.model.cheers_config())
            if not model.vae.pretrained:
                w = self._world(cfg, 64)
                model.vae.calibrate(torch.stack([w[k].image.float() / 127.5 - 1 for k in range(64)]))
        model.config.image_size = r.image_size
        model.vae.decoder_copy.requires_grad_(False)
        self._pixel_range = tuple(model.profile.pixel_range)     # what the rewards read images in
        return model.float()

    def build_data(self, cfg, model) -> DataSource:
        r = cfg.recipe
        self._min_area = self._world(cfg, 1).min_object_area
        if r.ppo_epochs > 1:
            E = r.ppo_epochs
            if cfg.job.steps % E or (cfg.checkpoint.every and cfg.checkpoint.every % E):
                raise ValueError(f"recipe.ppo_epochs = {E}: job.steps ({cfg.job.steps}) and checkpoint.every "
                                 f"({cfg.checkpoint.every}) must be multiples of it, so that checkpoints fall on "
                                 f"rollout boundaries and a resumed run redraws exactly the rollout it would have")
        if r.kl_beta > 0:
            # the engine has not loaded any checkpoint yet: `model` holds the initial weights
            dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[r.reference_dtype]
            self._reference = copy.deepcopy(model).to(dt).eval().requires_grad_(False)
        per = max(1, cfg.data.budget // r.prompts_per_micro)
        return DataSource(PromptDataset(self._world(cfg, r.train_records), r.train_records), _Encode(per), _collate,
                          length=lambda i: per)

    def updates_per_batch(self, cfg) -> int:
        return cfg.recipe.ppo_epochs

    def engine_defaults(self) -> dict:
        # Flow-GRPO trains at lr 1e-4 on SD3.5 with LoRA; a full tiny model at 64 px moves at 2e-5 .. 1e-4
        return {"job.steps": 40, "optim.lr": 5e-5, "schedule.warmup": 0, "schedule.decay": "constant",
                "data.budget": 64, "checkpoint.every": 10, "optim.weight_decay": 0.0}

    def describe(self, cfg) -> str:
        r = cfg.recipe
        return (f"flow-grpo from {r.init or 'a fresh ' + cfg.model.preset}: G={r.group_size}, "
                f"{r.prompts_per_micro} prompts/micro-batch, {r.sample_steps} steps ({r.schedule}), reward "
                f"{r.reward}, kl {r.kl_beta}")

    # ------------------------------------------------------------------ the step
    def _reward(self, r):
        from ... import rl

        if r.reward == "random":
            return _NullReward()
        rng = self._pixel_range
        return {"checker": rl.PixelCheckReward(value_range=rng, min_area=self._min_area),
                "checker-strict": rl.PixelCheckReward(strict=True, value_range=rng, min_area=self._min_area),
                "redness": rl.MeanColorReward(0)}[r.reward]

    def _rollout(self, model, batch, ctx):
        from ... import rl

        r = ctx.config.recipe
        E = r.ppo_epochs
        rstep = ctx.step - ctx.step % E
        docs = batch.docs
        with torch.no_grad():
            ro = model(rl.rollout_images, [d.text for d in docs], r.group_size, seed=ctx.seed, step=rstep,
                       keys=[d.index for d in docs], steps=r.sample_steps, cfg_scale=r.cfg_scale,
                       sigma=r.sigma_value(), schedule=r.sde_schedule(), same_init_noise=r.same_init_noise,
                       meta=[{"spec": d.spec} for d in docs])
            trajs = [{"prompt": p, "meta": m, "image": img, "seed": sd}
                     for p, m, img, sd in zip(ro.prompts, ro.meta, ro.images, ro.seeds)]
            rewards, parts = rl.score(self._reward(r), trajs)
            adv = rl.group_advantages(rewards, r.group_size, scale=r.adv_scale)
            old = ro.logprobs
            if r.old_logprobs == "recompute":
                old = model(rl.image_logprobs, ro)[0].detach()
        return ro, rewards, parts, adv, old

    def step(self, model, batch, ctx) -> StepOutput:
        from ... import rl

        r = ctx.config.recipe
        E = r.ppo_epochs
        key = (ctx.step - ctx.step % E, ctx.micro_index)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] == key[0]}
            self._cache[key] = self._rollout(model, batch, ctx)
        ro, rewards, parts, adv, old = self._cache[key]
        logp, kl = model(rl.image_logprobs, ro, reference=self._reference)
        loss, st = rl.flow_pg_loss(logp, old.to(logp.device), adv.to(logp.device), kl=kl, clip=r.clip,
                                   kl_beta=r.kl_beta, adv_clip=r.adv_clip or None)
        metrics = {"reward": float(rewards.mean()),
                   "reward_std": float(rewards.view(-1, r.group_size).std(1).mean()),
                   "pg_loss": st["pg_loss"], "kl": st["kl"], "clip_frac": st["clip_frac"],
                   "ratio_max": st["ratio_max"]}
        if "checker_correct" in parts:
            metrics["checker_correct"] = float(parts["checker_correct"].mean())
        return StepOutput(loss, metrics, {"images": int(rewards.numel())})

    def fsdp_units(self, model):
        return list(model.llm.model.layers)

    # ------------------------------------------------------------------ evaluation
    def wants_eval(self, cfg) -> bool:
        return cfg.recipe.evaluate and cfg.recipe.eval_images > 0

    def evaluate(self, model, cfg, out_dir) -> dict:
        from ...eval.world import evaluate_world

        r = cfg.recipe
        return evaluate_world(model, image_size=r.image_size, seed=cfg.job.seed, first=r.train_records,
                              world=self.world_kwargs(cfg), n_vqa=0, n_images=r.eval_images, n_captions=0,
                              steps=r.eval_steps, out_dir=out_dir)

    def report(self, results: dict) -> list:
        from ...eval.world import report_lines

        return report_lines(results)

    def shorthands(self) -> dict:
        return {"--init": ("recipe.init", "value", "SFT run / checkpoint to start from"),
                "--group-size": ("recipe.group_size", "value", "images per prompt"),
                "--no-eval": ("recipe.evaluate", "false", "skip the evaluation after training")}
