"""Rollouts for online RL: G samples per prompt, text through the KV-cache decoder and images through the SDE
sampler, with the sampling policy's log-probs recorded, and the differentiable recomputation of those log-probs
under the policy being trained (and a frozen reference).

Every random draw of a rollout is seeded by (run seed, optimizer step, prompt key, sample index) through one
generator per trajectory: a trajectory does not depend on the other prompts of the batch, on the batch's order or
on the rank that runs it, so a rollout replays exactly and sharding prompt groups over ranks changes nothing.

Which sampler steps of an image are stochastic (and recorded for the loss) is an :class:`SDESchedule`; the others
run as Euler (ODE) steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import umm_ops

from ..utils import generator, seed_of

__all__ = ["SDESchedule", "TextRollout", "ImageRollout", "rollout_text", "rollout_images", "sample_images",
           "token_logprobs", "image_logprobs", "trajectory_seed"]


def trajectory_seed(seed: int, step: int, key, sample: int) -> int:
    """The seed of one trajectory: (run seed, optimizer step, prompt key, sample index in its group)."""
    return seed_of(int(seed), int(step), "rollout", str(key), int(sample))


def _check_group(prompts, keys, group_size):
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a non-empty list, got {type(prompts).__name__}")
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError(f"keys must give one key per prompt ({len(prompts)}), got {len(keys)}")
    if len(set(map(str, keys))) != len(keys):
        raise ValueError(f"keys must be distinct (they seed the rollouts), got {keys}")
    return keys


# ----------------------------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class SDESchedule:
    """Which sampler steps of a trajectory are stochastic (SDE, recorded) - the others run as Euler steps.

    kind "all": every step but the last (which lands on t = 1 and is deterministic) - Flow-GRPO.
    kind "window": ``width`` consecutive steps from ``start``, moved by one step every ``shift_every`` optimizer
        steps (0: fixed) and wrapping within the stochastic range - MixGRPO's sliding window.
    kind "cycle": one step per optimizer step, cycling through the first ``recordable`` steps (0: all but the
        last) - CLEAR (20 recordable of 30).
    kind "random": one step per trajectory, uniform in [low, high) (high 0: the last stochastic step + 1), drawn
        from the trajectory's seed - R3.
    """

    kind: str = "all"
    start: int = 0
    width: int = 1
    shift_every: int = 0
    recordable: int = 0
    low: int = 0
    high: int = 0

    KINDS = ("all", "window", "cycle", "random")

    def validate(self, steps: int) -> "SDESchedule":
        if self.kind not in self.KINDS:
            raise ValueError(f"SDESchedule.kind must be one of {self.KINDS}, got {self.kind!r}")
        if steps < 2:
            raise ValueError(f"an SDE rollout needs >= 2 sampler steps (the last one is deterministic), got {steps}")
        last = steps - 1                  # stochastic steps are 0 .. last - 1
        if self.kind == "window" and not (1 <= self.width <= last and 0 <= self.start < last):
            raise ValueError(f"SDESchedule window: need 1 <= width <= {last} and 0 <= start < {last} for {steps} "
                             f"steps, got start={self.start} width={self.width}")
        if self.kind == "cycle" and not 0 <= self.recordable <= last:
            raise ValueError(f"SDESchedule cycle: recordable must be in [0, {last}] for {steps} steps, got "
                             f"{self.recordable}")
        if self.kind == "random":
            hi = self.high or last
            if not 0 <= self.low < hi <= last:
                raise ValueError(f"SDESchedule random: need 0 <= low < high <= {last} for {steps} steps, got "
                                 f"low={self.low} high={self.high}")
        if self.shift_every < 0:
            raise ValueError(f"SDESchedule: shift_every must be >= 0, got {self.shift_every}")
        return self

    def recorded(self, steps: int) -> int:
        """Steps recorded per trajectory."""
        return {"all": steps - 1, "window": self.width}.get(self.kind, 1)

    def steps_for(self, steps: int, opt_step: int, traj_seed: int) -> list:
        """The stochastic step indices of one trajectory (sorted)."""
        self.validate(steps)
        last = steps - 1
        if self.kind == "all":
            return list(range(last))
        if self.kind == "window":
            s = self.start + (opt_step // self.shift_every if self.shift_every else 0)
            s = s % (last - self.width + 1) if s + self.width > last else s
            return list(range(s, s + self.width))
        if self.kind == "cycle":
            return [opt_step % (self.recordable or last)]
        hi = self.high or last
        g = generator(traj_seed, "sde-step")
        return [self.low + int(torch.randint(hi - self.low, (), generator=g))]


# ----------------------------------------------------------------------------------------------- text
@dataclass
class TextRollout:
    """G continuations per prompt, consecutive per group: ``prompts`` / ``keys`` (B = groups x G, repeated),
    ``texts``, ``ids`` (lists, a closing eos included), ``logprobs`` (B, T) of the sampling policy, ``mask`` (B, T)
    bool, ``finish_reasons``, ``seeds`` (one per trajectory)."""

    prompts: list
    keys: list
    group_size: int
    texts: list
    ids: list
    logprobs: torch.Tensor
    mask: torch.Tensor
    finish_reasons: list
    seeds: list
    meta: list = field(default_factory=list)


def _pad(rows: list, T: int, value=0.0, dtype=torch.float32) -> torch.Tensor:
    out = torch.full((len(rows), T), value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def rollout_text(model, prompts, group_size: int, *, seed: int = 0, step: int = 0, keys=None,
                 max_new_tokens: int = 32, temperature: float = 1.0, top_k=None, top_p=None, stop=None,
                 meta=None) -> TextRollout:
    """Sample ``group_size`` continuations of each prompt (a str or a Sample with images to understand), all in one
    packed KV-cache batch, each from its own generator seeded by :func:`trajectory_seed`.  Recompute their log-probs
    with ``token_logprobs(model, ro.prompts, ro.ids, temperature, seed=ro.seeds)`` (the seeds also chose the dummy
    images of a profile that has them)."""
    from ..model.generate import decode

    keys = _check_group(prompts, keys, group_size)
    P = [p for p in prompts for _ in range(group_size)]
    K = [k for k in keys for _ in range(group_size)]
    seeds = [trajectory_seed(seed, step, k, j) for k in keys for j in range(group_size)]
    res = decode(model, P, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 stop=stop, seed=seeds)
    T = max(1, max(len(r["ids"]) for r in res))
    ids = [r["ids"] for r in res]
    mask = _pad([[1] * len(i) for i in ids], T, 0, torch.bool)
    lp = _pad([r["logprobs"].tolist() for r in res], T)
    m = [dict(x) for x in meta for _ in range(group_size)] if meta is not None else []
    return TextRollout(P, K, group_size, [r["text"] for r in res], ids, lp, mask,
                       [r["finish_reason"] for r in res], seeds, m)


def token_logprobs(model, prompts, ids, temperature: float = 1.0, reference=None, seed=None, chat=None,
                   dummy_image=None):
    """Log-probs of given continuations under ``model`` (differentiable) - (B, T) float32 and the (B, T) mask.

    prompts: one per continuation (a str, a Sample or token ids); ids: the continuations' token lists (as sampled:
    never re-tokenised text).  Each prompt is laid out exactly as :func:`umm_ops.model.generate.decode` fed it
    (the model's profile: chat template, image wrappers, the dummy image in front of a prompt without one), then its
    continuation; each [prompt, continuation] is one packed document, the whole batch one forward; the head runs
    through ``umm_ops.linear_logprob`` (no (n, V) logits) unless ``model.config.fused_text_loss`` is off.
    temperature: the sampling temperature (log-probs of softmax(logits / temperature), as recorded at rollout).
    seed / chat / dummy_image: what the continuations were sampled with (decode's arguments; TextRollout.seeds for
    :func:`rollout_text`): under a profile with dummy images they choose the dummy, so `seed` (or `dummy_image`) is
    required when a prompt has no image there; otherwise unused."""
    from ..data.packing import EncodedSample, collate_docs
    from ..model.generate import _text_docs
    from ..model.losses import token_logprobs as text_logprobs

    if len(prompts) != len(ids):
        raise ValueError(f"token_logprobs: {len(prompts)} prompts for {len(ids)} continuations")
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if seed is None and dummy_image is None:
        bare = _without_image(model, prompts)
        if bare:
            raise ValueError(f"token_logprobs: under the {model.profile.name!r} profile prompt {bare[0]} (no image) "
                             f"was decoded with a dummy image drawn from decode's seed: pass seed= (the seeds "
                             f"decode was given, TextRollout.seeds) or dummy_image=, got neither")
    docs_in = _text_docs(model, list(prompts), 0 if seed is None else seed, chat, dummy_image, "token_logprobs")
    docs, rows, T = [], [], max(1, max(len(i) for i in ids))
    off = 0
    for j, (di, cont) in enumerate(zip(docs_in, ids)):
        d = EncodedSample(j, di.input_ids, torch.full_like(di.input_ids, -100), list(di.segments), list(di.images),
                          list(di.image_rows), [1.0] * len(di.images), [], {})
        n0 = d.length
        if cont:
            extra = torch.tensor(cont, dtype=torch.int64)
            d.input_ids = torch.cat([d.input_ids, extra])
            d.labels = torch.full_like(d.input_ids, -100)
            if d.segments and d.segments[-1][1] == "causal":
                d.segments = list(d.segments[:-1]) + [(d.segments[-1][0] + len(cont), "causal")]
            else:
                d.segments = list(d.segments) + [(len(cont), "causal")]
        rows.append((off + n0 - 1, len(cont)))
        off += d.length
        docs.append(d)
    batch = collate_docs(docs)
    batch.labels = torch.full_like(batch.labels, -100)      # no text loss: the log-probs are computed here
    out = model(batch, return_outputs=True, noise=None)
    hidden = out["hidden"]
    labels = torch.full((hidden.shape[0],), -100, dtype=torch.int64)
    for (s0, n), c in zip(rows, ids):
        if n:
            labels[s0:s0 + n] = torch.as_tensor(c, dtype=torch.int64)
    head = model.llm.lm_head
    lp_flat = text_logprobs(hidden, labels.to(hidden.device), model.llm.logits,
                            head.weight if model.config.fused_text_loss else None, temperature=temperature)
    B = len(ids)
    mask = torch.zeros(B, T, dtype=torch.bool, device=hidden.device)
    for i, c in enumerate(ids):
        mask[i, :len(c)] = True
    lp = torch.zeros(B, T, device=hidden.device, dtype=lp_flat.dtype).masked_scatter(mask, lp_flat)
    return lp, mask


# ----------------------------------------------------------------------------------------------- images
@dataclass
class ImageRollout:
    """G images per prompt, consecutive per group, and their recorded SDE steps.

    images (B, 3, H, W) in the model's pixel range (its profile's); latents (B, n, C); x / x_next (B, S, n, C): the
    state before and after each of the S recorded steps; t / t_next (B, S); logprobs (B, S): the transition
    log-probs under the rollout policy (mean over elements); steps (B, S) their indices; sigma; cfg_scale; height,
    width; seeds (one per trajectory: its noise and, under a profile with dummy images, its dummy image);
    image_cfg_scale / cfg_renorm / cfg_interval: the two-scale guidance of edits the images were sampled with
    (``umm_ops.model.generate.guide``; 1 / "none": one scale) and the times it applied at (None: all)."""

    prompts: list
    keys: list
    group_size: int
    images: torch.Tensor
    latents: torch.Tensor
    x: torch.Tensor
    x_next: torch.Tensor
    t: torch.Tensor
    t_next: torch.Tensor
    logprobs: torch.Tensor
    steps: torch.Tensor
    sigma: object
    cfg_scale: float
    height: int
    width: int
    seeds: list
    meta: list = field(default_factory=list)
    image_cfg_scale: float = 1.0
    cfg_renorm: str = "none"
    cfg_interval: object = None


def rollout_images(model, prompts, group_size: int, *, seed: int = 0, step: int = 0, keys=None, steps: int = 10,
                   cfg_scale: float | None = None, time_shift: float | None = None, sigma=0.7,
                   schedule: SDESchedule | None = None, height: int | None = None, width: int | None = None,
                   same_init_noise: bool = False, meta=None) -> ImageRollout:
    """Draw ``group_size`` images per prompt with the SDE sampler (CFG as configured), recording the steps the
    schedule makes stochastic.  sigma: a float (constant, CLEAR 0.3) or ``umm_ops.SigmaSchedule(a)``
    (Flow-GRPO's a sqrt((1 - t) / t)).  same_init_noise: every sample of a group starts from the same noise (R3)."""
    keys = _check_group(prompts, keys, group_size)
    G = group_size
    P = [p for p in prompts for _ in range(G)]
    K = [k for k in keys for _ in range(G)]
    seeds = [trajectory_seed(seed, step, k, j) for k in keys for j in range(G)]
    init_keys = [("rollout-init", str(k)) for k in K] if same_init_noise else None
    m = [dict(x) for x in meta for _ in range(G)] if meta is not None else []
    return sample_images(model, P, seeds, step=step, seed=seed, steps=steps, cfg_scale=cfg_scale,
                         time_shift=time_shift, sigma=sigma, schedule=schedule, height=height, width=width,
                         init_keys=init_keys, keys=K, group_size=G, meta=m)


def sample_images(model, prompts, seeds, *, step: int = 0, seed: int = 0, steps: int = 10, cfg_scale=None,
                  time_shift=None, sigma=0.7, schedule: SDESchedule | None = None, height=None, width=None,
                  init_keys=None, keys=None, group_size: int = 1, meta=None, image_cfg_scale: float = 1.0,
                  cfg_renorm: str = "none", cfg_interval=None) -> ImageRollout:
    """One SDE image per prompt, each from its own seed (``seeds``), recording the steps ``schedule`` makes
    stochastic; ``init_keys``: per prompt, a key of its initial noise (equal keys, equal noise).
    image_cfg_scale / cfg_renorm / cfg_interval: two-scale guidance of edits (``umm_ops.model.generate.guide``)
    and where it applies (``guided_at``)."""
    from ..model.generate import generate_image

    schedule = (schedule or SDESchedule()).validate(steps)
    sde = [schedule.steps_for(steps, step, s) for s in seeds]
    cfg = model.config
    H, W = int(height or cfg.image_size), int(width or cfg.image_size)
    init = None
    if init_keys is not None:
        n, C = model.latent_shape((H, W))
        init = torch.stack([torch.randn(n, C, generator=generator(seed, step, *k)) for k in init_keys])
    scale = cfg.cfg_scale if cfg_scale is None else float(cfg_scale)
    out = generate_image(model, list(prompts), height=H, width=W, steps=steps, cfg_scale=scale,
                         time_shift=time_shift, seed=list(seeds), mode="sde", sigma=sigma, sde_steps=sde,
                         init_noise=init, image_cfg_scale=image_cfg_scale, cfg_renorm=cfg_renorm,
                         cfg_interval=cfg_interval)
    traj, ts, lps = out["trajectory"], out["timesteps"].float(), out["logprobs"]
    idx = torch.tensor(sde, dtype=torch.int64)                                   # (B, S)
    ar = torch.arange(len(prompts))[:, None]
    return ImageRollout(list(prompts), list(keys if keys is not None else range(len(prompts))), group_size,
                        out["images"], out["latents"], traj[ar, idx], traj[ar, idx + 1], ts[idx], ts[idx + 1],
                        lps[ar, idx.to(lps.device)], idx, sigma, scale, H, W, list(seeds), list(meta or []),
                        float(image_cfg_scale), cfg_renorm,
                        None if cfg_interval is None else tuple(float(v) for v in cfg_interval))


def _without_image(model, prompts) -> list:
    """Indices of the prompts that get a dummy image under the model's profile (none without dummy images)."""
    from ..data.packing import ImageItem, Sample

    if not model.profile.dummy_image:
        return []
    return [j for j, p in enumerate(prompts) if not (isinstance(p, Sample) and
                                                    any(isinstance(it, ImageItem) for it in p.items))]


def _row_seeds(model, ro: ImageRollout, S: int):
    """The seed of each (prompt, step) row's dummy image: its trajectory's (generate_image drew the dummy from it)."""
    if len(ro.seeds) == len(ro.prompts):
        return [int(sd) for sd in ro.seeds for _ in range(S)]
    if _without_image(model, ro.prompts):
        raise ValueError(f"image_logprobs: under the {model.profile.name!r} profile each image was sampled after a "
                         f"dummy image drawn from its trajectory seed; the rollout must record them (ImageRollout."
                         f"seeds: one per prompt, {len(ro.prompts)}), got {len(ro.seeds)}")
    return 0


def image_logprobs(model, ro: ImageRollout, reference=None):
    """The recorded steps' transition log-probs under ``model`` (differentiable in its parameters), (B, S), and,
    with a ``reference`` model, ``umm_ops.flow_kl`` of the policy's to the reference's velocity (B, S) (else None).
    All B x S (prompt, x_t, t) rows run as one packed batch, each prompt laid out as the sampler laid it out (the
    model's profile; a dummy image drawn from the trajectory's seed, ``ro.seeds``)."""
    from ..model.generate import velocity

    B, S = ro.t.shape
    P = [p for p in ro.prompts for _ in range(S)]
    x = ro.x.reshape(B * S, *ro.x.shape[2:])
    xn = ro.x_next.reshape(B * S, *ro.x.shape[2:])
    t, tn = ro.t.reshape(-1), ro.t_next.reshape(-1)
    dev = model.device
    seeds = _row_seeds(model, ro, S)
    guidance = {"cfg_scale": ro.cfg_scale, "image_cfg_scale": ro.image_cfg_scale, "cfg_renorm": ro.cfg_renorm,
                "cfg_interval": ro.cfg_interval}
    v = velocity(model, P, x.to(dev), t.to(dev), ro.height, ro.width, seed=seeds, **guidance)
    lp = umm_ops.flow_logprob(x.to(dev), xn.to(dev), v, t.to(dev), tn.to(dev), ro.sigma).view(B, S)
    kl = None
    if reference is not None:
        with torch.no_grad():
            v_ref = velocity(reference, P, x.to(reference.device), t.to(reference.device), ro.height, ro.width,
                             seed=_row_seeds(reference, ro, S), **guidance).to(dev)
        kl = umm_ops.flow_kl(v, v_ref, t.to(dev), tn.to(dev), ro.sigma).view(B, S)
    return lp, kl
