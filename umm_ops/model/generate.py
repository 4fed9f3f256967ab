"""Inference for CheersModel: text generation with a KV cache, image generation (Euler ODE or SDE with log-probs)
and image editing.  Everything is seeded (``seed=``) and reproducible.

Text: the prompts (with their understanding images) are prefilled once as a packed batch; each step adds one
causal token per unfinished document through span attention's cache case (finished documents add none).

Images: the prompt (and any image to edit) is prefilled once; every sampling step re-runs decoder copy -> ViT ->
projector -> LLM over the image tokens only (``update_cache=False``: the prompt stays cached, the image part is
recomputed, as Cheers does) -> both head stages.  Classifier-free guidance runs the conditional and the null-prompt
documents in the same packed batch: v = v_uncond + s (v_cond - v_uncond).  Time runs from 0 (noise) to 1 (clean)
on ``time_shift(linspace(0, 1, steps + 1), a)`` ("euler"), or on the released grid ("cheers": see
umm_ops.model.profile).

Conventions (prompt template, image tokens, null prompt, dummy image, sampler grid, pixel range) follow
``model.profile`` (umm_ops.model.profile): the project's own ("umm") or the released Cheers' ("cheers").
Prompts are str, Sample or token ids (:class:`PromptIds`: used as given).
"""
from __future__ import annotations

import itertools
import math

import torch

import umm_ops

from ..data.packing import ROLES, ImageItem, Sample, TextItem, encode_sample

__all__ = ["generate_text", "generate_image", "edit_image", "sample_tokens", "decode", "velocity", "PromptIds",
           "next_token_logits", "prompt_ids", "guide", "guided_at", "CFG_RENORMS"]


def _generator(seed, device="cpu"):
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def sample_tokens(logits: torch.Tensor, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """(B, V) -> (B,): greedy at temperature 0, else the LLM helper's sampler (temperature / top-k / top-p)."""
    if temperature == 0:
        return logits.argmax(-1)
    from .sampling import sample_next

    return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)


class PromptIds:
    """A prompt given as token ids (1-D int tensor or list of ints), used exactly as given: no chat template, no
    image wrappers added (a dummy image is still put in front under a profile that has one).  For
    generate_image it is everything before the image, so it ends with the profile's image start token (the
    released Cheers processor's ``add_im_start_id=True`` ids)."""

    def __init__(self, ids, who: str = "prompt"):
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(f"{who}: token ids must be a 1-D integer tensor, got shape {tuple(ids.shape)} "
                                 f"dtype {ids.dtype}")
            ids = ids.tolist()
        ids = list(ids)
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"{who}: token ids must be a non-empty list of ints, got {ids!r:.80}")
        self.ids = torch.tensor(ids, dtype=torch.long)


def _is_ids(p) -> bool:
    return isinstance(p, PromptIds) or (isinstance(p, torch.Tensor) and p.dim() == 1) or \
        (isinstance(p, (list, tuple)) and len(p) > 0 and all(isinstance(t, int) and not isinstance(t, bool)
                                                              for t in p))


def _prompt_list(prompts, who: str) -> list:
    """One prompt (str, Sample, token ids) or a list of them -> a list."""
    if isinstance(prompts, (str, Sample, PromptIds)) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1) \
            or (isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) and not isinstance(t, bool)
                                                                       for t in prompts)):
        return [prompts]
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        return list(prompts)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{who}: expected at least one prompt (a str, a Sample, token ids or a list of them), got "
                         f"{prompts!r:.80}")
    return list(prompts)


def _as_sample(p, who: str):
    if isinstance(p, Sample):
        return p
    if isinstance(p, str):
        return Sample([TextItem(p)])
    if _is_ids(p):
        return p if isinstance(p, PromptIds) else PromptIds(p, who)
    raise TypeError(f"{who}: each prompt must be a str, a umm_ops.data.packing.Sample or token ids (a 1-D int "
                    f"tensor / list of ints), got {type(p).__name__}")


def _chat_wrap(model, sample, chat):
    """The profile's chat template around a Sample's items (adjacent texts merged, so the whole turn text is
    tokenized at once as the released processor does); token-id prompts are used as given."""
    if isinstance(sample, PromptIds):
        return sample
    p = model.profile
    if not (p.chat if chat is None else bool(chat)):
        return sample
    from ..data.tokenizer import chat_template

    head, tail = chat_template([{"role": "user", "content": "\x00"}], add_generation_prompt=True,
                               system=p.system_prompt).split("\x00")
    items = []
    for it in [TextItem(head)] + list(sample.items) + [TextItem(tail)]:
        if isinstance(it, TextItem) and items and isinstance(items[-1], TextItem):
            items[-1] = TextItem(items[-1].text + it.text, items[-1].loss)
        else:
            items.append(it)
    return Sample(items, dict(sample.meta))


def _check_images(model, samples, who: str) -> None:
    for i, s in enumerate(samples):
        if isinstance(s, Sample):
            for it in s.items:
                if isinstance(it, ImageItem):
                    model.profile.check_pixels(it.image, f"{who}: prompt {i}")


class _Doc:
    """A prompt's tokens for generation: ids, attention segments, its images to understand and their rows."""

    def __init__(self, input_ids, segments, images, image_rows):
        self.input_ids, self.segments, self.images, self.image_rows = input_ids, list(segments), list(images), \
            list(image_rows)

    @property
    def length(self) -> int:
        return self.input_ids.shape[0]


def _with_dummy(model, doc: _Doc, image: torch.Tensor) -> _Doc:
    """The released Cheers' dummy image in front of a prompt without one: understanding path (t = 1), causal, no
    wrapper tokens (its positions hold the image placeholder id, which the null prompt keeps)."""
    gh, gw = (image.shape[-2] // model.config.pixels_per_token, image.shape[-1] // model.config.pixels_per_token)
    n = gh * gw
    pad = model.tokenizer.special(model.profile.image_pad)
    ids = torch.cat([torch.full((n,), pad, dtype=torch.long), doc.input_ids])
    segs = [(n, "causal")] + doc.segments
    if len(segs) > 1 and segs[1][1] == "causal":
        segs = [(n + segs[1][0], "causal")] + segs[2:]
    rows = [(0, n, ROLES["understand"], gh, gw)] + [(r[0] + n,) + tuple(r[1:]) for r in doc.image_rows]
    return _Doc(ids, segs, [image] + doc.images, rows)


def _dummies(model, samples, hw, seed, dummy_image=None) -> list:
    """One dummy image (or None) per prompt: for prompts without an image under a profile with dummy images.  The
    released processor draws them in turn from numpy's global generator: here from RandomState(seed) (an int seed:
    one stream for the batch, in prompt order; a list: one stream per prompt).  dummy_image: a (3, H, W) tensor in
    the profile's pixel range used for every such prompt instead."""
    from .profile import dummy_image as draw

    p = model.profile
    need = [p.dummy_image and not (isinstance(s, Sample) and any(isinstance(it, ImageItem) for it in s.items))
            for s in samples]
    if dummy_image is not None:
        if not isinstance(dummy_image, torch.Tensor) or tuple(dummy_image.shape) != (3, int(hw[0]), int(hw[1])):
            raise ValueError(f"dummy_image must be a (3, {hw[0]}, {hw[1]}) tensor (the size of the generated image / "
                             f"the model's image size), got "
                             f"{tuple(dummy_image.shape) if isinstance(dummy_image, torch.Tensor) else dummy_image!r}")
        p.check_pixels(dummy_image, "dummy_image")
        return [dummy_image if n else None for n in need]
    if not any(need):
        return [None] * len(samples)
    import numpy as np

    if isinstance(seed, (list, tuple)):
        return [draw(int(sd), hw, p) if n else None for n, sd in zip(need, seed)]
    if isinstance(seed, torch.Generator):
        seed = 0            # a caller's torch generator draws the noise; the dummy (numpy, as released) uses seed 0
    rs = np.random.RandomState(int(seed) % (2 ** 32))
    out = []
    for n in need:
        out.append(draw(rs, hw, p) if n else None)
    return out


def _prompt_doc(model, s, i: int, spec, generate_hw=None, dummy=None) -> _Doc:
    """The tokens of prompt `s` (a Sample, chat-wrapped already, or PromptIds) for text generation, or with
    `generate_hw` everything before the generated image's span (its start token included)."""
    if isinstance(s, PromptIds):
        ids = s.ids
        if generate_hw is not None:
            start = model.tokenizer.special(model.profile.image_start)
            if int(ids[-1]) != start:
                raise ValueError(f"prompt {i}: token ids for image generation must end with the image start token "
                                 f"{model.profile.image_start!r} (id {start}), got last id {int(ids[-1])}")
        d = _Doc(ids, [(ids.shape[0], "causal")], [], [])
    elif generate_hw is None:
        e = encode_sample(s, spec, i)
        d = _Doc(e.input_ids, e.segments, e.images, e.image_rows)
    else:
        e = encode_sample(Sample(list(s.items) + [ImageItem(torch.zeros(3, *generate_hw), "generate")]), spec, i)
        start = e.image_rows[-1][0]
        # drop the generated span and the trailing end token
        d = _Doc(e.input_ids[:start], e.segments[:-2], e.images[:-1], e.image_rows[:-1])
    return _with_dummy(model, d, dummy) if dummy is not None else d


def _embed_doc(model, doc, dev):
    """Embeddings of an encoded document with its images (all understanding, t = 1) placed at their spans."""
    ids = doc.input_ids.to(dev)
    emb = model.llm.embed(ids)
    for img, row in zip(doc.images, doc.image_rows):
        start, n = row[0], row[1]
        if row[2] != ROLES["understand"]:
            raise ValueError("prompts for generation may only hold images to understand")
        pix = img[None].to(dev)
        feats, _ = model.image_features(model.vae.encode(pix).to(model.dtype), pix.shape[-2:])
        emb = emb.index_put((torch.arange(start, start + n, device=dev),), feats[0].to(emb.dtype))
    return emb


def _generators(seed, n: int, dev, who: str) -> list:
    """One generator per document: an int seeds one generator shared by the batch (drawn in batch order); a list of
    n ints seeds one per document (its draws then do not depend on the batch it is in: RL rollouts); a
    torch.Generator is used as given, shared by the batch."""
    if isinstance(seed, torch.Generator):
        return [seed] * n
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ValueError(f"{who}: seed must be an int or one int per prompt ({n}), got a list of {len(seed)}")
        return [_generator(s, dev) for s in seed]
    g = _generator(seed, dev)
    return [g] * n


def decode(model, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, stop=None, seed=0, chat: bool | None = None, dummy_image=None) -> list:
    """The KV-cache decoder under :func:`generate_text`, with what RL needs recorded.

    Returns one dict per prompt: ``ids`` (every sampled token, the closing eos included when the document ended on
    it: RL trains the decision to stop), ``text`` (decoded, without the eos, cut before a stop string),
    ``logprobs`` (float32 (len(ids),): log-prob of each sampled token under softmax(logits / temperature), the
    sampling policy without top-k / top-p truncation, as TRL and verl record it; temperature 0: softmax(logits)),
    ``finish_reason`` ("eos", "stop" or "length").  seed: an int (one generator for the batch) or one int per
    prompt (per-document generators: a document's tokens do not depend on the other prompts).

    Prompts: str, Sample (text and images to understand, in the profile's pixel range) or token ids (used as given).
    chat: wrap str / Sample prompts in the chat template (default: the profile's; "cheers": yes, with its system
    turn).  Under a profile with dummy images a prompt without an image gets one (seeded from `seed`, or
    `dummy_image`)."""
    prompts = _prompt_list(prompts, "generate_text")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate_text: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    from .sampling import sample_next

    sample_next(torch.zeros(1, 1), temperature, top_k, top_p)      # validate the sampling arguments first
    temp = float(temperature)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _decode(model, prompts, max_new_tokens, temp, top_k, top_p, stops, seed, chat, dummy_image)
    finally:
        model.train(was_training)


def _text_docs(model, prompts, seed, chat, dummy_image, who):
    """The documents of text-generation prompts (chat template, dummy images per the profile)."""
    spec = model.pack_spec(text_only_image=None)
    samples = [_chat_wrap(model, _as_sample(p, who), chat) for p in prompts]
    _check_images(model, samples, who)
    size = model.config.image_size
    dummies = _dummies(model, samples, (size, size), seed, dummy_image)
    return [_prompt_doc(model, s, i, spec, dummy=dm) for i, (s, dm) in enumerate(zip(samples, dummies))]


def _prefill(model, docs):
    """Prefill the documents into a new KV cache; returns the cache and the next-token logits (B, V)."""
    dev = model.device
    embeds = torch.cat([_embed_doc(model, d, dev) for d in docs])
    cache = model.llm.new_cache()
    layout = cache.layout_for([d.segments for d in docs], device=dev)
    pos = cache.positions_for(layout)
    hidden = model.llm.forward_packed(embeds, pos, layout, cache)
    ends = torch.tensor([d.length for d in docs], device=dev).cumsum(0) - 1
    return cache, model.llm.logits(hidden[ends])


@torch.no_grad()
def next_token_logits(model, prompts, seed=0, chat: bool | None = None, dummy_image=None) -> torch.Tensor:
    """The logits (B, V) float32 of the first token :func:`generate_text` would sample for each prompt (str, Sample
    or token ids; chat / dummy image as there, the dummy seeded from `seed`)."""
    prompts = _prompt_list(prompts, "next_token_logits")
    was_training = model.training
    model.eval()
    try:
        docs = _text_docs(model, prompts, seed, chat, dummy_image, "next_token_logits")
        _check_positions(model, docs, 0, "next_token_logits")
        return _prefill(model, docs)[1].float()
    finally:
        model.train(was_training)


def prompt_ids(model, prompt, image: bool = False, chat: bool | None = None) -> torch.Tensor:
    """The token ids the model is fed for one prompt (str, Sample or token ids), chat template and image wrappers
    applied, without the dummy image (which enters as features in front): for text generation, or with
    ``image=True`` everything before the generated image (ending with the profile's image start token).  An image to
    understand is its start token, one placeholder id per LLM token, its end token."""
    s = _chat_wrap(model, _as_sample(prompt, "prompt_ids"), chat)
    size = model.config.image_size
    spec = model.pack_spec(text_only_image=None)
    return _prompt_doc(model, s, 0, spec, generate_hw=(size, size) if image else None).input_ids


def _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, stops, seed, chat=None, dummy_image=None):
    dev = model.device
    docs = _text_docs(model, prompts, seed, chat, dummy_image, "generate_text")
    _check_positions(model, docs, max_new_tokens, "generate_text")
    gens = _generators(seed, len(docs), dev, "generate_text")
    cache, logits = _prefill(model, docs)
    return _decode_loop(model, cache, logits, max_new_tokens, temperature, top_k, top_p, stops, gens)


def _decode_loop(model, cache, logits, max_new_tokens, temperature, top_k, top_p, stops, gens):
    """Decode from a filled KV cache: `logits` (B, V) are the next-token logits of the cache's B documents, `gens`
    one generator per document (see :func:`_generators`).  Returns :func:`decode`'s records."""
    dev, tok = model.device, model.tokenizer
    B = len(gens)
    if logits.shape[0] != B or cache.num_docs != B:
        raise ValueError(f"_decode_loop: {logits.shape[0]} rows of logits and a cache of {cache.num_docs} documents "
                         f"for {B} generators")
    shared = len(set(map(id, gens))) == 1
    res = [dict(ids=[], text="", logprobs=[], finish_reason="length") for _ in range(B)]
    active = list(range(B))
    for step in range(max_new_tokens):
        lg = logits.float()
        if shared:
            nxt = sample_tokens(lg, temperature, top_k, top_p, gens[0])
        else:
            nxt = torch.cat([sample_tokens(lg[j:j + 1], temperature, top_k, top_p, gens[d])
                             for j, d in enumerate(active)])
        lp = torch.log_softmax(lg / temperature if temperature > 0 else lg, -1).gather(1, nxt[:, None])[:, 0]
        still = []
        for d, t, l in zip(active, nxt.tolist(), lp.tolist()):
            r = res[d]
            r["ids"].append(t)
            r["logprobs"].append(l)
            if t == tok.eos_id:
                r["finish_reason"] = "eos"
                continue
            # ids beyond the tokenizer (a model's embedding table may be larger, Qwen2.5's is) decode to nothing
            text = tok.decode([i for i in r["ids"] if i < tok.vocab_size])
            hit = [text.index(s) for s in stops if s in text]
            r["text"] = text[:min(hit)] if hit else text
            if hit:
                r["finish_reason"] = "stop"
                continue
            still.append((d, t))
        if not still or step == max_new_tokens - 1:
            break
        active = [d for d, _ in still]
        new = [[] for _ in range(B)]
        for d, _ in still:
            new[d] = [(1, "causal")]
        layout = cache.layout_for(new, device=dev)
        pos = cache.positions_for(layout)
        x = model.llm.embed(torch.tensor([t for _, t in still], device=dev))
        logits = model.llm.logits(model.llm.forward_packed(x, pos, layout, cache))
    for r in res:
        r["logprobs"] = torch.tensor(r["logprobs"], dtype=torch.float32)
    return res


@torch.no_grad()
def generate_text(model, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, stop=None, seed=0, return_ids: bool = False, chat: bool | None = None,
                  dummy_image=None):
    """Continue each prompt (a str, or a Sample with text and images to understand) with up to `max_new_tokens`.

    Stops a document at the tokenizer's eos (<|im_end|>) or when its new text contains one of `stop` (a str or a
    list of str; the text is cut before it).  seed: an int, or one int per prompt (see :func:`decode`).  Prompts
    may also be token ids; chat / dummy_image: see :func:`decode`.  Returns the list of generated strings (and the
    token lists, without the eos).
    """
    res = decode(model, prompts, max_new_tokens, temperature, top_k, top_p, stop, seed, chat, dummy_image)
    texts = [r["text"] for r in res]
    if not return_ids:
        return texts
    return texts, [r["ids"][:-1] if r["finish_reason"] == "eos" else r["ids"] for r in res]


def _velocity(model, cache, x, t, hw, grid, gen_mode, n_docs):
    """One step of the generation network: x (n_docs, n_vit, 128) at time t (n_docs,) -> v (n_docs, n_vit, 128)."""
    n = grid[0] * grid[1]
    emb, high = model.image_features(x.to(model.dtype), hw, want_high=True, t=t)
    layout = cache.layout_for([[(n, gen_mode)]] * n_docs)
    pos = cache.positions_for(layout)
    h = model.llm.forward_packed(emb.reshape(n_docs * n, -1), pos, layout, cache, update_cache=False)
    ctx = cache.head_context if model.head.needs_context else {}   # the prompts', kept by _prefill_prompts
    return model.head(h.view(n_docs, n, -1), t, high, grid, x, **ctx).float()


def _prefill_prompts(model, cache, prefix_segs, prefix_embeds):
    """Run the generated images' prefixes (prompts) into the KV cache; with the head's prompt context
    (``HeadConfig.conv_context``) their final hidden states are kept on the cache for every step."""
    layout = cache.layout_for(prefix_segs, device=model.device)
    embeds = torch.cat(prefix_embeds)
    hidden = model.llm.forward_packed(embeds, cache.positions_for(layout), layout, cache)
    if model.head.needs_context:
        ends = list(itertools.accumulate(e.shape[0] for e in prefix_embeds))
        cache.head_context = model.head.prompt_context(hidden, embeds, zip([0] + ends[:-1], ends))


def _check_positions(model, docs, extra: int, who: str, image: bool = False) -> None:
    """Refuse prompts that would run past the LLM's position limit (RoPE beyond max_position_embeddings: an
    untrained, silently degraded regime).  image: `extra` is the generated image's span and end token."""
    limit = model.llm.config.max_position_embeddings
    for i, d in enumerate(docs):
        if d.length + extra > limit:
            if image:
                d_len, more = d.length + extra, " (the image's tokens included)"
                raise ValueError(f"{who}: prompt {i} is {d_len} tokens{more}, beyond the model's position limit of "
                                 f"{limit} (max_position_embeddings); shorten the prompt")
            more = f" + {extra} new tokens" if extra else " (the image's tokens included)"
            raise ValueError(f"{who}: prompt {i} is {d.length} tokens{more}, beyond the model's position limit of "
                             f"{limit} (max_position_embeddings); shorten the prompt")


def _prefixes(model, samples, hw, use_cfg: bool, who: str, keys=None, dummies=None, use_img: bool = False):
    """Per document, what comes before the generated image's span (its start token included): the segments
    and the input embeddings (images to understand placed, a dummy image in front where the profile has one); with
    CFG the null-prompt documents (text -> the null token, images kept) follow the N conditional ones; with
    ``use_img`` (two-scale CFG of edits) then N documents of the prompt without its images (the text only).
    keys: one per sample; samples with equal keys are encoded and embedded once (RL recomputes many (x_t, t) rows
    of the same prompt).  dummies: one dummy image or None per sample (see _dummies)."""
    if dummies is None:
        dummies = [None] * len(samples)
    if keys is not None:
        first: dict = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        uniq = list(first.values())
        if len(uniq) < len(samples):
            segs, embs = _prefixes(model, [samples[i] for i in uniq], hw, use_cfg, who,
                                   dummies=[dummies[i] for i in uniq], use_img=use_img)
            pos = {k: j for j, k in enumerate(first)}
            idx = [pos[k] for k in keys]
            U = len(uniq)
            k = 1 + int(use_cfg) + int(use_img)
            out_s = [segs[b * U + j] for b in range(k) for j in idx]
            out_e = [embs[b * U + j] for b in range(k) for j in idx]
            return out_s, out_e
    dev = model.device
    spec = model.pack_spec(text_only_image=None)
    docs = [_prompt_doc(model, s, i, spec, generate_hw=hw, dummy=dm)
            for i, (s, dm) in enumerate(zip(samples, dummies))]
    n_gen = (int(hw[0]) // model.config.pixels_per_token) * (int(hw[1]) // model.config.pixels_per_token)
    _check_positions(model, docs, n_gen + 1, who, image=True)
    prefix_segs = [d.segments for d in docs]
    prefix_embeds = [_embed_doc(model, d, dev) for d in docs]
    if use_cfg:
        for d in docs:
            null = _Doc(model.null_prompt_ids(d.input_ids.to(dev)), d.segments, d.images, d.image_rows)
            prefix_embeds.append(_embed_doc(model, null, dev))
            prefix_segs.append(list(d.segments))
    if use_img:
        # the image-CFG branch (BAGEL / R3's cfg_img context): the instruction without the image(s) to edit
        for i, s in enumerate(samples):
            items = [it for it in s.items if not isinstance(it, ImageItem)]
            d = _prompt_doc(model, Sample(items, dict(s.meta)), i, spec, generate_hw=hw)
            prefix_embeds.append(_embed_doc(model, d, dev))
            prefix_segs.append(list(d.segments))
    return prefix_segs, prefix_embeds


CFG_RENORMS = ("none", "global", "channel", "text_channel")


def _check_guidance(model, samples, cfg_scale: float, image_cfg_scale: float, cfg_renorm: str, who: str) -> None:
    """Refuse two-scale guidance settings that do not apply (see :func:`guide`)."""
    if not math.isfinite(image_cfg_scale):
        raise ValueError(f"{who}: image_cfg_scale must be a finite number (1 = no image guidance), got "
                         f"{image_cfg_scale}")
    if cfg_renorm not in CFG_RENORMS:
        raise ValueError(f"{who}: cfg_renorm must be one of {', '.join(CFG_RENORMS)}, got {cfg_renorm!r}")
    if image_cfg_scale == 1.0:
        return
    p = model.profile
    if p.dummy_image:
        raise ValueError(f"{who}: image_cfg_scale={image_cfg_scale} needs a prompt without its image (BAGEL / R3's "
                         f"image-CFG branch), which the {p.name!r} profile does not have: the released Cheers "
                         f"conventions put a dummy image in front of every prompt without one; use image_cfg_scale=1 "
                         f"(one-scale guidance) under this profile")
    for i, s in enumerate(samples):
        if not (isinstance(s, Sample) and any(isinstance(it, ImageItem) for it in s.items)):
            raise ValueError(f"{who}: image_cfg_scale={image_cfg_scale} guides edits (prompts holding an image to "
                             f"understand, given as a Sample); prompt {i} holds no image "
                             f"({type(s).__name__}); use image_cfg_scale=1 for text-to-image prompts")


def guide(v_full, v_text_null=None, v_image_null=None, cfg_scale: float = 1.0, image_cfg_scale: float = 1.0,
          cfg_renorm: str = "none"):
    """Classifier-free guidance of edits with two scales (BAGEL's ``_forward_flow``, R3's ``apply_cfg``): text
    guidance against the branch without the instruction (``v_text_null``: the image kept, the text -> the null
    token), then image guidance against the branch without the image (``v_image_null``: the instruction only):

        v_text = v_text_null + cfg_scale (v_full - v_text_null)
        v      = v_image_null + image_cfg_scale (v_text - v_image_null)

    cfg_renorm (BAGEL's cfg_renorm_type, cfg_renorm_min 0 as R3): "none"; "global" / "channel": v is rescaled by
    min(1, |v_full| / |v|) with the norm over each image's tokens and channels / over each token's channels;
    "text_channel" (R3's edit setting): v_text is rescaled per token by min(1, |v_full| / |v_text|) before the
    image step.  A scale of 1 skips its branch (None may be given for it).  Tensors (N, n, C) -> (N, n, C)."""
    if cfg_renorm not in CFG_RENORMS:
        raise ValueError(f"guide: cfg_renorm must be one of {', '.join(CFG_RENORMS)}, got {cfg_renorm!r}")
    eps = 1e-8
    if cfg_scale != 1.0:
        if v_text_null is None:
            raise ValueError(f"guide: cfg_scale={cfg_scale} needs v_text_null")
        v = v_text_null + cfg_scale * (v_full - v_text_null)
        if cfg_renorm == "text_channel":
            v = v * (v_full.norm(dim=-1, keepdim=True) / (v.norm(dim=-1, keepdim=True) + eps)).clamp(0.0, 1.0)
    else:
        v = v_full
    if image_cfg_scale != 1.0:
        if v_image_null is None:
            raise ValueError(f"guide: image_cfg_scale={image_cfg_scale} needs v_image_null")
        v = v_image_null + image_cfg_scale * (v - v_image_null)
    if cfg_renorm in ("global", "channel") and (cfg_scale != 1.0 or image_cfg_scale != 1.0):
        dims = (1, 2) if cfg_renorm == "global" else (-1,)
        v = v * (v_full.norm(dim=dims, keepdim=True) / (v.norm(dim=dims, keepdim=True) + eps)).clamp(0.0, 1.0)
    return v


def check_cfg_interval(cfg_interval, who: str):
    """None, or (lo, hi) with 0 <= lo < hi <= 1 -> a tuple of two floats."""
    if cfg_interval is None:
        return None
    try:
        lo, hi = (float(v) for v in cfg_interval)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: cfg_interval must be None or (lo, hi) with 0 <= lo < hi <= 1, got "
                         f"{cfg_interval!r}") from None
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"{who}: cfg_interval must be None or (lo, hi) with 0 <= lo < hi <= 1, got {cfg_interval!r}")
    return (lo, hi)


def guided_at(t, cfg_interval) -> torch.Tensor:
    """Where guidance applies: BAGEL's ``t > lo and t <= hi`` on its time, which runs from 1 (noise) to 0 (clean),
    i.e. on the noise level 1 - t of this project's t (0 = noise).  t: float or (N,); computed in float32 (the
    sampler's and the recomputation's times agree bit for bit) -> bool tensor of t's shape."""
    s = 1.0 - torch.as_tensor(t, dtype=torch.float32).cpu()
    lo, hi = cfg_interval
    return (s > lo) & (s <= hi)


def _guide_rows(v, N: int, cfg_scale: float, image_cfg_scale: float, cfg_renorm: str, t=None, cfg_interval=None):
    """v (k N, n, C) of the documents laid out by _prefixes -> the guided (N, n, C); with cfg_interval, rows whose
    time t (float or (N,)) lies outside it take the full branch's v (BAGEL / R3's cfg_interval)."""
    use_cfg, use_img = cfg_scale != 1.0, image_cfg_scale != 1.0
    if not use_cfg and not use_img:
        return v
    off = N
    vt = vi = None
    if use_cfg:
        vt, off = v[off:off + N], off + N
    if use_img:
        vi = v[off:off + N]
    out = guide(v[:N], vt, vi, cfg_scale, image_cfg_scale, cfg_renorm)
    if cfg_interval is not None:
        on = guided_at(t, cfg_interval).reshape(-1).to(v.device)
        if on.numel() == 1:
            on = on.expand(N)
        out = torch.where(on[:, None, None], out, v[:N])
    return out


def velocity(model, prompts, x, t, height: int | None = None, width: int | None = None,
             cfg_scale: float = 1.0, dummy_image=None, seed=0, image_cfg_scale: float = 1.0,
             cfg_renorm: str = "none", cfg_interval=None) -> torch.Tensor:
    """The sampler's velocity v(x_t, t | prompt) for a batch, differentiable (no KV cache): what RL trains through.

    prompts: one per row of x (a str or a Sample of text / images to understand); x (N, n, 128) latents on the
    generated image's token grid; t (N,) or a float; with cfg_scale != 1 the guided v_u + s (v_c - v_u), as the
    sampler uses (cfg_scale 0: the null prompt's v).  Each row runs [prompt, image tokens of x] as one packed
    document: the numbers of the sampler's cached path up to float rounding.  Conventions as generate_image (chat
    template, null prompt, dummy image).  The dummy image of a row (profiles with one, prompts without an image):
    `dummy_image` for every row, else drawn from `seed`: an int gives every row the draw of that seed (default 0),
    a list one seed per row - the row's generate_image(seed=[...]) seed gives the dummy its image was sampled
    with (RL: :func:`umm_ops.rl.image_logprobs` passes the rollout's seeds).  image_cfg_scale / cfg_renorm:
    two-scale guidance of edits (:func:`guide`), cfg_interval: the times guidance applies at (:func:`guided_at`),
    as the sampler.  Returns float32 (N, n, 128)."""
    prompts = _prompt_list(prompts, "velocity")
    samples = [_chat_wrap(model, _as_sample(p, "velocity"), None) for p in prompts]
    _check_images(model, samples, "velocity")
    cfg = model.config
    size = cfg.image_size
    hw = (int(height or size), int(width or size))
    ppt = cfg.pixels_per_token
    if hw[0] <= 0 or hw[1] <= 0 or hw[0] % ppt or hw[1] % ppt:
        raise ValueError(f"velocity: height and width must be positive multiples of {ppt} px, got {hw[0]}x{hw[1]}")
    grid = (hw[0] // ppt, hw[1] // ppt)
    n = grid[0] * grid[1]
    N = len(samples)
    want = (N, 4 * n, cfg.vae.packed_channels)
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
        raise ValueError(f"velocity: x must be a {want} tensor ({N} prompts, {hw[0]}x{hw[1]} px), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    dev = model.device
    t = torch.as_tensor(t, dtype=torch.float32, device=dev).reshape(-1).expand(N)
    cfg_scale = float(cfg_scale)
    image_cfg_scale = float(image_cfg_scale)
    _check_guidance(model, samples, cfg_scale, image_cfg_scale, cfg_renorm, "velocity")
    cfg_interval = check_cfg_interval(cfg_interval, "velocity")
    use_cfg = cfg_scale != 1.0
    use_img = image_cfg_scale != 1.0
    if isinstance(seed, (list, tuple)):
        if len(seed) != N or not all(isinstance(sd, int) and not isinstance(sd, bool) for sd in seed):
            raise ValueError(f"velocity: seed must be an int or one int per row ({N}), got {seed!r:.80}")
        seeds = list(seed)
    elif isinstance(seed, int) and not isinstance(seed, bool):
        seeds = [seed] * N
    else:
        raise ValueError(f"velocity: seed must be an int or one int per row ({N}), got {type(seed).__name__}")
    dummies = _dummies(model, samples, hw, seeds, dummy_image)
    # rows of one prompt share its encoded prefix; a drawn dummy image is part of it (one per seed)
    keys = [(p if isinstance(p, str) else id(p), sd if dm is not None and dummy_image is None else None)
            for p, sd, dm in zip(prompts, seeds, dummies)]
    segs, embeds = _prefixes(model, samples, hw, use_cfg, "velocity", keys, dummies, use_img=use_img)
    k = 1 + int(use_cfg) + int(use_img)
    xin = torch.cat([x] * k).to(dev)
    # the VAE decoder copy and the ViT in chunks of 32 images: one batch of hundreds of images was 2.5x slower on the
    # CPU for the same work (convolution activations far beyond the caches; bench/bench_rl.py)
    tin = torch.cat([t] * k).to(dev)
    feats = [model.image_features(c.to(model.dtype), hw, want_high=True, t=tc)
             for c, tc in zip(xin.split(32), tin.split(32))]
    emb, high = torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats])
    parts, rows, prompts_at, off = [], [], [], 0
    for j, (sg, e) in enumerate(zip(segs, embeds)):
        parts += [e, emb[j].to(e.dtype)]
        rows.append(torch.arange(off + e.shape[0], off + e.shape[0] + n, device=dev))
        prompts_at.append((off, off + e.shape[0]))
        off += e.shape[0] + n
    from ..attention import SpanLayout
    from .llm import positions_in_document

    layout = SpanLayout.from_segments([sg + [(n, cfg.gen_mode)] for sg in segs], device=dev)
    inputs = torch.cat(parts)
    h = model.llm.forward_packed(inputs, positions_in_document(layout), layout)
    ctx = model.head.prompt_context(h, inputs, prompts_at)
    v = model.head(h[torch.cat(rows)].view(k * N, n, -1), tin, high, grid, xin, **ctx).float()
    return _guide_rows(v, N, cfg_scale, image_cfg_scale, cfg_renorm, t, cfg_interval)


@torch.no_grad()
def _generate(model, samples, height, width, steps, cfg_scale, time_shift, seed, mode, sigma, return_trajectory,
              sde_steps=None, init_noise=None, sampler=None, dummy_image=None, start_t=None, start_images=None,
              pixels=True, return_cache=False, image_cfg_scale=1.0, cfg_renorm="none", cfg_interval=None):
    cfg = model.config
    sampler = model.profile.sampler if sampler is None else sampler
    if start_t is not None:
        start_t = float(start_t)
        if sampler != "cheers" or not 0.0 < start_t < 1.0:
            raise ValueError(f"start_t (start from the image to edit at t = start_t, the released edit_image=True) "
                             f"needs sampler='cheers' and 0 < start_t < 1, got sampler={sampler!r}, "
                             f"start_t={start_t}")
    if sampler not in ("euler", "cheers"):
        raise ValueError(f"sampler must be 'euler' (steps Euler steps on time_shift(linspace(0, 1, steps + 1))) or "
                         f"'cheers' (the released grid: v at time_shift(linspace(0, 1, steps)), steps - 1 Euler "
                         f"steps, then x + v(1) / steps), got {sampler!r}")
    if start_t is not None and mode != "ode":
        raise ValueError(f"start_t (editing from the image) is deterministic: mode must be 'ode', got {mode!r}")
    steps = cfg.sample_steps if steps is None else int(steps)
    if start_t is not None and int(steps * (1 - start_t)) < 1:
        raise ValueError(f"start_t={start_t} leaves int(steps * (1 - start_t)) = {int(steps * (1 - start_t))} "
                         f"sampling points; raise steps")
    cfg_scale = cfg.cfg_scale if cfg_scale is None else float(cfg_scale)
    a = cfg.time_shift if time_shift is None else float(time_shift)
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number (1 = no guidance), got {cfg_scale}")
    if not (math.isfinite(a) and a > 0):
        raise ValueError(f"time_shift must be a finite number > 0, got {a}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if mode not in ("ode", "sde"):
        raise ValueError(f"mode must be 'ode' (Euler) or 'sde' (Flow-GRPO transition with log-probs), got {mode!r}")
    if mode == "sde" and sigma is None:
        sigma = umm_ops.SigmaSchedule(0.7)
    if sde_steps is not None:
        if mode != "sde":
            raise ValueError("sde_steps chooses the stochastic steps of mode='sde'; got mode='ode'")
        per = isinstance(sde_steps, (list, tuple)) and len(sde_steps) > 0 and \
            all(isinstance(e, (set, frozenset, list, tuple)) for e in sde_steps)
        groups = list(sde_steps) if per else [sde_steps] * len(samples)
        if len(groups) != len(samples):
            raise ValueError(f"sde_steps must be one collection of step indices, or one per prompt ({len(samples)}), "
                             f"got {len(groups)}")
        for e in groups:
            bad = [k for k in e if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < steps]
            if bad:
                raise ValueError(f"sde_steps must be step indices in [0, {steps}), got {sorted(e, key=str)}")
        sde_steps = [set(e) for e in groups]
    was_training = model.training
    model.eval()
    dev = model.device
    hw = (int(height), int(width))
    ppt = cfg.pixels_per_token
    if hw[0] <= 0 or hw[1] <= 0 or hw[0] % ppt or hw[1] % ppt:
        raise ValueError(f"height and width must be positive multiples of {ppt} px (one LLM token per {ppt}x{ppt} "
                         f"pixels), got {hw[0]}x{hw[1]}")
    grid = (hw[0] // cfg.pixels_per_token, hw[1] // cfg.pixels_per_token)
    N = len(samples)
    image_cfg_scale = 1.0 if image_cfg_scale is None else float(image_cfg_scale)
    _check_guidance(model, samples, cfg_scale, image_cfg_scale, cfg_renorm, "generate_image")
    cfg_interval = check_cfg_interval(cfg_interval, "generate_image")
    use_cfg = cfg_scale != 1.0
    use_img = image_cfg_scale != 1.0
    k = 1 + int(use_cfg) + int(use_img)

    def guided(v, t):
        return _guide_rows(v, N, cfg_scale, image_cfg_scale, cfg_renorm, float(t), cfg_interval)
    dummies = _dummies(model, samples, hw, seed, dummy_image)
    prefix_segs, prefix_embeds = _prefixes(model, samples, hw, use_cfg, "generate_image", dummies=dummies,
                                           use_img=use_img)
    n_docs = len(prefix_segs)
    cache = model.llm.new_cache()
    _prefill_prompts(model, cache, prefix_segs, prefix_embeds)

    gens = _generators(seed, N, "cpu", "generate_image")   # a caller's torch.Generator draws every image's noise
    shared = len(set(map(id, gens))) == 1
    n_vit = 4 * grid[0] * grid[1]
    C = cfg.vae.packed_channels

    def randn():
        if shared:
            g = gens[0]
            return torch.randn(N, n_vit, C, generator=g, device=g.device).to(dev)
        return torch.stack([torch.randn(n_vit, C, generator=g) for g in gens]).to(dev)

    if init_noise is None:
        x = randn()
    else:
        if not isinstance(init_noise, torch.Tensor) or tuple(init_noise.shape) != (N, n_vit, C):
            raise ValueError(f"init_noise must be a ({N}, {n_vit}, {C}) tensor (the initial x of each image), got "
                             f"{tuple(init_noise.shape) if isinstance(init_noise, torch.Tensor) else init_noise!r}")
        x = init_noise.to(dev, torch.float32)
    if sampler == "cheers":
        if start_t is not None:     # the released edit_image=True: x = s z_image + (1 - s) noise
            z_img = model.vae.encode(torch.stack([im.to(dev) for im in start_images])).float()
            x = start_t * z_img + (1 - start_t) * x
        out = _generate_cheers_grid(model, cache, x, N, n_docs, hw, grid, steps, cfg_scale, a, k, guided,
                                    return_trajectory, was_training, start_t, mode, sigma, sde_steps, randn, pixels)
        if return_cache:
            out["cache"] = cache
        return out
    ts = umm_ops.time_shift(torch.linspace(0, 1, steps + 1, dtype=torch.float64), a).tolist()
    traj, logps = [x], []
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        xin = torch.cat([x] * k) if k > 1 else x
        v = guided(_velocity(model, cache, xin, torch.full((n_docs,), t, device=dev), hw, grid, cfg.gen_mode,
                             n_docs), t)
        if mode == "ode":
            x = umm_ops.flow_step(x, v, t, t_next)
        else:
            z = randn()              # drawn at every step: a sample's noise stream does not depend on the schedule
            sto = [i in sde_steps[j] for j in range(N)] if sde_steps is not None else [True] * N
            if t_next >= 1.0 or not any(sto):     # the last step lands on clean data: deterministic
                x = umm_ops.flow_step(x, v, t, t_next)
                logps.append(torch.zeros(N, device=dev))
            else:
                x_s, lp = umm_ops.flow_step(x, v, t, t_next, noise=z, sigma=sigma, return_logprob=True)
                if not all(sto):
                    m = torch.tensor(sto, device=dev)
                    x_s = torch.where(m[:, None, None], x_s, umm_ops.flow_step(x, v, t, t_next))
                    lp = torch.where(m, lp, torch.zeros_like(lp))
                x = x_s
                logps.append(lp)
        traj.append(x)
    out = _finish(model, x, hw, N, steps, cfg_scale, ts, traj, logps, mode, return_trajectory, was_training, pixels)
    if return_cache:
        out["cache"] = cache
    return out


def _generate_cheers_grid(model, cache, x, N, n_docs, hw, grid, steps, cfg_scale, a, k, guided, return_trajectory,
                          was_training, start_t=None, mode="ode", sigma=None, sde_steps=None, randn=None,
                          pixels=True):
    """The released sampler (modeling_umm.py Cheers.generate): v at the `steps` points t_n of
    time_shift(linspace(0, 1, steps), a) in float32; x += v(t_n) (t_{n+1} - t_n) for n < steps - 1, then the last
    point (t = 1) gives x + v(1) / steps.  start_t (edit_image=True there): int(steps (1 - start_t)) points from
    start_t instead of 0.

    mode "sde" (online RL on this grid; not in the released code): step n < steps - 1 (t_n -> t_{n+1}, the step
    onto t = 1 included) may be the Flow-GRPO transition with its log-prob instead of the Euler step (the steps in
    ``sde_steps``, default all of them); the last point's x + v(1) / steps stays deterministic (log-prob 0).  The
    noise is drawn at every step n < steps - 1, as on the Euler grid."""
    dev = model.device
    t0 = 0.0
    if start_t is not None:
        steps, t0 = int(steps * (1 - start_t)), start_t
    ts = torch.linspace(t0, 1, steps, dtype=torch.float32)
    ts = (a * ts) / (1.0 + (a - 1.0) * ts)             # Cheers.time_shift, in float32 as released
    traj, logps = [x], []
    for n in range(steps):
        t = ts[n]
        xin = torch.cat([x] * k) if k > 1 else x
        v = guided(_velocity(model, cache, xin, torch.full((n_docs,), float(t), device=dev), hw, grid,
                             model.config.gen_mode, n_docs), t)
        euler = float(t) != 1.0 and n < steps - 1
        if mode == "sde" and euler:
            z = randn()
            sto = [n in sde_steps[j] for j in range(N)] if sde_steps is not None else [True] * N
            x_e = x + v * (ts[n + 1] - ts[n]).to(dev)
            if any(sto):
                x_s, lp = umm_ops.flow_step(x, v, float(t), float(ts[n + 1]), noise=z, sigma=sigma,
                                            return_logprob=True)
                m = torch.tensor(sto, device=dev)
                x = torch.where(m[:, None, None], x_s, x_e)
                logps.append(torch.where(m, lp, torch.zeros_like(lp)))
            else:
                x = x_e
                logps.append(torch.zeros(N, device=dev))
        elif euler:
            x = x + v * (ts[n + 1] - ts[n]).to(dev)
        else:
            x = x + v * (1 / steps)
            if mode == "sde":
                logps.append(torch.zeros(N, device=dev))
        traj.append(x)
    return _finish(model, x, hw, N, steps, cfg_scale, ts.double().tolist(), traj, logps, mode, return_trajectory,
                   was_training, pixels)


def _finish(model, x, hw, N, steps, cfg_scale, ts, traj, logps, mode, return_trajectory, was_training, pixels=True):
    if pixels:
        images = model.vae.decode(x.to(model.dtype), hw, clamp=tuple(model.profile.pixel_range)).float()
        finite = [bool(torch.isfinite(images[i]).all()) for i in range(N)]
    else:
        images = None
        finite = [bool(torch.isfinite(x[i]).all()) for i in range(N)]
    model.train(was_training)
    if not all(finite):
        bad = [i for i in range(N) if not finite[i]]
        raise FloatingPointError(f"generate_image: the generated image(s) {bad} hold NaN / Inf values (the model's "
                                 f"output or the sampler diverged; steps={steps}, cfg_scale={cfg_scale}); "
                                 f"no image is returned")
    out = dict(images=images, latents=x, timesteps=torch.tensor(ts))
    if return_trajectory or mode == "sde":
        out["trajectory"] = torch.stack(traj, 1)              # (N, steps + 1, n_vit, C): x before each step, last
    if mode == "sde":
        out["logprobs"] = torch.stack(logps, 1)               # (N, steps)
    return out


def generate_image(model, prompts, height: int | None = None, width: int | None = None, steps: int | None = None,
                   cfg_scale: float | None = None, time_shift: float | None = None, seed=0,
                   mode: str = "ode", sigma=None, return_trajectory: bool = False, sde_steps=None,
                   init_noise=None, sampler: str | None = None, chat: bool | None = None,
                   dummy_image=None, pixels: bool = True, return_cache: bool = False,
                   image_cfg_scale: float = 1.0, cfg_renorm: str = "none", cfg_interval=None) -> dict:
    """Generate one image per prompt (a str, a Sample of text / images to understand, or token ids: everything
    before the image, ending with the profile's image start token).

    Defaults from the config: image_size, sample_steps, cfg_scale, time_shift; the conventions from the model's
    profile (``model.profile``: chat template, image tokens, null prompt, dummy image, sampler grid, pixel range).
    sampler: "euler" (steps Euler steps on time_shift(linspace(0, 1, steps + 1))) or "cheers" (the released grid:
    v at time_shift(linspace(0, 1, steps)), steps - 1 Euler steps, then x + v(1) / steps); default the profile's.
    chat: wrap str / Sample prompts in the chat template (default the profile's).  dummy_image: (3, H, W) in the
    profile's pixel range, the dummy for prompts without an image (profiles with one; default drawn from `seed`).
    mode "ode": deterministic; "sde": Flow-GRPO transitions (sigma: float or umm_ops.SigmaSchedule, default
    SigmaSchedule(0.7); on the "euler" grid the last step, which lands on t = 1, is Euler; on the "cheers" grid the
    steps t_n -> t_{n+1} are stochastic and the final x + v(1) / steps is deterministic) returning
    ``trajectory`` (N, steps + 1, n, 128) and ``logprobs`` (N, steps).  sde_steps: the step indices that are
    stochastic in mode "sde" (default all; the others are Euler steps with log-prob 0), or one such collection per
    prompt.
    seed: an int (one generator for the batch), one int per prompt (each image's noise then does not depend on the
    batch) or a torch.Generator (draws every image's noise in order).  init_noise: (N, n, 128) initial latents
    instead of drawn ones (e.g. one per group, as R3; a released (N, 128, h, w) latent z is
    ``z.flatten(2).transpose(1, 2)``).
    pixels=False: the latents only, not decoded to pixels (``images`` is None).  return_cache: also ``cache``, the
    KV cache of the prompts (the N conditional documents, then with CFG the N null-prompt ones), each holding
    everything before the image's span (its start token included): what CLEAR's latent bridge continues from
    (with image_cfg_scale != 1 then the N documents without their images).
    image_cfg_scale: two-scale guidance of edits (BAGEL / R3; prompts holding an image to understand): cfg_scale
    guides against the prompt without its text, image_cfg_scale against the prompt without its image, in that
    order (:func:`guide`); 1 (default) = one-scale guidance.  cfg_renorm: "none" (default), "global", "channel" or
    "text_channel" (R3's edit setting; :func:`guide`).  cfg_interval: (lo, hi) - guidance only at the sampler
    points whose noise level 1 - t lies in (lo, hi] (BAGEL / R3's cfg_interval, R3: (0.4, 1.0); elsewhere the
    unguided v); None (default): at every point.
    Returns dict(images (N, 3, H, W) in the profile's pixel range (clamped), latents (N, n, 128), timesteps, ...).
    """
    prompts = _prompt_list(prompts, "generate_image")
    size = model.config.image_size
    samples = [_chat_wrap(model, _as_sample(p, "generate_image"), chat) for p in prompts]
    _check_images(model, samples, "generate_image")
    return _generate(model, samples, height or size, width or size, steps, cfg_scale, time_shift, seed, mode, sigma,
                     return_trajectory, sde_steps, init_noise, sampler, dummy_image, pixels=bool(pixels),
                     return_cache=bool(return_cache), image_cfg_scale=image_cfg_scale, cfg_renorm=cfg_renorm,
                     cfg_interval=cfg_interval)


def edit_image(model, images, instructions, height: int | None = None, width: int | None = None,
               start_t: float | None = None, **kw) -> dict:
    """Image-conditioned generation: the prompt is [image to understand, instruction text] (one per pair; images
    in the profile's pixel range).  Output size defaults to the input image's size.  start_t (sampler "cheers"):
    start from the image itself, x = start_t z_image + (1 - start_t) noise, on int(steps (1 - start_t)) points from
    start_t (the released ``generate(edit_image=True)``, start_t = 0.1 there); the output then has the image's size.
    cfg_scale (text) and image_cfg_scale (image; default 1 = one scale) with cfg_renorm:
    BAGEL / R3's two-scale guidance of edits (R3: 4.0 / 1.5, renorm "text_channel"), see :func:`guide`.
    Other arguments as generate_image."""
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        images = [images]
    if isinstance(instructions, str):
        instructions = [instructions]
    if len(images) != len(instructions):
        raise ValueError(f"edit_image: {len(images)} images for {len(instructions)} instructions")
    for i, img in enumerate(images):
        model.profile.check_pixels(img, f"edit_image: image {i}")
    samples = [Sample([ImageItem(img, "understand"), TextItem(txt)]) for img, txt in zip(images, instructions)]
    h, w = images[0].shape[-2:]
    if start_t is None:
        return generate_image(model, samples, height=height or h, width=width or w, **kw)
    if (height or h, width or w) != (h, w) or any(tuple(im.shape[-2:]) != (h, w) for im in images):
        raise ValueError(f"edit_image: start_t starts from the images themselves: they must all be {h}x{w} and so "
                         f"is the output, got sizes {[tuple(im.shape[-2:]) for im in images]} and "
                         f"height={height}, width={width}")
    bad = set(kw) - {"steps", "cfg_scale", "time_shift", "seed", "init_noise", "return_trajectory", "chat",
                     "image_cfg_scale", "cfg_renorm", "cfg_interval"}
    if bad:
        raise ValueError(f"edit_image: with start_t, arguments {sorted(bad)} do not apply (the 'cheers' grid)")
    chat = kw.pop("chat", None)
    samples = [_chat_wrap(model, s, chat) for s in samples]
    return _generate(model, samples, h, w, kw.get("steps"), kw.get("cfg_scale"), kw.get("time_shift"),
                     kw.get("seed", 0), "ode", None, kw.get("return_trajectory", False), None, kw.get("init_noise"),
                     "cheers", None, start_t, list(images), image_cfg_scale=kw.get("image_cfg_scale", 1.0),
                     cfg_renorm=kw.get("cfg_renorm", "none"), cfg_interval=kw.get("cfg_interval"))
