"""VAE: train the FLUX.2-style autoencoder of a CheersModel preset (its ``vae.frozen``) on the synthetic world.

    umm train --recipe vae --out runs/vae --steps 3000
    umm export runs/vae --out vae.safetensors       # the autoencoder, latent statistics calibrated: export_vae

Data: pictures and colour-coded instance maps of SyntheticWorld records at every size of ``recipe.sizes`` (index i
-> size sizes[i % S], record (i // S) // 2, picture when (i // S) is even else its segmentation map); records
>= ``train_records`` are held out.  A picture of side s counts (s / 16)^2 "tokens" (its packed latent tokens), so
``data.budget`` tokens per micro-batch = that many latent tokens of images, mixed sizes grouped per size.
Loss per image: L1(reconstruction, picture), each pixel weighted 1 + ``color_weight`` at and 1 px around coloured
objects (normalised by the weights' mean), + ``kl_weight`` * KL(posterior || N(0, I)) summed over latent elements /
pixels.  The decoded latent is a sample with noise the recipe draws from seed_of(seed, step, sample id,
"vae-noise") (``posterior = "sample"``, the default) or the posterior mean (``"mode"``).  ``se_weight`` > 0 adds
scale equivariance (Skorokhodov et al. 2025): the same loss between the decodes of the latent average-pooled 2x and
4x and the picture pooled alike (docs/results/base, "The latent space": 1,000 steps of it on the shipped autoencoder
did not make text-to-image better).  ``train = "decoder"`` (with ``init``) trains only the decoder
(``post_quant_conv`` and ``decoder``): the encoder and the latent statistics stay init's bit for bit, so every
latent a model trained on init's autoencoder reads is unchanged (the export checks this and keeps init's
statistics instead of recalibrating them).

Status (CPU, tiny preset): the shipped autoencoder (umm_ops/assets/tiny-world-vae.safetensors, the tiny preset's
default) is this recipe's 7,000-step run (budget 512, lr 2e-3, ~90,000 pictures, 80 min on 2 cores).  Held-out
checker score of its reconstructions: 1.000 at 128 px, 0.768 at 64 px (target 0.95: missed; medium and small
diamonds and stars lose their points) and 0.974 at 64 px on the base SFT world (docs/results/vae; its decoder
trained 3,000 steps more at 64 px with ``train = "decoder"``: 0.820 and 1.000, not shipped).  Without the
colour weight, runs of 1,500 steps put every object in one washed-out hue (checker 0.0): the loss is dominated by
the grey background, and colour came late or not at all.
Evaluation after training: the pixel checker's score of reconstructions of held-out pictures at every size (the
issue's target: >= 0.95) and the mean absolute error.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
from torch import nn

from ...utils import generator, optional_import
from ..spec import DataSource, Recipe, StepOutput, register

__all__ = ["VAERecipe", "VAERecipeConfig", "VAETrainer", "WorldImages"]


@dataclass
class VAERecipeConfig:
    sizes: tuple = (64, 128)          # picture sides (multiples of 16)
    train_records: int = 50_000
    max_objects: int = 4
    segmentation: bool = True         # also reconstruct the colour-coded instance maps (SGT's targets)
    kl_weight: float = 1e-6
    color_weight: float = 5.0         # extra L1 weight on pixels at and around coloured objects (see VAETrainer)
    posterior: str = "sample"         # "sample": decode mean + std * noise (a KL-VAE); "mode": decode the posterior
                                      # mean (a deterministic autoencoder, the KL a small regulariser)
    se_weight: float = 0.0            # scale equivariance (Skorokhodov et al. 2025, "Improving the Diffusability of
                                      # Autoencoders"): + se_weight * the same weighted L1 between the decoding of
                                      # the latent average-pooled 2x and 4x and the picture pooled alike (0: off)
    eval_images: int = 64             # held-out pictures per size scored after training
    evaluate: bool = True
    init: typing.Optional[str] = None   # autoencoder weights to start from: a .safetensors file or a shipped name
    train: str = "all"                # "all", or "decoder": the encoder (and its latent statistics) stay init's, so
                                      # the latents every model trained on init's autoencoder reads are unchanged

    def validate(self):
        from ..config import ConfigError

        if not self.sizes or any((not isinstance(s, int)) or s < 32 or s % 16 for s in self.sizes):
            raise ConfigError(f"recipe.sizes = {self.sizes!r}: must be picture sides, multiples of 16, >= 32")
        if self.train_records < 1:
            raise ConfigError(f"recipe.train_records = {self.train_records!r}: must be >= 1")
        if not 1 <= self.max_objects <= 8:
            raise ConfigError(f"recipe.max_objects = {self.max_objects!r}: must be in [1, 8]")
        if not self.kl_weight >= 0:
            raise ConfigError(f"recipe.kl_weight = {self.kl_weight!r}: must be >= 0")
        if not self.color_weight >= 0:
            raise ConfigError(f"recipe.color_weight = {self.color_weight!r}: must be >= 0")
        if not (isinstance(self.se_weight, (int, float)) and 0 <= self.se_weight < float("inf")):
            raise ConfigError(f"recipe.se_weight = {self.se_weight!r}: must be a finite number >= 0")
        if self.posterior not in ("mode", "sample"):
            raise ConfigError(f"recipe.posterior = {self.posterior!r}: use 'mode' or 'sample'")
        if self.eval_images < 0:
            raise ConfigError(f"recipe.eval_images = {self.eval_images!r}: must be >= 0")
        if self.train not in ("all", "decoder"):
            raise ConfigError(f"recipe.train = {self.train!r}: use 'all' or 'decoder'")
        if self.train == "decoder" and not self.init:
            raise ConfigError("recipe.train = 'decoder' keeps the encoder of recipe.init, but recipe.init is not set "
                              "(give a .safetensors file or a shipped name such as 'tiny-world-vae')")
        return self


class WorldImages:
    """Map-style dataset of (index, size, (3, s, s) float pixels in [-1, 1]) over SyntheticWorld records."""

    def __init__(self, sizes, seed: int, records: int, max_objects: int, segmentation: bool, first: int = 0):
        from ...data.synthetic import SyntheticWorld

        self.sizes, self.records, self.first, self.seg = tuple(sizes), records, first, segmentation
        self.worlds = {s: SyntheticWorld(size=s, seed=seed, max_objects=max_objects, length=first + records)
                       for s in self.sizes}
        self.kinds = 2 if segmentation else 1

    def __len__(self) -> int:
        return self.records * len(self.sizes) * self.kinds

    def __getitem__(self, i):
        if isinstance(i, bool) or not isinstance(i, int) or not (0 <= i < len(self)):
            raise IndexError(f"WorldImages: index {i!r} out of range [0, {len(self)})")
        size = self.sizes[i % len(self.sizes)]
        j = i // len(self.sizes)
        rec = self.worlds[size][self.first + j // self.kinds]
        img = rec.segmentation if (self.kinds == 2 and j % 2) else rec.image
        return size, img.float() / 127.5 - 1.0

    def length(self, i: int) -> int:
        return (self.sizes[i % len(self.sizes)] // 16) ** 2


@dataclass
class _Doc:
    index: int
    pixels: torch.Tensor
    length: int


class ImageBatch:
    """Pictures grouped by size: {side: (N, 3, s, s)} and their dataset indices."""

    def __init__(self, groups: dict, ids: dict):
        self.groups, self.ids = groups, ids

    @property
    def num_tokens(self) -> int:
        return sum(x.shape[0] * (x.shape[-1] // 16) ** 2 for x in self.groups.values())

    @property
    def num_docs(self) -> int:
        return sum(x.shape[0] for x in self.groups.values())

    def to(self, device):
        return ImageBatch({s: x.to(device) for s, x in self.groups.items()}, self.ids)


def _encode(sample, index: int, seed: int) -> _Doc:
    size, pixels = sample
    return _Doc(int(index), pixels, (size // 16) ** 2)


def _collate(docs) -> ImageBatch:
    groups: dict = {}
    for d in docs:
        groups.setdefault(d.pixels.shape[-1], []).append(d)
    return ImageBatch({s: torch.stack([d.pixels for d in g]) for s, g in sorted(groups.items())},
                      {s: [d.index for d in g] for s, g in sorted(groups.items())})


class VAETrainer(nn.Module):
    """The autoencoder under training (diffusers AutoencoderKLFlux2 with the preset's VAEConfig) and its loss."""

    def __init__(self, vae_config, train: str = "all"):
        super().__init__()
        AutoencoderKLFlux2 = optional_import("diffusers", "AutoencoderKLFlux2")

        self.vae_config = vae_config
        self.ae = AutoencoderKLFlux2(**vae_config.diffusers_kwargs())
        self.ae.bn.requires_grad_(False)   # latent statistics: calibrated after training, not learned
        self.decoder_only = train == "decoder"
        if self.decoder_only:
            for part in ENCODER_PARTS:
                getattr(self.ae, part).requires_grad_(False)

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor | None, kl_weight: float,
                color_weight: float = 0.0, se_weight: float = 0.0) -> dict:
        """noise None: decode the posterior mean.  Reconstruction loss: L1 weighted per pixel by
        1 + color_weight * [a pixel within 1 px of one whose chroma (max - min channel, on [-1, 1]) exceeds
        CHROMA_ON], normalised by the weights' mean; "l1" reports the plain L1.  se_weight > 0 adds scale
        equivariance: the same loss between decode(avg_pool_k(z)) and avg_pool_k(pixels), k = 2 and 4 averaged
        (2x / 4x bilinear downsampling is this box average), so that a spatially smoothed latent decodes to the
        smoothed picture ("se" reports it)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
            post = self.ae.encode(pixels).latent_dist
        z = post.mean if noise is None else post.mean + post.std * noise.to(post.mean.dtype)
        recon = self.ae.decode(z).sample
        l1, rec = weighted_l1(recon, pixels, color_weight)
        kl = 0.5 * (post.mean.float() ** 2 + post.var.float() - 1.0 - post.logvar.float()).sum() / pixels.numel()
        loss = rec + kl_weight * kl
        out = {"l1": l1.detach(), "kl": kl.detach(), "recon": recon}
        if se_weight > 0:
            pool = torch.nn.functional.avg_pool2d
            se = sum(weighted_l1(self.ae.decode(pool(z, k)).sample, pool(pixels, k), color_weight)[1]
                     for k in (2, 4)) / 2
            loss = loss + se_weight * se
            out["se"] = se.detach()
        out["loss"] = loss
        return out


ENCODER_PARTS = ("encoder", "quant_conv")   # AutoencoderKLFlux2's pixels -> posterior; decoder: post_quant_conv, decoder


def weighted_l1(recon: torch.Tensor, pixels: torch.Tensor, color_weight: float):
    """(plain L1, L1 weighted per pixel by 1 + color_weight * color_mask(pixels), normalised by the weights' mean)."""
    err = (recon.float() - pixels.float()).abs()
    l1 = err.mean()
    if color_weight <= 0:
        return l1, l1
    w = 1.0 + color_weight * color_mask(pixels)
    return l1, (err * w).sum() / (w.sum() * err.shape[1])


CHROMA_ON = 0.3   # the world's palette colours have chroma >= 1.1 on [-1, 1]; its backgrounds are greys (0)


def color_mask(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) pixels on [-1, 1] -> (N, 1, H, W) float 0/1: coloured pixels and their 8 neighbours (both
    sides of every object edge, where a blurry reconstruction bleeds colour)."""
    chroma = pixels.float().amax(1, keepdim=True) - pixels.float().amin(1, keepdim=True)
    return torch.nn.functional.max_pool2d((chroma > CHROMA_ON).float(), 3, stride=1, padding=1)


@register
class VAERecipe(Recipe):
    name = "vae"
    config_class = VAERecipeConfig
    run_defining = ("sizes", "train_records", "max_objects", "segmentation", "kl_weight", "color_weight", "posterior",
                    "init", "se_weight", "train")

    def _data(self, cfg, first: int = 0, records: int | None = None) -> WorldImages:
        r = cfg.recipe
        return WorldImages(r.sizes, cfg.job.seed, r.train_records if records is None else records, r.max_objects,
                           r.segmentation, first)

    def build_model(self, cfg):
        from ...model.config import preset

        model = VAETrainer(preset(cfg.model.preset).vae, cfg.recipe.train)
        if cfg.recipe.init:
            load_file = optional_import("safetensors.torch", "load_file")

            from ...model.vae import resolve_vae_weights

            model.ae.load_state_dict(load_file(resolve_vae_weights(cfg.recipe.init)))
        return model

    def build_data(self, cfg, model) -> DataSource:
        ds = self._data(cfg)
        return DataSource(ds, _encode, _collate, length=ds.length)

    def describe(self, cfg) -> str:
        r = cfg.recipe
        return (f"autoencoder of the {cfg.model.preset} preset on {'/'.join(map(str, r.sizes))} px synthetic "
                f"pictures{' and instance maps' if r.segmentation else ''}")

    def fsdp_units(self, model):
        return []   # a small convolutional model: one FSDP unit (the root)

    def step(self, model, batch, ctx) -> StepOutput:
        r = ctx.config.recipe
        l1s, kls, ses, n = 0.0, 0.0, 0.0, 0
        loss = None
        for size, pixels in batch.groups.items():
            noise = None
            if r.posterior == "sample":
                zs = [torch.randn(ctx.module.vae_config.latent_channels, size // 8, size // 8,
                                  generator=generator(ctx.seed, ctx.step, i, "vae-noise")) for i in batch.ids[size]]
                noise = torch.stack(zs).to(pixels.device)
            out = model(pixels, noise, r.kl_weight, r.color_weight, r.se_weight)
            w = pixels.shape[0]
            loss = out["loss"] * w if loss is None else loss + out["loss"] * w
            l1s += float(out["l1"]) * w
            kls += float(out["kl"]) * w
            ses += float(out.get("se", 0.0)) * w
            n += w
        logs = {"l1": l1s / n, "kl": kls / n}
        if r.se_weight > 0:
            logs["se"] = ses / n
        return StepOutput(loss / n, logs, {"images": n})

    def wants_eval(self, cfg) -> bool:
        return cfg.recipe.evaluate and cfg.recipe.eval_images > 0

    @torch.no_grad()
    def evaluate(self, model, cfg, out_dir) -> dict:
        from ...data.synthetic import SyntheticWorld
        from ...eval.checker import check

        r = cfg.recipe
        model.eval()
        dev = next(model.parameters()).device
        res = {}
        for size in r.sizes:
            world = SyntheticWorld(size=size, seed=cfg.job.seed, max_objects=r.max_objects,
                                   length=r.train_records + r.eval_images)
            recs = [world[r.train_records + k] for k in range(r.eval_images)]
            pix = torch.stack([rec.image.float() / 127.5 - 1.0 for rec in recs]).to(dev)
            recon = torch.cat([model.ae.decode(model.ae.encode(pix[i:i + 16]).latent_dist.mode()).sample
                               for i in range(0, len(recs), 16)]).clamp(-1, 1).float().cpu()
            scores = [check(rec.prompt, x, value_range=(-1.0, 1.0))["score"] for rec, x in zip(recs, recon)]
            mae = float((recon - pix.float().cpu()).abs().mean() * 127.5)
            res[str(size)] = {"n": len(recs), "checker_score": sum(scores) / len(scores),
                              "mean_abs_error_grey_levels": mae}
            if out_dir is not None:
                _grid(pix.cpu(), recon, out_dir, size)
        return res

    def report(self, results: dict) -> list:
        return [f"eval vae {s} px: checker score of reconstructions {v['checker_score']:.3f} on {v['n']} held-out "
                f"pictures, mean |error| {v['mean_abs_error_grey_levels']:.1f} grey levels"
                for s, v in results.items()]

    def export(self, checkpoint, cfg, out, ema: bool = False):
        if ema:
            raise ValueError("export of a vae run: EMA weights are not supported here (export the raw weights)")
        export_vae(checkpoint, out)
        return out

    def shorthands(self) -> dict:
        return {"--sizes": ("recipe.sizes", "value", "picture sides, comma-separated"),
                "--no-eval": ("recipe.evaluate", "false", "skip the evaluation after training")}


def _grid(pix, recon, out_dir, size: int, k: int = 8) -> None:
    from pathlib import Path

    Image = optional_import("PIL", "Image")

    from ...eval.world import to_pil
    from ...utils import atomic_write

    k = min(k, pix.shape[0])
    grid = Image.new("RGB", (k * (size + 4), 2 * (size + 4)), "white")
    for i in range(k):
        grid.paste(to_pil(pix[i]), (i * (size + 4), 0))
        grid.paste(to_pil(recon[i]), (i * (size + 4), size + 4))
    path = Path(out_dir) / "eval" / f"vae-recon-{size}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write=lambda p: grid.save(p, format="PNG"), suffix=".png")


def export_vae(run_or_checkpoint, out_file, calibrate_images: int = 256) -> dict:
    """The trained autoencoder of a vae run as one safetensors file (float32), its latent BatchNorm statistics
    calibrated on training pictures (what CheersVAE.calibrate computes), plus the config and command next to it."""
    from ...model.config import preset
    from ...model.vae import CheersVAE
    from ..engine.checkpoint import load_model_state
    from ..export import read_run, write_part

    folder, st, cfg = read_run(run_or_checkpoint, "vae")
    model = VAETrainer(preset(cfg.model.preset).vae)
    load_model_state(folder, model)
    vae = CheersVAE(preset(cfg.model.preset).vae)
    vae.frozen.load_state_dict(model.ae.state_dict())
    if getattr(cfg.recipe, "train", "all") == "decoder":
        # the encoder must be init's, bit for bit, and so are its latent statistics: recalibrating them (on other
        # pictures or sizes) would move the latents every model trained on init's autoencoder reads
        from ...model.vae import resolve_vae_weights
        from ..engine.checkpoint import file_hash

        load_file = optional_import("safetensors.torch", "load_file")
        init_file = resolve_vae_weights(cfg.recipe.init)
        init = load_file(init_file)
        kept = {k: v for k, v in vae.frozen.state_dict().items() if k.split(".")[0] in ENCODER_PARTS + ("bn",)}
        changed = [k for k, v in kept.items() if k not in init or not torch.equal(v, init[k])]
        if changed:
            raise ValueError(f"{folder}: a recipe.train = 'decoder' run whose encoder differs from recipe.init "
                             f"({cfg.recipe.init}) in {len(changed)} tensors, e.g. {changed[:3]}: not exporting")
        return write_part(vae.frozen.state_dict(), out_file, folder, st, cfg,
                          calibrated_on=f"kept from {cfg.recipe.init} (recipe.train = 'decoder': same encoder)",
                          init_blake2b=file_hash(init_file))
    ds = VAERecipe()._data(cfg)
    size = max(cfg.recipe.sizes)
    S, kinds = len(ds.sizes), ds.kinds
    picks = [ds.sizes.index(size) + S * kinds * r for r in range(min(calibrate_images, ds.records))]  # pictures
    vae.calibrate(torch.stack([ds[i][1] for i in picks]))
    return write_part(vae.frozen.state_dict(), out_file, folder, st, cfg,
                      calibrated_on=f"{len(picks)} training pictures at {size} px")
