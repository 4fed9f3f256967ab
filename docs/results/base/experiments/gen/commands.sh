#!/usr/bin/env bash
# The runs of docs/results/base "What the generation path sees" (stop 33), as they were made: seed 0, one thread
# per run, two runs sharing a 2-vCPU machine.  (gE and gF were made with the latent input switched on by a
# development-time environment variable; the `--set model.latent_input=true` below is today's equivalent.)
set -euo pipefail
export OMP_NUM_THREADS=1
GEN="--no-resume --device cpu --steps 600 --warmup 30 --set data.budget=256 --set recipe.caption_first=0"
umm train --out gA $GEN --set recipe.tasks=generate --set checkpoint.every=150
umm train --out gB $GEN --set recipe.tasks=generate --set 'optim.lr_scales=[]'
umm train --out gC $GEN --set recipe.tasks=generate --set recipe.train_decoder_copy=true
umm train --out gD $GEN --set recipe.tasks=generate --set recipe.train_decoder_copy=true \
    --set 'optim.lr_scales=["vit.:0.1","und_projector.:0.1","vae.decoder_copy.:0.1"]'
umm train --out gE $GEN --set recipe.tasks=generate --set model.latent_input=true
umm train --out gG $GEN --set recipe.tasks=generate --set model.prediction=clean
umm train --out gS0 $GEN --set recipe.tasks=segment --set recipe.evaluate=false
umm train --out gS1 $GEN --set recipe.tasks=segment --set recipe.evaluate=false --set model.latent_input=true
umm train --out gP $GEN --set recipe.tasks=generate --set recipe.image_size=128 --set recipe.evaluate=false
umm train --out gPL $GEN --set recipe.tasks=generate --set recipe.image_size=128 --set recipe.evaluate=false \
    --set model.latent_input=true
umm train --out gBase --no-resume --device cpu --keep-last 20                                # the defaults
umm train --out gF --no-resume --device cpu --keep-last 20 --set model.latent_input=true
# evaluation
for r in gA gB gC gD gE gG gP gPL; do umm eval $r --tasks geneval --n 64 --steps 12 --brief --json eval64-$r.json; done
for r in gS0 gS1; do umm eval $r --tasks seg-miou --n 64 --steps 12 --brief --json eval64-$r.json; done
for r in gBase gF; do umm eval $r --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief --json eval128-$r.json; done
# diagnostics (python = the project's venv)
python per_t_loss.py gBase/checkpoint-1800 48          # and gF, gA..gG at checkpoint-600, p1a at 1200
python decoder_info.py 1024
python onestep.py gF/checkpoint-1800 onestep-gF.png 8  # and gG/checkpoint-600
python euler_check.py gBase/checkpoint-1800 euler-gBase.png 8 12
python ../sampler/sweep.py gF/checkpoint-1800 64 '[[1.0,12,0.5],[2.0,12,0.5],[4.0,12,0.5],[7.0,12,0.5],[4.0,12,0.3],[4.0,12,1.0],[4.0,12,3.0],[4.0,50,0.5]]'
