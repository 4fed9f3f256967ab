#!/usr/bin/env bash
# The runs of docs/results/base "REPA" (stop 45), as they were made on a 2-vCPU AMD EPYC; umm / python = the
# project's venv.  Text-to-image-only runs: one thread each, two or three runs (and at times CI) sharing the machine.
set -euo pipefail
# text-to-image only: stops 36-38's schedule (25 images per step, one 1,800-step schedule) with today's defaults
# (the tiny preset's conv stage with the prompt, the pretrained tower at 0.1 x lr, the bf16 VAE)
GEN="--no-resume --device cpu --steps 1800 --warmup 30 --set data.budget=256 --set recipe.caption_first=0 \
     --set recipe.tasks=generate --set checkpoint.every=600 --set checkpoint.keep_last=5 --no-progress \
     --set recipe.evaluate=false"
REPA="--set model.conv_repa=true --set recipe.repa_weight=0.5"
OMP_NUM_THREADS=1 umm train --out tG $GEN                 &    # seed 0, defaults
OMP_NUM_THREADS=1 umm train --out tGr $GEN $REPA          &    # seed 0, + REPA
wait
OMP_NUM_THREADS=1 umm train --out tG-s1 $GEN --seed 1     &    # seed 1 (another world draw, other held-out prompts)
OMP_NUM_THREADS=1 umm train --out tGr-s1 $GEN --seed 1 $REPA &
# the base schedule (all tasks, 1,800 steps): + REPA alone on 2 threads; + REPA with three text-to-image samples
# per record (one thread, beside the two runs above)
umm train --out bR-s0 --no-resume --device cpu --keep-last 2 --no-progress $REPA
OMP_NUM_THREADS=1 umm train --out g3R-s0 --no-resume --device cpu --keep-last 2 --no-progress $REPA \
    --set recipe.task_weights=2,1,1,3,1
wait
# the three-sample mix without REPA, alone on 2 threads (after the runs above)
umm train --out g3-s0 --no-resume --device cpu --keep-last 2 --no-progress --set recipe.task_weights=2,1,1,3,1 \
    --set recipe.evaluate=false
# evaluation: 128 held-out records per task, 12 sampler steps
for r in tG tGr tG-s1 tGr-s1; do for s in 600 1200 1800; do
  umm eval $r/checkpoint-$s --tasks geneval --n 128 --steps 12 --brief --json ev128-$r-$s.json --out evdir-$r-$s
done; done
for r in bR-s0 g3R-s0 g3-s0; do
  umm eval $r/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief \
      --json ev128-$r.json --out evdir-$r
done
python paired.py ev128-tGr-1800.json ev128-tG-1800.json                  # paired bootstrap over the same prompts
python paired.py ev128-bR-s0.json ../knobs/ev128-def-s0.json             # against the defaults' seed 0 (stop 44)
# stop 46: a second seed of g3R (one thread, beside a vae run), paired with the defaults' seed 1 (stop 43, ../vit)
OMP_NUM_THREADS=1 /usr/bin/time -v -o time-v-g3R-s1.txt umm train --out g3R-s1 --no-resume --device cpu \
    --keep-last 2 --no-progress --seed 1 $REPA --set recipe.task_weights=2,1,1,3,1
umm eval g3R-s1/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief \
    --json ev128-g3R-s1.json --out evdir-g3R-s1
for t in geneval vqa vqa-short; do python paired.py ev128-g3R-s1.json ../vit/ev128-bT-s1.json $t; done
