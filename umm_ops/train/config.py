"""The config tree of a training run: one dataclass per section, loadable from TOML, overridable with
``--set section.key=value``, saved in every checkpoint.

    cfg = Config.build(recipe="sft", toml="run.toml", overrides=["optim.lr=3e-4", "job.steps=300"])

Sections: ``job`` (run folder, steps, seed, device), ``model`` (preset, parameter dtype), ``data`` (tokens per
micro-batch and per optimizer step, loader workers), ``optim``, ``schedule``, ``parallel`` (DDP / FSDP2, mixed
precision, activation checkpointing, torch.compile), ``checkpoint``, ``metrics``, and ``recipe`` (the recipe's own
dataclass, see :mod:`umm_ops.train.spec`).  Every value is checked against its field's type when it is set, and
:meth:`Config.validate` refuses impossible combinations; every message names the key, the value and what is
allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..utils import not_a_file, optional_import

__all__ = ["Config", "JobConfig", "ModelConfig", "DataConfig", "OptimConfig", "ScheduleConfig", "ParallelConfig",
           "CheckpointConfig", "MetricsConfig", "ConfigError", "set_value", "to_dict", "from_dict", "parse_value"]


class ConfigError(ValueError):
    """A config key, value or combination that is not allowed (the message says which and what is)."""


def requirement(section: str, obj):
    """``need = requirement("recipe", self)`` in a config's validate(): ``need(ok, key, what)`` raises ConfigError
    ``"<section>.<key> = <value>: <what>"`` unless ok."""
    def need(ok, key, what):
        if not ok:
            raise ConfigError(f"{section}.{key} = {getattr(obj, key)!r}: {what}")
    return need


@dataclass
class JobConfig:
    out: str = "runs/demo"            # the run folder: checkpoints, metrics.jsonl, plots, eval, summary.json
    steps: int = 150                  # optimizer steps in total (a resumed run continues up to this)
    seed: int = 0                     # model init, data order, timesteps, noise: every draw is seeded from it
    device: str = "auto"              # "cpu", "cuda" or "auto" (cuda when torch sees a GPU)
    resume: bool = True               # continue from the newest intact checkpoint in `out`
    progress: typing.Optional[bool] = None   # a progress bar (None: when stdout is a terminal)


@dataclass
class ModelConfig:
    preset: str = "tiny"              # CheersModel preset
    dtype: str = "float32"            # parameter dtype: "float32" or "bfloat16" (pure bf16, AdamW moments too)
    latent_input: bool = False        # the flow head also reads the noisy latent x_t (HeadConfig.latent_input)
    prediction: str = "velocity"      # the flow head predicts "velocity" (Cheers) or "clean" (HeadConfig.prediction)
    latent_to_llm: bool = False       # the LLM also reads every image's latent x_t and t (CheersConfig.latent_to_llm)
    conv_widths: typing.Optional[tuple] = None   # a convolutional stage after the flow head's detail stage,
                                      # channels per level, e.g. [64, 128, 192]; [] for none (HeadConfig.conv_widths)
    conv_context: typing.Optional[bool] = None   # that stage also reads the prompt's LLM hidden states
                                      # (HeadConfig.conv_context)
    conv_inputs: typing.Optional[str] = None   # what that stage reads: "all", "latent" or "alone"
                                      # (HeadConfig.conv_inputs)
    conv_context_embeddings: typing.Optional[bool] = None   # that context also carries the prompt's input
                                      # embeddings (HeadConfig.conv_context_embeddings)
    conv_repa: typing.Optional[bool] = None   # a REPA projector on that stage's second level
                                      # (HeadConfig.conv_repa; trained by recipe.repa_weight)
                                      # (these five: None is the preset's, or recipe.init's)
    embedding_multiplier: typing.Optional[float] = None   # the LLM's token embeddings times this before its first
                                      # layer (Qwen2Config.embedding_multiplier); None: the preset's
                                      # (these nine: a fresh model's architecture, not in Cheers by default but
                                      # for the tiny preset's conv stage; with recipe.init the checkpoint's holds,
                                      # and a value it lacks is refused)
    vae_weights: typing.Optional[str] = None   # a fresh model's autoencoder instead of the preset's: a shipped name
                                      # or a .safetensors file from `umm export` of a vae run (refused with
                                      # recipe.init; the run's checkpoints hold it)
    vit_weights: typing.Optional[str] = None   # a fresh model's vision tower instead of the preset's: a shipped name,
                                      # a .safetensors file from `umm export` of a vit run, or "none" (random init)
                                      # (refused with recipe.init; the run's checkpoints hold it)
    vae_compute_dtype: str = "auto"   # what the frozen VAE parts (encoder; decoder copy while untrained) compute in:
                                      # "bfloat16" (autocast, 2-3x faster on CPUs with bf16 instructions), "model"
                                      # (the model's dtype), "auto": what the model brings (the preset's, or
                                      # recipe.init's / a resumed checkpoint's).  VAEConfig.compute_dtype

    def cheers_config(self):
        """The CheersConfig of a fresh model of this run: the preset with the run's head options; or, in a copy
        made by :func:`building_config`, the architecture a checkpoint recorded (``model_config``)."""
        from ..model.config import CheersConfig, preset

        recorded = self.__dict__.get("_recorded_architecture")
        if recorded is not None:
            return CheersConfig.from_dict(recorded)
        c = preset(self.preset)
        c.head.latent_input = bool(self.latent_input)
        c.head.prediction = self.prediction
        c.latent_to_llm = bool(self.latent_to_llm)
        if self.conv_widths is not None:
            widths = tuple(int(w) for w in self.conv_widths)
            # no stage: the preset's options of the stage go with it
            c.head = dataclasses.replace(c.head, conv_widths=widths) if widths else c.head.without_conv_stage()
        for name in ("conv_context", "conv_inputs", "conv_context_embeddings", "conv_repa"):
            if getattr(self, name) is not None:
                setattr(c.head, name, getattr(self, name))
        if self.embedding_multiplier is not None:
            c.llm["embedding_multiplier"] = float(self.embedding_multiplier)
        if self.vae_weights is not None:
            c.vae.weights = self.vae_weights
        if self.vit_weights is not None:
            c.vit_weights = None if self.vit_weights == "none" else self.vit_weights
        return c.validate()

    def apply_options(self, model) -> None:
        """Set on a built model what this section says that is not architecture (so it holds with recipe.init and
        on resume as well): a Cheers-family model's ``vae.compute_dtype`` from ``vae_compute_dtype``."""
        c = getattr(model, "config", None)
        if self.vae_compute_dtype != "auto" and hasattr(getattr(c, "vae", None), "compute_dtype"):
            c.vae.compute_dtype = None if self.vae_compute_dtype == "model" else self.vae_compute_dtype

    def check_init(self, source_config, init: str) -> None:
        """Refuse head options that the checkpoint given as recipe.init does not have."""
        head = source_config.head
        if self.latent_input and not head.latent_input:
            raise ConfigError(f"model.latent_input = true, but recipe.init {init!r} is a model without the latent "
                              f"input (its head has no latent_embed): drop model.latent_input, or start fresh")
        if self.vae_weights is not None:
            raise ConfigError(f"model.vae_weights = {self.vae_weights!r} applies to a fresh model, but recipe.init "
                              f"{init!r} brings its own autoencoder: drop one of them")
        if self.vit_weights is not None:
            raise ConfigError(f"model.vit_weights = {self.vit_weights!r} applies to a fresh model, but recipe.init "
                              f"{init!r} brings its own vision tower: drop one of them")
        if self.latent_to_llm and not source_config.latent_to_llm:
            raise ConfigError(f"model.latent_to_llm = true, but recipe.init {init!r} is a model without it (no "
                              f"latent_to_llm weights): drop model.latent_to_llm, or start fresh")
        if self.conv_widths is not None and tuple(self.conv_widths) != tuple(head.conv_widths):
            raise ConfigError(f"model.conv_widths = {list(self.conv_widths)}, but recipe.init {init!r} has "
                              f"{list(head.conv_widths) or 'no convolutional stage'}: drop model.conv_widths, or "
                              f"start fresh")
        if self.conv_inputs is not None and self.conv_inputs != head.conv_inputs:
            raise ConfigError(f"model.conv_inputs = {self.conv_inputs!r}, but recipe.init {init!r} has "
                              f"{head.conv_inputs!r}: drop model.conv_inputs, or start fresh")
        if self.embedding_multiplier is not None and \
                float(self.embedding_multiplier) != float(source_config.llm.get("embedding_multiplier", 1.0)):
            raise ConfigError(f"model.embedding_multiplier = {self.embedding_multiplier}, but recipe.init {init!r} "
                              f"was trained with {source_config.llm.get('embedding_multiplier', 1.0)}: drop "
                              f"model.embedding_multiplier, or start fresh")
        if self.conv_context is not None and self.conv_context != head.conv_context:
            raise ConfigError(f"model.conv_context = {str(self.conv_context).lower()}, but recipe.init {init!r} "
                              f"{'has no' if self.conv_context else 'has a'} prompt context in its convolutional "
                              f"stage: drop model.conv_context, or start fresh")
        if self.conv_context_embeddings is not None and self.conv_context_embeddings != head.conv_context_embeddings:
            raise ConfigError(f"model.conv_context_embeddings = {str(self.conv_context_embeddings).lower()}, but "
                              f"recipe.init {init!r} {'has no' if self.conv_context_embeddings else 'has'} input "
                              f"embeddings in its prompt context: drop model.conv_context_embeddings, or start fresh")
        if self.conv_repa is not None and self.conv_repa != head.conv_repa:
            raise ConfigError(f"model.conv_repa = {str(self.conv_repa).lower()}, but recipe.init {init!r} "
                              f"{'has no' if self.conv_repa else 'has a'} REPA projector in its head: drop "
                              f"model.conv_repa, or start fresh")
        if self.prediction != "velocity" and self.prediction != head.prediction:
            raise ConfigError(f"model.prediction = {self.prediction!r}, but recipe.init {init!r} predicts "
                              f"{head.prediction!r}: drop model.prediction, or start fresh")


def _resolvable(weights) -> bool:
    from ..utils import resolve_shipped_weights

    try:
        resolve_shipped_weights(weights, "weights")
        return True
    except FileNotFoundError:
        return False


def building_config(cfg, architecture: dict | None = None):
    """The config a model is built from when a checkpoint's weights then fill it: `cfg`, or a copy without
    ``model.vae_weights`` / ``model.vit_weights`` when that file is gone (a run's checkpoints hold its autoencoder
    and vision tower, so neither resuming nor eval / export needs the file; only a fresh model does).  Recipes
    without a model section pass through.

    architecture: the ``model_config`` a checkpoint recorded (the CheersConfig of the model it saved).  With it the
    copy builds that architecture without reading ``recipe.init`` (which is cleared): loading a run's checkpoint
    then needs neither the run it started from (moved, deleted, or a path relative to another directory) nor the
    preset's current definition.  Not for resuming a training run: recipes may take more than the architecture from
    recipe.init (flow-grpo's KL reference is its weights)."""
    model = getattr(cfg, "model", None)
    gone = [name for name in ("vae_weights", "vit_weights")
            if getattr(model, name, None) not in (None, "none") and not _resolvable(getattr(model, name))]
    pin = architecture is not None and hasattr(model, "cheers_config")
    if not (pin or gone):
        return cfg
    c = copy.deepcopy(cfg)
    for name in gone:
        setattr(c.model, name, None)
    if pin:
        arch = copy.deepcopy(architecture)
        w = (arch.get("vae") or {}).get("weights")
        if w is not None and not _resolvable(w):
            arch["vae"]["weights"] = None      # the checkpoint holds the autoencoder
        if arch.get("vit_weights") is not None and not _resolvable(arch["vit_weights"]):
            arch["vit_weights"] = None         # ... and the vision tower
        c.model.__dict__["_recorded_architecture"] = arch
        if getattr(c.recipe, "init", None):
            c.recipe.init = ""
    return c


@dataclass
class DataConfig:
    budget: int = 1024                # tokens per packed micro-batch (one forward/backward)
    global_tokens: int = 0            # tokens per optimizer step across all ranks; a multiple of budget (0: = budget)
    num_workers: int = 0              # loader worker processes per rank


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01        # on matrices only (parameters with >= 2 dims)
    grad_clip: float = 1.0            # max global gradient norm (0: off)
    ema: float = 0.0                  # EMA decay of the weights (0: off; CLEAR uses 0.995)
    lr_scales: tuple = ()             # "prefix:scale" items: a parameter whose name starts with prefix (first match)
                                      # trains at scale * the scheduled lr, e.g. ("vit.:0.1", "und_projector.:0.1")
    implementation: str = "fused"     # AdamW's kernel: "fused" (one pass over each tensor; on the CPU ~3x faster per
                                      # step than PyTorch's default there), "foreach" or "for-loop" (PyTorch's CPU
                                      # default).  Same update up to float rounding


@dataclass
class ScheduleConfig:
    warmup: int = 10                  # steps of linear warmup
    decay: str = "cosine"             # "cosine", "linear" or "constant" after warmup
    min_lr_ratio: float = 0.1         # floor of the decay as a fraction of lr


@dataclass
class ParallelConfig:
    mode: str = "auto"                # "auto" (ddp when world > 1, else none), "none", "ddp", "fsdp"
    mixed_precision: str = "none"     # "none" or "bf16" (FSDP2 MixedPrecisionPolicy / autocast for DDP)
    activation_checkpointing: bool = False
    compile: bool = False             # torch.compile each block
    backend: str = "auto"             # process group backend: "auto" (nccl on cuda, gloo on cpu), "gloo", "nccl"


@dataclass
class CheckpointConfig:
    every: int = 50                   # steps between checkpoints (0: only at the end)
    keep_last: int = 2                # complete checkpoints kept
    verify: str = "hash"              # "hash" (BLAKE2b of every file, checked before loading) or "size"


@dataclass
class MetricsConfig:
    log_every: int = 10               # console line period (metrics.jsonl gets every step)
    tensorboard: bool = False         # also write TensorBoard events to out/tensorboard
    plot: bool = True                 # loss_curve.png at the end


_SECTIONS = {"job": JobConfig, "model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
             "schedule": ScheduleConfig, "parallel": ParallelConfig, "checkpoint": CheckpointConfig,
             "metrics": MetricsConfig}

_CHOICES = {
    ("job", "device"): ("cpu", "cuda", "auto"),
    ("model", "dtype"): ("float32", "bfloat16"),
    ("model", "prediction"): ("velocity", "clean"),
    ("model", "vae_compute_dtype"): ("auto", "model", "bfloat16"),
    ("optim", "implementation"): ("fused", "foreach", "for-loop"),
    ("schedule", "decay"): ("cosine", "linear", "constant"),
    ("parallel", "mode"): ("auto", "none", "ddp", "fsdp"),
    ("parallel", "mixed_precision"): ("none", "bf16"),
    ("parallel", "backend"): ("auto", "gloo", "nccl"),
    ("checkpoint", "verify"): ("hash", "size"),
}


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    recipe_name: str = "sft"
    recipe: typing.Any = None         # the recipe's dataclass instance

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, recipe: str = "sft", toml=None, overrides=(), values: dict | None = None) -> "Config":
        """Defaults of every dataclass <- the recipe's engine_defaults() <- a TOML file <- `values`
        ({"section.key": value}, already typed) <-
        `overrides` ("section.key=value" strings).  A TOML file may name its recipe (top-level
        ``recipe_name = "sft"``, as :meth:`to_toml` writes), which must agree with `recipe`."""
        from .spec import get_recipe

        data = {}
        if toml is not None:
            data = load_toml(toml)
            named = data.pop("recipe_name", None)
            if named is not None and named != recipe:
                raise ConfigError(f"{toml}: the file is for recipe {named!r} but the run asks for recipe {recipe!r}")
        rec = get_recipe(recipe)
        cfg = cls(recipe_name=recipe, recipe=rec.config_class())
        for key, v in rec.engine_defaults().items():
            set_value(cfg, key, v, where=f"recipe {recipe}'s defaults")
        _apply_tree(cfg, data, where=str(toml) if toml is not None else "config")
        for key, v in (values or {}).items():
            set_value(cfg, key, v, where="command line")
        for item in overrides:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"--set expects KEY=VALUE (e.g. optim.lr=3e-4), got {item!r}")
            key, text = item.split("=", 1)
            set_value(cfg, key.strip(), parse_value(text.strip()), where="--set")
        return cfg.validate()

    def sections(self) -> dict:
        d = {k: getattr(self, k) for k in _SECTIONS}
        d["recipe"] = self.recipe
        return d

    def validate(self) -> "Config":
        j, d, o, s, p, c, m = self.job, self.data, self.optim, self.schedule, self.parallel, self.checkpoint, \
            self.metrics
        for sec, obj in self.sections().items():
            if obj is None:
                raise ConfigError(f"config: section [{sec}] is missing")
            for name, tp in _fields(obj).items():   # values assigned directly (not via set_value) checked too
                _coerce(f"{sec}.{name}", getattr(obj, name), tp, "config")
                allowed = _CHOICES.get((sec, name))
                if allowed and getattr(obj, name) not in allowed:
                    raise ConfigError(f"{sec}.{name} = {getattr(obj, name)!r} is not allowed; use one of "
                                      f"{list(allowed)}")

        def need(ok, key, value, what):
            if not ok:
                raise ConfigError(f"{key} = {value!r}: {what}")

        need(j.steps >= 1, "job.steps", j.steps, "must be >= 1")
        need(j.seed >= 0, "job.seed", j.seed, "must be >= 0")
        need(bool(str(j.out)), "job.out", j.out, "must name a folder")
        need(d.budget >= 16, "data.budget", d.budget, "must be >= 16 tokens")
        need(d.global_tokens >= 0, "data.global_tokens", d.global_tokens, "must be >= 0 (0: = data.budget)")
        need(d.global_tokens % d.budget == 0, "data.global_tokens", d.global_tokens,
             f"must be a multiple of data.budget = {d.budget} (micro-batches per step = global_tokens / budget)")
        need(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
        need(math.isfinite(o.lr) and o.lr > 0, "optim.lr", o.lr, "must be a finite number > 0")
        need(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", o.betas,
             "must be two numbers in [0, 1)")
        need(o.eps > 0, "optim.eps", o.eps, "must be > 0")
        need(math.isfinite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay,
             "must be >= 0")
        need(math.isfinite(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip", o.grad_clip,
             "must be >= 0 (0 = no clipping)")
        need(0.0 <= o.ema < 1.0, "optim.ema", o.ema, "must be in [0, 1) (0 = no EMA)")
        parse_lr_scales(o.lr_scales)
        need(s.warmup >= 0, "schedule.warmup", s.warmup, "must be >= 0")
        need(0.0 <= s.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", s.min_lr_ratio, "must be in [0, 1]")
        need(c.every >= 0, "checkpoint.every", c.every, "must be >= 0 (0 = only at the end)")
        need(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")
        need(m.log_every >= 1, "metrics.log_every", m.log_every, "must be >= 1")
        if p.mixed_precision == "bf16" and self.model.dtype == "bfloat16":
            raise ConfigError("parallel.mixed_precision = 'bf16' with model.dtype = 'bfloat16': mixed precision "
                              "keeps float32 master weights; use model.dtype = 'float32' with it, or pure bf16 "
                              "without it")
        if p.backend == "nccl" and j.device == "cpu":
            raise ConfigError("parallel.backend = 'nccl' with job.device = 'cpu': nccl needs CUDA tensors; use "
                              "'gloo' or 'auto'")
        if hasattr(self.recipe, "validate"):
            self.recipe.validate()
        return self

    def micro_per_step(self) -> int:
        """Micro-batches per optimizer step across all ranks."""
        return max(1, self.data.global_tokens // self.data.budget) if self.data.global_tokens else 1

    # ------------------------------------------------------------------ (de)serialising
    def to_dict(self) -> dict:
        out = {k: to_dict(v) for k, v in self.sections().items()}
        out["recipe_name"] = self.recipe_name
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "saved config") -> "Config":
        d = dict(d)
        name = d.pop("recipe_name", "sft")
        from .spec import get_recipe

        cfg = cls(recipe_name=name, recipe=get_recipe(name).config_class())
        _apply_tree(cfg, d, where=where)
        return cfg.validate()

    def to_toml(self) -> str:
        lines = [f"recipe_name = {_toml_value(self.recipe_name)}", ""]
        for sec, obj in self.sections().items():
            lines.append(f"[{sec}]")
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if v is not None:
                    lines.append(f"{f.name} = {_toml_value(v)}")
            lines.append("")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- helpers
def to_dict(obj) -> dict:
    d = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def from_dict(cls, d: dict, where: str = "config"):
    obj = cls()
    for k, v in d.items():
        set_value(obj, k, v, where=where, section=cls.__name__)
    return obj


def _tomllib():
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    return optional_import("tomli")   # Python 3.10


def load_toml(path) -> dict:
    tomllib = _tomllib()
    p = Path(path)
    why = not_a_file(p)
    if why:
        raise ConfigError(f"--config {p}: the file {why}")
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return data


def _apply_tree(cfg: Config, data: dict, where: str) -> None:
    sections = cfg.sections()
    for sec, body in data.items():
        if sec == "recipe_name":
            continue
        if sec not in sections:
            raise ConfigError(f"{where}: unknown section [{sec}]; sections: {sorted(sections)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: [{sec}] must be a table of keys, got {body!r}")
        for k, v in body.items():
            set_value(cfg, f"{sec}.{k}", v, where=where)


def _fields(obj) -> dict:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(obj)}


def set_value(cfg, key: str, value, where: str = "config", section: str | None = None) -> None:
    """Set ``section.key`` on a Config (or ``key`` on one section's dataclass), checked against the field type."""
    if isinstance(cfg, Config):
        if "." not in key:
            raise ConfigError(f"{where}: key {key!r} must be SECTION.KEY (sections: {sorted(cfg.sections())})")
        sec, name = key.split(".", 1)
        obj = cfg.sections().get(sec)
        if obj is None:
            raise ConfigError(f"{where}: unknown section {sec!r} in {key!r}; sections: {sorted(cfg.sections())}")
    else:
        obj, sec, name = cfg, section or type(cfg).__name__, key
    fields = _fields(obj)
    if name not in fields:
        raise ConfigError(f"{where}: unknown key {sec}.{name}; [{sec}] has: {sorted(fields)}")
    setattr(obj, name, _coerce(f"{sec}.{name}", value, fields[name], where))
    allowed = _CHOICES.get((sec, name))
    if allowed and getattr(obj, name) not in allowed:
        raise ConfigError(f"{where}: {sec}.{name} = {value!r} is not allowed; use one of {list(allowed)}")


def _coerce(key: str, value, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, value, inner[0], where)
    bad = ConfigError(f"{where}: {key} = {value!r} ({type(value).__name__}) is not a valid "
                      f"{getattr(tp, '__name__', str(tp))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
            if math.isnan(v):
                raise ConfigError(f"{where}: {key} = nan is not allowed")
            return v
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp is tuple or origin is tuple:
        if isinstance(value, str):   # "a,b" on the command line: each item parsed like a value (64 -> int)
            value = [parse_value(x.strip()) for x in value.split(",") if x.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):   # "64": a one-item tuple
            value = [value]
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise bad
    return value


def parse_lr_scales(items) -> list:
    """optim.lr_scales ("prefix:scale" strings) -> [(prefix, scale)], checked."""
    out = []
    for item in items:
        prefix, sep, num = str(item).rpartition(":")
        try:
            scale = float(num) if sep and prefix else float("nan")
        except ValueError:
            scale = float("nan")
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"optim.lr_scales: each item must be 'name-prefix:scale' with a finite scale > 0 "
                              f"(e.g. 'vit.:0.1'), got {item!r}")
        out.append((prefix, scale))
    return out


def parse_value(text: str):
    """A command-line value: TOML syntax when it parses (3e-4, true, [0.9, 0.95], "x"), else the raw string."""
    tomllib = _tomllib()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        low = text.lower()
        if low in ("nan", "inf", "+inf", "-inf"):
            return float(low)
        return text


def _toml_value(v) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))
