# stop 44: three knobs of the base schedule re-tested with the pretrained tower (docs/results/base, "Knobs with the
# pretrained tower (stop 44)").  Machine: AMD EPYC (family 25, model 17), 2 vCPU, 23 GiB; torch 2.13.0+cpu.
# Seed-0 runs: three together (def-s0 later, beside a CI run), one thread each.  ln-s1, ln-s2: one after the other, alone, two threads.
export OMP_NUM_THREADS=1
umm train --out cf0-s0 --no-resume --device cpu --keep-last 2 --no-progress --seed 0 --set recipe.caption_first=0
umm train --out cf0w-s0 --no-resume --device cpu --keep-last 2 --no-progress --seed 0 --set recipe.caption_first=0 \
    --set recipe.task_weights=1,2,1,1,1
umm train --out def-s0 --no-resume --device cpu --keep-last 2 --no-progress --seed 0   # the defaults, this machine
umm train --out ln-s0 --no-resume --device cpu --keep-last 2 --no-progress --seed 0 --set recipe.timesteps=logit_normal
export OMP_NUM_THREADS=2
for s in 1 2; do
  /usr/bin/time -v -o time-v-ln-s$s.txt umm train --out ln-s$s --no-resume --device cpu --keep-last 2 --no-progress \
      --seed $s --set recipe.timesteps=logit_normal
done
umm train --out lr1-s0 --no-resume --device cpu --keep-last 2 --no-progress --seed 0 --set 'optim.lr_scales=[]'   # alone
# every run, 128 held-out records per task, 12 sampler steps
for r in def-s0 cf0-s0 cf0w-s0 ln-s0 ln-s1 ln-s2 lr1-s0; do
  umm eval $r/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief --json ev128-$r.json \
      --out evdir-$r
done
for r in def-s0 ln-s0 cf0-s0 cf0w-s0 ln-s1; do umm eval $r/checkpoint-1650 --tasks vqa --n 128 --brief --json ev1650-$r.json; done
# paired by seed with the defaults (stop 43's bT-s0 / s1 / s2)
B=../vit
python contrast.py ev128-ln-s0.json,ev128-ln-s1.json,ev128-ln-s2.json $B/ev128-bT-s0.json,$B/ev128-bT-s1.json,$B/ev128-bT-s2.json
