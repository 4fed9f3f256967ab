"""A SigLIP / SigLIP2 (fixed resolution) vision transformer on ``umm_ops.span_attention``.

Parameter names are those of transformers' SiglipVisionModel as stored in SigLIP checkpoints
(``vision_model.embeddings.patch_embedding`` (Conv2d), ``vision_model.embeddings.position_embedding`` (Embedding),
``vision_model.encoder.layers.{i}.{self_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2, mlp.fc1, mlp.fc2}``,
``vision_model.post_layernorm``).  The attention-pooling head is not built (Cheers uses the token features); its
weights are skipped when loading (``umm_ops.model.hf.load_siglip``).

The images of a batch are packed into one token stream, each image one bidirectional ("full") document, so the
same span-attention kernel serves the ViT and the LLM.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import SpanLayout, span_attention

__all__ = ["SiglipVisionConfig", "SiglipViT"]

_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


@dataclass
class SiglipVisionConfig:
    """Hyper-parameters of a SigLIP vision tower (names as in transformers' SiglipVisionConfig)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                     "image_size", "num_channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"SiglipVisionConfig.{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"SiglipVisionConfig: hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"SiglipVisionConfig: image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"SiglipVisionConfig.hidden_act must be one of {sorted(_ACTIVATIONS)}, got "
                             f"{self.hidden_act!r}")
        if not (self.layer_norm_eps > 0):
            raise ValueError(f"SiglipVisionConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def grid(self) -> int:
        """Patches per side at image_size (the position-embedding grid)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: dict) -> "SiglipVisionConfig":
        """From a ``config.json`` dict: a vision config (model_type ``siglip_vision_model``) or a full SigLIP
        config (model_type ``siglip``, its ``vision_config`` is used)."""
        if not isinstance(d, dict):
            raise TypeError(f"SiglipVisionConfig.from_hf expects a dict (a config.json), got {type(d).__name__}")
        mt = d.get("model_type")
        if mt in ("siglip", "siglip2") or ("vision_config" in d and "hidden_size" not in d):
            if "vision_config" not in d:
                raise ValueError(f"SiglipVisionConfig.from_hf: a {mt!r} config needs a 'vision_config' entry")
            d = d["vision_config"]
            mt = d.get("model_type")
        if mt is not None and mt not in ("siglip_vision_model",):
            hint = (" (SigLIP2 NaFlex models use a linear patch embedding and variable patch counts; use a "
                    "fixed-resolution SigLIP2 checkpoint, which is stored as a 'siglip' model)"
                    if mt == "siglip2_vision_model" else "")
            raise ValueError(f"SiglipVisionConfig.from_hf: expected model_type 'siglip_vision_model', got "
                             f"{mt!r}{hint}")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "patch_size", "image_size") if k not in d]
        if missing:
            raise ValueError(f"SiglipVisionConfig.from_hf: config is missing {missing}")
        return cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                   num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
                   patch_size=d["patch_size"], image_size=d["image_size"], num_channels=d.get("num_channels", 3),
                   layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
                   hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"))

    def to_hf(self) -> dict:
        """A ``config.json`` dict that transformers loads as SiglipVisionModel."""
        out = dataclasses.asdict(self)
        out.update(model_type="siglip_vision_model", architectures=["SiglipVisionModel"], attention_dropout=0.0,
                   vision_use_head=False)
        return out


class Embeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid = config.grid
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.grid * config.grid, config.hidden_size)

    def position(self, gh: int, gw: int) -> torch.Tensor:
        """(gh*gw, C) position embeddings; resized bicubically (align_corners=False, as transformers'
        ``interpolate_pos_encoding``) when the patch grid differs from the trained one."""
        w = self.position_embedding.weight
        if (gh, gw) == (self.grid, self.grid):
            return w
        C = w.shape[1]
        grid = w.reshape(1, self.grid, self.grid, C).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(gh * gw, C)


class Attention(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        d = config.hidden_size
        self.n_heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, layout: SpanLayout) -> torch.Tensor:
        L, d = x.shape
        q = self.q_proj(x).view(L, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(L, self.n_heads, self.head_dim)
        v = self.v_proj(x).view(L, self.n_heads, self.head_dim)
        return self.out_proj(span_attention(q, k, v, layout).reshape(L, d))


class MLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, layout):
        x = x + self.self_attn(self.layer_norm1(x), layout)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(nn.Module):
    """``vision_model.`` in SigLIP's names."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class SiglipViT(nn.Module):
    """SigLIP vision tower.  ``forward(pixels (N, C, H, W) in [-1, 1]) -> (N, (H/p)*(W/p), hidden)``: the last
    hidden state after ``post_layernorm``; ``patch_embed(pixels)``: the patch-embedding conv output alone
    (row-major patches, no position embedding); ``embed(pixels)``: patch + position embedding (the encoder
    input)."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        if not isinstance(config, SiglipVisionConfig):
            raise TypeError(f"SiglipViT expects a SiglipVisionConfig, got {type(config).__name__}")
        self.config = config
        self.vision_model = VisionTransformer(config)
        self.gradient_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """SigLIP's init (transformers' _init_weights): lecun-normal conv, normal(0, 1/sqrt(C)) positions,
        xavier-uniform projections with zero biases, xavier-uniform MLP with tiny normal biases, unit LayerNorms."""
        c = self.config
        emb = self.vision_model.embeddings
        fan_in = emb.patch_embedding.in_channels * c.patch_size * c.patch_size
        nn.init.trunc_normal_(emb.patch_embedding.weight, std=math.sqrt(1.0 / fan_in) / .87962566103423978)
        emb.patch_embedding.bias.zero_()
        nn.init.normal_(emb.position_embedding.weight, std=1.0 / math.sqrt(c.hidden_size))
        for m in self.modules():
            if isinstance(m, Attention):
                for lin in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
                    nn.init.xavier_uniform_(lin.weight)
                    lin.bias.zero_()
            elif isinstance(m, MLP):
                for lin in (m.fc1, m.fc2):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.normal_(lin.bias, std=1e-6)
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()

    def load_pretrained(self, weights) -> None:
        """Load a pretrained tower: a shipped name (``"tiny-world-vit"``, umm_ops/assets) or a .safetensors file of
        this module's state (``umm export`` of a vit run), which must match this config exactly."""
        from ..utils import optional_import, resolve_shipped_weights

        load_file = optional_import("safetensors.torch", "load_file")
        path = resolve_shipped_weights(weights, "vit_weights")
        state = load_file(os.fspath(path))
        try:
            self.load_state_dict(state)
        except RuntimeError as e:
            c = self.config
            raise ValueError(f"{os.fspath(path)}: not a vision tower of this config (hidden {c.hidden_size}, "
                             f"{c.num_hidden_layers} layers, patch {c.patch_size}, image {c.image_size}): "
                             f"{str(e)[:400]}") from None

    def _check_pixels(self, pixels) -> tuple[int, int]:
        c = self.config
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != c.num_channels:
            raise ValueError(f"pixels must be a (N, {c.num_channels}, H, W) tensor, got "
                             f"{tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__}")
        if not pixels.dtype.is_floating_point:
            raise TypeError(f"pixels must be a floating tensor in [-1, 1], got {pixels.dtype}")
        H, W = pixels.shape[-2:]
        p = c.patch_size
        if H % p or W % p or H == 0 or W == 0 or pixels.shape[0] == 0:
            raise ValueError(f"pixels: H and W must be positive multiples of the patch size {p} and N > 0, got "
                             f"shape {tuple(pixels.shape)}")
        return H // p, W // p

    def patch_embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, (H/p)*(W/p), hidden): the patch-embedding conv output, patches in row-major order."""
        self._check_pixels(pixels)
        conv = self.vision_model.embeddings.patch_embedding
        x = conv(pixels.to(conv.weight.dtype))                          # (N, hidden, H/p, W/p)
        return x.flatten(2).transpose(1, 2)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch + position embedding (N, T, hidden): the encoder's input."""
        gh, gw = self._check_pixels(pixels)
        return self.patch_embed(pixels) + self.vision_model.embeddings.position(gh, gw)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embed(pixels)                                          # (N, T, C)
        N, T, C = x.shape
        layout = SpanLayout.from_segments([[(T, "full")]] * N, device=x.device)
        h = x.reshape(N * T, C)                                         # packed: one "full" document per image
        for layer in self.vision_model.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(layer, h, layout, use_reentrant=False)
            else:
                h = layer(h, layout)
        return self.vision_model.post_layernorm(h).view(N, T, C)
