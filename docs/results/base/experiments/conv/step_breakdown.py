"""Where a training step of the base schedule spends its time (stop 39).

Real micro-batches of the default SFT mix (the recipe's dataset after the captions-first opening, 1024-token packs),
the tiny preset as the recipe trains it (the VAE and its decoder copy frozen), forward + backward; wall time of the
forward of each part (VAE encoder, decoder copy, ViT, LLM, head), measured by wrapping their calls, and the backward.
Minimum over the repeats per batch, summed over the batches.

    OMP_NUM_THREADS=2 python step_breakdown.py [THREADS] [BATCHES] [cheers] [bf16] [cold] [vae-bf16]

With ``cheers`` the tiny preset without its conv stage (Cheers' head: ``HeadConfig.without_conv_stage()``,
what ``umm train --set model.conv_widths=[]`` trains), on the same batches.  With ``bf16`` the forward runs under
bf16 autocast, as ``umm train --mixed-precision bf16`` runs it without FSDP (stop 40).  By default each batch's
time is the minimum of repeats 2-4 of that batch (warm: its shapes seen before); with ``cold`` it is the first run of
the batch, as in training, where every packed batch brings new shapes (stop 41: bf16 autocast is 1.3x faster warm and
level cold on the Xeon).  With ``vae-bf16`` the frozen VAE (encoder and decoder copy) computes in bf16
(``VAEConfig.compute_dtype``, what ``umm train`` does by default since stop 42: ``model.vae_compute_dtype``).
"""
import contextlib
import collections
import dataclasses
import random
import sys
import time

import torch

from umm_ops.data.packing import pack
from umm_ops.model import CheersModel, preset
from umm_ops.train import policy
from umm_ops.train.recipes.sft import SFTRecipeConfig, SyntheticSFTDataset

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
n_batches = int(sys.argv[2]) if len(sys.argv) > 2 else 4
torch.set_num_threads(threads)
torch.manual_seed(0)
r = SFTRecipeConfig()
ds = SyntheticSFTDataset(r.image_size, 0, r.train_records, r.tasks, task_weights=r.weights(), caption_first=0,
                         **r.world_kwargs())
flags = set(sys.argv[3:])
OPTIONS = {"cheers", "bf16", "cold", "vae-bf16"}
if flags - OPTIONS:
    raise SystemExit(f"unknown options {sorted(flags - OPTIONS)}: use {', '.join(sorted(OPTIONS))}")
cheers_head = "cheers" in flags
autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "bf16" in flags else contextlib.nullcontext
cfg = preset("tiny")
if cheers_head:
    cfg = dataclasses.replace(cfg, head=cfg.head.without_conv_stage())
if "vae-bf16" in flags:
    cfg.vae.compute_dtype = "bfloat16"
m = CheersModel(cfg)
m.train()
m.vae.requires_grad_(False)
spec = m.pack_spec(budget=1024)
cold = "cold" in flags
n_run = n_batches + 1 if cold else n_batches   # cold: one more batch first, not counted (the process's warm-up)
idx = random.Random(0).sample(range(len(ds)), 60 * n_run)
batches = []
for b in pack([ds[i] for i in idx], spec):
    if len(batches) < n_run:
        batches.append(b)
acc = collections.defaultdict(float)


def wrap(obj, name, label):
    f = getattr(obj, name)

    def g(*a, **k):
        t = time.perf_counter()
        out = f(*a, **k)
        acc[label] += time.perf_counter() - t
        return out
    setattr(obj, name, g)


wrap(m.vae, "encode", "vae encoder (frozen)")
wrap(m.vae, "decode_trainable", "vae decoder copy (frozen)")
wrap(m.vit, "forward", "vit")
wrap(m.llm, "forward_packed", "llm")
wrap(m.head, "forward", "head")
total = collections.defaultdict(float)
for bi, b in enumerate(batches):
    inp = policy.training_inputs(m, b, seed=0, cfg_dropout_p=m.config.cfg_dropout)
    best = None
    for rep in range(1 if cold else 4):
        acc.clear()
        m.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with autocast():
            out = m(b, **inp)
        t1 = time.perf_counter()
        out["loss"].backward()
        t2 = time.perf_counter()
        row = dict(acc, forward=t1 - t0, backward=t2 - t1, step=t2 - t0)
        if (cold and rep == 0) or (not cold and rep and (best is None or row["step"] < best["step"])):
            best = row
    if cold and bi == 0:
        continue
    for k, v in best.items():
        total[k] += v
    total["images"] += len(b.images)
    total["tokens"] += b.num_tokens
    total["docs"] += b.num_docs
label = ("Cheers' head" if cheers_head else "the tiny preset") + (", bf16 autocast" if "bf16" in flags else "") \
    + (", the frozen VAE in bf16" if "vae-bf16" in flags else "") \
    + (", cold (each batch's first run)" if cold else ", warm (each batch's best of repeats 2-4)")
print(f"{label}, {threads} threads, {n_batches} real 1024-token batches of the default mix: per batch "
      f"{total['docs'] / n_batches:.1f} documents, {total['images'] / n_batches:.1f} images, "
      f"{total['tokens'] / n_batches:.0f} tokens")
step = total["step"]
for k in ("step", "forward", "backward", "vae encoder (frozen)", "vae decoder copy (frozen)", "vit", "llm", "head"):
    print(f"  {k:28s} {1000 * total[k] / n_batches:7.1f} ms  ({100 * total[k] / step:4.1f}% of the step)")
