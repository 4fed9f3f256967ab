#!/usr/bin/env bash
# The runs of docs/results/base "A peer generator, and a checker that paid for confetti" (stop 35), as they were made:
# one thread per run, two or three runs sharing the 2-vCPU machine.  python = the project's venv; the first run
# encodes the 50,000 training scenes with the shipped VAE (512 s) into pA/latents.pt, the others link to it.
set -euo pipefail
export OMP_NUM_THREADS=1
P=docs/results/base/experiments/peer/peer_dit.py
python $P pA --steps 3600 --eval-at 600,1800,3600 --n 128                         # DiT, 16 packed tokens
for r in pL pP pA2 pU pUs1 pUsmall pU20; do mkdir -p $r; ln -sf ../pA/latents.pt $r/latents.pt; done
python $P pL --tokens latent --steps 3600 --eval-at 600,1800,3600 --n 128          # DiT, 64 latent-pixel tokens
python $P pP --tokens pixel --steps 3600 --eval-at 600,1800,3600 --n 128           # DiT on the pictures, no VAE
python $P pA2 --steps 12000 --eval-at 1200,3600,6000,9000,12000 --n 128            # DiT, longer
python $P pU --arch unet --tokens latent --steps 3600 --eval-at 600,1800,3600 --n 128   # convolutional UNet
python $P pUs1 --arch unet --tokens latent --seed 1 --steps 3600 --eval-at 1800,3600 --n 128   # seed 1, alone, OMP_NUM_THREADS=2
python $P pUsmall --arch unet --tokens latent --widths 32,64,96 --seed 1 --steps 3600 --eval-at 1800,3600 --n 128   # alone, OMP_NUM_THREADS=2
python $P pU20 --arch unet --tokens latent --steps 20 --eval-at 20 --n 128         # nearly untrained: confetti
# re-evaluations of saved models with both checker thresholds (eval-STEP-cfgC-sS.json, grid-STEP-cfgC-sS.png)
for s in 600 1800 3600; do python $P pU --arch unet --tokens latent --eval-only model-$s.pt --n 128; done
for s in 1200 3600 6000 9000 12000; do python $P pA2 --eval-only model-$s.pt --n 128; done
for s in 1800 3600; do python $P pP --tokens pixel --eval-only model-$s.pt --n 128; done
for c in 1 2 7; do python $P pA2 --eval-only model-1200.pt --cfg $c --sample-steps 30 --n 128; done
# the Cheers runs of stops 33-34 scored again with the world's threshold (umm eval since stop 35)
for r in gen/gBase gen/gA gen/gF; do
  umm eval $r/checkpoint-* --tasks geneval --n 128 --steps 12 --brief --json cheers-rescored/ev128-$(basename $r).json
done   # (gA: checkpoint-600; gBase, gF: checkpoint-1800)
(cd gen2 && umm eval gJ2/checkpoint-1800 --tasks geneval --n 128 --steps 12 --brief --json ../cheers-rescored/ev128-gJ2.json)
umm eval --model tiny --tasks geneval --n 128 --steps 12 --brief --json cheers-rescored/ev128-untrained.json
# stop 37: which prompt encoder? the pUc settings (uniform t, CFG dropout 0.2, one 1,800-step schedule, seed 1) with
# the UNet's text encoder swapped (one thread each, two runs at a time, beside CI or Cheers runs)
C="--arch unet --tokens latent --seed 1 --timesteps uniform --p-uncond 0.2 --steps 1800 --eval-at 1800 --n 128"
for r in pUL pULb pUEc pULe pULr; do mkdir -p $r; ln -sf ../pA/latents.pt $r/latents.pt; done
python $P pUL  $C --text llm                         # the tiny preset's Qwen2 (causal), trained with the UNet
python $P pULb $C --text llm-bidir                   # the same LLM attending bidirectionally over the prompt
python $P pUEc $C --text enc-causal                  # the 2-layer encoder with a causal mask
python $P pULe $C --text llm --llm-embed-std 1       # the LLM with unit-scale token embeddings
python $P pULr $C --text llm-refined                 # the LLM, then the 2-layer bidirectional encoder over its states
# the two runs that carry the finding, seed 2
C2="--arch unet --tokens latent --seed 2 --timesteps uniform --p-uncond 0.2 --steps 1800 --eval-at 1800 --n 128"
for r in pUL-s2 pULe-s2; do mkdir -p $r; ln -sf ../pA/latents.pt $r/latents.pt; done
python $P pUL-s2 $C2 --text llm
python $P pULe-s2 $C2 --text llm --llm-embed-std 1
