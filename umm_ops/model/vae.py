"""The VAE side of Cheers' unified vision tokenizer.

``CheersVAE`` wraps diffusers' ``AutoencoderKLFlux2`` (FLUX.2 layout: 32 latent channels, 8x down, quant convs and
a non-affine BatchNorm over the 2x2-packed 128 channels) and adds Cheers' *trainable copy of the decoder*:

* ``frozen``: the pretrained autoencoder.  Its encoder turns images into normalised packed latents (the flow
  targets; no gradient ever reaches it); its decoder turns generated latents back into pixels.
* ``decoder_copy``: ``post_quant_conv`` + ``decoder`` + its own BatchNorm statistics (Cheers'
  ``vae_decoder_projector``), initialised from the frozen decoder and trained with the model: every image (clean for
  understanding, noisy x_t for generation) goes latent -> decoder copy -> pixels -> ViT.

Packed latents are tokens (N, (H/16)*(W/16), 128) normalised with ``umm_ops.pack_latents`` (channel c*4 + pi*2 + pj,
Cheers' ``c (i pi) (j pj) -> (c pi pj) i j``; BatchNorm eps 1e-4, running statistics only).
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import torch
from torch import nn

import umm_ops

from ..utils import ASSETS, optional_import, resolve_shipped_weights
from .config import VAEConfig

__all__ = ["CheersVAE", "DecoderCopy", "SHIPPED_WEIGHTS", "resolve_vae_weights"]

SHIPPED_WEIGHTS = ASSETS   # trained autoencoders shipped in the package


def _autoencoder(cfg: VAEConfig):
    AutoencoderKLFlux2 = optional_import("diffusers", "AutoencoderKLFlux2")

    return AutoencoderKLFlux2(**cfg.diffusers_kwargs())


class DecoderCopy(nn.Module):
    """Trainable decoder: normalised packed latent tokens -> pixels in [-1, 1] (not clamped)."""

    def __init__(self, frozen, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.post_quant_conv = copy.deepcopy(frozen.post_quant_conv)
        self.decoder = copy.deepcopy(frozen.decoder)
        self.bn = nn.BatchNorm2d(cfg.packed_channels, eps=cfg.bn_eps, affine=False, track_running_stats=True)
        self.bn.load_state_dict(frozen.bn.state_dict())
        self.bn.eval()
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, tokens: torch.Tensor, latent_hw) -> torch.Tensor:
        """tokens (N, (h/2)*(w/2), 128), latent_hw = (h, w) -> pixels (N, 3, 8h, 8w)."""
        z = umm_ops.unpack_latents(tokens, latent_hw, self.bn.running_mean, self.bn.running_var,
                                   self.cfg.patch, self.cfg.bn_eps)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def resolve_vae_weights(weights) -> Path:
    """VAEConfig.weights -> the safetensors file: a name of SHIPPED_WEIGHTS (``"tiny-world-vae"``, with or without
    ``.safetensors``) or a path."""
    return resolve_shipped_weights(weights, "VAEConfig.weights")


class CheersVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.frozen = _autoencoder(cfg)
        self.frozen.requires_grad_(False)
        self.frozen.eval()
        # trained weights (config.weights) bring their latent statistics; built on the meta device (hf loaders)
        # there is nothing to copy into
        self.pretrained = False
        if cfg.weights is not None and not self.frozen.decoder.conv_out.weight.is_meta:
            self.load_autoencoder(resolve_vae_weights(cfg.weights))
        self.decoder_copy = DecoderCopy(self.frozen, cfg)

    @property
    def calibrated(self) -> bool:
        """Whether the latent BatchNorm statistics are set (trained weights or calibrate()), not the defaults 0 / 1."""
        bn = self.frozen.bn
        return not (bool((bn.running_mean == 0).all()) and bool((bn.running_var == 1).all()))

    def load_autoencoder(self, file) -> None:
        """Load an AutoencoderKLFlux2 state (a ``umm export`` of a vae run: weights and calibrated BatchNorm
        statistics) into ``frozen``; the decoder copy, if built, restarts from it."""
        load_file = optional_import("safetensors.torch", "load_file")

        state = load_file(os.fspath(file))
        try:
            self.frozen.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{os.fspath(file)}: not an autoencoder of this VAEConfig "
                             f"({self.cfg.block_out_channels} channels, {self.cfg.latent_channels} latent "
                             f"channels): {str(e)[:400]}") from None
        if not self.calibrated:
            raise ValueError(f"{os.fspath(file)}: its latent BatchNorm statistics are the defaults (0 / 1): "
                             f"export it with `umm export` (which calibrates them)")
        if hasattr(self, "decoder_copy"):
            self.decoder_copy = DecoderCopy(self.frozen, self.cfg)
        self.pretrained = True

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()                 # frozen: BatchNorm / any dropout stay in inference mode
        self.decoder_copy.bn.eval()        # statistics are never updated by training batches
        return self

    # ------------------------------------------------------------------ geometry
    def latent_hw(self, pixel_hw):
        h, w = int(pixel_hw[0]), int(pixel_hw[1])
        f = self.cfg.downsample * self.cfg.patch
        if h % f or w % f:
            raise ValueError(f"image height and width must be multiples of {f} px (VAE {self.cfg.downsample}x down "
                             f"and {self.cfg.patch}x{self.cfg.patch} packing), got {h}x{w}")
        return h // self.cfg.downsample, w // self.cfg.downsample

    def token_grid(self, pixel_hw):
        h, w = self.latent_hw(pixel_hw)
        return h // self.cfg.patch, w // self.cfg.patch

    # ------------------------------------------------------------------ encode / decode
    def _frozen_compute(self, module: nn.Module):
        """The context the frozen `module` computes in: bf16 autocast on its device with ``compute_dtype =
        "bfloat16"`` (weights and outputs stay in their dtype), else nothing."""
        if self.cfg.compute_dtype != "bfloat16":
            return contextlib.nullcontext()
        return torch.autocast(next(module.parameters()).device.type, dtype=torch.bfloat16)

    def _check_pixels(self, pixels: torch.Tensor, who: str):
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3:
            got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"{who}: expected pixels (N, 3, H, W) in [-1, 1], got {got}")

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised latent means (N, 32, H/8, W/8) of the frozen encoder (no gradient)."""
        self._check_pixels(pixels, "CheersVAE.latents")
        with torch.no_grad():
            dt = self.frozen.quant_conv.weight.dtype if self.frozen.quant_conv is not None else pixels.dtype
            with self._frozen_compute(self.frozen.encoder):
                z = self.frozen.encode(pixels.to(dt)).latent_dist.mode()
            return z.to(dt)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, H, W) in [-1, 1] -> normalised packed latent tokens (N, (H/16)*(W/16), 128), no gradient."""
        self.latent_hw(pixels.shape[-2:])
        z = self.latents(pixels)
        bn = self.frozen.bn
        return umm_ops.pack_latents(z, bn.running_mean, bn.running_var, self.cfg.patch, self.cfg.bn_eps)

    def decode(self, tokens: torch.Tensor, pixel_hw, clamp=(-1.0, 1.0)) -> torch.Tensor:
        """Frozen decoder: normalised packed tokens -> pixels (N, 3, H, W) clamped to `clamp` (the model's pixel
        range: [-1, 1] by default, [0, 1] under the released Cheers conventions; None: not clamped)."""
        bn = self.frozen.bn
        z = umm_ops.unpack_latents(tokens, self.latent_hw(pixel_hw), bn.running_mean, bn.running_var,
                                   self.cfg.patch, self.cfg.bn_eps)
        x = self.frozen.decode(z).sample
        return x if clamp is None else x.clamp(*clamp)

    def decode_trainable(self, tokens: torch.Tensor, pixel_hw) -> torch.Tensor:
        """The trainable decoder copy (Cheers' vae_decoder_projector): tokens -> pixels (N, 3, H, W), in the dtype of
        `tokens`.  While none of its parameters is trained it is a frozen part (``compute_dtype``); gradients still
        reach `tokens` when they need them."""
        hw = self.latent_hw(pixel_hw)
        dc = self.decoder_copy
        if any(p.requires_grad for p in dc.parameters()):
            return dc(tokens, hw)
        with self._frozen_compute(dc.decoder):
            x = dc(tokens, hw)
        return x.to(tokens.dtype)

    @torch.no_grad()
    def calibrate(self, pixels: torch.Tensor) -> None:
        """Set both BatchNorm statistics (frozen and copy) to the per-channel mean / variance of the packed latents of
        `pixels` (what BatchNorm's running statistics converge to on that data).  For freshly initialised VAEs; a
        pretrained VAE comes with its statistics."""
        z = self.latents(pixels)
        p = self.cfg.patch
        b, c, h, w = z.shape
        t = z.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * p * p).float()
        mean, var = t.mean(0), t.var(0, unbiased=True) if t.shape[0] > 1 else torch.ones_like(t[0])
        for bn in (self.frozen.bn, self.decoder_copy.bn):
            bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
            bn.running_var.copy_(var.to(bn.running_var.dtype))
