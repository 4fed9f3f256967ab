"""CLEAR's generate-then-answer inference (papers.md section 2; issue 16): understand a degraded image by restoring it
first when the model decides to.

For each (image, question): the model reads [image, question] and writes its reasoning; if it asks for a restoration
(it writes ``RESTORE_TAG``, the decoder stops there), the restored image is generated conditioned on everything so far
(the editing path: the degraded image is in context), joins the context as an image to understand (VAE encode ->
ViT -> projector, as the model reads any image), and the model writes the rest: its reasoning about the restored
image and ``<answer>...</answer>``.  Otherwise its first text already holds the answer.  Batched; every draw seeded by
(seed, question, its occurrence among equal items, part), so an item does not depend on the batch.

Two ways for the restoration to join the context (``bridge``):

* False (decode -> re-encode): the restored latent is decoded to pixels by the frozen VAE, clamped, and read again
  as an image to understand (VAE encode -> decoder copy -> ViT -> projector) in a fresh prefill of the whole context.
* True (CLEAR's latent bridge, stage 2): the restored latent x1 enters the LLM through the model's own latent-to-token
  path at t = 1 (``model.image_features``: decoder copy -> ViT -> projector, what every image to understand goes
  through after the VAE encoder; here understanding already starts from VAE latents, so this is the path BAGEL's
  vae2llm + timestep + position embedding plays in CLEAR) and is written straight into the KV cache the sampler
  prefilled for the restoration (everything before the image, its start token included; the null-prompt documents
  of CFG dropped): the image's tokens ("full" attention) and its end token, then the answer is decoded from that
  cache.  No VAE decode to pixels, no VAE re-encode, and the context is not prefilled again.  The token layout is
  the decode -> re-encode path's: [image, question, reasoning, <image_restore>, restored image, answer].
"""
from __future__ import annotations

import torch

from ..data.packing import ImageItem, Sample, TextItem
from ..utils import seed_of

__all__ = ["generate_then_answer", "bridge_answer"]


def _check_bridge_profile(model, who):
    if model.profile.chat:
        raise ValueError(f"{who}: the latent bridge needs a profile without a chat template (the restoration's prompt "
                         f"and the answer's context are laid out differently under one); model.profile "
                         f"{model.profile.name!r} has chat=True")


def _write_restored(model, cache, latents, hw, answer_tokens, temperature, top_k, seeds):
    """The bridge's last part: `cache` holds N documents, each everything before its restored image (the image's
    start token included); latents (N, n_vit, C) -> image tokens at t = 1 + end token appended to the cache ->
    the answer decoded from it.  Returns decode's records."""
    from .generate import _decode_loop, _generators

    dev = model.device
    N = latents.shape[0]
    grid = (hw[0] // model.config.pixels_per_token, hw[1] // model.config.pixels_per_token)
    n = grid[0] * grid[1]
    emb, _ = model.image_features(latents.to(dev, model.dtype), hw)            # (N, n, D)
    end = model.llm.embed(torch.tensor([model.tokenizer.special(model.profile.image_end)], device=dev))
    layout = cache.layout_for([[(n, "full"), (1, "causal")]] * N, device=dev)
    x = torch.cat([torch.cat([emb[j].to(end.dtype), end]) for j in range(N)])
    h = model.llm.forward_packed(x, cache.positions_for(layout), layout, cache)
    logits = model.llm.logits(h[torch.arange(N, device=dev) * (n + 1) + n])
    return _decode_loop(model, cache, logits, answer_tokens, float(temperature), top_k, None, [],
                        _generators(list(seeds), N, dev, "generate_then_answer"))


@torch.no_grad()
def bridge_answer(model, contexts, latents, answer_tokens: int = 96, temperature: float = 0.0,
                  top_k: int | None = None, seed=0, size=None) -> list:
    """CLEAR's latent bridge from given restored latents: each context (a Sample: the degraded image, the question and
    the model's text up to ``<image_restore>``) is prefilled into a KV cache, its latent (n_vit, C) written after it
    at t = 1 (see the module docstring), and the answer decoded.  latents: (N, n_vit, C) normalised packed latents of
    the restored images (what the sampler returns as ``latents``, or ``model.vae.encode`` of a picture).
    seed: an int or one per context.  size: (H, W) pixels of the restored image (default: square, from the latents'
    token count).  Returns decode's records (``ids``, ``text``, ``logprobs``, ``finish_reason``)."""
    from .generate import _chat_wrap, _prefixes

    _check_bridge_profile(model, "bridge_answer")
    if isinstance(contexts, Sample):
        contexts = [contexts]
    if not contexts or not all(isinstance(c, Sample) for c in contexts):
        raise ValueError("bridge_answer: contexts must be a non-empty list of umm_ops.data.packing.Sample")
    N = len(contexts)
    C = model.config.vae.packed_channels
    if not isinstance(latents, torch.Tensor) or latents.dim() != 3 or latents.shape[0] != N \
            or latents.shape[2] != C:
        raise ValueError(f"bridge_answer: latents must be a ({N}, n_vit, {C}) tensor (one restored latent per "
                         f"context), got {tuple(latents.shape) if isinstance(latents, torch.Tensor) else latents!r}")
    if not torch.isfinite(latents).all():
        raise ValueError("bridge_answer: the latents hold NaN / Inf values")
    if size is None:
        side = int(round((latents.shape[1] // 4) ** 0.5)) * model.config.pixels_per_token
        hw = (side, side)
    else:
        hw = (int(size[0]), int(size[1]))
    if model.latent_shape(hw) != tuple(latents.shape[1:]):
        raise ValueError(f"bridge_answer: latents of shape {tuple(latents.shape[1:])} do not belong to a "
                         f"{hw[0]}x{hw[1]} image (expected {model.latent_shape(hw)})")
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed)] * N
    if len(seeds) != N:
        raise ValueError(f"bridge_answer: seed must be an int or one per context ({N}), got {len(seeds)}")
    was_training = model.training
    model.eval()
    try:
        samples = [_chat_wrap(model, c, None) for c in contexts]
        segs, embeds = _prefixes(model, samples, hw, False, "bridge_answer")
        cache = model.llm.new_cache()
        layout = cache.layout_for(segs, device=model.device)
        model.llm.forward_packed(torch.cat(embeds), cache.positions_for(layout), layout, cache)
        return _write_restored(model, cache, latents, hw, answer_tokens, temperature, top_k, seeds)
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_then_answer(model, images, questions, think_tokens: int = 96, answer_tokens: int = 96,
                         steps: int | None = None, cfg_scale: float | None = None, temperature: float = 0.0,
                         top_k: int | None = None, seed: int = 0, restorations=None, bridge: bool = False) -> list:
    """images: (N, 3, H, W) or a list of (3, H, W) in [-1, 1]; questions: N strings (the question as the model was
    trained to read it, options included).  Returns one dict per item: ``text`` (everything the model wrote, the
    restoration marker included), ``restored`` (bool: it asked for a restoration), ``image`` (the restored (3, H, W)
    image in [-1, 1], or None), ``answer`` (inside <answer>...</answer>, "" if missing), ``format`` (think / answer /
    order checks).  restorations: optional images ((3, H, W) in [-1, 1], one per item) used as the restoration
    instead of generating one, where the model asks for it (e.g. the clean pictures: an oracle restoration that
    separates the format from the quality of the model's own restorations).  bridge: the restoration joins the
    context through the latent bridge (module docstring): ``image`` is then None and ``latent`` holds the restored
    (n_vit, C) latent (an oracle restoration enters as ``model.vae.encode`` of the picture).  Token budgets: the
    world tokenizer spells the format's markers in byte pieces (the restoration thought and marker are ~51 tokens,
    an answer with its reasoning ~50)."""
    from ..data.clear_data import RESTORE_TAG, parse_clear
    from .generate import decode, generate_image

    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"generate_then_answer: images must be (N, 3, H, W), got {tuple(images.shape)}")
        images = list(images)
    if isinstance(questions, str):
        questions = [questions]
    if len(images) != len(questions) or not images:
        raise ValueError(f"generate_then_answer: expected one question per image, got {len(images)} images and "
                         f"{len(questions)} questions")
    if not all(isinstance(q, str) and q for q in questions):
        raise ValueError("generate_then_answer: every question must be a non-empty string")
    for im in images:
        if not torch.isfinite(im).all():
            raise ValueError("generate_then_answer: an input image holds NaN / Inf values")
    if bridge:
        _check_bridge_profile(model, "generate_then_answer")
    n = len(images)
    keys = [(q, questions[:i].count(q)) for i, q in enumerate(questions)]

    def sd(i, what):
        return seed_of(int(seed), *keys[i], what)

    base = [[ImageItem(im, "understand"), TextItem(q)] for im, q in zip(images, questions)]
    first = decode(model, [Sample(b) for b in base], max_new_tokens=think_tokens, temperature=temperature,
                   top_k=top_k, stop=[RESTORE_TAG], seed=[sd(i, "think") for i in range(n)])
    out = []
    for r in first:     # decode cuts the text before the stop string: the marker is put back
        stop = r["finish_reason"] == "stop"
        out.append({"text": r["text"] + (RESTORE_TAG if stop else ""), "restored": stop, "image": None})
    idx = [i for i in range(n) if out[i]["restored"]]
    if idx:
        ctx = [Sample(base[i] + [TextItem(out[i]["text"])]) for i in idx]
        H, W = images[idx[0]].shape[-2:]
        if any(tuple(images[i].shape[-2:]) != (H, W) for i in idx):
            raise ValueError("generate_then_answer: images to restore in one call must share their size")
        if restorations is not None:
            if len(restorations) != n:
                raise ValueError(f"generate_then_answer: expected one restoration per image ({n}), got "
                                 f"{len(restorations)}")
            restored = torch.stack([restorations[i] for i in idx])
            if bridge:
                latents = model.vae.encode(restored.to(model.device, model.dtype)).float()
                ans = bridge_answer(model, ctx, latents, answer_tokens, temperature, top_k,
                                    [sd(i, "answer") for i in idx], size=(H, W))
        elif bridge:
            was_training = model.training
            model.eval()
            try:
                g = generate_image(model, ctx, height=H, width=W, steps=steps, cfg_scale=cfg_scale,
                                   seed=[sd(i, "restore") for i in idx], pixels=False, return_cache=True)
                latents, cache = g["latents"], g["cache"]
                cache.select(range(len(idx)))          # the conditional documents (CFG's null prompts follow them)
                ans = _write_restored(model, cache, latents, (H, W), answer_tokens, temperature, top_k,
                                      [sd(i, "answer") for i in idx])
            finally:
                model.train(was_training)
        else:
            restored = generate_image(model, ctx, height=H, width=W, steps=steps, cfg_scale=cfg_scale,
                                      seed=[sd(i, "restore") for i in idx])["images"]
        if not bridge:
            ans = decode(model, [Sample(s.items + [ImageItem(im, "understand")]) for s, im in zip(ctx, restored)],
                         max_new_tokens=answer_tokens, temperature=temperature, top_k=top_k,
                         seed=[sd(i, "answer") for i in idx])
        for j, i in enumerate(idx):
            if bridge:
                out[i]["latent"] = latents[j]
            else:
                out[i]["image"] = restored[j]
            out[i]["text"] += ans[j]["text"]
    for o in out:
        p = parse_clear(o["text"])
        o["answer"], o["format"] = p["answer"], p["format"]
    return out
