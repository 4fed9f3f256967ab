"""Interleaved rollouts: text -> image -> text -> ... as one trajectory of segments (what CLEAR and R3 produce), and
the one-advantage loss over all of a trajectory's text tokens and recorded image steps.

A *plan* is a list of :class:`Seg` (kind "text" or "image", the sampling settings of that segment, and an optional
``when(trajectory) -> bool`` that skips the segment for trajectories where it is False: CLEAR restores only when
the model asked for it).  Each segment runs batched over the trajectories it applies to:

* a text segment continues the trajectory's context with the KV-cache decoder (``decode``) and records the sampled
  ids and their log-probs (the text it adds to the context is all it sampled, a stop string included);
* an image segment draws an image conditioned on the context with the SDE sampler (``sample_images``), records its
  stochastic steps, and appends the image to the context as an image to understand: it enters the next segment's
  context exactly as the model reads any image (VAE encode -> decoder copy -> ViT -> projector).

The context is a :class:`umm_ops.data.packing.Sample`: the prompt's items, then per segment the generated text
(``TextItem``) or image (``ImageItem(..., "understand")``).  Every segment keeps the context it was sampled from, and
the training recomputation uses those same contexts (so the recomputed log-probs are those of the sampled tokens and
steps).  Every draw is seeded by (run seed, step, prompt key, sample, segment index).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..utils import seed_of
from .losses import flow_pg_loss, token_pg_loss
from .rollout import ImageRollout, SDESchedule, _check_group, image_logprobs, sample_images, token_logprobs, \
    trajectory_seed

__all__ = ["Seg", "Trajectory", "rollout_interleaved", "interleaved_logprobs", "interleaved_pg_loss"]


@dataclass
class Seg:
    """One segment of a plan.  kind "text": ``max_new_tokens`` (its token budget), ``temperature``, ``top_k``,
    ``top_p``, ``stop`` (strings; the text is cut before them, the sampled ids keep them).  kind "image":
    ``steps``, ``cfg_scale``, ``image_cfg_scale`` / ``cfg_renorm`` / ``cfg_interval`` (two-scale guidance of
    edits and the times it applies at, R3),
    ``sigma``, ``schedule``, ``height`` / ``width``.  ``when``: run only for the
    trajectories where ``when(trajectory)`` is true (default all)."""

    kind: str
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple = ()
    steps: int = 10
    cfg_scale: float | None = None
    image_cfg_scale: float = 1.0
    cfg_renorm: str = "none"
    cfg_interval: object = None
    sigma: object = 0.7
    schedule: SDESchedule | None = None
    height: int | None = None
    width: int | None = None
    when: object = None
    context: object = None
    shared_noise: bool = False

    # shared_noise (image): the samples of a group start from the same initial noise (R3)

    # context: ``context(trajectory) -> Sample`` conditions this segment on something else than the running
    # context (R3's edit: [the image to edit, the instruction]); its output still joins the running context

    def __post_init__(self):
        if self.kind not in ("text", "image"):
            raise ValueError(f"Seg.kind must be 'text' or 'image', got {self.kind!r}")


@dataclass
class Trajectory:
    """One interleaved sample: its prompt, key, group index, the segments it ran (dicts: kind, context, and for
    seed (the segment's sampling seed), text ids / text / logprobs / finish_reason, for images image / latent (the
    final latent tokens) / x / x_next / t / t_next / logprobs / steps) and ``meta``.  ``text`` is the last text segment's text, ``image`` the last image: what rewards read."""

    prompt: object
    key: object
    sample: int
    segments: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def context(self):
        from ..data.packing import ImageItem, Sample, TextItem
        from ..model.generate import _as_sample

        items = list(_as_sample(self.prompt, "rollout_interleaved").items)
        for s in self.segments:
            if s["kind"] == "text":
                if s["context_text"]:
                    items.append(TextItem(s["context_text"]))
            else:
                items.append(ImageItem(s["image"], "understand"))
        return Sample(items)

    def as_reward_input(self) -> dict:
        texts = [s for s in self.segments if s["kind"] == "text"]
        images = [s for s in self.segments if s["kind"] == "image"]
        return {"prompt": self.prompt, "meta": self.meta, "text": texts[-1]["text"] if texts else None,
                "image": images[-1]["image"] if images else None, "restored": bool(images),
                "texts": [s["text"] for s in texts], "trajectory": self}


def rollout_interleaved(model, prompts, group_size: int, plan, *, seed: int = 0, step: int = 0, keys=None,
                        meta=None) -> list:
    """Run ``plan`` for ``group_size`` samples of each prompt -> a list of :class:`Trajectory` (groups consecutive)."""
    from ..model.generate import decode

    keys = _check_group(prompts, keys, group_size)
    if not plan:
        raise ValueError("rollout_interleaved: the plan needs at least one segment")
    trajs = [Trajectory(p, k, j, meta=dict(meta[i]) if meta is not None else {})
             for i, (p, k) in enumerate(zip(prompts, keys)) for j in range(group_size)]
    base = [trajectory_seed(seed, step, t.key, t.sample) for t in trajs]
    for si, seg in enumerate(plan):
        todo = [i for i, t in enumerate(trajs) if seg.when is None or seg.when(trajs[i])]
        if not todo:
            continue
        ctx = [trajs[i].context() if seg.context is None else seg.context(trajs[i]) for i in todo]
        seeds = [seed_of(base[i], "segment", si) for i in todo]
        if seg.kind == "text":
            res = decode(model, ctx, max_new_tokens=seg.max_new_tokens, temperature=seg.temperature,
                         top_k=seg.top_k, top_p=seg.top_p, stop=list(seg.stop), seed=seeds)
            eos = model.tokenizer.eos_id
            for i, c, r, sd in zip(todo, ctx, res, seeds):
                # what the model wrote joins the context as sampled (a stop string included, the eos not)
                full = model.tokenizer.decode([t for t in r["ids"] if t != eos])
                trajs[i].segments.append({"kind": "text", "index": si, "context": c, "ids": r["ids"], "seed": sd,
                                          "context_text": full,
                                          "text": r["text"], "logprobs": r["logprobs"],
                                          "finish_reason": r["finish_reason"], "temperature": seg.temperature})
        else:
            init = [("interleaved-init", str(trajs[i].key), si) for i in todo] if seg.shared_noise else None
            ro = sample_images(model, ctx, seeds, step=step, seed=seed, steps=seg.steps, cfg_scale=seg.cfg_scale,
                               sigma=seg.sigma, schedule=seg.schedule, height=seg.height, width=seg.width,
                               init_keys=init, image_cfg_scale=seg.image_cfg_scale, cfg_renorm=seg.cfg_renorm,
                               cfg_interval=seg.cfg_interval)
            for j, (i, c) in enumerate(zip(todo, ctx)):
                trajs[i].segments.append({"kind": "image", "index": si, "context": c, "image": ro.images[j],
                                          "seed": seeds[j],
                                          "latent": ro.latents[j], "x": ro.x[j], "x_next": ro.x_next[j],
                                          "t": ro.t[j],
                                          "t_next": ro.t_next[j], "logprobs": ro.logprobs[j], "steps": ro.steps[j],
                                          "sigma": ro.sigma, "cfg_scale": ro.cfg_scale,
                                          "image_cfg_scale": ro.image_cfg_scale, "cfg_renorm": ro.cfg_renorm,
                                          "cfg_interval": ro.cfg_interval,
                                          "hw": (ro.height, ro.width)})
    return trajs


def _pad_rows(rows, width, dtype, device):
    out = torch.zeros(len(rows), max(1, width), dtype=dtype, device=device)
    mask = torch.zeros(len(rows), max(1, width), dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        if len(r):
            out[b, :len(r)] = r
            mask[b, :len(r)] = True
    return out, mask


def interleaved_logprobs(model, trajs, reference=None) -> dict:
    """Recompute every trajectory's log-probs under ``model`` (differentiable): all text segments in one packed
    forward, all image segments' recorded steps in another.  Returns per trajectory, concatenated over its segments
    and padded: text_logp / text_old / text_mask (B, T) and image_logp / image_old / image_mask (B, S) (+ text_ref,
    image_kl with a reference model; None otherwise)."""
    dev = model.device
    texts = [(b, s) for b, t in enumerate(trajs) for s in t.segments if s["kind"] == "text" and s["ids"]]
    images = [(b, s) for b, t in enumerate(trajs) for s in t.segments if s["kind"] == "image"]
    out = {}
    B = len(trajs)
    # ---------------------------------------------------------------- text
    per_b = [[] for _ in range(B)]
    per_b_old = [[] for _ in range(B)]
    per_b_ref = [[] for _ in range(B)]
    by_temp: dict = {}
    for k, (b, s) in enumerate(texts):
        by_temp.setdefault(s["temperature"], []).append(k)
    flat = [None] * len(texts)
    flat_ref = [None] * len(texts)
    for temp, ks in by_temp.items():
        ctx = [texts[k][1]["context"] for k in ks]
        ids = [texts[k][1]["ids"] for k in ks]
        sds = [texts[k][1]["seed"] for k in ks]     # the decode seeds: they choose a profile's dummy image
        lp, mask = token_logprobs(model, ctx, ids, temperature=temp, seed=sds)
        ref = None
        if reference is not None:
            with torch.no_grad():
                ref, _ = token_logprobs(reference, ctx, ids, temperature=temp, seed=sds)
        for row, k in enumerate(ks):
            n = len(texts[k][1]["ids"])
            flat[k] = lp[row, :n]
            if ref is not None:
                flat_ref[k] = ref[row, :n].to(dev)
    for k, (b, s) in enumerate(texts):
        per_b[b].append(flat[k])
        per_b_old[b].append(s["logprobs"].to(dev))
        if reference is not None:
            per_b_ref[b].append(flat_ref[k])
    T = max([sum(x.shape[0] for x in r) for r in per_b] + [1])
    cat = lambda rs: [torch.cat(r) if r else torch.zeros(0, device=dev) for r in rs]  # noqa: E731
    out["text_logp"], out["text_mask"] = _pad_rows(cat(per_b), T, torch.float32, dev)
    out["text_old"], _ = _pad_rows(cat(per_b_old), T, torch.float32, dev)
    out["text_ref"] = _pad_rows(cat(per_b_ref), T, torch.float32, dev)[0] if reference is not None else None
    if not texts:        # keep the graph connected to the parameters for a step without any text
        out["text_logp"] = out["text_logp"] + 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)
    # ---------------------------------------------------------------- images
    img_b = [[] for _ in range(B)]
    img_old = [[] for _ in range(B)]
    img_kl = [[] for _ in range(B)]
    groups: dict = {}
    for k, (b, s) in enumerate(images):
        key = (s["hw"], s["cfg_scale"], s.get("image_cfg_scale", 1.0), s.get("cfg_renorm", "none"),
               s.get("cfg_interval"), repr(s["sigma"]), s["t"].shape[0])
        groups.setdefault(key, []).append(k)
    lp_of, kl_of = {}, {}
    for key, ks in groups.items():
        segs = [images[k][1] for k in ks]
        ro = ImageRollout([s["context"] for s in segs], list(range(len(segs))), 1,
                          torch.stack([s["image"] for s in segs]), None,
                          torch.stack([s["x"] for s in segs]), torch.stack([s["x_next"] for s in segs]),
                          torch.stack([s["t"] for s in segs]), torch.stack([s["t_next"] for s in segs]),
                          torch.stack([s["logprobs"] for s in segs]), torch.stack([s["steps"] for s in segs]),
                          segs[0]["sigma"], segs[0]["cfg_scale"], segs[0]["hw"][0], segs[0]["hw"][1],
                          [s["seed"] for s in segs], [], segs[0].get("image_cfg_scale", 1.0),
                          segs[0].get("cfg_renorm", "none"), segs[0].get("cfg_interval"))
        lp, kl = image_logprobs(model, ro, reference=reference)
        for row, k in enumerate(ks):
            lp_of[k] = lp[row]
            kl_of[k] = kl[row] if kl is not None else None
    for k, (b, s) in enumerate(images):
        img_b[b].append(lp_of[k])
        img_old[b].append(s["logprobs"].to(dev))
        if reference is not None:
            img_kl[b].append(kl_of[k])
    S = max([sum(x.shape[0] for x in r) for r in img_b] + [1])
    out["image_logp"], out["image_mask"] = _pad_rows(cat(img_b), S, torch.float32, dev)
    out["image_old"], _ = _pad_rows(cat(img_old), S, torch.float32, dev)
    out["image_kl"] = _pad_rows(cat(img_kl), S, torch.float32, dev)[0] if reference is not None else None
    return out


def interleaved_pg_loss(lp: dict, advantages, *, text_clip=0.2, text_kl_beta: float = 0.0, text_norm="token",
                        text_max_len: int | None = None, image_clip=0.2, image_kl_beta: float = 0.0,
                        image_weight: float = 1.0, adv_clip=None):
    """One update over interleaved trajectories with ONE advantage each (CLEAR, R3): ``token_pg_loss`` over all
    text tokens + ``image_weight`` x ``flow_pg_loss`` over all recorded image steps (CLEAR: image weight 0.5,
    text KL 0.04; R3: image weight 2.0, KL 0.001 on both).  A term without any token / step contributes 0.
    text_norm / text_max_len: ``token_pg_loss``'s norm and max_len ("constant" with the trajectory's token budget:
    Dr.GRPO, CLEAR).  Returns (loss, stats) with the stats of both terms prefixed text_ / image_."""
    adv = advantages.to(lp["text_logp"].device)
    t_loss, t_st = token_pg_loss(lp["text_logp"], lp["text_old"], adv, lp["text_mask"], ref_logp=lp["text_ref"],
                                 clip=text_clip, kl_beta=text_kl_beta, norm=text_norm, max_len=text_max_len)
    loss = t_loss
    stats = {f"text_{k}": v for k, v in t_st.items()}
    if bool(lp["image_mask"].any()):
        i_loss, i_st = flow_pg_loss(lp["image_logp"], lp["image_old"], adv, kl=lp["image_kl"], clip=image_clip,
                                    kl_beta=image_kl_beta, mask=lp["image_mask"], adv_clip=adv_clip)
        loss = loss + float(image_weight) * i_loss
        stats.update({f"image_{k}": v for k, v in i_st.items()})
    else:
        loss = loss + 0.0 * lp["image_logp"].sum()
    return loss, stats
