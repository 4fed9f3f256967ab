"""A minimal training loop that measures whether the tiny model learns to *read* objects: teacher-forced accuracy of
the colour and shape words of held-out single-object captions (200 scenes, records 50,000+), every 100 steps.
Used to find why the base run learned no object binding (docs/results/base/README.md, "Reading objects").

    STEPS=300 LR=1e-3 VS=0.1 python scripts/read_objects_loop.py              # captions only
    STEPS=300 LR=1e-3 VS=0.1 TASKS=caption,vqa CURR=150 python scripts/read_objects_loop.py

Environment: SIZE (64), STEPS (600), LR (2e-3, AdamW via the engine's build_optimizer / LRSchedule, 50 warmup
steps, cosine), VS (lr scale of vit. and und_projector.; VSV / VSP set them apart), TASKS (caption; or caption,vqa),
MAXO (objects per scene, 1), MC (1: multiple-choice VQA, 0: short answers), VQAP (fraction of VQA samples kept),
CURR (steps of captions only before TASKS), OSCALE (the world's object_scale), VITSIZE (the ViT's native image_size).  Not a test: ~0.3 s per step on
2 cores.  Chance: colour 0.125, shape 0.25.
"""
import os
import sys
import time

import torch

from umm_ops.model import CheersModel
from umm_ops.data.synthetic import SyntheticWorld, to_samples
from umm_ops.data.packing import pack
from umm_ops.train.engine.optim import build_optimizer, LRSchedule
from umm_ops.train import Config
torch.manual_seed(0)
SIZE=int(os.environ.get("SIZE",64)); STEPS=int(os.environ.get("STEPS",600)); LR=float(os.environ.get("LR",2e-3))
VS=os.environ.get("VS","1"); TASKS=tuple(os.environ.get("TASKS","caption").split(","))
MAXO=int(os.environ.get("MAXO",1)); OSCALE=float(os.environ.get("OSCALE",1))
from umm_ops.model.config import preset
pc = preset("tiny")
if os.environ.get("VITSIZE"): pc.vit["image_size"] = int(os.environ["VITSIZE"])
m = CheersModel(pc); m.vae.decoder_copy.requires_grad_(False); m.train()
tok = m.tokenizer
w = SyntheticWorld(size=SIZE, max_objects=MAXO, kinds=("circle","square","triangle","cross"), two_tone=0.0, object_scale=OSCALE)
cfg = Config.build("sft", overrides=[f"optim.lr={LR}"] + ([f"optim.lr_scales=vit.:{os.environ.get('VSV',VS)},und_projector.:{os.environ.get('VSP',VS)}"]))
opt = build_optimizer(m, cfg.optim); sched = LRSchedule(LR, STEPS, 50)
spec = m.pack_spec(budget=1024)
import random
VQAP=float(os.environ.get("VQAP",1)); CURR=int(os.environ.get("CURR",0)); STEP=[0]; rr=random.Random(0)
def batches(start):
    i = start; buf=[]
    while True:
        tasks = ("caption",) if STEP[0] < CURR else TASKS
        buf += [s for s in to_samples(w[i], tasks=tasks, multiple_choice=os.environ.get("MC","1")=="1")
                if s.meta["task"] != "vqa" or rr.random() < VQAP]; i += 1
        if len(buf) >= 48:
            for b in pack(buf, spec, seed=i): yield b
            buf = []
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from read_objects_check import held_out_captions, word_accuracy  # noqa: E402  (the same measure)

held = held_out_captions(m, size=SIZE, max_objects=MAXO, object_scale=OSCALE)


def evaluate():
    return word_accuracy(m, held)


it = batches(0); t0=time.time()
for step in range(STEPS):
    STEP[0] = step; b = next(it); sched.apply(opt, step); opt.zero_grad()
    out = m(b); out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(m.trainable_parameters(), 1.0); opt.step()
    if (step+1) % 100 == 0:
        print(step+1, "loss %.3f" % out["loss"].item(), evaluate(), "%.0fs" % (time.time()-t0), flush=True)
