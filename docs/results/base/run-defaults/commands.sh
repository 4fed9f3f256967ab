# Stop 47: the current defaults' base run and two more seeds (AMD EPYC, 2 vCPU, torch 2.13.0+cpu).
# Seed 0, alone on the machine, 2 threads:
OMP_NUM_THREADS=2 /usr/bin/time -v umm train --out runs/base --no-resume --device cpu --keep-last 20 --no-progress   # time-v.txt
OMP_NUM_THREADS=1 python scripts/eval_curve.py runs/base --tasks vqa,vqa-short,caption,geneval,segment --n 64 --steps 12
OMP_NUM_THREADS=2 /usr/bin/time -v umm eval runs/base/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval,segment,vae-recon \
    --n 256 --steps 12 --json ev256.json --out ev256                                                            # ev256/
OMP_NUM_THREADS=2 python bench/bench_model.py --quick --image-size 64 --samples 40 \
    --out bench/results/cpu-amd-epyc-2-threads-model-default-tiny.json
# Seeds 1 and 2, both at once, one thread each; then evaluated one at a time with 2 threads:
for s in 1 2; do OMP_NUM_THREADS=1 umm train --out runs/base-s$s --seed $s --no-resume --device cpu --keep-last 2 --no-progress & done; wait
for s in 1 2; do umm eval runs/base-s$s/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval,segment,vae-recon --n 256 --steps 12 \
    --json seeds/ev256-s$s.json --out ev256-s$s; done
# Paired with stop 44's def-s0 (the same seed, one thread):
python docs/results/base/experiments/repa/paired.py ev256/eval.json docs/results/base/experiments/knobs/ev128-def-s0.json vqa
