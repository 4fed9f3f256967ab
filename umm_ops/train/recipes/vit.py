"""ViT: pretrain the vision tower (SigLIP-style ViT) of a CheersModel preset on the synthetic world, as Cheers
starts from a pretrained SigLIP2.

    umm train --recipe vit --out runs/vit
    umm export runs/vit --out vit.safetensors        # the tower's state (the model's ``vit.*`` without the prefix)
    umm train --out runs/base --set model.vit_weights=vit.safetensors

The tower reads what the understanding path hands it: the picture through the preset's frozen VAE (encoder ->
decoder copy; bf16 as in the base schedule, ``recipe.vae_compute_dtype``).  Dense supervision from the scene's
instance map: for every patch token, the share of its pixels of each shape kind and of each colour (background
included; a soft-label cross-entropy per token), plus the number of objects from the tokens' mean (weight
``count_weight``).  To name an interior patch's shape the token must look at the object's outline in other patches,
which is what a captioning LLM needs from it and what a tower learned from scratch inside the base schedule never
learned (docs/results/base, "A pretrained vision tower").  The heads are thrown away at export.

Data: index i -> picture side sizes[i % S], then world variant object_scales[(i // S) % V] (all seven kinds, up to
``max_objects``, ``two_tone`` backgrounds), record (i // (S V)); records >= ``train_records`` are held out.  A picture
of side s counts (s / 16)^2 tokens (its patches), so ``data.budget`` = patches per micro-batch.
Evaluation after training: on held-out records of every variant at every side, the per-token kind and colour
accuracy on patches at least 30% object, and the count accuracy.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import DataSource, Recipe, StepOutput, register

__all__ = ["ViTRecipe", "ViTRecipeConfig", "ViTTrainer", "WorldPatches", "patch_labels", "export_vit"]

MAX_COUNT = 8      # count classes 0 .. MAX_COUNT


@dataclass
class ViTRecipeConfig:
    sizes: tuple = (64,)              # picture sides (multiples of the patch size): the base schedule's; at 128 px the
                                      # tower reads its own 8 x 8 position table, trained here only through its
                                      # bicubic resize to 4 x 4 unless 128 is listed
    object_scales: tuple = (1.0, 1.4, 1.8)   # world variants (SyntheticWorld.object_scale); the base world's is 1.8
    train_records: int = 50_000
    max_objects: int = 4
    two_tone: float = 0.4
    count_weight: float = 0.5
    inputs: str = "picture"           # what the tower reads: "picture" (as SigLIP is pretrained on pictures, while
                                      # Cheers' understanding path hands it the VAE decoder copy's reconstructions)
                                      # or "reconstruction" (the picture through the preset's frozen VAE, as in the
                                      # model; ~2.5x the step time on CPU)
    vae_compute_dtype: str = "bfloat16"   # that VAE (inputs = "reconstruction"): "bfloat16" or "model"
    eval_images: int = 256            # held-out pictures per variant and side scored after training
    evaluate: bool = True
    init: typing.Optional[str] = None   # tower weights to start from: a .safetensors file or a shipped name

    def validate(self):
        from ..config import ConfigError

        if not self.sizes or any((not isinstance(s, int)) or s < 32 or s % 16 for s in self.sizes):
            raise ConfigError(f"recipe.sizes = {self.sizes!r}: must be picture sides, multiples of 16, >= 32")
        if not self.object_scales or any(not (0.5 <= float(s) <= 2.5) for s in self.object_scales):
            raise ConfigError(f"recipe.object_scales = {self.object_scales!r}: must be numbers in [0.5, 2.5]")
        if self.train_records < 1:
            raise ConfigError(f"recipe.train_records = {self.train_records!r}: must be >= 1")
        if not 1 <= self.max_objects <= MAX_COUNT:
            raise ConfigError(f"recipe.max_objects = {self.max_objects!r}: must be in [1, {MAX_COUNT}]")
        if not 0.0 <= self.two_tone <= 1.0:
            raise ConfigError(f"recipe.two_tone = {self.two_tone!r}: must be a probability")
        if not (0.0 <= self.count_weight < float("inf")):
            raise ConfigError(f"recipe.count_weight = {self.count_weight!r}: must be a finite number >= 0")
        if self.inputs not in ("picture", "reconstruction"):
            raise ConfigError(f"recipe.inputs = {self.inputs!r}: use 'picture' or 'reconstruction'")
        if self.vae_compute_dtype not in ("bfloat16", "model"):
            raise ConfigError(f"recipe.vae_compute_dtype = {self.vae_compute_dtype!r}: use 'bfloat16' or 'model'")
        if self.eval_images < 0:
            raise ConfigError(f"recipe.eval_images = {self.eval_images!r}: must be >= 0")
        return self


def patch_labels(record, patch: int):
    """A SceneRecord (or anything with its ``scene`` and ``instances``) -> (kind shares (T, len(KINDS) + 1), colour
    shares (T, len(COLORS) + 1), object count): per patch (row-major), the share of its pixels that are background
    (class 0) or of each kind / colour."""
    from ...data.synthetic import COLORS, KINDS

    inst = record.instances
    kinds, colors = torch.zeros_like(inst), torch.zeros_like(inst)
    for k, o in enumerate(record.scene["objects"]):
        m = inst == k + 1
        kinds[m] = KINDS.index(o["kind"]) + 1
        colors[m] = list(COLORS).index(o["color"]) + 1
    H, W = inst.shape
    if H % patch or W % patch:
        raise ValueError(f"patch_labels: a {H}x{W} picture is not a whole number of {patch} px patches")

    def shares(m, n):
        oh = F.one_hot(m, n).float().permute(2, 0, 1)[None]
        return F.avg_pool2d(oh, patch)[0].permute(1, 2, 0).reshape(-1, n)

    return (shares(kinds, len(KINDS) + 1), shares(colors, len(COLORS) + 1),
            min(len(record.scene["objects"]), MAX_COUNT))


class WorldPatches:
    """Map-style dataset of (size, pixels (3, s, s) in [-1, 1], kind shares, colour shares, count)."""

    def __init__(self, cfg, seed: int, first: int = 0, records: int | None = None, patch: int = 16):
        from ...data.synthetic import KINDS, SyntheticWorld

        r = cfg
        self.sizes, self.scales, self.patch = tuple(r.sizes), tuple(float(s) for s in r.object_scales), patch
        self.first = first
        self.records = r.train_records if records is None else records
        self.worlds = {(s, sc): SyntheticWorld(size=s, seed=seed, max_objects=r.max_objects, kinds=KINDS,
                                               two_tone=r.two_tone, object_scale=sc, length=first + self.records)
                       for s in self.sizes for sc in self.scales}

    def __len__(self) -> int:
        return self.records * len(self.sizes) * len(self.scales)

    def where(self, i: int):
        S, V = len(self.sizes), len(self.scales)
        return self.sizes[i % S], self.scales[(i // S) % V], self.first + i // (S * V)

    def __getitem__(self, i):
        if isinstance(i, bool) or not isinstance(i, int) or not (0 <= i < len(self)):
            raise IndexError(f"WorldPatches: index {i!r} out of range [0, {len(self)})")
        from types import SimpleNamespace

        from ...data.synthetic import render

        size, scale, j = self.where(i)
        scene = self.worlds[(size, scale)].scene(j)        # the picture and its instances; no texts needed
        image, instances = render(scene)
        k, c, n = patch_labels(SimpleNamespace(scene=scene, instances=instances), self.patch)
        return size, image.float() / 127.5 - 1.0, k, c, n

    def length(self, i: int) -> int:
        return (self.sizes[i % len(self.sizes)] // self.patch) ** 2


@dataclass
class _Doc:
    sample: tuple
    length: int


class PatchBatch:
    """Pictures grouped by side: {side: (pixels (N, 3, s, s), kinds (N, T, K), colours (N, T, C), counts (N,))}."""

    def __init__(self, groups: dict):
        self.groups = groups

    @property
    def num_tokens(self) -> int:
        return sum(g[1].shape[0] * g[1].shape[1] for g in self.groups.values())

    @property
    def num_docs(self) -> int:
        return sum(g[0].shape[0] for g in self.groups.values())

    def to(self, device):
        return PatchBatch({s: tuple(x.to(device) for x in g) for s, g in self.groups.items()})


def _encode(sample, index: int, seed: int) -> _Doc:
    return _Doc(sample, sample[2].shape[0])


def _collate(docs) -> PatchBatch:
    groups: dict = {}
    for d in docs:
        groups.setdefault(d.sample[0], []).append(d.sample)
    return PatchBatch({s: (torch.stack([x[1] for x in g]), torch.stack([x[2] for x in g]),
                           torch.stack([x[3] for x in g]), torch.tensor([x[4] for x in g]))
                       for s, g in sorted(groups.items())})


class ViTTrainer(nn.Module):
    """The preset's vision tower under training, the frozen VAE in front of it, and the supervision heads."""

    def __init__(self, model_config, vae_compute_dtype: str = "bfloat16", inputs: str = "picture"):
        super().__init__()
        from ...data.synthetic import COLORS, KINDS
        from ...model.vae import CheersVAE
        from ...model.vit import SiglipViT

        # a copy: the caller's config is not changed
        vae_cfg = dataclasses.replace(model_config.vae,
                                      compute_dtype="bfloat16" if vae_compute_dtype == "bfloat16" else None)
        self.inputs = inputs
        self.vit = SiglipViT(model_config.vit_config())
        self.vae = CheersVAE(vae_cfg)
        self.vae.requires_grad_(False)
        C = self.vit.config.hidden_size
        self.kind_head = nn.Linear(C, len(KINDS) + 1)
        self.color_head = nn.Linear(C, len(COLORS) + 1)
        self.count_head = nn.Linear(C, MAX_COUNT + 1)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, s, s) pictures -> the tower's tokens (N, T, C) of the pictures, or of their VAE round trip (encoder,
        decoder copy) with ``inputs = "reconstruction"``."""
        if self.inputs == "reconstruction":
            with torch.no_grad():
                pixels = self.vae.decode_trainable(self.vae.encode(pixels), pixels.shape[-2:]).float()
        return self.vit(pixels)

    def forward(self, pixels, kinds, colors, counts, count_weight: float = 0.5) -> dict:
        h = self.features(pixels)
        lk = -(kinds * F.log_softmax(self.kind_head(h).float(), -1)).sum(-1).mean()
        lc = -(colors * F.log_softmax(self.color_head(h).float(), -1)).sum(-1).mean()
        ln = F.cross_entropy(self.count_head(h.mean(1)).float(), counts)
        return {"loss": lk + lc + count_weight * ln, "kind": lk.detach(), "color": lc.detach(),
                "count": ln.detach(), "h": h}

    @torch.no_grad()
    def accuracy(self, h, kinds, colors, counts, min_share: float = 0.3) -> dict:
        """Per-token kind / colour accuracy (the commonest object class of the patch) on patches at least
        `min_share` object, and count accuracy: (correct, total) pairs."""
        obj = kinds[..., 1:].sum(-1) >= min_share
        pk = self.kind_head(h)[..., 1:].argmax(-1) == kinds[..., 1:].argmax(-1)
        pc = self.color_head(h)[..., 1:].argmax(-1) == colors[..., 1:].argmax(-1)
        pn = self.count_head(h.mean(1)).argmax(-1) == counts
        return {"kind": (int(pk[obj].sum()), int(obj.sum())), "color": (int(pc[obj].sum()), int(obj.sum())),
                "count": (int(pn.sum()), int(counts.numel()))}


@register
class ViTRecipe(Recipe):
    name = "vit"
    config_class = ViTRecipeConfig
    run_defining = ("sizes", "object_scales", "train_records", "max_objects", "two_tone", "count_weight", "inputs",
                    "vae_compute_dtype", "init")

    def build_model(self, cfg):
        from ...model.config import preset

        c = preset(cfg.model.preset)
        model = ViTTrainer(c, cfg.recipe.vae_compute_dtype, cfg.recipe.inputs)
        if cfg.recipe.init:
            model.vit.load_pretrained(cfg.recipe.init)
        return model

    def build_data(self, cfg, model) -> DataSource:
        ds = WorldPatches(cfg.recipe, cfg.job.seed, patch=model.vit.config.patch_size)
        return DataSource(ds, _encode, _collate, length=ds.length)

    def describe(self, cfg) -> str:
        r = cfg.recipe
        return (f"vision tower of the {cfg.model.preset} preset on {'/'.join(map(str, r.sizes))} px synthetic "
                f"pictures (object scales {'/'.join(str(s) for s in r.object_scales)}), dense kind / colour labels")

    def fsdp_units(self, model):
        return []

    def engine_defaults(self) -> dict:
        # the shipped tower (umm_ops/assets/tiny-world-vit.safetensors) is this schedule's run: 35 minutes at one
        # thread on the 2-core Xeon (docs/results/vit)
        return {"job.steps": 6000, "optim.lr": 1e-3, "schedule.warmup": 100, "data.budget": 2048,
                "checkpoint.every": 500}

    def step(self, model, batch, ctx) -> StepOutput:
        r = ctx.config.recipe
        loss, n, logs = None, 0, {"kind": 0.0, "color": 0.0, "count": 0.0}
        for size, (pixels, kinds, colors, counts) in batch.groups.items():
            out = model(pixels, kinds, colors, counts, r.count_weight)
            w = pixels.shape[0]
            loss = out["loss"] * w if loss is None else loss + out["loss"] * w
            for k in logs:
                logs[k] += float(out[k]) * w
            n += w
        return StepOutput(loss / n, {k: v / n for k, v in logs.items()}, {"images": n})

    def wants_eval(self, cfg) -> bool:
        return cfg.recipe.evaluate and cfg.recipe.eval_images > 0

    @torch.no_grad()
    def evaluate(self, model, cfg, out_dir) -> dict:
        r = cfg.recipe
        model.eval()
        dev = next(model.parameters()).device
        ds = WorldPatches(r, cfg.job.seed, first=r.train_records, records=r.eval_images,
                          patch=model.vit.config.patch_size)
        S, V = len(ds.sizes), len(ds.scales)
        res = {}
        for si, size in enumerate(ds.sizes):
            for vi, scale in enumerate(ds.scales):
                idx = [si + S * vi + S * V * j for j in range(r.eval_images)]
                tot: dict = {}
                for b in range(0, len(idx), 64):
                    batch = _collate([_encode(ds[i], i, 0) for i in idx[b:b + 64]]).to(dev)
                    pixels, kinds, colors, counts = batch.groups[size]
                    h = model.features(pixels)
                    for k, (a, n) in model.accuracy(h, kinds, colors, counts).items():
                        tot[k] = (tot.get(k, (0, 0))[0] + a, tot.get(k, (0, 0))[1] + n)
                res[f"{size}px-scale{scale}"] = {"n": r.eval_images, **{
                    f"{k}_accuracy": a / max(n, 1) for k, (a, n) in tot.items()}}
        return res

    def report(self, results: dict) -> list:
        return [f"eval vit {k}: kind {v['kind_accuracy']:.3f} / colour {v['color_accuracy']:.3f} per object patch, "
                f"count {v['count_accuracy']:.3f} ({v['n']} held-out pictures)" for k, v in results.items()]

    def export(self, checkpoint, cfg, out, ema: bool = False):
        if ema:
            raise ValueError("export of a vit run: EMA weights are not supported here (export the raw weights)")
        export_vit(checkpoint, out)
        return out

    def shorthands(self) -> dict:
        return {"--sizes": ("recipe.sizes", "value", "picture sides, comma-separated"),
                "--no-eval": ("recipe.evaluate", "false", "skip the evaluation after training")}


def export_vit(run_or_checkpoint, out_file) -> dict:
    """The trained tower of a vit run as one safetensors file (float32, SiglipViT names: what
    ``CheersConfig.vit_weights`` / ``SiglipViT.load_pretrained`` read), plus the config and command next to it."""
    from ...model.config import preset
    from ..engine.checkpoint import load_model_state
    from ..export import read_run, write_part

    folder, st, cfg = read_run(run_or_checkpoint, "vit")
    model = ViTTrainer(preset(cfg.model.preset), cfg.recipe.vae_compute_dtype, cfg.recipe.inputs)
    load_model_state(folder, model)
    return write_part(model.vit.state_dict(), out_file, folder, st, cfg)
