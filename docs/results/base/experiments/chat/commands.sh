#!/usr/bin/env bash
# stop 46, docs/results/base "One picture, three questions": a 2-vCPU AMD EPYC, torch 2.13.0+cpu; umm / python = the
# project's venv.  ch-s0 ran on one thread beside the vae decoder run and then dV-s0; ch-s1 beside dV-s0.
set -euo pipefail
CHAT="--set recipe.tasks=caption,chat,generate,segment --set recipe.task_weights=1,1,1,1"
for s in 0 1; do
  OMP_NUM_THREADS=1 umm train --out ch-s$s --no-resume --device cpu --keep-last 2 --no-progress --seed $s $CHAT
  umm eval ch-s$s/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief \
      --json ev128-ch-s$s.json --out evdir-ch-s$s
done
for t in geneval vqa vqa-short caption; do
  python ../repa/paired.py ev128-ch-s0.json ../knobs/ev128-def-s0.json $t
  python ../repa/paired.py ev128-ch-s1.json ../vit/ev128-bT-s1.json $t
done
python time_mix.py time_mix.json 150      # alone on the idle machine, 2 threads
