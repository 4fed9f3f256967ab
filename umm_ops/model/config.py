"""Configuration of the Cheers-style unified model and its presets (tiny / small / cheers-1.5b).

One ``CheersConfig`` holds the whole model: the LLM and ViT as Hugging Face style dicts (the keys of transformers'
Qwen2Config / SiglipVisionConfig, turned into our dataclasses by :meth:`CheersConfig.llm_config` /
:meth:`CheersConfig.vit_config`), the VAE (diffusers AutoencoderKLFlux2 arguments), the cascaded flow head, the
losses and the sampler defaults.  ``to_dict`` / ``from_dict`` give the ``config.json`` of a checkpoint.

Geometry (checked by :meth:`CheersConfig.validate`): an image of H x W pixels has a VAE latent of (H/8, W/8),
packed 2x2 into (H/16, W/16) tokens of 4*32 = 128 channels; the ViT sees the decoded image with patch 16, so its
token grid is the packed-latent grid; the understanding projector compresses that grid 2x2 into (H/32)*(W/32)
LLM tokens (``pixels_per_token`` = 32).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field

__all__ = ["VAEConfig", "HeadConfig", "CheersConfig", "PRESETS", "preset"]


@dataclass
class VAEConfig:
    """Arguments of diffusers' AutoencoderKLFlux2 (FLUX.2-style: 32 latent channels, 8x down, quant convs)."""

    latent_channels: int = 32
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    patch: int = 2                 # 2x2 latent packing -> 4 * latent_channels packed channels
    bn_eps: float = 1e-4           # Cheers' BatchNorm2d(affine=False, eps=1e-4), used with running stats only
    weights: typing.Optional[str] = None   # trained autoencoder loaded at construction: the name of one shipped
                                           # in umm_ops/assets/ (e.g. "tiny-world-vae") or a .safetensors
                                           # path (see umm_ops.model.vae.resolve_vae_weights); None: random init
    compute_dtype: typing.Optional[str] = None   # the dtype the *frozen* parts compute in: the autoencoder's encoder
                                           # (flow targets and understanding inputs) and the decoder copy while
                                           # none of its parameters is trained, under autocast (weights stay in
                                           # the model's dtype).  None: the model's dtype; "bfloat16": 2-3x faster
                                           # on CPUs with bf16 instructions, latents within ~0.3% of their spread
                                           # (docs/results/base, "The frozen VAE in bf16").  The frozen decoder
                                           # that turns generated latents into pictures always runs in the
                                           # model's dtype

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def packed_channels(self) -> int:
        return self.latent_channels * self.patch * self.patch

    def diffusers_kwargs(self) -> dict:
        n = len(self.block_out_channels)
        return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                    up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(self.block_out_channels),
                    layers_per_block=self.layers_per_block, latent_channels=self.latent_channels,
                    norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                    batch_norm_eps=self.bn_eps, patch_size=(self.patch, self.patch))


@dataclass
class HeadConfig:
    """Cascaded flow head.  Widths and heads come from the LLM (semantic stage) and the ViT (detail stage)."""

    semantic_layers: int = 7       # adaLN-Zero blocks at the LLM width (Cheers' gen_projector.diffusion_head_a)
    detail_layers: int = 3         # adaLN-Zero blocks at the ViT width (Cheers' hi_projector.diffusion_head_a)
    mlp_ratio: int = 4             # SwiGLU hidden = mlp_ratio * width
    rope_theta: float = 10000.0
    freq_dim: int = 256            # sinusoidal timestep features, ordered [cos, sin]
    norm_eps: float = 1e-6         # the head's RMSNorms
    gate_ln_eps: float = 1e-5      # HiGate LayerNorm (nn.LayerNorm default)
    latent_input: bool = False     # not in Cheers (which sees x_t only through the decoder copy's pixels): x_t also
                                   # enters the detail stage through a zero-initialised Linear(packed channels -> C),
                                   # ``head.latent_embed``, added to HiGate's `high` (docs/results/base: what a tiny
                                   # frozen decoder copy loses of the noise)
    prediction: str = "velocity"   # what the detail stage's output is: "velocity" (Cheers) or "clean" (the clean
                                   # latent x1_hat; the head returns v = (x1_hat - x_t) / max(1 - t, clean_min_gap),
                                   # so losses and samplers still see a velocity; x-prediction as in JiT, Li & He 2025)
    clean_min_gap: float = 0.05    # the floor of 1 - t in that division
    conv_widths: tuple = ()        # not in Cheers: a convolutional stage after the detail stage, on the unpacked
                                   # latent grid (2x2 depth-to-space of the packed tokens, 4gh x 4gw x 32), with these
                                   # channels per level (each level halves the grid; e.g. (64, 128, 192)).  It reads
                                   # x_t, the detail stage's velocity and its tokens and adds a correction to that
                                   # velocity through a zero-initialised last convolution, so at initialisation the
                                   # head is Cheers' to the bit (``head.conv_stage``; docs/results/base: a UNet peer
                                   # learns shapes several times faster than token models).  (): no such stage
    conv_heads: int = 4            # attention heads of that stage (cross-attention to the detail stage's tokens)
    conv_inputs: str = "all"       # what that stage reads: "all" (x_t, the detail stage's velocity and HiGate's
                                   # tokens) or "latent" (x_t only, with the prompt context when conv_context: a
                                   # text-to-image UNet inside the head, beside the token stages) or "alone" (as
                                   # "latent", and its output is the whole velocity: the token stages are not run,
                                   # so the LLM reaches the image only through the prompt context - an LLM as the
                                   # text encoder of a UNet; needs conv_context)
    conv_context: bool = False     # that stage also attends to the LLM's final hidden states of the image's prompt
                                   # (its document's tokens before the image) and adds their mean to its FiLM
                                   # conditioning, as a text-to-image UNet reads its text encoder (needs conv_widths)
    conv_context_embeddings: bool = False  # that context is the final hidden states plus the prompt tokens' input
                                   # embeddings through a learnable RMSNorm (``head.context_norm``): the tokens' own
                                   # identity at unit scale beside what the layers mixed in, which a tiny LLM's final
                                   # states keep little of (docs/results/base, "The LLM as a text encoder"; needs
                                   # conv_context)
    conv_repa: bool = False        # REPA (Yu et al. 2024, "Representation Alignment for Generation"): a projector,
                                   # ``head.repa_projector`` (Linear - SiLU - Linear - SiLU - Linear, hidden 2C),
                                   # from the conv stage's second level (after its attention; a 2gh x 2gw map, the
                                   # ViT's patch grid) to the ViT width C.  Used only in training: a recipe aligns
                                   # its output with a frozen pretrained tower's patch features of the clean picture
                                   # (``recipe.repa_weight``); sampling never runs it.  Needs >= 2 conv levels

    def without_conv_stage(self) -> "HeadConfig":
        """A copy without the convolutional stage and its options: Cheers' own head at these sizes."""
        return dataclasses.replace(self, conv_widths=(), conv_context=False, conv_inputs="all",
                                   conv_context_embeddings=False, conv_repa=False)


@dataclass
class CheersConfig:
    llm: dict = field(default_factory=dict)       # transformers Qwen2Config keys
    vit: dict = field(default_factory=dict)       # transformers SiglipVisionConfig keys
    vit_weights: typing.Optional[str] = None   # a pretrained vision tower loaded at construction (Cheers starts from a
                                   # pretrained SigLIP2): the name of one shipped in umm_ops/assets/ (e.g.
                                   # "tiny-world-vit") or a .safetensors path of a SiglipViT state; None: random init
    vae: VAEConfig = field(default_factory=VAEConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    image_size: int = 512          # default generation size (pixels, square)
    projector_ln_eps: float = 1e-5  # und_projector LayerNorm (nn.LayerNorm default in Cheers)
    compress: int = 2              # understanding projector 2x2 space-to-depth (4x fewer tokens)
    text_loss_weight: float = 1.0
    flow_loss_weight: float = 1.0
    cfg_dropout: float = 0.2       # probability of replacing a generation prompt by the null prompt
    und_flow_loss: bool = False    # released Cheers: understanding images also pass the head (t = 1, target 0)
    latent_to_llm: bool = False    # not in Cheers (whose LLM sees an image only through the decoder copy and the
                                   # ViT): every image's packed latent x_t (2x2 space-to-depth, as the LLM grid) and
                                   # its t also enter the LLM, through zero-initialised Linears added to the image's
                                   # LLM inputs (``latent_to_llm.*``; BAGEL / Transfusion feed the LLM the noisy
                                   # latent and t).  At initialisation the model is Cheers to the bit.
    fused_text_loss: bool = True   # text loss through umm_ops.linear_cross_entropy (no (n, V) logits); False: the
                                   # plain lm_head + F.cross_entropy path (same loss to float rounding)
    time_shift: float = 0.5        # sampling t' = a t / (1 + (a - 1) t)
    sample_steps: int = 80
    cfg_scale: float = 9.5
    gen_mode: str = "full"         # "full" (Cheers: image tokens visible to later text) | "noise" (BAGEL)
    tokenizer: str = "byte"        # "byte", "world" (the synthetic world's shipped BPE), "world+clear" (+ CLEAR's
                                   # markers) or a local HF tokenizer folder
    profile: str = "umm"           # conventions profile (umm_ops.model.profile): "umm" (this project's, for models
                                   # trained here) or "cheers" (the released checkpoint's: template, tokens, null
                                   # prompt, dummy image, sampler grid, pixel range, preprocessing)

    # ------------------------------------------------------------------ derived
    @property
    def vit_patch(self) -> int:
        return int(self.vit["patch_size"])

    @property
    def pixels_per_token(self) -> int:
        """Pixels per LLM token side (the packer's PackSpec.patch)."""
        return self.vit_patch * self.compress

    def llm_config(self):
        from .llm import Qwen2Config
        return Qwen2Config.from_hf(dict(self.llm))

    def vit_config(self):
        from .vit import SiglipVisionConfig
        names = {f.name for f in dataclasses.fields(SiglipVisionConfig)}
        return SiglipVisionConfig(**{k: v for k, v in self.vit.items() if k in names})

    def validate(self) -> "CheersConfig":
        from .profile import PROFILES

        if self.profile not in PROFILES:
            raise ValueError(f"CheersConfig.profile must be one of {sorted(PROFILES)}, got {self.profile!r}")
        if self.vit_weights is not None and not (isinstance(self.vit_weights, str) and self.vit_weights):
            raise ValueError(f"CheersConfig.vit_weights must be None, a shipped name or a .safetensors path, got "
                             f"{self.vit_weights!r}")
        if self.gen_mode not in ("full", "noise"):
            raise ValueError(f"gen_mode must be 'full' or 'noise', got {self.gen_mode!r}")
        for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
            if k not in self.llm:
                raise ValueError(f"CheersConfig.llm needs {k!r} (a transformers Qwen2Config dict), got keys "
                                 f"{sorted(self.llm)}")
        for k in ("hidden_size", "num_attention_heads", "patch_size", "image_size"):
            if k not in self.vit:
                raise ValueError(f"CheersConfig.vit needs {k!r} (a transformers SiglipVisionConfig dict), got "
                                 f"keys {sorted(self.vit)}")
        if self.vae.compute_dtype not in (None, "bfloat16"):
            raise ValueError(f"vae.compute_dtype must be None (the model's dtype) or 'bfloat16', got "
                             f"{self.vae.compute_dtype!r}")
        packed = self.vae.downsample * self.vae.patch
        if self.vit_patch != packed:
            raise ValueError(f"the ViT patch ({self.vit_patch} px) must equal the packed-latent stride "
                             f"(VAE {self.vae.downsample}x down * {self.vae.patch}x{self.vae.patch} pack = {packed} "
                             f"px) so that the ViT grid is the packed-latent grid the head predicts")
        if self.image_size % self.pixels_per_token:
            raise ValueError(f"image_size must be a multiple of {self.pixels_per_token} px, got {self.image_size}")
        if self.llm["num_attention_heads"] % self.llm["num_key_value_heads"]:
            raise ValueError("LLM heads must be a multiple of its KV heads")
        if self.vit["num_attention_heads"] % self.llm["num_key_value_heads"]:
            raise ValueError(f"the detail stage uses the ViT's {self.vit['num_attention_heads']} heads with the "
                             f"LLM's {self.llm['num_key_value_heads']} KV heads (as Cheers does): heads must be "
                             f"a multiple of KV heads")
        if self.head.prediction not in ("velocity", "clean"):
            raise ValueError(f"head.prediction must be 'velocity' or 'clean', got {self.head.prediction!r}")
        cw = tuple(self.head.conv_widths)
        if cw and (len(cw) > 4 or not all(isinstance(w, int) and w >= 8 and w % 8 == 0 for w in cw)
                   or any(w % self.head.conv_heads for w in cw[1:])):
            raise ValueError(f"head.conv_widths must be () or 1-4 channel counts, each a multiple of 8 (GroupNorm "
                             f"groups) and, from the second on, of head.conv_heads = {self.head.conv_heads}; got "
                             f"{self.head.conv_widths!r}")
        if self.head.conv_inputs not in ("all", "latent", "alone"):
            raise ValueError(f"head.conv_inputs must be 'all', 'latent' or 'alone', got {self.head.conv_inputs!r}")
        if self.head.conv_inputs == "alone" and not self.head.conv_context:
            raise ValueError("head.conv_inputs = 'alone' needs head.conv_context = True: the stage alone would not "
                             "see the prompt")
        if self.head.conv_context_embeddings and not self.head.conv_context:
            raise ValueError("head.conv_context_embeddings = True needs head.conv_context = True (it adds the prompt's "
                             "input embeddings to that context)")
        if self.head.conv_context and not cw:
            raise ValueError("head.conv_context = True needs the convolutional stage: set head.conv_widths")
        if self.head.conv_repa and len(cw) < 2:
            raise ValueError(f"head.conv_repa = True needs a convolutional stage of at least 2 levels (it reads the "
                             f"second level's map), got head.conv_widths = {cw!r}")
        if not 0.0 < self.head.clean_min_gap <= 1.0:
            raise ValueError(f"head.clean_min_gap must be in (0, 1], got {self.head.clean_min_gap}")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {self.cfg_dropout}")
        return self

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vae"]["block_out_channels"] = list(self.vae.block_out_channels)
        d["head"]["conv_widths"] = list(self.head.conv_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CheersConfig":
        d = copy.deepcopy(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"CheersConfig: unknown keys {unknown} (expected some of {sorted(known)})")
        vae = d.pop("vae", {})
        head = d.pop("head", {})
        if "block_out_channels" in vae:
            vae["block_out_channels"] = tuple(vae["block_out_channels"])
        if "conv_widths" in head:
            head["conv_widths"] = tuple(head["conv_widths"])
        return cls(vae=VAEConfig(**vae), head=HeadConfig(**head), **d).validate()


def _tiny() -> CheersConfig:
    # ~19M parameters (6.6M of them the head's conv stage); 64-128 px images: VAE 8x down, packed 16 px per token =
    # ViT patch 16, 32 px per LLM token.
    return CheersConfig(
        llm=dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=4096),
        vit=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 patch_size=16, image_size=128, num_channels=3, layer_norm_eps=1e-6),
        # pretrained on the synthetic world, as Cheers starts from a pretrained SigLIP2 (umm train --recipe vit; the
        # command and held-out scores in the .json beside it): the base schedule's captions and short answers
        # depend on it (docs/results/base, "A pretrained vision tower")
        vit_weights="tiny-world-vit",
        # trained on the synthetic world (umm train --recipe vae; the recipe, command and scores in the .json beside it)
        vae=VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                      weights="tiny-world-vae"),
        # not Cheers' head: a small UNet beside the token stages, reading x_t and the prompt (final hidden states
        # plus input embeddings); at initialisation it adds zero (docs/results/base, "A generator the tiny LLM can
        # condition"); HeadConfig(semantic_layers=2, detail_layers=2) alone is Cheers' head at this size
        head=HeadConfig(semantic_layers=2, detail_layers=2, conv_widths=(64, 128, 192), conv_context=True,
                        conv_inputs="latent", conv_context_embeddings=True),
        image_size=128, sample_steps=20, cfg_scale=4.0,
        tokenizer="world",   # the synthetic world's BPE (512 ids, ~1 token per word; umm_ops.data.world_tokenizer)
    ).validate()


def _small() -> CheersConfig:
    # one GPU: Qwen2.5-0.5B-sized LLM, SigLIP-base-sized ViT, the full FLUX.2 VAE, 4 + 2 head blocks, 256 px.
    return CheersConfig(
        llm=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=32768),
        vit=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 patch_size=16, image_size=256, num_channels=3, layer_norm_eps=1e-6),
        vae=VAEConfig(),
        head=HeadConfig(semantic_layers=4, detail_layers=2),
        image_size=256, sample_steps=50,
    ).validate()


def _cheers_1_5b() -> CheersConfig:
    # The released Cheers (AI9Stars/Cheers Training/cheers_config/config.json + modeling_umm.py): Qwen2.5-1.5B,
    # SigLIP2 so400m patch16-512, FLUX.2 VAE (32 ch), head 7 blocks @1536 + 3 blocks @1152 / 16 heads.
    return CheersConfig(
        llm=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, max_position_embeddings=32768),
        vit=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                 patch_size=16, image_size=512, num_channels=3, layer_norm_eps=1e-6),
        vae=VAEConfig(),
        head=HeadConfig(semantic_layers=7, detail_layers=3),
        image_size=512, sample_steps=80, cfg_scale=9.5, time_shift=0.5, und_flow_loss=True,
    ).validate()


PRESETS = {"tiny": _tiny, "small": _small, "cheers-1.5b": _cheers_1_5b}


def preset(name: str) -> CheersConfig:
    """A fresh CheersConfig of a named preset: "tiny", "small" or "cheers-1.5b"."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]()
