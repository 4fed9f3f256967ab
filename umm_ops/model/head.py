"""Cheers' cascaded flow-matching head, on the fused ops.

    LLM hidden states at the image tokens (N, n, D_llm), t (N,)
      -> semantic stage: adaLN-Zero blocks at the LLM width (1-D RoPE theta 1e4 over 0..n-1)
      -> final adaLN layer + Linear(D_llm -> 4 C_vit) + 2x2 depth-to-space  (``umm_ops.expand_tokens``)
      -> HiGate: LayerNorm(low + g * high), g = Linear(SiLU(Linear(low))) one unbounded scalar per token
         (``umm_ops.gated_detail_residual``), high = ViT patch (+ position) embedding of the decoded noisy image
      -> detail stage: adaLN-Zero blocks at the ViT width (RoPE over arange(4n/2) repeated twice, as released)
      -> final adaLN layer -> packed-latent velocity (N, 4n, 128).
      -> (option, not in Cheers: ``HeadConfig.conv_widths``) ConvStage: a small UNet on the unpacked latent grid
         (N, 32, 4gh, 4gw) reading x_t, that velocity and the detail stage's tokens, adding a correction through a
         zero-initialised last convolution.

Every block's modulation is ``adaln_modulate`` (RMSNorm with learnable weight, x * (1 + scale) + shift in fp32) and
its residuals ``gated_residual``; attention is ``span_attention`` over the images of a batch packed back to back, one
bidirectional ("full") document per image, so images of different sizes share one call.  Module and parameter
names follow the released Cheers checkpoint (``time_embed.mlp_1``, ``gen_projector.diffusion_head_a.{i}``,
``diffusion_head_b``, ``hi_gate.gate``, ``hi_projector``), zero-initialised where Cheers zero-initialises (every
block's adaLN projection, HiGate's last Linear).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import umm_ops

__all__ = ["timestep_features", "TimestepEmbedder", "RMSNorm", "HeadBlock", "FinalLayer", "HeadStage", "HiGate", "FlowHead",
           "ConvStage", "prompt_context", "rope_cos_sin", "apply_rope", "image_layout"]


# ----------------------------------------------------------------------------------- small pieces
def prompt_context(hidden: torch.Tensor, spans) -> tuple:
    """The conv stage's prompt context: rows [start, end) of `hidden` (L, D) for each (start, end) of `spans`,
    zero-padded to the longest -> (context (N, Lmax, D), mask (N, Lmax) bool)."""
    spans = [(int(a), int(b)) for a, b in spans]
    if not spans or any(b <= a for a, b in spans):
        raise ValueError(f"prompt_context: every image needs a non-empty prompt span (start < end), got {spans}")
    L = max(b - a for a, b in spans)
    ctx = hidden.new_zeros(len(spans), L, hidden.shape[-1])
    mask = torch.zeros(len(spans), L, dtype=torch.bool, device=hidden.device)
    for i, (a, b) in enumerate(spans):
        ctx[i, : b - a] = hidden[a:b]
        mask[i, : b - a] = True
    return ctx, mask


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Raw t (N,) -> sinusoidal features (N, dim) in float32, ordered [cos, sin] (a zero column when dim is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1, 1).float() * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Raw t in [0, 1] (t = 1 clean) -> sinusoidal features [cos, sin] -> one MLP per head width."""

    def __init__(self, width_1: int, width_2: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp_1 = nn.Sequential(nn.Linear(freq_dim, width_1), nn.SiLU(), nn.Linear(width_1, width_1))
        self.mlp_2 = nn.Sequential(nn.Linear(freq_dim, width_2), nn.SiLU(), nn.Linear(width_2, width_2))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_features(t, self.freq_dim, self.max_period)

    def forward(self, t: torch.Tensor, dtype=None):
        f = self.features(t).to(dtype or self.mlp_1[0].weight.dtype)
        return self.mlp_1(f), self.mlp_2(f)


class RMSNorm(nn.Module):
    """Holds the learnable weight of an RMSNorm that adaln_modulate applies (fused with the modulation)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype, inv_freq_dtype=None):
    """(L,) positions -> cos, sin (L, head_dim) in the rotate-half layout (frequencies repeated twice); the inverse
    frequencies rounded to `inv_freq_dtype` first when given (see umm_ops.model.llm.rope_cos_sin)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    if inv_freq_dtype is not None:
        inv = inv.to(inv_freq_dtype).float()
    f = positions.float()[:, None] * inv[None]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (L, H, D) with cos / sin (L, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def image_layout(n_images: int, tokens_per_image: int, device) -> umm_ops.SpanLayout:
    """Packed layout of `n_images` independent bidirectional images of the same length."""
    return umm_ops.SpanLayout.from_segments([[(tokens_per_image, "full")]] * n_images, device=device)


class HeadAttention(nn.Module):
    """Bias-free GQA attention with RoPE over packed images (span_attention, one 'full' document per image)."""

    def __init__(self, width: int, heads: int, kv_heads: int):
        super().__init__()
        if width % heads or heads % kv_heads:
            raise ValueError(f"head attention: width {width} must split into {heads} heads and heads into "
                             f"{kv_heads} KV heads")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.q_proj = nn.Linear(width, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, width, bias=False)

    def forward(self, x, cos, sin, layout):
        N, L, C = x.shape
        x = x.reshape(N * L, C)
        q = apply_rope(self.q_proj(x).view(N * L, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(N * L, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(N * L, self.kv_heads, self.head_dim)
        o = umm_ops.span_attention(q, k, v, layout)
        return self.o_proj(o.reshape(N * L, -1)).view(N, L, C)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HeadBlock(nn.Module):
    """adaLN-Zero transformer block: chunks (shift, scale, gate) for attention then (shift, scale, gate) for the MLP."""

    def __init__(self, width: int, heads: int, kv_heads: int, mlp_ratio: int = 4, eps: float = 1e-6):
        super().__init__()
        self.attn = HeadAttention(width, heads, kv_heads)
        self.mlp = MLP(width, width * mlp_ratio)
        self.input_layernorm = RMSNorm(width, eps)
        self.post_attention_layernorm = RMSNorm(width, eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x, c, cos, sin, layout):
        """x (N, L, C) tokens, c (N, C) conditioning."""
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        n1, n2 = self.input_layernorm, self.post_attention_layernorm
        h = umm_ops.adaln_modulate(x, sh1, sc1, n1.eps, "rms", n1.weight)
        x = umm_ops.gated_residual(x, g1, self.attn(h, cos, sin, layout))
        h = umm_ops.adaln_modulate(x, sh2, sc2, n2.eps, "rms", n2.weight)
        return umm_ops.gated_residual(x, g2, self.mlp(h))


class FinalLayer(nn.Module):
    """RMSNorm + adaLN (shift, scale) + Linear.  With `expand_grid` the Linear is fused with the 2x2 depth-to-space."""

    def __init__(self, width: int, out: int, eps: float = 1e-6):
        super().__init__()
        self.norm_final = RMSNorm(width, eps)
        self.linear = nn.Linear(width, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c, expand_grid=None):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        h = umm_ops.adaln_modulate(x, shift, scale, self.norm_final.eps, "rms", self.norm_final.weight)
        if expand_grid is None:
            return self.linear(h)
        return umm_ops.expand_tokens(h, expand_grid, self.linear.weight, self.linear.bias, 2)


class HeadStage(nn.Module):
    """``diffusion_head_a`` (blocks) + ``diffusion_head_b`` (final layer)."""

    def __init__(self, width, heads, kv_heads, layers, out, mlp_ratio=4, eps=1e-6, theta=1e4):
        super().__init__()
        self.head_dim, self.theta = width // heads, theta
        self.round_rope_inv_freq = False     # as Qwen2LM.round_rope_inv_freq (set by CheersModel's profile)
        self.diffusion_head_a = nn.ModuleList(HeadBlock(width, heads, kv_heads, mlp_ratio, eps) for _ in range(layers))
        self.diffusion_head_b = FinalLayer(width, out, eps)

    def forward(self, x, c, positions, expand_grid=None):
        N, L, _ = x.shape
        cos, sin = rope_cos_sin(positions, self.head_dim, self.theta, x.dtype,
                                x.dtype if self.round_rope_inv_freq else None)
        cos, sin = cos.repeat(N, 1), sin.repeat(N, 1)
        layout = image_layout(N, L, x.device)
        for blk in self.diffusion_head_a:
            x = blk(x, c, cos, sin, layout)
        return self.diffusion_head_b(x, c, expand_grid)


class HiGate(nn.Module):
    """LayerNorm(low + g * high) with g = gate(low) = Linear(C -> 1)(SiLU(Linear(C -> C)(low))), unbounded."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        self.layer_norm = nn.LayerNorm(width, eps=eps)
        nn.init.zeros_(self.gate[2].weight)
        nn.init.zeros_(self.gate[2].bias)

    def forward(self, low, high):
        hidden = F.silu(self.gate[0](low))
        return umm_ops.gated_detail_residual(low, high, hidden, self.gate[2].weight, self.gate[2].bias,
                                             self.layer_norm.weight, self.layer_norm.bias, self.layer_norm.eps)

    def gate_values(self, low):
        """The per-token gate g (..., 1) (for heat maps)."""
        return self.gate(low)


class ConvBlock(nn.Module):
    """Residual block: GroupNorm, SiLU, 3x3 conv, FiLM (shift, scale) from the conditioning vector, GroupNorm, SiLU,
    zero-initialised 3x3 conv; a 1x1 conv on the skip when the channels change."""

    def __init__(self, cin: int, cout: int, cond: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(cond, 2 * cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, e):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(e))[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class ConvAttention(nn.Module):
    """The feature map attends to itself, to the detail stage's tokens (N, L, C) and, with a context width, to the
    prompt's hidden states (N, Lc, D) where ``context_mask`` (N, Lc) is True; zero-initialised output."""

    def __init__(self, width: int, token_width: int, heads: int, context_width: int = 0):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(8, width)
        self.q, self.kv = nn.Linear(width, width), nn.Linear(width, 2 * width)
        self.kv_tokens = nn.Linear(token_width, 2 * width) if token_width else None
        self.kv_context = nn.Linear(context_width, 2 * width) if context_width else None
        self.o = nn.Linear(width, width)
        nn.init.zeros_(self.o.weight)
        nn.init.zeros_(self.o.bias)

    def forward(self, x, tokens, context=None, context_mask=None):
        N, C, H, W = x.shape
        y = self.norm(x).flatten(2).transpose(1, 2)                                    # (N, HW, C)
        kv = [self.kv(y)]
        if self.kv_tokens is not None:
            kv.append(self.kv_tokens(tokens.to(y.dtype)))
        mask = None
        if self.kv_context is not None:
            keep = torch.ones(N, sum(z.shape[1] for z in kv), dtype=torch.bool, device=x.device)
            kv.append(self.kv_context(context.to(y.dtype)))
            mask = torch.cat([keep, context_mask.to(x.device, torch.bool)], dim=1)[:, None, None, :]
        k, v = torch.cat(kv, dim=1).chunk(2, dim=-1)
        split = lambda z: z.reshape(N, -1, self.heads, C // self.heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(self.q(y)), split(k), split(v), attn_mask=mask)
        return x + self.o(o.transpose(1, 2).reshape(N, H * W, C)).transpose(1, 2).reshape(N, C, H, W)


class ConvStage(nn.Module):
    """A small UNet on the unpacked latent grid (not in Cheers; ``HeadConfig.conv_widths``).

    Inputs, on the latent grid (N, c, 4gh, 4gw) with c = packed channels / 4: the noisy latent x_t and the detail
    stage's velocity (both unpacked by 2x2 depth-to-space, ``F.pixel_shuffle``, whose channel order c*4 + di*2 + dj
    is the packing's) and two coordinate channels; the detail stage's input tokens (HiGate's output, (N, 4n, C))
    through Linear(C -> 4 w0) and the same depth-to-space.  Two ConvBlocks per level with FiLM from the detail
    stage's conditioning (the timestep embedding) plus the tokens' mean; every level but the first halves the grid
    and attends to itself and the tokens.  The way up mirrors it with skip connections; the last convolution is
    zero-initialised and its output, packed back, is added to the velocity: at initialisation the head is Cheers'.
    With ``inputs = "latent"`` it reads x_t and the coordinates only (FiLM from the timestep embedding, attention to
    itself), plus the prompt context when it has one: a text-to-image UNet beside the token stages.  With
    ``inputs = "alone"`` it reads the same and FlowHead returns its output as the whole velocity (the token stages
    are not run).  Translation-equivariant where the token stages are not (docs/results/base, "A peer generator").
    """

    parallel_atomic = True   # its ModuleLists hold layers of one small UNet: not blocks to checkpoint or shard

    def __init__(self, packed_channels: int, token_width: int, widths, heads: int, context_width: int = 0,
                 inputs: str = "all"):
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.context_width = int(context_width)
        self.read_tokens = inputs == "all"          # "latent" / "alone": x_t (and the prompt context) only
        c, w0 = packed_channels // 4, self.widths[0]
        cond = token_width                          # the FiLM vector's width (the timestep embedding's)
        self.conv_in = nn.Conv2d((2 * c if self.read_tokens else c) + 2, w0, 3, padding=1)
        self.token_map = nn.Linear(token_width, 4 * w0) if self.read_tokens else None
        self.pool = nn.Linear(token_width, token_width) if self.read_tokens else None
        self.pool_context = nn.Linear(context_width, cond) if context_width else None
        token_width = token_width if self.read_tokens else 0
        self.down, self.down_blocks, self.down_attn = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.up, self.up_blocks, self.up_attn = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i, w in enumerate(self.widths):
            prev = self.widths[i - 1] if i else w0
            self.down.append(nn.Conv2d(prev, w, 3, stride=2, padding=1) if i else nn.Identity())
            self.down_blocks.append(nn.ModuleList([ConvBlock(w, w, cond), ConvBlock(w, w, cond)]))
            self.down_attn.append(ConvAttention(w, token_width, heads, context_width) if i else nn.Identity())
        for i in reversed(range(len(self.widths))):
            w = self.widths[i]
            self.up_blocks.append(nn.ModuleList([ConvBlock(2 * w, w, cond), ConvBlock(w, w, cond)]))
            self.up_attn.append(ConvAttention(w, token_width, heads, context_width) if i else nn.Identity())
            self.up.append(nn.ConvTranspose2d(w, self.widths[i - 1], 2, stride=2) if i else nn.Identity())
        self.norm_out = nn.GroupNorm(8, w0)
        self.conv_out = nn.Conv2d(w0, c, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_t, v, tokens, c, fine_hw, context=None, context_mask=None, features: bool = False):
        """x_t, v (N, Hf*Wf, packed); tokens (N, Hf*Wf, C); c (N, C); fine_hw = (Hf, Wf); with a context width,
        context (N, Lc, D) and context_mask (N, Lc) bool (True: a prompt token; at least one per row) -> correction
        (N, Hf*Wf, packed).  v and tokens are read only with inputs = "all" (else they may be None); the output has
        v's dtype (c's without v).  With `features`, also the second level's map after its attention (the grid
        halved once: Hf x Wf) as (N, Hf*Wf, widths[1]), row-major (what ``HeadConfig.conv_repa`` projects)."""
        N, L, P = x_t.shape
        Hf, Wf = fine_hw
        if self.context_width:
            if context is None or context_mask is None or context.dim() != 3 or context.shape[0] != N \
                    or context.shape[2] != self.context_width or tuple(context_mask.shape) != context.shape[:2]:
                raise ValueError(f"ConvStage: conv_context needs context (N, Lc, {self.context_width}) with N = {N} "
                                 f"and context_mask (N, Lc), got "
                                 f"{None if context is None else tuple(context.shape)} and "
                                 f"{None if context_mask is None else tuple(context_mask.shape)}")
            if not bool(context_mask.any(dim=1).all()):
                raise ValueError("ConvStage: every image needs at least one prompt token in context_mask")
        step = 2 ** (len(self.widths) - 1)
        if (2 * Hf) % step or (2 * Wf) % step:
            raise ValueError(f"ConvStage: a latent grid of {2 * Hf}x{2 * Wf} cannot be halved "
                             f"{len(self.widths) - 1} times (head.conv_widths = {self.widths}): use fewer levels")
        grid = lambda z: F.pixel_shuffle(z.transpose(1, 2).reshape(N, -1, Hf, Wf), 2)
        dt, dev = (v.dtype if v is not None else c.dtype), c.device
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, 2 * Hf, device=dev, dtype=dt),
                                torch.linspace(-1, 1, 2 * Wf, device=dev, dtype=dt), indexing="ij")
        coords = torch.stack([yy, xx]).expand(N, 2, 2 * Hf, 2 * Wf)
        if self.read_tokens:
            tokens = tokens.to(dt)
            h = self.conv_in(torch.cat([grid(x_t.to(dt)), grid(v), coords], dim=1)) + grid(self.token_map(tokens))
            e = c.to(dt) + self.pool(tokens.mean(dim=1))
        else:
            h = self.conv_in(torch.cat([grid(x_t.to(dt)), coords], dim=1))
            e = c.to(dt)
        if self.context_width:
            context = context.to(dt)
            m = context_mask.to(device=dev, dtype=dt)[..., None]
            e = e + self.pool_context((context * m).sum(1) / m.sum(1))
        skips = []
        for down, blocks, attn in zip(self.down, self.down_blocks, self.down_attn):
            h = down(h)
            for blk in blocks:
                h = blk(h, e)
            h = attn(h, tokens, context, context_mask) if isinstance(attn, ConvAttention) else h
            skips.append(h)
        level1 = skips[1] if len(skips) > 1 else None
        for up, blocks, attn in zip(self.up, self.up_blocks, self.up_attn):
            h = blocks[1](blocks[0](torch.cat([h, skips.pop()], dim=1), e), e)
            h = attn(h, tokens, context, context_mask) if isinstance(attn, ConvAttention) else h
            h = up(h)
        out = self.conv_out(F.silu(self.norm_out(h)))                                  # (N, c, 2Hf, 2Wf)
        out = F.pixel_unshuffle(out, 2).reshape(N, P, L).transpose(1, 2)
        if not features:
            return out
        if len(self.widths) < 2:
            raise ValueError(f"ConvStage: features need a second level, head.conv_widths = {self.widths}")
        return out, level1.flatten(2).transpose(1, 2)


class FlowHead(nn.Module):
    """The whole cascaded head.  Widths: D = LLM hidden, C = ViT hidden; out = packed latent channels."""

    def __init__(self, d_llm, llm_heads, kv_heads, c_vit, vit_heads, out_channels, cfg):
        super().__init__()
        self.time_embed = TimestepEmbedder(d_llm, c_vit, cfg.freq_dim)
        self.gen_projector = HeadStage(d_llm, llm_heads, kv_heads, cfg.semantic_layers, 4 * c_vit, cfg.mlp_ratio,
                                       cfg.norm_eps, cfg.rope_theta)
        self.hi_gate = HiGate(c_vit, cfg.gate_ln_eps)
        self.hi_projector = HeadStage(c_vit, vit_heads, kv_heads, cfg.detail_layers, out_channels, cfg.mlp_ratio,
                                      cfg.norm_eps, cfg.rope_theta)
        self.latent_input, self.prediction = bool(cfg.latent_input), cfg.prediction
        self.clean_min_gap = float(cfg.clean_min_gap)
        if self.latent_input:
            self.latent_embed = nn.Linear(out_channels, c_vit)
            nn.init.zeros_(self.latent_embed.weight)
            nn.init.zeros_(self.latent_embed.bias)
        self.conv_stage = ConvStage(out_channels, c_vit, cfg.conv_widths, cfg.conv_heads,
                                    d_llm if cfg.conv_context else 0, cfg.conv_inputs) if cfg.conv_widths else None
        self.needs_context = bool(cfg.conv_widths) and bool(cfg.conv_context)
        self.context_norm = nn.RMSNorm(d_llm, eps=cfg.norm_eps) \
            if self.needs_context and cfg.conv_context_embeddings else None
        self.conv_alone = bool(cfg.conv_widths) and cfg.conv_inputs == "alone"
        self.repa_projector = nn.Sequential(
            nn.Linear(cfg.conv_widths[1], 2 * c_vit), nn.SiLU(), nn.Linear(2 * c_vit, 2 * c_vit), nn.SiLU(),
            nn.Linear(2 * c_vit, c_vit)) if cfg.conv_repa else None

    def prompt_context(self, hidden: torch.Tensor, embeds: torch.Tensor, spans) -> dict:
        """The keyword arguments of ``forward`` that carry each image's prompt: rows [start, end) of the LLM's final
        hidden states `hidden` (L, D) and, with ``conv_context_embeddings``, of its input embeddings `embeds` (L, D),
        for each (start, end) of `spans`; {} when the head reads no prompt."""
        if not self.needs_context:
            return {}
        spans = [(int(a), int(b)) for a, b in spans]
        context, mask = prompt_context(hidden, spans)
        out = dict(context=context, context_mask=mask)
        if self.context_norm is not None:
            if embeds is None or tuple(embeds.shape) != tuple(hidden.shape):
                raise ValueError(f"FlowHead.prompt_context: conv_context_embeddings needs the input embeddings "
                                 f"{tuple(hidden.shape)} beside the hidden states, got "
                                 f"{None if embeds is None else tuple(embeds.shape)}")
            out["context_embeds"] = prompt_context(embeds, spans)[0]
        return out

    def forward(self, h: torch.Tensor, t: torch.Tensor, high: torch.Tensor, grid_hw,
                x_t: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, context_embeds: torch.Tensor | None = None,
                features: bool = False):
        """h (N, gh*gw, D) LLM hidden states of N images with the same LLM token grid (gh, gw); t (N,);
        high (N, 4*gh*gw, C) ViT patch embeddings of the decoded x_t; x_t (N, 4*gh*gw, out) the noisy packed latent
        itself, needed by the options that are not Cheers' (``HeadConfig.latent_input``, ``conv_widths`` and
        ``prediction = "clean"``); context (N, Lc, D) / context_mask (N, Lc): the LLM hidden states of each image's
        prompt, read only with ``conv_context``; context_embeds (N, Lc, D): the same tokens' input embeddings, read
        only with ``conv_context_embeddings`` (``FlowHead.prompt_context`` builds all three).  Returns the velocity v
        (N, 4*gh*gw, out); with `features` (needs ``conv_repa``) the pair (v, f): f (N, 4*gh*gw, C) the REPA
        projection of the conv stage's second level, one row per ViT patch, row-major."""
        if features and self.repa_projector is None:
            raise ValueError("FlowHead: features=True needs a head with HeadConfig.conv_repa = True (no "
                             "repa_projector here)")
        N, n, D = h.shape
        gh, gw = int(grid_hw[0]), int(grid_hw[1])
        if n != gh * gw:
            raise ValueError(f"FlowHead: h has {n} tokens per image, expected gh*gw = {gh}*{gw}")
        fine = (2 * gh, 2 * gw)
        if high.shape[:2] != (N, 4 * n):
            raise ValueError(f"FlowHead: high must be (N, 4*gh*gw, C) = ({N}, {4 * n}, C), got {tuple(high.shape)}")
        needs_x = self.latent_input or self.prediction == "clean" or self.conv_stage is not None
        if needs_x and (x_t is None or x_t.shape[:2] != (N, 4 * n)):
            raise ValueError(f"FlowHead: latent_input / conv_widths / prediction='clean' need x_t (N, 4*gh*gw, out) = "
                             f"({N}, {4 * n}, out), got {None if x_t is None else tuple(x_t.shape)}")
        c1, c2 = self.time_embed(t, h.dtype)
        if self.context_norm is not None and context is not None:
            if context_embeds is None or context_embeds.shape != context.shape:
                raise ValueError(f"FlowHead: conv_context_embeddings needs context_embeds shaped as context "
                                 f"{tuple(context.shape)}, got "
                                 f"{None if context_embeds is None else tuple(context_embeds.shape)}")
            context = context + self.context_norm(context_embeds.to(context.dtype))
        if self.conv_alone:   # the stage's output is the velocity; the token stages are not run
            out = self.conv_stage(x_t, None, None, c2, fine, context, context_mask, features=features)
            if features:
                out, f = out
            out = out if self.prediction == "velocity" else self._from_clean(out, x_t, t)
            return (out, self.repa_projector(f)) if features else out
        pos = torch.arange(n, device=h.device)
        low = self.gen_projector(h, c1, pos, expand_grid=fine)                 # (N, 4n, C)
        high = high.to(low.dtype)
        if self.latent_input:
            high = high + self.latent_embed(x_t.to(low.dtype))
        x = self.hi_gate(low, high)
        pos2 = torch.arange(2 * n, device=h.device).repeat(2)                   # arange(L/2) twice, as released
        out = self.hi_projector(x, c2, pos2)
        f = None
        if self.conv_stage is not None:
            corr = self.conv_stage(x_t, out, x, c2, fine, context, context_mask, features=features)
            if features:
                corr, f = corr
            out = out + corr
        if self.prediction != "velocity":
            out = self._from_clean(out, x_t, t)
        return (out, self.repa_projector(f)) if features else out

    def _from_clean(self, out, x_t, t):
        # the head predicts the clean latent x1; v = (x1_hat - x_t) / (1 - t), 1 - t kept >= clean_min_gap
        gap = (1.0 - t.to(out.dtype)).clamp_min(self.clean_min_gap)
        return (out - x_t.to(out.dtype)) / gap[:, None, None]
