"""The Cheers-style unified multimodal model (papers.md section 1), on the fused ops.

    image (3, H, W) in [-1, 1]
      -> frozen VAE encoder -> normalised packed latent x1 (n_vit, 128)          [CheersVAE.encode, no grad]
      -> x_t = t x1 + (1 - t) noise   (t = 1 for images to understand, t ~ sampler for images to generate)
      -> trainable VAE decoder copy -> pixels -> SigLIP ViT -> (n_vit, C)       [CheersVAE.decode_trainable, vit]
      -> und_projector: LayerNorm + 2x2 space-to-depth + Linear + GELU (compress_tokens) + Linear -> (n_vit/4, D)
      -> placed at the image's <|image_pad|> span of the packed sequence
      -> Qwen2 LLM over the packed batch (span_attention: text causal, images full / noise)
      -> text: cross-entropy on the labelled tokens
      -> generated images: cascaded flow head on the LLM hidden states at the image's own tokens, with the ViT
         patch + position embedding of the decoded x_t as HiGate's detail input -> v (n_vit, 128); MSE to x1 - noise.

Parameter names: ``llm.*`` (transformers Qwen2ForCausalLM), ``vit.*`` (transformers SiglipVisionModel),
``vae.frozen.*`` (diffusers AutoencoderKLFlux2), ``vae.decoder_copy.*``, ``und_projector.*`` and ``head.*`` (the
released Cheers names below their module; see checkpoint.py for the converter).
"""
from __future__ import annotations

import torch
from torch import nn

import umm_ops

from ..data.packing import ROLES, _mix
from ..data.tokenizer import load_tokenizer
from .checkpoint import from_pretrained as _from_pretrained, save_pretrained as _save_pretrained
from .config import CheersConfig, preset
from .head import FlowHead
from .losses import add_noise, flow_loss, flow_target, text_loss
from .vae import CheersVAE

__all__ = ["CheersModel", "UnderstandingProjector"]

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
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        if self.tokenizer.vocab_size > config.llm["vocab_size"]:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the LLM vocabulary only "
                             f"{config.llm['vocab_size']}")
        llm_cfg, vit_cfg = config.llm_config(), config.vit_config()
        self.llm = Qwen2LM(llm_cfg)
        self.vit = SiglipViT(vit_cfg)
        self.vae = CheersVAE(config.vae)
        self.und_projector = UnderstandingProjector(vit_cfg.hidden_size, llm_cfg.hidden_size, config.compress,
                                                    config.projector_ln_eps)
        self.head = FlowHead(llm_cfg.hidden_size, llm_cfg.num_attention_heads, llm_cfg.num_key_value_heads,
                             vit_cfg.hidden_size, vit_cfg.num_attention_heads, config.vae.packed_channels, config.head)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.llm.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.model.embed_tokens.weight.dtype

    def pack_spec(self, budget: int = 1 << 20, **kw):
        """The PackSpec that matches this model (tokenizer, pixels per token, gen_mode)."""
        from ..data.packing import PackSpec

        return PackSpec(tokenizer=self.tokenizer, patch=self.config.pixels_per_token, gen_mode=self.config.gen_mode,
                        budget=budget, **kw)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def vit_grid(self, pixel_hw):
        p = self.config.vit_patch
        return int(pixel_hw[0]) // p, int(pixel_hw[1]) // p

    def detail_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """HiGate's `high`: the ViT's patch + position embedding of `pixels` (N, n_vit, C) (released Cheers calls
        ``vision_representation.embeddings``)."""
        return self.vit.embed(pixels)

    def image_features(self, x_t: torch.Tensor, pixel_hw, want_high: bool = False):
        """Normalised packed latents x_t (N, n_vit, 128) -> decoder copy -> ViT -> projector: LLM inputs (N, n, D)
        (and the detail embeddings of the decoded pixels)."""
        pix = self.vae.decode_trainable(x_t, pixel_hw).to(self.dtype)
        feats = self.vit(pix)
        emb = self.und_projector(feats, self.vit_grid(pixel_hw))
        return (emb, self.detail_embeddings(pix)) if want_high else (emb, None)

    def null_prompt_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Cheers' unconditional prompt: every token except the vision markers and image placeholders -> <|pad|>
        (same length, so image positions and layouts are unchanged)."""
        tok = self.tokenizer
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        for name in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>"):
            keep |= input_ids == tok.special(name)
        return torch.where(keep, input_ids, torch.full_like(input_ids, tok.pad_id))

    @staticmethod
    def _sample_rng(seed: int, sample_id: int, *key: int) -> torch.Generator:
        return torch.Generator().manual_seed(_mix(seed, sample_id, *key))

    def _cfg_dropout(self, batch, generator, seed) -> torch.Tensor:
        """Replace the prompt of each document holding a generated image by the null prompt with prob. cfg_dropout."""
        ids = batch.input_ids
        p = self.config.cfg_dropout
        spans = batch.image_spans
        if not self.training or p <= 0 or spans.shape[0] == 0 or not bool((spans[:, 2] == GENERATE).any()):
            return ids
        offs = batch.doc_offsets.to(ids.device)
        gen_starts = spans[spans[:, 2] == GENERATE, 0].contiguous().to(ids.device)
        docs = torch.unique(torch.searchsorted(offs, gen_starts, right=True) - 1)
        if seed is None:
            u = torch.rand(docs.shape[0], generator=generator, device="cpu")
        else:
            sids = batch.sample_ids.tolist()
            u = torch.cat([torch.rand(1, generator=self._sample_rng(seed, sids[d], 0xD20F)) for d in docs.tolist()])
        drop = u.to(ids.device) < p
        doc_of_tok = torch.searchsorted(offs, torch.arange(ids.shape[0], device=ids.device), right=True) - 1
        dropped = torch.zeros(batch.num_docs, dtype=torch.bool, device=ids.device)
        dropped[docs[drop]] = True
        return torch.where(dropped[doc_of_tok], self.null_prompt_ids(ids), ids)

    # ------------------------------------------------------------------ training forward
    def forward(self, batch, generator: torch.Generator | None = None, return_outputs: bool = False,
                seed: int | None = None) -> dict:
        """Losses of a PackedBatch (see umm_ops.data.packing).

        Returns dict(loss, text_loss, flow_loss, text_tokens, flow_images); with return_outputs also ``hidden``
        (L, D) and ``v_pred`` / ``v_target`` (lists over the images given to the head, grouped by size).
        The head sees the generated images, and with ``config.und_flow_loss`` (the released Cheers' choice) the
        understanding images too, at t = 1 with a zero target.

        Randomness (flow noise, CFG dropout): with ``seed`` every draw comes from a generator seeded by (seed,
        sample id, image index), as the packer seeds timesteps, so a sample gets the same noise in whatever batch it
        is packed; else from `generator` (CPU) or, when None, torch's global RNG.
        """
        cfg = self.config
        dev, dt = self.device, self.dtype
        if batch.device != dev:
            batch = batch.to(dev)
        ids = self._cfg_dropout(batch, generator, seed)
        embeds = self.llm.embed(ids)
        if seed is not None:   # (sample id, index of the image inside its document) per image
            starts = batch.image_spans[:, 0].cpu().contiguous()
            doc_of = (torch.searchsorted(batch.doc_offsets.cpu(), starts, right=True) - 1).tolist()
            sids = batch.sample_ids.tolist()
            img_key = [(sids[d], doc_of[:i].count(d)) for i, d in enumerate(doc_of)]

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
                noise = torch.zeros_like(x1)
            elif seed is None:
                noise = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device="cpu").to(dev)
            else:
                noise = torch.stack([torch.randn(x1.shape[1:], generator=self._sample_rng(seed, *img_key[i], 0x9015E),
                                                 dtype=x1.dtype) for i in idx]).to(dev)
            x_t = torch.where(is_gen[:, None, None], add_noise(x1, noise, t), x1)
            head_all = cfg.und_flow_loss
            emb, high = self.image_features(x_t.to(dt), hw, want_high=head_all or bool(is_gen.any()))
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
                target = torch.where(is_gen[gi][:, None, None], flow_target(x1[gi], noise[gi]), 0.0)
                gen.append((tuple(grids[idx[g[0]]]), [spans[idx[j]][0] for j in g], t[gi], high[gi], target))
        if rows:
            embeds = embeds.index_put((torch.cat(rows),), torch.cat(img_embeds).to(embeds.dtype))
        hidden = self.llm.forward_packed(embeds, batch.position_ids, batch.layout)

        l_text, n_text = text_loss(hidden, batch.labels, self.llm.logits)
        v_preds, targets = [], []
        for grid, starts, t, high, target in gen:
            n = grid[0] * grid[1]
            pos = torch.cat([torch.arange(s, s + n, device=dev) for s in starts])
            h = hidden[pos].view(len(starts), n, -1)
            v_preds.append(self.head(h, t, high, grid))
            targets.append(target)
        l_flow, _ = flow_loss(v_preds, targets)
        if l_flow is None:
            l_flow = hidden[:1].sum() * 0.0
        loss = cfg.text_loss_weight * l_text + cfg.flow_loss_weight * l_flow
        out = dict(loss=loss, text_loss=l_text.detach(), flow_loss=l_flow.detach(), text_tokens=n_text,
                   flow_images=sum(len(s) for _, s, *_ in gen))
        if return_outputs:
            out.update(hidden=hidden, v_pred=v_preds, v_target=targets)
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

    # ------------------------------------------------------------------ checkpoints (see checkpoint.py)
    def save_pretrained(self, folder, **kw):
        return _save_pretrained(self, folder, **kw)

    @classmethod
    def from_pretrained(cls, folder, **kw) -> "CheersModel":
        return _from_pretrained(folder, model_class=cls, **kw)
