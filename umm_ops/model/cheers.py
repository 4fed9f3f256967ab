"""The Cheers-style unified multimodal model (papers.md section 1), on the fused ops.

    image (3, H, W) in [-1, 1] (the profile's pixel range: [0, 1] under the released Cheers conventions)
      -> frozen VAE encoder -> normalised packed latent x1 (n_vit, 128)          [CheersVAE.encode, no grad]
      -> x_t = t x1 + (1 - t) noise   (t = 1 for images to understand, t ~ sampler for images to generate;
                                       the noise is an input of forward: umm_ops.train.policy draws it)
      -> trainable VAE decoder copy -> pixels -> SigLIP ViT -> (n_vit, C)       [CheersVAE.decode_trainable, vit]
      -> und_projector: LayerNorm + 2x2 space-to-depth + Linear + GELU (compress_tokens) + Linear -> (n_vit/4, D)
      -> placed at the image's placeholder span of the packed sequence (<|image_pad|>; <image> under the released
         Cheers conventions, model.profile)
      -> Qwen2 LLM over the packed batch (span_attention: text causal, images full / noise)
      -> text: cross-entropy on the labelled tokens
      -> generated images: cascaded flow head on the LLM hidden states at the image's own tokens, with the ViT
         patch + position embedding of the decoded x_t as HiGate's detail input -> v (n_vit, 128); MSE to x1 - noise.

Parameter names: ``llm.*`` (transformers Qwen2ForCausalLM), ``vit.*`` (transformers SiglipVisionModel),
``vae.frozen.*`` (diffusers AutoencoderKLFlux2), ``vae.decoder_copy.*``, ``und_projector.*`` and ``head.*`` (the
released Cheers names below their module; see checkpoint.py for the converter).

Training policy stays out of the model: ``forward`` draws nothing.  The flow noise of each generated image
and the CFG prompt dropout are inputs (``noise=``, ``input_ids=``) that the training recipe draws with
:mod:`umm_ops.train.policy` (``model(batch, **policy.training_inputs(model, batch, seed, p))``); the timesteps come
with the packed batch.
"""
from __future__ import annotations

import bisect

import torch
from torch import nn

import umm_ops

from ..data.packing import ROLES
from ..data.tokenizer import load_tokenizer
from ..reference.tokens import space_to_depth
from .checkpoint import from_pretrained as _from_pretrained, save_pretrained as _save_pretrained
from .config import CheersConfig, preset
from .head import FlowHead, timestep_features
from .losses import add_noise, flow_loss, flow_target, text_loss
from .profile import get_profile
from .vae import CheersVAE

__all__ = ["CheersModel", "UnderstandingProjector", "LatentToLLM", "with_tokenizer"]

GENERATE = ROLES["generate"]


class UnderstandingProjector(nn.Module):
    """Cheers' und_projector: LayerNorm(C) -> 2x2 space-to-depth -> Linear(4C, 4C) -> GELU -> Linear(4C, D)."""

    def __init__(self, c_vit: int, d_llm: int, factor: int = 2, eps: float = 1e-5):
        super().__init__()
        self.factor = factor
        self.layernorm = nn.LayerNorm(c_vit, eps=eps)
        k = c_vit * factor * factor
        self.mlp = nn.Sequential(nn.Linear(k, k), nn.GELU(), nn.Linear(k, d_llm))

    def forward(self, feats: torch.Tensor, grid_hw) -> torch.Tensor:
        """feats (N, H*W, C) on the ViT grid (H, W) -> (N, (H/2)*(W/2), D)."""
        ln, fc = self.layernorm, self.mlp[0]
        y = umm_ops.compress_tokens(feats, grid_hw, ln.weight, ln.bias, fc.weight, fc.bias, self.factor, "gelu",
                                    ln.eps)
        return self.mlp[2](y)


class LatentToLLM(nn.Module):
    """Not in Cheers (``CheersConfig.latent_to_llm``): an image's noisy packed latent x_t (N, gh*gw, C) on the
    packed-latent grid, 2x2 space-to-depth onto the LLM grid, through ``proj`` = Linear(4C -> D), plus
    ``time`` = Linear(sinusoidal features of t -> D): added to the image's LLM inputs.  Both Linears start at zero,
    so a fresh model computes exactly what Cheers does; the LLM, which sees the noise of x_t only through the
    decoder copy's pixels otherwise, can then read the latent and the noise level it is denoising."""

    def __init__(self, channels: int, d_llm: int, factor: int = 2, freq_dim: int = 256):
        super().__init__()
        self.factor, self.freq_dim = factor, freq_dim
        self.proj = nn.Linear(channels * factor * factor, d_llm)
        self.time = nn.Linear(freq_dim, d_llm)
        for lin in (self.proj, self.time):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x_t: torch.Tensor, grid_hw, t: torch.Tensor) -> torch.Tensor:
        """x_t (N, gh*gw, C) on the packed-latent grid (gh, gw), t (N,) -> (N, gh*gw/4, D)."""
        N, L, _ = x_t.shape
        gh, gw, f = int(grid_hw[0]), int(grid_hw[1]), self.factor
        if L != gh * gw or gh % f or gw % f:
            raise ValueError(f"LatentToLLM: x_t has {L} tokens, expected a ({gh}, {gw}) grid whose sides are "
                             f"multiples of {f}")
        if t.shape != (N,):
            raise ValueError(f"LatentToLLM: t must have shape ({N},) (one per image), got {tuple(t.shape)}")
        x = space_to_depth(x_t, (gh, gw), f)
        w = self.proj.weight
        return self.proj(x.to(w.dtype)) + self.time(timestep_features(t, self.freq_dim).to(w.dtype))[:, None]


class CheersModel(nn.Module):
    def __init__(self, config: CheersConfig | str = "tiny", tokenizer=None):
        super().__init__()
        if isinstance(config, str):
            config = preset(config)
        if not isinstance(config, CheersConfig):
            raise TypeError(f"CheersModel expects a CheersConfig or a preset name, got {type(config).__name__}")
        from .llm import Qwen2LM
        from .vit import SiglipViT

        self.config = config.validate()
        self.profile = get_profile(config.profile)
        need = self.profile if self.profile.added_tokens else None   # its tokens added / checked
        if tokenizer is None:
            tokenizer = load_tokenizer(config.tokenizer, profile=need)
        elif need is not None:
            tokenizer = load_tokenizer(tokenizer, profile=need)
        self.tokenizer = tokenizer
        if self.tokenizer.vocab_size > config.llm["vocab_size"]:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the LLM vocabulary only "
                             f"{config.llm['vocab_size']}")
        llm_cfg, vit_cfg = config.llm_config(), config.vit_config()
        self.llm = Qwen2LM(llm_cfg)
        self.vit = SiglipViT(vit_cfg)
        if config.vit_weights is not None and not self.vit.vision_model.post_layernorm.weight.is_meta:
            self.vit.load_pretrained(config.vit_weights)
        self.vae = CheersVAE(config.vae)
        self.und_projector = UnderstandingProjector(vit_cfg.hidden_size, llm_cfg.hidden_size, config.compress,
                                                    config.projector_ln_eps)
        self.head = FlowHead(llm_cfg.hidden_size, llm_cfg.num_attention_heads, llm_cfg.num_key_value_heads,
                             vit_cfg.hidden_size, vit_cfg.num_attention_heads, config.vae.packed_channels, config.head)
        if config.latent_to_llm:
            self.latent_to_llm = LatentToLLM(config.vae.packed_channels, llm_cfg.hidden_size, config.compress,
                                             config.head.freq_dim)
        self.profile = self.profile       # the profile's RoPE rounding reaches the LLM and the head

    # ------------------------------------------------------------------ helpers
    @property
    def profile(self):
        """The conventions profile (umm_ops.model.profile.Profile); setting it also sets the RoPE rounding of the
        LLM and the flow head (``Profile.rope_inv_freq_in_model_dtype``)."""
        return self._profile

    @profile.setter
    def profile(self, p):
        self._profile = p
        if "llm" in self._modules:
            r = bool(p.rope_inv_freq_in_model_dtype)
            self.llm.round_rope_inv_freq = r
            for stage in (self.head.gen_projector, self.head.hi_projector):
                stage.round_rope_inv_freq = r

    @property
    def device(self) -> torch.device:
        return self.llm.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.model.embed_tokens.weight.dtype

    def pack_spec(self, budget: int = 1 << 20, **kw):
        """The PackSpec that matches this model for training (tokenizer, pixels per token, gen_mode, and the
        profile's image tokens, labels and text-only image); generation builds its prompts with
        ``text_only_image=None``."""
        from ..data.packing import PackSpec

        p = self.profile
        kw.setdefault("image_token_names", (p.image_start, p.image_end, p.image_pad))
        kw.setdefault("label_image_start", p.label_image_start)
        # the released training's black image at t = 0 for samples without images (generation passes None)
        kw.setdefault("text_only_image", (self.config.image_size, float(p.pixel_range[0])) if p.text_only_image
                      else None)
        return PackSpec(tokenizer=self.tokenizer, patch=self.config.pixels_per_token, gen_mode=self.config.gen_mode,
                        budget=budget, **kw)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def latent_shape(self, pixel_hw) -> tuple:
        """Shape (n_vit, packed_channels) of the normalised packed latent of one image of `pixel_hw` pixels: what
        ``vae.encode`` gives per image, and the shape of its flow noise."""
        gh, gw = self.vae.token_grid(pixel_hw)
        return gh * gw, self.config.vae.packed_channels

    def vit_grid(self, pixel_hw):
        p = self.config.vit_patch
        return int(pixel_hw[0]) // p, int(pixel_hw[1]) // p

    def detail_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """HiGate's `high`: the ViT's patch + position embedding of `pixels` (N, n_vit, C) (released Cheers calls
        ``vision_representation.embeddings``)."""
        return self.vit.embed(pixels)

    def image_features(self, x_t: torch.Tensor, pixel_hw, want_high: bool = False, t: torch.Tensor | None = None):
        """Normalised packed latents x_t (N, n_vit, 128) -> decoder copy -> ViT -> projector: LLM inputs (N, n, D)
        (and the detail embeddings of the decoded pixels).  t (N,): the images' flow times, read only with
        ``config.latent_to_llm`` (None: t = 1, images to understand)."""
        pix = self.vae.decode_trainable(x_t, pixel_hw).to(self.dtype)
        feats = self.vit(pix)
        emb = self.und_projector(feats, self.vit_grid(pixel_hw))
        if self.config.latent_to_llm:
            if t is None:
                t = torch.ones(x_t.shape[0], device=x_t.device)
            emb = emb + self.latent_to_llm(x_t, self.vit_grid(pixel_hw), t.to(x_t.device)).to(emb.dtype)
        return (emb, self.detail_embeddings(pix)) if want_high else (emb, None)

    def null_prompt_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Cheers' unconditional prompt: every token except the image start / end markers and image placeholders ->
        the profile's null token (same length, so image positions and layouts are unchanged): ``<|pad|>`` under
        the "umm" profile, ``<no_mean>`` under "cheers" (modeling_umm.py ``_build_uncond_full_ids``)."""
        tok, p = self.tokenizer, self.profile
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        for name in p.keep_in_null_prompt:
            keep |= input_ids == tok.special(name)
        null = tok.pad_id if p.null_token is None else tok.special(p.null_token)
        return torch.where(keep, input_ids, torch.full_like(input_ids, null))

    # ------------------------------------------------------------------ training forward
    def _check_input_ids(self, batch, input_ids) -> torch.Tensor:
        if input_ids is None:
            return batch.input_ids
        ref = batch.input_ids
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a tensor of shape {tuple(ref.shape)} (the batch's), got "
                             f"{type(input_ids).__name__}")
        if input_ids.shape != ref.shape:
            raise ValueError(f"input_ids must have the batch's shape {tuple(ref.shape)} (same tokens, e.g. with "
                             f"dropped prompts), got {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        return input_ids.to(ref.device, torch.long)

    def _check_noise(self, batch, noise) -> list:
        """`noise` checked against the batch's images: a list with a floating tensor of the image's latent shape
        for every generated image (None or a tensor of that shape elsewhere)."""
        n_img = len(batch.images)
        roles = batch.image_spans[:, 2].tolist()
        if noise is None:
            gen = [i for i, r in enumerate(roles) if r == GENERATE]
            if gen:
                i = gen[0]
                raise ValueError(f"image {i} is generated (role 'generate') and needs flow noise of shape "
                                 f"{self.latent_shape(batch.images[i].shape[-2:])}, but noise=None was given: pass "
                                 f"noise (one tensor per generated image, e.g. umm_ops.train.policy.flow_noise(model, "
                                 f"batch, seed)) or model(batch, **policy.training_inputs(...))")
            return [None] * n_img
        if not isinstance(noise, (list, tuple)) or len(noise) != n_img:
            got = f"{type(noise).__name__} of {len(noise)}" if isinstance(noise, (list, tuple)) else \
                type(noise).__name__
            raise ValueError(f"noise must be a list aligned with batch.images ({n_img} entries: a tensor per "
                             f"generated image, None for understanding images), got {got}")
        for i, (z, role) in enumerate(zip(noise, roles)):
            want = self.latent_shape(batch.images[i].shape[-2:])
            if z is None:
                if role == GENERATE:
                    raise ValueError(f"noise[{i}]: image {i} is generated (role 'generate') and needs flow noise "
                                     f"of shape {want}, got None")
                continue
            if not isinstance(z, torch.Tensor):
                raise ValueError(f"noise[{i}]: expected a tensor of shape {want} for image {i}, got "
                                 f"{type(z).__name__}")
            if tuple(z.shape) != want:
                raise ValueError(f"noise[{i}]: image {i} ({batch.images[i].shape[-2]}x{batch.images[i].shape[-1]} "
                                 f"px) needs flow noise of shape {want} (n_vit, packed_channels), got "
                                 f"{tuple(z.shape)}")
            if not z.is_floating_point():
                raise ValueError(f"noise[{i}]: flow noise must be a floating tensor, got dtype {z.dtype}")
        return list(noise)

    def forward(self, batch, noise: list | None = None, input_ids: torch.Tensor | None = None,
                return_outputs: bool = False, layer_rows: torch.Tensor | None = None,
                repa_features: bool = False) -> dict:
        """Losses of a PackedBatch (see umm_ops.data.packing).

        Returns dict(loss, text_loss, flow_loss, text_tokens, flow_images); with return_outputs also ``hidden``
        (L, D), ``v_pred`` / ``v_target`` (lists over the images given to the head, grouped by size) and
        ``v_images`` (for each of those groups, the indices into ``batch.images`` of its rows).
        The head sees the generated images, and with ``config.und_flow_loss`` (the released Cheers' choice) the
        understanding images too, at t = 1 with a zero target.

        noise: a list aligned with ``batch.images``: for each generated image (span role "generate") a tensor of its
            packed latent shape ``self.latent_shape((H, W))`` = (n_vit, packed_channels), the flow noise of
            x_t = t x1 + (1 - t) noise (any floating dtype / device: converted); None (or ignored) for understanding
            images, which run at x_t = x1 with zero noise.  Required when the batch holds a generated image.
        input_ids: replaces ``batch.input_ids`` (same shape), e.g. with the prompts dropped for classifier-free
            guidance (``umm_ops.train.policy.cfg_dropout``).
        layer_rows: optional (R,) token positions of the packed batch: the output also holds ``layer_hidden``
            (num_hidden_layers, R, D), every LLM layer's output at those positions (``Qwen2LM.forward_packed``), for
            a recipe's losses on intermediate states (e.g. CLEAR's latent bridge).
        repa_features: the output also holds ``repa_features`` (a list aligned with ``v_pred``: (N_g, n_vit, C), the
            head's REPA projections of its conv stage, ``HeadConfig.conv_repa``) and ``v_images``, for a recipe's
            representation-alignment loss against a vision tower's features of the clean pictures.

        Nothing is drawn here: the training recipe draws the noise and the prompt dropout
        (``umm_ops.train.policy.training_inputs``), the packer draws the timesteps.
        """
        cfg = self.config
        dev, dt = self.device, self.dtype
        if batch.device != dev:
            batch = batch.to(dev)
        ids = self._check_input_ids(batch, input_ids)
        noise = self._check_noise(batch, noise)
        embeds = self.llm.embed(ids)

        spans = batch.image_spans.tolist()
        grids = batch.image_grids.tolist()
        ts = batch.timesteps.tolist()
        # group images by pixel size so the VAE / ViT / head run batched
        groups: dict = {}
        for i, img in enumerate(batch.images):
            groups.setdefault(tuple(img.shape[-2:]), []).append(i)
        rows, img_embeds = [], []
        gen = []   # (grid, [span starts], t (N,), high, x1 - noise)
        for hw, idx in groups.items():
            pixels = torch.stack([batch.images[i] for i in idx]).to(dev)
            x1 = self.vae.encode(pixels)
            t = torch.tensor([ts[i] for i in idx], device=dev, dtype=torch.float32)
            is_gen = torch.tensor([spans[i][2] == GENERATE for i in idx], device=dev)
            if not bool(is_gen.any()):
                z = torch.zeros_like(x1)
            else:   # understanding images: zero noise (x_t = x1 and target 0 below whatever it is)
                z = torch.stack([noise[i].to(dev, x1.dtype) if spans[i][2] == GENERATE else torch.zeros_like(x1[j])
                                 for j, i in enumerate(idx)])
            x_t = torch.where(is_gen[:, None, None], add_noise(x1, z, t), x1)
            head_all = cfg.und_flow_loss
            emb, high = self.image_features(x_t.to(dt), hw, want_high=head_all or bool(is_gen.any()),
                                            t=torch.where(is_gen, t, 1.0))
            for j, i in enumerate(idx):
                start, length, _ = spans[i]
                if emb.shape[1] != length:
                    raise ValueError(f"image {i} ({hw[0]}x{hw[1]} px) gives {emb.shape[1]} LLM tokens but its span "
                                     f"in the batch has {length}: pack with model.pack_spec() "
                                     f"(patch = {cfg.pixels_per_token})")
                rows.append(torch.arange(start, start + length, device=dev))
                img_embeds.append(emb[j])
            g = [j for j, i in enumerate(idx) if head_all or spans[i][2] == GENERATE]
            if g:
                gi = torch.tensor(g, device=dev)
                # understanding images (und_flow_loss): t = 1, target 0 (released Cheers masks v by t < 1)
                target = torch.where(is_gen[gi][:, None, None], flow_target(x1[gi], z[gi]), 0.0)
                gen.append((tuple(grids[idx[g[0]]]), [spans[idx[j]][0] for j in g], t[gi], high[gi], target,
                            x_t[gi], [idx[j] for j in g]))
        if rows:
            embeds = embeds.index_put((torch.cat(rows),), torch.cat(img_embeds).to(embeds.dtype))
        layer_hidden = None
        if layer_rows is None:
            hidden = self.llm.forward_packed(embeds, batch.position_ids, batch.layout)
        else:
            hidden, layer_hidden = self.llm.forward_packed(embeds, batch.position_ids, batch.layout,
                                                           layer_rows=layer_rows)

        head = self.llm.lm_head
        l_text, n_text = text_loss(hidden, batch.labels, self.llm.logits,
                                   *((head.weight, head.bias) if cfg.fused_text_loss else ()))
        if repa_features and self.head.repa_projector is None:
            raise ValueError("repa_features=True needs a model whose head has HeadConfig.conv_repa = True")
        v_preds, targets, feats = [], [], []
        doc_starts = batch.doc_offsets.tolist() if self.head.needs_context else None
        for grid, starts, t, high, target, x_t, _ in gen:
            n = grid[0] * grid[1]
            pos = torch.cat([torch.arange(s, s + n, device=dev) for s in starts])
            h = hidden[pos].view(len(starts), n, -1)
            ctx = {}
            if self.head.needs_context:   # the image's prompt: its document's tokens before the image
                ctx = self.head.prompt_context(
                    hidden, embeds, [(doc_starts[bisect.bisect_right(doc_starts, s) - 1], s) for s in starts])
            v = self.head(h, t, high, grid, x_t, **ctx, features=repa_features)
            if repa_features:
                v, f = v
                feats.append(f)
            v_preds.append(v)
            targets.append(target)
        l_flow, _ = flow_loss(v_preds, targets)
        if l_flow is None:
            l_flow = hidden[:1].sum() * 0.0
        loss = cfg.text_loss_weight * l_text + cfg.flow_loss_weight * l_flow
        out = dict(loss=loss, text_loss=l_text.detach(), flow_loss=l_flow.detach(), text_tokens=n_text,
                   flow_images=sum(len(s) for _, s, *_ in gen))
        if return_outputs:
            out.update(hidden=hidden, v_pred=v_preds, v_target=targets)
        if return_outputs or repa_features:
            out["v_images"] = [g[-1] for g in gen]
        if repa_features:
            out["repa_features"] = feats
        if layer_hidden is not None:
            out["layer_hidden"] = layer_hidden
        return out

    # ------------------------------------------------------------------ inference (see generate.py)
    def generate_text(self, prompts, **kw):
        from .generate import generate_text

        return generate_text(self, prompts, **kw)

    def generate_image(self, prompts, **kw):
        from .generate import generate_image

        return generate_image(self, prompts, **kw)

    def edit_image(self, images, instructions, **kw):
        from .generate import edit_image

        return edit_image(self, images, instructions, **kw)

    def generate_refined(self, prompts, **kw):
        from .refine import generate_refined

        return generate_refined(self, prompts, **kw)

    def generate_then_answer(self, images, questions, **kw):
        from .clear import generate_then_answer

        return generate_then_answer(self, images, questions, **kw)

    # ------------------------------------------------------------------ checkpoints (see checkpoint.py)
    def save_pretrained(self, folder, **kw):
        return _save_pretrained(self, folder, **kw)

    @classmethod
    def from_pretrained(cls, folder, **kw) -> "CheersModel":
        return _from_pretrained(folder, model_class=cls, **kw)


def with_tokenizer(model: CheersModel, tokenizer: str) -> CheersModel:
    """A copy of `model` that reads and writes with `tokenizer` (a name or folder for ``CheersConfig.tokenizer``)
    whose ids extend the model's: the embedding table (tied to the LM head when the model ties them; an untied head
    grows too) gets rows for the new ids, each initialised to the mean of the rows of the pieces the model's own
    tokenizer splits that token's text into (so "<answer>" starts near what the model read as "<answer>" before,
    and the new tokens start distinct: rows all equal to one mean row left the model confusing them after 600 steps
    of clear-sft); every other weight is copied.  The tokenizer must keep the model's ids: its first
    ``vocab_size`` tokens equal the old tokenizer's.  Training policy stays with the caller (e.g. clear-sft)."""
    import copy

    from ..data.tokenizer import load_tokenizer

    new_tok = load_tokenizer(tokenizer)
    old_tok = model.tokenizer
    V = model.config.llm["vocab_size"]
    n_old = old_tok.vocab_size
    if new_tok.vocab_size < n_old:
        raise ValueError(f"with_tokenizer: {tokenizer!r} has {new_tok.vocab_size} ids, fewer than the model's "
                         f"tokenizer ({n_old})")
    probe = list(range(n_old))
    if new_tok.decode(probe) != old_tok.decode(probe):
        raise ValueError(f"with_tokenizer: {tokenizer!r} does not keep the ids 0..{n_old - 1} of the model's tokenizer")
    cfg = copy.deepcopy(model.config)
    cfg.tokenizer = tokenizer
    cfg.llm = {**cfg.llm, "vocab_size": max(V, new_tok.vocab_size)}
    out = CheersModel(cfg, tokenizer=new_tok)
    sd = model.state_dict()
    new_sd = out.state_dict()
    pieces = []
    for i in range(V, cfg.llm["vocab_size"]):
        ids = old_tok.encode(new_tok.decode([i])) if i < new_tok.vocab_size else []
        pieces.append(ids)
    for k, v in sd.items():
        w = new_sd[k]
        if w.shape == v.shape:
            new_sd[k] = v.clone()
        elif w.dim() >= 1 and w.shape[1:] == v.shape[1:] and w.shape[0] > v.shape[0]:   # embedding / head rows
            grown = torch.stack([v[ids].mean(0) if ids else v.mean(0) for ids in pieces])
            new_sd[k] = torch.cat([v, grown.to(v.dtype)])
        else:
            raise ValueError(f"with_tokenizer: cannot map {k} from {tuple(v.shape)} to {tuple(w.shape)}")
    out.load_state_dict(new_sd)
    out.train(model.training)
    return out
