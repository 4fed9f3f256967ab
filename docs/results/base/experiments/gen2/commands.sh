#!/usr/bin/env bash
# The runs of docs/results/base "The latent space, and three more generation changes" (stop 34), as they were made:
# seed 0, one thread per run, two runs sharing a 2-vCPU machine.  python = the project's venv.
set -euo pipefail
export OMP_NUM_THREADS=1
GEN="--no-resume --device cpu --steps 600 --warmup 30 --set data.budget=256 --set recipe.caption_first=0 --set recipe.tasks=generate"
umm train --out gH $GEN --set model.latent_input=true --set model.prediction=clean
umm train --out gK $GEN --set model.latent_to_llm=true
umm train --out gJ --no-resume --device cpu --steps 1800 --warmup 30 --set data.budget=256 --set recipe.caption_first=0 \
    --set recipe.tasks=generate --set model.latent_input=true --set checkpoint.every=600
umm train --recipe vae --steps 1000 --budget 512 --lr 5e-4 --warmup 50 --out vSE --no-resume --device cpu --log-every 20 \
    --save-every 250 --no-progress --set recipe.init=tiny-world-vae --set recipe.se_weight=1.0 --set recipe.eval_images=64
OMP_NUM_THREADS=2 umm train --out gJ2 --no-resume --device cpu --steps 1800 --warmup 30 --set data.budget=256 \
    --set recipe.caption_first=0 --set recipe.tasks=generate --set recipe.init=gJ/checkpoint-1800 --set checkpoint.every=600
umm export vSE --out vSE.safetensors
umm train --out gV $GEN --set model.vae_weights=$PWD/vSE.safetensors
for r in gH gK gJ gJ2 gV; do umm eval $r --tasks geneval --n 64 --steps 12 --brief --json eval64-$r.json; done
# diagnostics (gF: stop 33's run; its saved config needs model.latent_input = true, see "What the generation path sees")
python cond_loss.py gF/checkpoint-1800 48 | tail -1 > cond_loss-gF.json
python oracle.py gF/checkpoint-1800 8000 512 > oracle.json
python latent_space.py ls-shipped.png - 8
python latent_space.py ls-vSE.png vSE.safetensors 8
python sde_eval.py gJ/checkpoint-1800 128 12 '[["ode",0],["sde",1.0],["sde",1.5],["sde",2.0]]'  > sde-gJ.jsonl
python sde_eval.py gJ/checkpoint-1800 128 30 '[["ode",0],["sde",1.0],["sde",2.0]]' >> sde-gJ.jsonl
python sde_eval.py gJ2/checkpoint-1800 128 12 '[["ode",0],["sde",1.5]]' >> sde-gJ.jsonl
# (sde-gJ.jsonl: a "ckpt" field was added to each line afterwards to tell gJ and gJ2 apart)
