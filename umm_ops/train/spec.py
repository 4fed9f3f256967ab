"""What a recipe supplies to the training engine, and the registry of recipes by name.

A recipe owns its data, its random draws (flow noise, timesteps, CFG dropout) and its losses; it never touches
the optimizer, the device mesh or the checkpoint format (those are the engine's).  Adding a recipe = a module with
a :class:`Recipe` subclass and one :func:`register` call.

    class MyRecipe(Recipe):
        name = "mine"
        config_class = MyRecipeConfig                 # a dataclass: the [recipe] section of the config
        run_defining = ("image_size", "tasks")        # recipe keys that may not change on resume

        def build_model(self, cfg): ...               # an nn.Module on the CPU, float32, initialised
        def build_data(self, cfg, model): ...         # DataSource(dataset, encode, collate, length=None),
                                                      # or DataPhases(((0, source), (first_step, source), ...))
        def step(self, model, batch, ctx): ...        # StepOutput(loss, metrics) of one micro-batch
        def evaluate(self, model, cfg, out_dir): ...  # a dict of scores (after training, rank 0, unwrapped model)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["Recipe", "StepContext", "StepOutput", "DataSource", "DataPhases", "register", "get_recipe", "build_model",
           "recipe_names"]


@dataclass
class StepContext:
    """What the engine tells a recipe's step: the (0-based) optimizer step, the run seed, which micro-batch of the
    step this is (global index among the step's micro-batches, the same for any world size), the device."""

    step: int
    seed: int
    micro_index: int
    micro_per_step: int
    device: object
    rank: int = 0
    world_size: int = 1
    module: object = None        # the bare model (not the DDP / FSDP wrapper): for its config, tokenizer, VAE
    config: object = None        # the run's Config (ctx.config.recipe: the recipe's section)


@dataclass
class StepOutput:
    """A micro-batch's loss (a scalar tensor to backpropagate) and named metrics (floats or 0-d tensors; the engine
    averages them over the micro-batches and ranks of a step), plus counts to sum instead (``counts``: e.g. tokens)."""

    loss: object
    metrics: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)


@dataclass
class DataSource:
    """A recipe's training data for the engine's sharded loader.

    ``dataset``: map-style (``len``, ``[i]``); ``encode(sample, index, epoch_seed) -> doc`` with ``doc.length``
    (tokens); ``collate(list_of_docs) -> batch`` with ``batch.to(device)``, ``batch.num_tokens`` (and optionally
    ``batch.num_docs``);
    ``length(index) -> int`` (optional): the tokens of ``encode(dataset[index])`` without building it, so that a rank
    plans the global batch without loading other ranks' samples."""

    dataset: object
    encode: object
    collate: object
    length: object = None


@dataclass(frozen=True)
class DataPhases:
    """A recipe's training data in phases: ``((first_step, DataSource), ...)``, the first at step 0, first steps
    increasing.  (0-based) step s trains on the last phase whose first step is <= s.  Each phase is its own batch
    stream (:class:`~umm_ops.train.engine.data.PhasedLoader`): it starts at the beginning of its epoch 0, shuffled
    with the run seed for phase 0 and ``seed_of(seed, "phase", k)`` for phase k.  E.g. a schedule that ends on a
    different task mix."""

    phases: tuple

    def __post_init__(self):
        ph = tuple(self.phases)
        if not ph or any(not (isinstance(p, tuple) and len(p) == 2) for p in ph):
            raise ValueError(f"DataPhases: expected a non-empty tuple of (first_step, DataSource), got {self.phases!r}")
        starts = [p[0] for p in ph]
        if starts[0] != 0 or any(not isinstance(s, int) or isinstance(s, bool) for s in starts) or any(
                b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(f"DataPhases: first steps must be ints starting at 0 and increasing, got {starts}")
        object.__setattr__(self, "phases", ph)


class Recipe:
    name: str = ""
    config_class = None
    run_defining: tuple = ()

    def build_model(self, cfg):
        raise NotImplementedError

    def build_data(self, cfg, model) -> DataSource:
        raise NotImplementedError

    def step(self, model, batch, ctx: StepContext) -> StepOutput:
        raise NotImplementedError

    def evaluate(self, model, cfg, out_dir) -> dict:
        return {}

    def fsdp_units(self, model):
        """Modules that get their own FSDP2 unit: they must run in every micro-batch on every rank (None: every
        block of every ModuleList, right for a model whose every part runs on every batch)."""
        return None

    def export(self, checkpoint, cfg, out, ema: bool = False):
        """``umm export``: write the checkpoint's model where a user loads it from (default: the model's
        save_pretrained folder)."""
        from .export import load_checkpoint_model

        model = load_checkpoint_model(checkpoint, ema=ema)
        model.save_pretrained(out)
        return out

    def cached_reader(self, key, make):
        """The reader `make()` builds, built once per recipe object and `key` (the config values it reads), so
        that build_data of every epoch / rank does not parse a user's file again."""
        cache = self.__dict__.setdefault("_readers", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def wants_eval(self, cfg) -> bool:
        """Whether :meth:`evaluate` runs after training (default: when the recipe overrides it)."""
        return type(self).evaluate is not Recipe.evaluate

    def report(self, results: dict) -> list:
        """Console lines for the evaluation results."""
        return []

    def describe(self, cfg) -> str:
        return ""

    def updates_per_batch(self, cfg) -> int:
        """Optimizer steps per batch of data (RL: PPO epochs per rollout).  With E > 1 the engine fetches the next
        step's micro-batches every E steps and hands the same ones to the steps in between; the recipe must make
        checkpoints fall on multiples of E (its rollouts are not saved)."""
        return 1

    def engine_defaults(self) -> dict:
        """The recipe's own defaults for engine keys ({"job.steps": 1500, "optim.lr": 2e-3, ...}): applied over the
        dataclass defaults, under a TOML file and the command line (its schedule when the user names none)."""
        return {}

    def shorthands(self) -> dict:
        """Command-line flags of this recipe: {flag: (config key, help)} (e.g. {"--image-size": ("recipe.image_size",
        "...")}); the engine's own flags are in umm_ops.cli."""
        return {}


_REGISTRY: dict = {}


def build_model(recipe: Recipe, cfg):
    """`recipe`'s model for `cfg`, with the engine's model options that are not architecture set on it
    (``ModelConfig.apply_options``: e.g. the frozen VAE's compute dtype), whichever way the recipe built it (fresh,
    recipe.init, a checkpoint's recorded architecture).  The one way the trainer, `bare_loop` and checkpoint loading
    build a run's model."""
    model = recipe.build_model(cfg)
    options = getattr(getattr(cfg, "model", None), "apply_options", None)
    if options is not None:
        options(model)
    return model


def register(recipe_cls):
    """Class decorator: make a Recipe subclass available by its ``name`` (``umm train --recipe NAME``)."""
    if not (isinstance(recipe_cls, type) and issubclass(recipe_cls, Recipe)):
        raise TypeError(f"register: expected a Recipe subclass, got {recipe_cls!r}")
    if not recipe_cls.name or not dataclasses.is_dataclass(recipe_cls.config_class):
        raise TypeError(f"register: {recipe_cls.__name__} needs a name and a dataclass config_class")
    _REGISTRY[recipe_cls.name] = recipe_cls
    return recipe_cls


def _load_builtin() -> None:
    from . import recipes  # noqa: F401  (registers the built-in recipes)


def get_recipe(name: str) -> Recipe:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown recipe {name!r}; recipes: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def recipe_names() -> list:
    _load_builtin()
    return sorted(_REGISTRY)
