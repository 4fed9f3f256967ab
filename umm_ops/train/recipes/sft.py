"""SFT: supervised fine-tuning of CheersModel on packed span batches (the built-in demo job on the synthetic world).

    umm train --recipe sft --steps 150 --out runs/demo

Data: a map-style dataset over SyntheticWorld records: each record gives one sample per slot, the slots being the
tasks each repeated ``task_weights`` times (index i -> record i // len(slots), slot i % len(slots)); a task giving
several samples per record (vqa: one per question) yields the one picked by seed_of(seed, record, "pick") for its
first slot, seed_of(seed, record, "pick", k) for its k-th repeat.  Losses: the model's text cross-entropy and
flow-matching MSE (``CheersModel.forward``), with the flow noise and the CFG prompt dropout drawn here per (step,
sample) (:mod:`umm_ops.train.policy`) and the timesteps by the packer per (epoch, sample).  Evaluation after
training: held-out records (index >= train_records),
:func:`umm_ops.eval.world.evaluate_world`.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass

import torch

from ...data.packing import LogitNormalTimesteps, UniformTimesteps
from ...utils import seed_of
from ..spec import DataPhases, DataSource, Recipe, StepOutput, build_model, register

__all__ = ["SFTRecipe", "SFTRecipeConfig", "SyntheticSFTDataset", "TASKS", "bare_loop"]

TASKS = ("caption", "vqa", "vqa_short", "chat", "vqa_chain", "generate", "segment", "degraded_vqa",
         "degraded_vqa_short", "r3_plan", "r3_reflect", "r3_edit", "clear", "clear_short", "clear_data")
# vqa_short: the same questions answered with the word (short-answer VQA), vqa: multiple choice answered with the
# option letter; chat: one picture read once for three turns, its caption, a multiple-choice question and a
# short-answer question (another of the record's questions), in an order drawn per record (LLaVA-style multi-turn
# data: the frozen VAE, the tower and the picture's tokens are paid once for three answers); vqa_chain: multiple
# choice answered "<option text> (<letter>)" (MC_CHAIN_SUFFIX); r3_*: R3's plan -> draw, reflect -> instruction,
# and edit samples (umm_ops.data.refine_data);
# clear / clear_short: CLEAR's generate-then-answer samples on degraded pictures, multiple choice / short answer
# (umm_ops.data.clear_data); clear_data: the same format from a user's VQA file (recipe.clear_data, read with
# umm_ops.data.VQAReader: record r // ... of the run -> user record r mod its length, degraded afresh per sample)
TIMESTEPS = {"uniform": UniformTimesteps, "logit_normal": LogitNormalTimesteps}   # recipe.timesteps
DEFAULT_WEIGHTS = {"caption": 2}   # samples per record of each task when task_weights = (); others 1


@dataclass
class SFTRecipeConfig:
    init: str = ""                    # a run folder / checkpoint / save_pretrained folder whose weights this run starts
                                      # from ("" = the preset's fresh model): e.g. R3's format SFT on the base run.
                                      # Not run-defining: a resumed run loads its own checkpoint (the folder must
                                      # still exist to build the model)
    image_size: int = 64              # side of the synthetic pictures (a multiple of 32, the pixels per LLM token)
    tasks: tuple = ("caption", "vqa", "vqa_short", "generate", "segment")
    task_weights: tuple = ()          # samples per record and task (ints >= 1, one per task); () = DEFAULT_WEIGHTS
    train_records: int = 50_000       # records 0 .. train_records-1 are trained on, later ones held out
    max_objects: int = 2              # objects per scene (1 .. max_objects)
    # the world's vocabulary and backgrounds (SyntheticWorld's arguments of the same names; eval reads them back)
    kinds: tuple = ("circle", "square", "triangle", "cross")   # the base world (all 7: "star", "ring", "diamond")
    colors: tuple = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
    two_tone: float = 0.0             # fraction of two-tone backgrounds (the VAE's world: 0.4)
    repeat: float = 0.35              # probability that an object repeats an earlier one's colour and shape
    object_scale: float = 1.8         # multiplies the objects' sizes (SyntheticWorld.object_scale; its default 1.0):
                                      # at 64 px the base world's 13-23 px objects sit in one or two 16 px ViT
                                      # patches and their shapes were never read; 21-39 px objects are (while two
                                      # of them still fit in 30% of the scenes: docs/results/base, "Shapes")
    caption_first: int = 12000        # a curriculum: the first epoch opens with this many caption samples (the
                                      # rest of the mix follows).  Trained on the full mix from the start, the LLM
                                      # reads the background but never the objects; after ~150 steps of captions it
                                      # reads object colours, after ~300 their shapes, and goes on learning in the
                                      # mix (docs/results/base)
    finish_at: int = 0                # a final phase: from this (1-based) step on, train on finish_tasks with
                                      # finish_weights instead of the mix (its own shuffle of the same records, no
                                      # captions-first; one lr schedule throughout).  0: no final phase
    finish_tasks: tuple = ()          # the final phase's tasks (from TASKS)
    finish_weights: tuple = ()        # their samples per record (ints >= 1, one per task); () = DEFAULT_WEIGHTS
    freeze_vit: bool = False          # keep the ViT's weights (CLEAR freezes ViT and VAE)
    clear_direct: float = 0.3         # clear tasks: share of questions answered directly (clean or low-level pictures)
    clear_data: str = ""              # task clear_data: a user's VQA file (.json LLaVA conversations, .jsonl manifest,
                                      # .tsv MMBench-style; umm_ops.data.VQAReader), its pictures degraded on the fly
    clear_image_root: str = ""        # where clear_data's relative image paths start ("": the file's folder)
    clear_skip_bad: bool = False      # a record of clear_data that cannot be used: skip it (the next usable one is
                                      # taken) instead of stopping the run with its file and record named
    clear_backend: str = "torch"      # degradations of clear_data: "torch", "opencv" (CLEAR's exact operations), "auto"
    cfg_dropout: typing.Optional[float] = None   # CFG prompt dropout probability (None: the model preset's)
    timesteps: str = "uniform"        # flow training times of generated images: "uniform" (Cheers: U(0.001, 0.999))
                                      # or "logit_normal" (SD3: sigmoid of N(0, 1), most samples at mid t)
    repa_weight: float = 0.0          # REPA (Yu et al. 2024): add this times the representation-alignment loss, the
                                      # mean over the generated pictures' patches of -cos(head's REPA projection of
                                      # its conv stage, a frozen copy of the pretrained vision tower's patch feature of
                                      # the clean picture) (:func:`repa_loss`; the model needs model.conv_repa = true
                                      # and a pretrained tower, CheersConfig.vit_weights).  REPA's own weight: 0.5
    train_decoder_copy: bool = False  # train the VAE decoder copy the understanding path runs (Cheers does, under a
                                      # pretrained ViT); with a ViT learned from scratch its early gradients are noise
                                      # and at lr 2e-3 they wreck it (pixels of +-50 after 600 steps), so the base
                                      # schedule keeps it equal to the shipped decoder
    evaluate: bool = True             # run the held-out evaluation after training
    eval_vqa: int = 128               # held-out questions
    eval_images: int = 32             # held-out image prompts generated and scored
    eval_captions: int = 32           # held-out pictures captioned
    eval_steps: int = 12              # sampler steps of the evaluation images
    eval_prompts: tuple = ()          # extra free-text image prompts (generated and saved, not scored)
    eval_clear: int = -1              # MMD-Bench items answered generate-then-answer (task clear) and directly
                                      # (-1: 64 when a clear task is trained, else 0)

    def validate(self):
        from ..config import requirement

        need = requirement("recipe", self)

        need(self.image_size >= 32 and self.image_size % 32 == 0, "image_size",
             "must be a multiple of 32 (pixels per LLM token), >= 32")

        def distinct(tasks):
            return set(tasks) <= set(TASKS) and len(set(tasks)) == len(tasks)

        def per_task(weights, tasks):
            return weights == () or (len(weights) == len(tasks) and all(
                isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in weights))

        need(len(self.tasks) >= 1 and distinct(self.tasks), "tasks", f"must be distinct names from {list(TASKS)}")
        need(per_task(self.task_weights, self.tasks), "task_weights",
             f"must be () or one int >= 1 per task ({len(self.tasks)} tasks: {list(self.tasks)})")
        need(self.train_records >= 1, "train_records", "must be >= 1")
        need(isinstance(self.finish_at, int) and not isinstance(self.finish_at, bool) and self.finish_at != 1
             and self.finish_at >= 0, "finish_at", "must be a step >= 2 (the mix trains at least step 1), or 0: no "
             "final phase")
        need((self.finish_at == 0) == (len(self.finish_tasks) == 0) and distinct(self.finish_tasks), "finish_tasks",
             f"must be distinct names from {list(TASKS)}, given exactly when finish_at > 0 (finish_at="
             f"{self.finish_at}, finish_tasks={list(self.finish_tasks)})")
        need(per_task(self.finish_weights, self.finish_tasks), "finish_weights",
             f"must be () or one int >= 1 per finish task ({list(self.finish_tasks)})")
        need("clear_data" not in self.finish_tasks or "clear_data" in self.tasks, "finish_tasks",
             "may name clear_data only when the main tasks do (it reads recipe.clear_data)")
        need(self.caption_first >= 0, "caption_first", "must be >= 0 (0: no captions-first start)")
        need(isinstance(self.clear_direct, (int, float)) and 0.0 <= self.clear_direct <= 1.0, "clear_direct",
             "must be a probability in [0, 1]")
        need(1 <= self.max_objects <= 8, "max_objects", "must be in [1, 8]")
        from ...data.synthetic import COLORS, KINDS

        need(len(self.kinds) >= 1 and set(self.kinds) <= set(KINDS) and len(set(self.kinds)) == len(self.kinds),
             "kinds", f"must be distinct shapes from {list(KINDS)}")
        need(len(self.colors) >= 4 and set(self.colors) <= set(COLORS) and len(set(self.colors)) == len(self.colors),
             "colors", f"must be at least 4 distinct colours from {list(COLORS)} (VQA draws 3 wrong options)")
        need(0.0 <= self.two_tone <= 1.0, "two_tone", "must be a probability in [0, 1]")
        need(0.0 <= self.repeat <= 1.0, "repeat", "must be a probability in [0, 1]")
        need(0.5 <= self.object_scale <= 2.5, "object_scale", "must be in [0.5, 2.5]")
        need(self.cfg_dropout is None or 0.0 <= self.cfg_dropout <= 1.0, "cfg_dropout", "must be in [0, 1]")
        need(self.timesteps in TIMESTEPS, "timesteps", f"must be one of {sorted(TIMESTEPS)}")
        need(isinstance(self.repa_weight, (int, float)) and not isinstance(self.repa_weight, bool)
             and 0.0 <= self.repa_weight < float("inf"), "repa_weight", "must be a finite number >= 0 (0: off)")
        for k in ("eval_vqa", "eval_images", "eval_captions"):
            need(getattr(self, k) >= 0, k, "must be >= 0")
        need(self.eval_clear >= -1, "eval_clear", "must be >= 0 (or -1: automatic)")
        need(self.eval_steps >= 1, "eval_steps", "must be >= 1")
        need(all(isinstance(p, str) and p for p in self.eval_prompts), "eval_prompts", "must be non-empty strings")
        need(("clear_data" in self.tasks) == bool(self.clear_data), "clear_data",
             "must name a VQA file exactly when the task clear_data is trained (and the task needs one): got "
             f"clear_data={self.clear_data!r} with tasks {list(self.tasks)}")
        need(self.clear_backend in ("torch", "opencv", "auto"), "clear_backend", "must be torch, opencv or auto")
        return self

    def weights(self, final: bool = False) -> tuple:
        """Samples per record of each task (of the final phase's tasks when `final`): task_weights (finish_weights),
        or DEFAULT_WEIGHTS for the tasks named."""
        tasks, weights = (self.finish_tasks, self.finish_weights) if final else (self.tasks, self.task_weights)
        return tuple(weights) or tuple(DEFAULT_WEIGHTS.get(t, 1) for t in tasks)

    def world_kwargs(self) -> dict:
        """SyntheticWorld's arguments (besides size, seed and length) of the world this recipe trains on."""
        return {"max_objects": self.max_objects, "kinds": tuple(self.kinds), "colors": tuple(self.colors),
                "two_tone": self.two_tone, "repeat": self.repeat, "object_scale": self.object_scale}


class SyntheticSFTDataset:
    """Map-style dataset of Samples over SyntheticWorld records ``first .. first + records - 1`` (see the module
    docstring); the same sample for the same index in any process."""

    def __init__(self, size: int, seed: int, records: int, tasks=("caption", "vqa", "generate"), max_objects: int = 3,
                 first: int = 0, task_weights=(), caption_first: int = 0, clear_direct: float = 0.3,
                 clear_data=None, clear_backend: str = "torch", **world):
        from ...data.synthetic import SyntheticWorld

        self.world = SyntheticWorld(size=size, seed=seed, max_objects=max_objects, length=first + records, **world)
        self.tasks, self.records, self.first, self.seed = tuple(tasks), records, first, seed
        weights = tuple(task_weights) or (1,) * len(self.tasks)
        if len(weights) != len(self.tasks):
            raise ValueError(f"SyntheticSFTDataset: {len(weights)} task_weights for {len(self.tasks)} tasks")
        self.slots = [(t, k) for t, w in zip(self.tasks, weights) for k in range(w)]   # (task, repeat)
        self.caption_first = int(caption_first)
        self.clear_direct = float(clear_direct)
        self.clear_data, self.clear_backend = clear_data, clear_backend   # a VQAReader for the task clear_data
        if ("clear_data" in self.tasks) != (clear_data is not None) or (clear_data is not None and not len(clear_data)):
            raise ValueError("SyntheticSFTDataset: the task clear_data needs a non-empty VQAReader as clear_data (and "
                             f"only that task reads one): tasks {list(self.tasks)}, clear_data {clear_data!r}")

    def curriculum(self, order: list, epoch: int) -> list:
        """The loaders' hook (umm_ops.data.loader.epoch_order): epoch 0 opens with ``caption_first`` caption samples,
        then every other sample in the shuffled order.  The opening captions are the *last* ones of that order, so
        the mix that follows keeps its share of captions (taking the first ones would leave the next stretch of the
        stream without any: the model then forgets them); later epochs are unchanged."""
        if epoch != 0 or self.caption_first == 0 or "caption" not in self.tasks:
            return order
        cap = {j for j, (t, _) in enumerate(self.slots) if t == "caption"}
        k = len(self.slots)
        lead = [i for i in reversed(order) if i % k in cap][:self.caption_first][::-1]
        taken = set(lead)
        return lead + [i for i in order if i not in taken]

    def __len__(self) -> int:
        return self.records * len(self.slots)

    def __getitem__(self, i):
        from ...data.synthetic import to_samples

        if isinstance(i, bool) or not isinstance(i, int) or not (0 <= i < len(self)):
            raise IndexError(f"SyntheticSFTDataset: index {i!r} out of range [0, {len(self)})")
        r = self.first + i // len(self.slots)
        task, k = self.slots[i % len(self.slots)]
        if task in ("vqa_short", "degraded_vqa_short"):
            samples = to_samples(self.world[r], (task[:-6],), multiple_choice=False)
        elif task.startswith("r3_"):
            from ...data.refine_data import r3_samples

            samples = r3_samples(self.world[r], (task[3:],), kinds=self.world.kinds, colors=self.world.colors)
        elif task in ("clear", "clear_short"):
            from ...data.clear_data import clear_samples

            samples = clear_samples(self.world[r], multiple_choice=task == "clear", p_direct=self.clear_direct)
        elif task == "clear_data":
            return self._clear_data(r, i)
        elif task == "chat":
            return self._chat(r, k)
        else:
            samples = to_samples(self.world[r], (task,))
        pick = seed_of(self.seed, r, "pick") if k == 0 else seed_of(self.seed, r, "pick", k)
        return samples[pick % len(samples)]

    def _chat(self, r: int, k: int):
        """Record r's picture with three turns: its caption, a multiple-choice question (picked as a vqa slot picks)
        and a short-answer question about another of its questions when it has several, in an order drawn per record
        and repeat; each question unsupervised, each answer (ending with the end token) supervised."""
        from ...data.packing import Sample
        from ...data.synthetic import to_samples

        rec = self.world[r]
        mc = to_samples(rec, ("vqa",))
        short = to_samples(rec, ("vqa",), multiple_choice=False)
        tag = () if k == 0 else (k,)
        q = seed_of(self.seed, r, "pick", *tag) % len(mc)
        q2 = (q + 1 + seed_of(self.seed, r, "chat-short", *tag) % (len(mc) - 1)) % len(mc) if len(mc) > 1 else q
        turns = [to_samples(rec, ("caption",))[0], mc[q], short[q2]]
        order = torch.randperm(3, generator=torch.Generator().manual_seed(seed_of(self.seed, r, "chat-order", *tag)))
        items = [turns[0].items[0]] + [it for j in order.tolist() for it in turns[j].items[1:]]
        names = ("caption", "vqa", "vqa_short")
        return Sample(items, meta={**turns[0].meta, "task": "chat", "turns": [names[j] for j in order.tolist()],
                                   "types": {"vqa": mc[q].meta["type"], "vqa_short": short[q2].meta["type"]}})

    def _clear_data(self, r: int, i: int):
        """Sample i (task clear_data, run record r): the user's record r mod its length in CLEAR's format, degraded
        as drawn for i; a bad record stops with its file and record named, or with skip_bad the next usable one."""
        from ...data.clear_data import clear_vqa_sample

        return clear_vqa_sample(self.clear_data.cyclic(r), self.world.size, self.seed, i, p_direct=self.clear_direct,
                                backend=self.clear_backend)

    def images(self, n: int) -> torch.Tensor:
        """The first n records' pictures as (n, 3, H, W) in [-1, 1] (VAE calibration)."""
        return torch.stack([self.world[self.first + k].image.float() / 127.5 - 1.0 for k in range(n)])


class Encoder:
    """encode(sample, index, epoch seed) -> the packer's EncodedSample (picklable for loader workers)."""

    def __init__(self, spec):
        self.spec = spec

    def __call__(self, sample, index: int, seed: int):
        from ...data.packing import encode_sample

        return encode_sample(sample, self.spec, sample_id=int(index), seed=int(seed))


def collate(docs):
    from ...data.packing import collate_docs

    return collate_docs(docs)


VISION_LR_SCALES = ("vit.:0.1", "und_projector.:0.1")


class RepaTargets:
    """REPA's target encoder: a frozen copy of the model's pretrained vision tower (``CheersConfig.vit_weights``,
    loaded afresh: not the model's own tower, which trains), held by the recipe, never in the optimizer or the
    checkpoints.  ``targets(pixels)`` -> (N, n_vit, C) patch features of clean pictures (the images' own pixels, in
    the model's [-1, 1] range), without gradient."""

    def __init__(self, model):
        from ...model.vit import SiglipViT

        self.check(model)
        self.tower = SiglipViT(model.config.vit_config())
        self.tower.load_pretrained(model.config.vit_weights)
        self.tower.requires_grad_(False).eval()

    @staticmethod
    def check(model) -> None:
        from ..config import ConfigError

        head = getattr(getattr(model, "head", None), "repa_projector", None)
        if head is None:
            raise ConfigError("recipe.repa_weight > 0 needs the flow head's REPA projector: --set model.conv_repa=true "
                              "(a fresh model; a recipe.init checkpoint must have been trained with it)")
        if model.config.vit_weights is None:
            raise ConfigError("recipe.repa_weight > 0 needs a pretrained vision tower to align with "
                              "(CheersConfig.vit_weights; model.vit_weights), but the model's tower is randomly "
                              "initialised")

    @torch.no_grad()
    def targets(self, pixels: torch.Tensor) -> torch.Tensor:
        p = next(self.tower.parameters())
        if p.device != pixels.device:
            self.tower.to(pixels.device)
        return self.tower(pixels.float())


def repa_loss(features: list, images: list, batch, targets: RepaTargets) -> torch.Tensor:
    """REPA's loss (Yu et al. 2024, eq. 3): -1/(N P) sum over the N generated pictures and their P patches of
    cos(h_n,p, y_n,p), h = the head's projections (``CheersModel.forward(..., repa_features=True)``: `features`, a list
    of (N_g, P, C) aligned with `images`, the lists of ``batch.images`` indices of their rows), y = the frozen tower's
    features of the clean pictures.  Rows of understanding pictures (role not "generate": the head sees them only
    under ``und_flow_loss``) are left out.  A batch without generated pictures gives 0 (with a graph, as the flow
    loss does)."""
    from .. import policy

    roles = batch.image_spans[:, 2].tolist() if len(batch.images) else []
    sims, zero = [], None
    for f, idx in zip(features, images):
        if f.shape[0] != len(idx):
            raise ValueError(f"repa_loss: {f.shape[0]} feature rows for {len(idx)} images")
        keep = [j for j, i in enumerate(idx) if roles[i] == policy.GENERATE]
        zero = f.sum() * 0.0 if zero is None else zero
        if not keep:
            continue
        pix = torch.stack([batch.images[idx[j]] for j in keep]).to(f.device)
        y = targets.targets(pix)
        h = f[keep]
        if y.shape != h.shape:
            raise ValueError(f"repa_loss: the head's projections {tuple(h.shape)} and the tower's features "
                             f"{tuple(y.shape)} differ (the conv stage's second level must be the ViT's patch grid)")
        sims.append(torch.nn.functional.cosine_similarity(h.float(), y, dim=-1).flatten())
    if not sims:
        return zero if zero is not None else torch.zeros(())
    return -torch.cat(sims).mean()


@register
class SFTRecipe(Recipe):
    name = "sft"
    config_class = SFTRecipeConfig
    run_defining = ("image_size", "tasks", "task_weights", "train_records", "max_objects", "kinds", "colors",
                    "two_tone", "repeat", "object_scale", "cfg_dropout", "timesteps", "repa_weight", "train_decoder_copy",
                    "caption_first",
                    "clear_direct", "freeze_vit", "clear_data", "clear_image_root", "clear_skip_bad",
                    "clear_backend", "finish_at", "finish_tasks", "finish_weights")

    def _dataset(self, cfg, final: bool = False) -> SyntheticSFTDataset:
        """The mix's dataset, or with `final` the final phase's (finish_tasks, no captions-first)."""
        r = cfg.recipe
        tasks = r.finish_tasks if final else r.tasks
        return SyntheticSFTDataset(r.image_size, cfg.job.seed, r.train_records, tasks,
                                   task_weights=r.weights(final), caption_first=0 if final else r.caption_first,
                                   clear_direct=r.clear_direct,
                                   clear_data=self._clear_data(cfg) if "clear_data" in tasks else None,
                                   clear_backend=r.clear_backend, **r.world_kwargs())

    def _clear_data(self, cfg):
        """The user's VQA file of the task clear_data, read once per recipe (None without that task)."""
        r = cfg.recipe
        if not r.clear_data:
            return None
        from ...data.readers import VQAReader

        return self.cached_reader(("vqa", r.clear_data, r.clear_image_root, r.clear_skip_bad),
                                  lambda: VQAReader(r.clear_data, image_root=r.clear_image_root or None,
                                                    skip_bad=r.clear_skip_bad))

    def build_model(self, cfg):
        from ...model.cheers import CheersModel

        if cfg.recipe.init:
            from ..export import load_checkpoint_model

            src = load_checkpoint_model(cfg.recipe.init)
            cfg.model.check_init(src.config, cfg.recipe.init)
            model = CheersModel(src.config, tokenizer=src.tokenizer)
            model.load_state_dict(src.state_dict())
            model.train()
        else:
            model = CheersModel(cfg.model.cheers_config())
        model.config.image_size = cfg.recipe.image_size   # the checkpoint's default generation size
        if not cfg.recipe.train_decoder_copy:
            model.vae.decoder_copy.requires_grad_(False)
        if cfg.recipe.freeze_vit:
            model.vit.requires_grad_(False)
        if cfg.recipe.repa_weight > 0:
            RepaTargets.check(model)
        if not model.vae.pretrained and not cfg.recipe.init:
            # a random VAE needs latent statistics (trained weights bring theirs; a resumed run loads them)
            model.vae.calibrate(self._dataset(cfg).images(min(64, cfg.recipe.train_records)))
        return model

    def build_data(self, cfg, model):
        spec = model.pack_spec(budget=cfg.data.budget, timestep_sampler=TIMESTEPS[cfg.recipe.timesteps]())
        main = DataSource(self._dataset(cfg), Encoder(spec), collate)
        if not cfg.recipe.finish_at:
            return main
        return DataPhases(((0, main), (cfg.recipe.finish_at - 1,
                                       DataSource(self._dataset(cfg, final=True), Encoder(spec), collate))))

    def engine_defaults(self) -> dict:
        # the base schedule: ~15 minutes on 2 CPU cores for the tiny preset at 64 px (docs/results/base).  The
        # vision path (ViT, understanding projector) trains at a tenth of the lr: at the LLM's lr a from-scratch ViT
        # and projector lose the objects' colours within ~150 steps (linear probes: scripts/probe_features.py) and
        # the LLM never learns to read them.  The frozen VAE (encoder, decoder copy: about half of a step in float32)
        # computes in bf16: with the fused AdamW the schedule trains in 14.5 instead of 18.7 minutes on the 2-core
        # Xeon, at a likely cost on captions with stop 42's from-scratch vision tower (-0.02 over three seeds of the
        # bf16 VAE, 0.50 against 0.56-0.59 in both seeds of these exact defaults; docs/results/base, "The frozen VAE
        # in bf16, and a fused AdamW"); with the pretrained tower (stop 43) captions score 0.99 in three seeds
        return {"job.steps": 1800, "optim.lr": 1e-3, "optim.lr_scales": VISION_LR_SCALES, "schedule.warmup": 50,
                "checkpoint.every": 150, "model.vae_compute_dtype": "bfloat16"}

    def describe(self, cfg) -> str:
        r = cfg.recipe
        tower = None if r.init else cfg.model.cheers_config().vit_weights
        return (f"{r.image_size} px synthetic world, tasks {'/'.join(r.tasks)}"
                + (f"; weights from {r.init}" if r.init else "; weights from the preset's initialisation")
                + (f", the vision tower pretrained ({tower})" if tower else "")
                + ("; ViT frozen" if r.freeze_vit else "")
                + (f"; from step {r.finish_at}: tasks {'/'.join(r.finish_tasks)}" if r.finish_at else ""))

    def step(self, model, batch, ctx) -> StepOutput:
        from .. import policy

        bare, r = ctx.module, ctx.config.recipe
        p = bare.config.cfg_dropout if r.cfg_dropout is None else r.cfg_dropout
        inputs = policy.training_inputs(bare, batch, seed_of(ctx.seed, ctx.step, "sft-step"), p)
        if r.repa_weight > 0:
            inputs["repa_features"] = True
        out = model(batch, **inputs)
        read = int((batch.image_spans[:, 2] != policy.GENERATE).sum()) if len(batch.images) else 0
        loss = out["loss"]
        metrics = {"text_loss": out["text_loss"], "flow_loss": out["flow_loss"]}
        if r.repa_weight > 0:
            if self.__dict__.get("_repa") is None:   # built once per recipe object, on first use
                self._repa = RepaTargets(bare)
            l_repa = repa_loss(out["repa_features"], out["v_images"], batch, self._repa)
            loss = loss + r.repa_weight * l_repa
            metrics["repa_loss"] = l_repa.detach()
        return StepOutput(loss, metrics,
                          {"text_tokens": out["text_tokens"], "flow_images": out["flow_images"], "read_images": read})

    def fsdp_units(self, model):
        # the LLM's layers run on every packed micro-batch; the ViT, the VAE decoder copy and the flow head only when
        # the micro-batch holds an image (to generate): they stay in the root unit
        return list(model.llm.model.layers)

    def shorthands(self) -> dict:
        return {
            "--image-size": ("recipe.image_size", "value", "synthetic picture side, a multiple of 32"),
            "--tasks": ("recipe.tasks", "value", "comma-separated: " + ",".join(TASKS)),
            "--train-records": ("recipe.train_records", "value", "records trained on (later ones are held out)"),
            "--no-eval": ("recipe.evaluate", "false", "skip the evaluation after training"),
            "--eval-vqa": ("recipe.eval_vqa", "value", "held-out VQA questions to evaluate"),
            "--eval-images": ("recipe.eval_images", "value", "held-out image prompts to generate and score"),
            "--eval-captions": ("recipe.eval_captions", "value", "held-out pictures to caption"),
            "--eval-steps": ("recipe.eval_steps", "value", "sampler steps of the evaluation images"),
            "--eval-prompt": ("recipe.eval_prompts", "append", "an extra image prompt to generate after training"),
        }

    def wants_eval(self, cfg) -> bool:
        return cfg.recipe.evaluate

    def evaluate(self, model, cfg, out_dir) -> dict:
        from ...eval.world import evaluate_world

        r = cfg.recipe
        trained = set(r.tasks) | set(r.finish_tasks)
        return evaluate_world(model, image_size=r.image_size, seed=cfg.job.seed, first=r.train_records,
                              world=r.world_kwargs(), n_vqa=r.eval_vqa, n_images=r.eval_images,
                              n_captions=r.eval_captions, steps=r.eval_steps, prompts=r.eval_prompts,
                              short_vqa="vqa_short" in trained, chain_vqa="vqa_chain" in trained,
                              n_clear=(64 if {"clear", "clear_short"} & trained else 0)
                              if r.eval_clear < 0 else r.eval_clear,
                              out_dir=out_dir)

    def report(self, results: dict) -> list:
        from ...eval.world import report_lines

        return report_lines(results)


def bare_loop(cfg, on_step=None) -> list:
    """The SFT computation of `cfg` for one process with M = 1 micro-batch per step, written without the engine:
    PackedLoader (the same global stream as the engine's loader), the same policy draws, AdamW groups, schedule and
    clipping, and the final phase (recipe.finish_at).  The engine must give the same losses bitwise
    (tests/test_train.py) and its overhead is measured against this (bench/bench_engine.py).  on_step(step, loss)
    after each optimizer step; returns the losses."""
    from ...data.loader import PackedLoader
    from .. import policy
    from ..engine.optim import LRSchedule, build_optimizer

    if cfg.micro_per_step() != 1:
        raise ValueError("bare_loop: one micro-batch per step only (data.global_tokens = 0 or = data.budget)")
    recipe = SFTRecipe()
    torch.manual_seed(seed_of(cfg.job.seed, "model-init"))
    model = build_model(recipe, cfg).train()
    opt = build_optimizer(model, cfg.optim)
    sched = LRSchedule.from_config(cfg)
    spec = model.pack_spec(budget=cfg.data.budget, timestep_sampler=TIMESTEPS[cfg.recipe.timesteps]())
    it = iter(PackedLoader(recipe._dataset(cfg), spec, shuffle=True, seed=cfg.job.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    p_drop = model.config.cfg_dropout if cfg.recipe.cfg_dropout is None else cfg.recipe.cfg_dropout
    losses = []
    for step in range(cfg.job.steps):
        if cfg.recipe.finish_at and step == cfg.recipe.finish_at - 1:   # the final phase: its own stream
            it = iter(PackedLoader(recipe._dataset(cfg, final=True), spec, shuffle=True,
                                   seed=seed_of(cfg.job.seed, "phase", 1)))
        batch = next(it)
        sched.apply(opt, step)
        opt.zero_grad(set_to_none=False)
        out = model(batch, **policy.training_inputs(model, batch, seed_of(cfg.job.seed, step, "sft-step"), p_drop))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
        opt.step()
        losses.append(float(out["loss"].detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    return losses


# ------------------------------------------------------------------------------------------ CLEAR stage 1
@dataclass
class ClearSFTRecipeConfig(SFTRecipeConfig):
    """CLEAR's generate-then-answer SFT (issue 16, stage 1) on the synthetic world: the SFT recipe with CLEAR's data
    and settings as defaults.  Starts from a base run (``init``); mixes the generate-then-answer samples (multiple
    choice and short answer) with plain VQA and captions so the plain formats are kept; ViT (and the VAE, always)
    frozen as CLEAR freezes them."""
    tasks: tuple = ("clear", "clear_short", "vqa", "vqa_short", "caption")
    task_weights: tuple = (2, 2, 1, 1, 1)
    caption_first: int = 0
    freeze_vit: bool = True           # CLEAR: ViT and VAE frozen (the understanding projector still trains)
    add_tokens: bool = True           # a world-tokenizer model gets CLEAR's markers as tokens ("world+clear": ids
                                      # 512..516, embeddings grown); off: the markers are spelled in byte pieces

    def validate(self):
        super().validate()
        from ..config import ConfigError

        if not ({"clear", "clear_short", "clear_data"} & set(self.tasks)):
            raise ConfigError(f"recipe.tasks = {self.tasks!r}: clear-sft needs clear, clear_short and / or clear_data")
        return self


@register
class ClearSFTRecipe(SFTRecipe):
    name = "clear-sft"
    config_class = ClearSFTRecipeConfig
    run_defining = SFTRecipe.run_defining + ("add_tokens",)

    def build_model(self, cfg):
        model = super().build_model(cfg)
        if cfg.recipe.add_tokens and model.config.tokenizer == "world":
            from ...model.cheers import with_tokenizer

            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            model = with_tokenizer(model, "world+clear")
            for n, p in model.named_parameters():
                p.requires_grad_(n not in frozen)
        return model

    def engine_defaults(self) -> dict:
        # CLEAR: EMA 0.995; a tenth of the base schedule's lr (continuing a trained model); ~5 minutes on 2 cores
        return {"job.steps": 600, "optim.lr": 1e-4, "optim.ema": 0.995, "schedule.warmup": 20,
                "checkpoint.every": 150}

    def describe(self, cfg) -> str:
        return "CLEAR generate-then-answer SFT: " + super().describe(cfg)
