"""sgt: semantic generative tuning (SGT, papers.md section 3) - post-training with a generative proxy task mixed
with understanding SFT data.

    umm train --recipe sgt --set recipe.init=runs/base5/checkpoint-1800 --set recipe.proxy=instance_seg \\
        --steps 100 --out runs/sgt-inst

A proxy sample is an editing sample (:mod:`umm_ops.data.proxy`): [the picture (or its degraded copy) to understand,
no loss] [the proxy's instruction, e.g. "Segment instances with different colors.", no loss] [the proxy target
(instance map, edge map, clean picture, ...) generated: the flow loss on its VAE latent, nothing else].
``recipe.proxy`` picks one task of the hierarchy (reconstruction, denoising, deblurring, super_resolution,
inpainting, edge, semantic_seg, instance_seg) or ``none`` (understanding data only: the control arm).

Data: per SyntheticWorld record, the understanding slots of the SFT recipe (``recipe.tasks``, default caption x2,
vqa, vqa_short: :class:`umm_ops.train.recipes.sft.SyntheticSFTDataset`) and ``proxy_ratio`` x as many proxy slots
(the paper's ~2 proxy : 1 VQA is the default 2.0); the proxy slot k of record r draws its degradation with
seed_of(seed, "proxy", k).  With ``recipe.proxy_data`` (a COCO-style instances JSON, ``proxy_image_dir``) the
proxy samples come from its pictures instead (record r -> picture r mod their number,
:func:`umm_ops.data.proxy.coco_proxy_record`); the understanding samples stay the world's.  The step is the SFT recipe's (text cross-entropy + flow MSE, flow noise and CFG prompt
dropout drawn per (step, sample) by :mod:`umm_ops.train.policy`).

Defaults, SGT's settings scaled to the tiny model: lr 1e-4 (SGT's; also where the base schedule's cosine ends),
every module trained at that lr except the VAE (frozen encoder and, as in the base schedule, its decoder copy), a
short warm-up, 300 steps; ``recipe.init`` = the run / checkpoint to continue (the base run).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...utils import seed_of
from ..spec import register
from .sft import SFTRecipe, SFTRecipeConfig, SyntheticSFTDataset

__all__ = ["SGTRecipe", "SGTConfig", "SGTDataset"]


@dataclass
class SGTConfig(SFTRecipeConfig):
    tasks: tuple = ("caption", "vqa", "vqa_short")   # the understanding SFT tasks mixed in (any SFT task is accepted)
    caption_first: int = 0                           # the base schedule's opening; SGT continues a trained model
    proxy: str = "instance_seg"                      # a task of umm_ops.data.proxy.PROXIES, or "none"
    proxy_ratio: float = 2.0                         # proxy samples per understanding sample (SGT: ~2 : 1)
    eval_seg: int = 32                               # held-out instance maps scored (seg-miou) after training,
                                                     # when proxy = instance_seg
    proxy_data: str = ""                             # COCO-style instances JSON: the proxy samples come from its
                                                     # pictures (umm_ops.data.CocoReader) instead of the world's
    proxy_image_dir: str = ""                        # proxy_data's image folder ("": the JSON's folder)
    proxy_skip_bad: bool = False                     # skip proxy_data's unusable pictures (the next one is taken)

    def understanding_slots(self) -> int:
        return sum(self.weights())

    def proxy_slots(self) -> int:
        return 0 if self.proxy == "none" else int(round(self.proxy_ratio * self.understanding_slots()))

    def validate(self):
        from ...data.proxy import PROXIES
        from ..config import requirement

        super().validate()
        need = requirement("recipe", self)

        need(self.proxy in PROXIES + ("none",), "proxy", f"must be one of {', '.join(PROXIES)} or none")
        need(self.caption_first == 0, "caption_first", "must be 0 for sgt (the captions-first opening belongs to "
                                                       "the base schedule)")
        r = self.proxy_ratio
        need(not isinstance(r, bool) and isinstance(r, (int, float)) and r > 0, "proxy_ratio",
             "must be a number > 0 (proxy samples per understanding sample; recipe.proxy=none for none)")
        u = self.understanding_slots()
        need(abs(r * u - round(r * u)) < 1e-9, "proxy_ratio",
             f"times the {u} understanding samples per record ({list(self.tasks)}, weights {list(self.weights())}) "
             f"must be a whole number of proxy samples per record")
        need(self.eval_seg >= 0, "eval_seg", "must be >= 0")
        need(not self.proxy_data or self.proxy != "none", "proxy_data",
             "is read by a proxy task: set recipe.proxy to one of the hierarchy, not none")
        return self


class SGTDataset:
    """Map-style: record r (``first + i // slots``) gives ``proxy`` slots then the SFT dataset's understanding
    slots; the same sample for the same index in any process."""

    def __init__(self, size: int, seed: int, records: int, proxy: str, proxy_slots: int,
                 tasks=("caption", "vqa", "vqa_short"), task_weights=(), first: int = 0, max_objects: int = 2,
                 proxy_data=None, **world):
        from ...data.proxy import check_proxy

        if proxy != "none":
            check_proxy(proxy)
        if proxy == "none" and proxy_slots:
            raise ValueError(f"SGTDataset: proxy 'none' takes 0 proxy slots, got {proxy_slots}")
        self.und = SyntheticSFTDataset(size, seed, records, tasks, max_objects=max_objects, first=first,
                                       task_weights=task_weights, **world)
        self.world, self.records, self.first, self.seed = self.und.world, records, first, seed
        self.proxy, self.n_proxy, self.n_und = proxy, int(proxy_slots), len(self.und.slots)
        self.proxy_data = proxy_data        # a CocoReader: proxy samples from its pictures
        if proxy_data is not None and (proxy == "none" or not len(proxy_data)):
            raise ValueError(f"SGTDataset: proxy_data needs a proxy task and a non-empty CocoReader, got proxy "
                             f"{proxy!r} and {len(proxy_data)} picture(s)")

    @property
    def slots_per_record(self) -> int:
        return self.n_proxy + self.n_und

    def __len__(self) -> int:
        return self.records * self.slots_per_record

    def __getitem__(self, i):
        from ...data.proxy import proxy_sample

        if isinstance(i, bool) or not isinstance(i, int) or not (0 <= i < len(self)):
            raise IndexError(f"SGTDataset: index {i!r} out of range [0, {len(self)})")
        k, s = divmod(i, self.slots_per_record)
        if s < self.n_proxy:
            rec = self.world[self.first + k] if self.proxy_data is None else self._picture(self.first + k)
            return proxy_sample(rec, self.proxy, seed=seed_of(self.seed, "proxy", s), draw=s)
        return self.und[k * self.n_und + s - self.n_proxy]

    def _picture(self, r: int):
        """Run record r's picture of proxy_data: its picture r mod its length (with skip_bad the next usable one),
        its draws seeded by r (a picture seen again gets new noise / holes)."""
        from ...data.proxy import coco_proxy_record

        rec = self.proxy_data.cyclic(r)
        return coco_proxy_record(rec, self.world.size, r, self.seed, self.proxy_data.categories)

    def images(self, n: int):
        return self.und.images(n)


@register
class SGTRecipe(SFTRecipe):
    name = "sgt"
    config_class = SGTConfig
    run_defining = SFTRecipe.run_defining + ("proxy", "proxy_ratio", "proxy_data", "proxy_image_dir",
                                             "proxy_skip_bad")

    def _dataset(self, cfg) -> SGTDataset:
        r = cfg.recipe
        return SGTDataset(r.image_size, cfg.job.seed, r.train_records, r.proxy, r.proxy_slots(), r.tasks,
                          task_weights=r.weights(), proxy_data=self._proxy_data(cfg), **r.world_kwargs())

    def _proxy_data(self, cfg):
        """recipe.proxy_data read once per recipe (None without it)."""
        r = cfg.recipe
        if not r.proxy_data:
            return None
        from ...data.readers import CocoReader

        return self.cached_reader(("coco", r.proxy_data, r.proxy_image_dir, r.proxy_skip_bad),
                                  lambda: CocoReader(r.proxy_data, image_dir=r.proxy_image_dir or None,
                                                     skip_bad=r.proxy_skip_bad))

    def build_model(self, cfg):
        if cfg.recipe.init:
            _warn_world(cfg)
        return super().build_model(cfg)

    def engine_defaults(self) -> dict:
        return {"job.steps": 300, "optim.lr": 1e-4, "optim.lr_scales": (), "schedule.warmup": 10,
                "checkpoint.every": 100}

    def describe(self, cfg) -> str:
        r = cfg.recipe
        mix = ("understanding only" if r.proxy == "none" else
               f"proxy {r.proxy} x{r.proxy_slots()} : understanding x{r.understanding_slots()} per record")
        return f"sgt from {r.init or 'a fresh ' + cfg.model.preset}: {mix} ({'/'.join(r.tasks)}), {r.image_size} px"

    def shorthands(self) -> dict:
        return {**super().shorthands(),
                "--proxy": ("recipe.proxy", "value", "the proxy task (or none)"),
                "--init": ("recipe.init", "value", "run / checkpoint to continue (the base run)")}

    def evaluate(self, model, cfg, out_dir) -> dict:
        res = super().evaluate(model, cfg, out_dir)
        r = cfg.recipe
        if r.proxy == "instance_seg" and r.eval_seg > 0:
            from ...eval.runner import evaluate

            ev = evaluate(model, "seg-miou", n=r.eval_seg, seed=cfg.job.seed, image_size=r.image_size,
                          out_dir=f"{out_dir}/eval/seg-miou", world_kwargs={"seed": cfg.job.seed, **r.world_kwargs()},
                          first=r.train_records, steps=r.eval_steps)["tasks"]["seg-miou"]
            res["seg_miou"] = {k: ev[k] for k in ("score", "ci95", "n", "metrics") if k in ev}
        return res

    def report(self, results: dict) -> list:
        lines = super().report(results)
        if "seg_miou" in results:
            s = results["seg_miou"]
            lines.append(f"eval seg-miou: {s['score']:.3f} {list(map(lambda v: round(v, 3), s['ci95']))} instance "
                         f"mIoU of generated maps on {s['n']} held-out pictures")
        return lines


def _warn_world(cfg) -> None:
    """Say so when the init run trained on another world than this run's recipe keys describe."""
    import sys

    from .flow_grpo import _init_config

    saved = _init_config(cfg.recipe.init)
    if not saved or saved.get("recipe_name") not in ("sft", "sgt"):
        return
    mine = cfg.recipe.world_kwargs()
    theirs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved["recipe"].items() if k in mine}
    diff = {k: (theirs[k], mine[k]) for k in theirs if theirs[k] != mine[k]}
    if diff:
        print(f"sgt: the init run {cfg.recipe.init} trained on another world: "
              + ", ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in diff.items()), file=sys.stderr)
