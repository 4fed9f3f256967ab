"""Inference for CheersModel: text generation with a KV cache, image generation (Euler ODE or SDE with log-probs)
and image editing.  Everything is seeded (``seed=``) and reproducible.

Text: the prompts (with their understanding images) are prefilled once as a packed batch; each step adds one
causal token per unfinished document through span attention's cache case (finished documents add none).

Images: the prompt (and any image to edit) is prefilled once; every sampling step re-runs decoder copy -> ViT ->
projector -> LLM over the image tokens only (``update_cache=False``: the prompt stays cached, the image part is
recomputed, as Cheers does) -> both head stages.  Classifier-free guidance runs the conditional and the null-prompt
documents in the same packed batch: v = v_uncond + s (v_cond - v_uncond).  Time runs from 0 (noise) to 1 (clean)
on ``time_shift(linspace(0, 1, steps + 1), a)``.
"""
from __future__ import annotations

import math

import torch

import umm_ops

from ..data.packing import ROLES, ImageItem, Sample, TextItem, encode_sample

__all__ = ["generate_text", "generate_image", "edit_image", "sample_tokens", "decode", "velocity"]


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


def _as_sample(p, who: str) -> Sample:
    if isinstance(p, Sample):
        return p
    if isinstance(p, str):
        return Sample([TextItem(p)])
    raise TypeError(f"{who}: each prompt must be a str or a umm_ops.data.packing.Sample, got {type(p).__name__}")


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
    n ints seeds one per document (its draws then do not depend on the batch it is in: RL rollouts)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ValueError(f"{who}: seed must be an int or one int per prompt ({n}), got a list of {len(seed)}")
        return [_generator(s, dev) for s in seed]
    g = _generator(seed, dev)
    return [g] * n


def decode(model, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, stop=None, seed=0) -> list:
    """The KV-cache decoder under :func:`generate_text`, with what RL needs recorded.

    Returns one dict per prompt: ``ids`` (every sampled token, the closing eos included when the document ended on
    it: RL trains the decision to stop), ``text`` (decoded, without the eos, cut before a stop string),
    ``logprobs`` (float32 (len(ids),): log-prob of each sampled token under softmax(logits / temperature), the
    sampling policy without top-k / top-p truncation, as TRL and verl record it; temperature 0: softmax(logits)),
    ``finish_reason`` ("eos", "stop" or "length").  seed: an int (one generator for the batch) or one int per
    prompt (per-document generators: a document's tokens do not depend on the other prompts)."""
    if isinstance(prompts, (str, Sample)):
        prompts = [prompts]
    if not prompts:
        raise ValueError("generate_text: expected at least one prompt")
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
            return _decode(model, prompts, max_new_tokens, temp, top_k, top_p, stops, seed)
    finally:
        model.train(was_training)


def _decode(model, prompts, max_new_tokens, temperature, top_k, top_p, stops, seed):
    dev, tok = model.device, model.tokenizer
    spec = model.pack_spec()
    docs = [encode_sample(_as_sample(p, "generate_text"), spec, i) for i, p in enumerate(prompts)]
    _check_positions(model, docs, max_new_tokens, "generate_text")
    B = len(docs)
    gens = _generators(seed, B, dev, "generate_text")
    shared = len(set(map(id, gens))) == 1
    embeds = torch.cat([_embed_doc(model, d, dev) for d in docs])
    cache = model.llm.new_cache()
    layout = cache.layout_for([d.segments for d in docs], device=dev)
    pos = cache.positions_for(layout)
    hidden = model.llm.forward_packed(embeds, pos, layout, cache)
    ends = torch.tensor([d.length for d in docs], device=dev).cumsum(0) - 1
    logits = model.llm.logits(hidden[ends])
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
            text = tok.decode([i for i in r["ids"]])
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
                  top_p: float | None = None, stop=None, seed=0, return_ids: bool = False):
    """Continue each prompt (a str, or a Sample with text and images to understand) with up to `max_new_tokens`.

    Stops a document at the tokenizer's eos (<|im_end|>) or when its new text contains one of `stop` (a str or a
    list of str; the text is cut before it).  seed: an int, or one int per prompt (see :func:`decode`).  Returns
    the list of generated strings (and the token lists, without the eos).
    """
    res = decode(model, prompts, max_new_tokens, temperature, top_k, top_p, stop, seed)
    texts = [r["text"] for r in res]
    if not return_ids:
        return texts
    return texts, [r["ids"][:-1] if r["finish_reason"] == "eos" else r["ids"] for r in res]


def _velocity(model, cache, x, t, hw, grid, gen_mode, n_docs):
    """One step of the generation network: x (n_docs, n_vit, 128) at time t (n_docs,) -> v (n_docs, n_vit, 128)."""
    n = grid[0] * grid[1]
    emb, high = model.image_features(x.to(model.dtype), hw, want_high=True)
    layout = cache.layout_for([[(n, gen_mode)]] * n_docs)
    pos = cache.positions_for(layout)
    h = model.llm.forward_packed(emb.reshape(n_docs * n, -1), pos, layout, cache, update_cache=False)
    return model.head(h.view(n_docs, n, -1), t, high, grid).float()


def _check_positions(model, docs, extra: int, who: str) -> None:
    """Refuse prompts that would run past the LLM's position limit (RoPE beyond max_position_embeddings: an
    untrained, silently degraded regime)."""
    limit = model.llm.config.max_position_embeddings
    for i, d in enumerate(docs):
        if d.length + extra > limit:
            more = f" + {extra} new tokens" if extra else " (the image's tokens included)"
            raise ValueError(f"{who}: prompt {i} is {d.length} tokens{more}, beyond the model's position limit of "
                             f"{limit} (max_position_embeddings); shorten the prompt")


def _prefixes(model, samples, hw, use_cfg: bool, who: str, keys=None):
    """Per document, what comes before the generated image's span (its <|vision_start|> included): the segments
    and the input embeddings (images to understand placed); with CFG the null-prompt documents follow the N
    conditional ones.  keys: one per sample; samples with equal keys are encoded and embedded once (RL recomputes
    many (x_t, t) rows of the same prompt)."""
    if keys is not None:
        first: dict = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        uniq = list(first.values())
        if len(uniq) < len(samples):
            segs, embs = _prefixes(model, [samples[i] for i in uniq], hw, use_cfg, who)
            pos = {k: j for j, k in enumerate(first)}
            idx = [pos[k] for k in keys]
            U = len(uniq)
            out_s = [segs[j] for j in idx] + ([segs[U + j] for j in idx] if use_cfg else [])
            out_e = [embs[j] for j in idx] + ([embs[U + j] for j in idx] if use_cfg else [])
            return out_s, out_e
    dev = model.device
    placeholder = torch.zeros(3, *hw)
    spec = model.pack_spec()
    docs = [encode_sample(Sample(list(s.items) + [ImageItem(placeholder, "generate")]), spec, i)
            for i, s in enumerate(samples)]
    _check_positions(model, docs, 0, who)
    prefix_ids, prefix_segs, prefix_embeds = [], [], []
    for d in docs:
        start = d.image_rows[-1][0]
        prefix_ids.append(d.input_ids[:start])
        prefix_segs.append(list(d.segments[:-2]))         # drop the generated span and the trailing vision_end
        prefix_embeds.append(_embed_doc(model, _Prefix(d, start), dev))
    if use_cfg:
        null = [model.null_prompt_ids(ids.to(dev)) for ids in prefix_ids]
        for d, ids, segs in zip(docs, null, list(prefix_segs)):
            prefix_embeds.append(_embed_doc(model, _Prefix(d, ids.shape[0], ids), dev))
            prefix_segs.append(segs)
    return prefix_segs, prefix_embeds


def velocity(model, prompts, x, t, height: int | None = None, width: int | None = None,
             cfg_scale: float = 1.0) -> torch.Tensor:
    """The sampler's velocity v(x_t, t | prompt) for a batch, differentiable (no KV cache): what RL trains through.

    prompts: one per row of x (a str or a Sample of text / images to understand); x (N, n, 128) latents on the
    generated image's token grid; t (N,) or a float; with cfg_scale != 1 the guided v_u + s (v_c - v_u), as the
    sampler uses.  Each row runs [prompt, image tokens of x] as one packed document: the numbers of the sampler's
    cached path up to float rounding.  Returns float32 (N, n, 128)."""
    if isinstance(prompts, (str, Sample)):
        prompts = [prompts]
    samples = [_as_sample(p, "velocity") for p in prompts]
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
    use_cfg = cfg_scale != 1.0
    keys = [p if isinstance(p, str) else id(p) for p in prompts]
    segs, embeds = _prefixes(model, samples, hw, use_cfg, "velocity", keys)
    k = 2 if use_cfg else 1
    xin = torch.cat([x] * k).to(dev)
    # the VAE decoder copy and the ViT in chunks of 32 images: one batch of hundreds of images was 2.5x slower on the
    # CPU for the same work (convolution activations far beyond the caches; bench/bench_rl.py)
    feats = [model.image_features(c.to(model.dtype), hw, want_high=True) for c in xin.split(32)]
    emb, high = torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats])
    parts, rows, off = [], [], 0
    for j, (sg, e) in enumerate(zip(segs, embeds)):
        parts += [e, emb[j].to(e.dtype)]
        rows.append(torch.arange(off + e.shape[0], off + e.shape[0] + n, device=dev))
        off += e.shape[0] + n
    from ..attention import SpanLayout
    from .llm import positions_in_document

    layout = SpanLayout.from_segments([sg + [(n, cfg.gen_mode)] for sg in segs], device=dev)
    h = model.llm.forward_packed(torch.cat(parts), positions_in_document(layout), layout)
    v = model.head(h[torch.cat(rows)].view(k * N, n, -1), torch.cat([t] * k), high, grid).float()
    if use_cfg:
        v = v[N:] + cfg_scale * (v[:N] - v[N:])
    return v


@torch.no_grad()
def _generate(model, samples, height, width, steps, cfg_scale, time_shift, seed, mode, sigma, return_trajectory,
              sde_steps=None, init_noise=None):
    cfg = model.config
    steps = cfg.sample_steps if steps is None else int(steps)
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
    use_cfg = cfg_scale != 1.0
    prefix_segs, prefix_embeds = _prefixes(model, samples, hw, use_cfg, "generate_image")
    n_docs = len(prefix_segs)
    cache = model.llm.new_cache()
    layout = cache.layout_for(prefix_segs, device=dev)
    model.llm.forward_packed(torch.cat(prefix_embeds), cache.positions_for(layout), layout, cache)

    gens = _generators(seed, N, "cpu", "generate_image")
    shared = len(set(map(id, gens))) == 1
    n_vit = 4 * grid[0] * grid[1]
    C = cfg.vae.packed_channels

    def randn():
        if shared:
            return torch.randn(N, n_vit, C, generator=gens[0]).to(dev)
        return torch.stack([torch.randn(n_vit, C, generator=g) for g in gens]).to(dev)

    if init_noise is None:
        x = randn()
    else:
        if not isinstance(init_noise, torch.Tensor) or tuple(init_noise.shape) != (N, n_vit, C):
            raise ValueError(f"init_noise must be a ({N}, {n_vit}, {C}) tensor (the initial x of each image), got "
                             f"{tuple(init_noise.shape) if isinstance(init_noise, torch.Tensor) else init_noise!r}")
        x = init_noise.to(dev, torch.float32)
    ts = umm_ops.time_shift(torch.linspace(0, 1, steps + 1, dtype=torch.float64), a).tolist()
    traj, logps = [x], []
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        xin = torch.cat([x, x]) if use_cfg else x
        v = _velocity(model, cache, xin, torch.full((n_docs,), t, device=dev), hw, grid, cfg.gen_mode, n_docs)
        if use_cfg:
            v_c, v_u = v[:N], v[N:]
            v = v_u + cfg_scale * (v_c - v_u)
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
    images = model.vae.decode(x.to(model.dtype), hw).float()
    model.train(was_training)
    if not torch.isfinite(images).all():
        bad = [i for i in range(N) if not torch.isfinite(images[i]).all()]
        raise FloatingPointError(f"generate_image: the generated image(s) {bad} hold NaN / Inf values (the model's "
                                 f"output or the sampler diverged; steps={steps}, cfg_scale={cfg_scale}); "
                                 f"no image is returned")
    out = dict(images=images, latents=x, timesteps=torch.tensor(ts))
    if return_trajectory or mode == "sde":
        out["trajectory"] = torch.stack(traj, 1)              # (N, steps + 1, n_vit, C)
    if mode == "sde":
        out["logprobs"] = torch.stack(logps, 1)               # (N, steps)
    return out


class _Prefix:
    """The first `length` tokens of an encoded document (optionally with replaced ids) for _embed_doc."""

    def __init__(self, doc, length, ids=None):
        self.input_ids = doc.input_ids[:length] if ids is None else ids
        rows = [(r, img) for r, img in zip(doc.image_rows, doc.images) if r[0] + r[1] <= length]
        self.image_rows = [r for r, _ in rows]
        self.images = [img for _, img in rows]


def generate_image(model, prompts, height: int | None = None, width: int | None = None, steps: int | None = None,
                   cfg_scale: float | None = None, time_shift: float | None = None, seed=0,
                   mode: str = "ode", sigma=None, return_trajectory: bool = False, sde_steps=None,
                   init_noise=None) -> dict:
    """Generate one image per prompt (a str or a Sample of text / images to understand).

    Defaults from the config: image_size, sample_steps, cfg_scale, time_shift.  mode "ode": Euler; "sde": Flow-GRPO
    transitions (sigma: float or umm_ops.SigmaSchedule, default SigmaSchedule(0.7); the last step, which lands on
    t = 1, is Euler) returning ``trajectory`` (N, steps + 1, n, 128) and ``logprobs`` (N, steps).  sde_steps: the
    step indices that are stochastic in mode "sde" (default all; the others are Euler steps with log-prob 0), or one
    such collection per prompt.
    seed: an int (one generator for the batch) or one int per prompt (each image's noise then does not depend on
    the batch).  init_noise: (N, n, 128) initial latents instead of drawn ones (e.g. one per group, as R3).
    Returns dict(images (N, 3, H, W) in [-1, 1], latents (N, n, 128), timesteps (steps + 1,), ...).
    """
    if isinstance(prompts, (str, Sample)):
        prompts = [prompts]
    if not prompts:
        raise ValueError("generate_image: expected at least one prompt")
    size = model.config.image_size
    samples = [_as_sample(p, "generate_image") for p in prompts]
    return _generate(model, samples, height or size, width or size, steps, cfg_scale, time_shift, seed, mode, sigma,
                     return_trajectory, sde_steps, init_noise)


def edit_image(model, images, instructions, height: int | None = None, width: int | None = None, **kw) -> dict:
    """Image-conditioned generation: the prompt is [image to understand, instruction text] (one per pair).
    Output size defaults to the input image's size.  Other arguments as generate_image."""
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        images = [images]
    if isinstance(instructions, str):
        instructions = [instructions]
    if len(images) != len(instructions):
        raise ValueError(f"edit_image: {len(images)} images for {len(instructions)} instructions")
    samples = [Sample([ImageItem(img, "understand"), TextItem(txt)]) for img, txt in zip(images, instructions)]
    h, w = images[0].shape[-2:]
    return generate_image(model, samples, height=height or h, width=width or w, **kw)
