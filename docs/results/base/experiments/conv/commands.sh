#!/usr/bin/env bash
# The runs of docs/results/base "A convolutional stage in the head" (stop 36), as they were made: seed 0, one
# thread per run, two or three runs sharing the 2-vCPU machine.  umm / python = the project's venv.
set -euo pipefail
export OMP_NUM_THREADS=1
GEN="--no-resume --device cpu --steps 1800 --warmup 30 --set data.budget=256 --set recipe.caption_first=0 \
     --set recipe.tasks=generate --set checkpoint.every=600 --set checkpoint.keep_last=5 --no-progress"
CONV="--set model.conv_widths=[64,128,192]"
umm train --out cG $GEN $CONV                                            # text-to-image only, conv stage
umm train --out cB --no-resume --device cpu --keep-last 20 $CONV --no-progress   # the default base schedule + conv stage
umm train --out cGL $GEN $CONV --set recipe.timesteps=logit_normal       # + SD3's logit-normal training times
umm train --out cGC $GEN $CONV --set model.conv_context=true             # + the prompt's hidden states in the stage
umm train --out cGP $GEN $CONV --set model.conv_context=true --set model.conv_inputs=latent --set recipe.evaluate=false
                                                                         # the stage reads x_t and the prompt only
# the UNet peer with Cheers' uniform training times (run in ../peer, beside its latents.pt cache; outputs in ../peer/pUu, pUc)
python ../peer/peer_dit.py pUu --arch unet --tokens latent --seed 1 --timesteps uniform --steps 3600 \
    --eval-at 1800,3600 --n 128
# the same with this project's CFG dropout (0.2) and one 1,800-step schedule (6.7 min, CI running beside it)
python ../peer/peer_dit.py pUc --arch unet --tokens latent --seed 1 --timesteps uniform --p-uncond 0.2 --steps 1800 \
    --eval-at 1800 --n 128
# evaluation (the same 128 held-out prompts as every run of stops 33-35; cB also understanding, as gBase)
for r in cG cGL cGC cGP; do for s in 600 1200 1800; do
  umm eval $r/checkpoint-$s --tasks geneval --n 128 --steps 12 --brief --json ev128-$r-$s.json --out evdir-$r-$s
done; done
umm eval cB/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief --json ev128-cB.json \
    --out evdir-cB
# diagnostics: the stage's share of the velocity (stage on / off), linear probes of the prompt's shape and colour
python conv_share.py cG/checkpoint-1200 48               # -> conv_share-cG-1200.json
python ../gen2/cond_loss.py cG/checkpoint-1200 48         # -> cond_loss-cG-1200.json
python probe.py cG/checkpoint-1800                      # -> probe-cG-1800.json
# sampler settings of cG/checkpoint-1800 (time shift 0.5 / 1, CFG 1 / 4 / 8) -> shift-cG-1800.jsonl
python shift_eval.py cG/checkpoint-1800 128 0.5:4 1.0:4 0.5:1 0.5:8
python plot.py ..   # RUNS = the folder holding gen/, gen2/ and conv/: loss_curves.json from the metrics, conv.png
# stop 37 (GEN as above plus --set recipe.evaluate=false; CI or peer runs beside them)
umm train --out cGA $GEN $CONV --set model.conv_context=true --set model.conv_inputs=alone   # the stage alone
umm train --out cGAe $GEN $CONV --set model.conv_context=true --set model.conv_inputs=alone \
    --set model.embedding_multiplier=50                                  # + unit-scale token embeddings
umm train --out gGe $GEN --set model.embedding_multiplier=50             # Cheers' head + unit-scale token embeddings
for r in cGA cGAe gGe; do for s in 600 1200 1800; do
  umm eval $r/checkpoint-$s --tasks geneval --n 128 --steps 12 --brief --json ev128-$r-$s.json --out evdir-$r-$s
done; done
# the demo's 600-step schedule with the multiplier (understanding measured by the run's own evaluation)
umm train --out dE --no-resume --steps 600 --no-progress --set model.embedding_multiplier=50
umm train --out dAe --no-resume --steps 600 --no-progress $CONV --set model.conv_context=true --set model.conv_inputs=alone \
    --set model.embedding_multiplier=50
# stop 38: the prompt's input embeddings in the conv stage's context (GEN, CONV as above; two or three runs sharing
# the 2 cores, one thread each)
umm train --out cGAx $GEN $CONV --set model.conv_context=true --set model.conv_inputs=alone \
    --set model.conv_context_embeddings=true
umm train --out cGPx $GEN $CONV --set model.conv_context=true --set model.conv_inputs=latent \
    --set model.conv_context_embeddings=true
for r in cGAx cGPx; do for s in 600 1200 1800; do
  umm eval $r/checkpoint-$s --tasks geneval --n 128 --steps 12 --brief --json ev128-$r-$s.json --out evdir-$r-$s
done; done
# the demo's and the base schedule with it (the runs' own evaluation, then 128 held-out records per task)
umm train --out dAx --no-resume --steps 600 --no-progress $CONV --set model.conv_context=true \
    --set model.conv_inputs=alone --set model.conv_context_embeddings=true
umm train --out bAx --no-resume --device cpu --keep-last 20 --no-progress $CONV --set model.conv_context=true \
    --set model.conv_inputs=alone --set model.conv_context_embeddings=true
umm train --out bPx --no-resume --device cpu --keep-last 20 --no-progress $CONV --set model.conv_context=true \
    --set model.conv_inputs=latent --set model.conv_context_embeddings=true    # = the tiny preset's head since stop 38
umm eval dAx/checkpoint-600 --tasks geneval --n 128 --steps 12 --brief --json ev128-dAx.json --out evdir-dAx
umm eval DEMO/checkpoint-600 --tasks geneval --n 128 --steps 12 --brief --json ev128-demo-defaults.json \
    --out evdir-demo   # DEMO: stop 37's fresh-clone runs/demo
for r in bAx bPx; do
  umm eval $r/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief --json ev128-$r.json \
      --out evdir-$r
done
python "$REPO/scripts/eval_curve.py" bPx --tasks vqa,vqa-short,caption,geneval --n 64   # -> eval_curve-bPx.* (REPO: this repository)
# stop 39: the defaults (= bPx) with seed 1, alone on the idle machine (the timing), and three text-to-image samples
# per record (two seeds, one thread each, the two runs together)
/usr/bin/time -v umm train --out bPx-s1 --no-resume --device cpu --keep-last 20 --no-progress --seed 1
for s in 0 1; do OMP_NUM_THREADS=1 umm train --out g3-s$s --no-resume --device cpu --keep-last 20 --no-progress \
    --seed $s --set recipe.task_weights=2,1,1,3,1 & done; wait
for r in bPx-s1 g3-s0 g3-s1; do
  umm eval $r/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief --json ev128-$r.json \
      --out evdir-$r
done
for v in tiny cheers; do OMP_NUM_THREADS=2 python "$REPO/docs/results/base/experiments/conv/step_breakdown.py" 2 4 $v; done > step_breakdown.txt
# stop 40: bf16 autocast (umm train --mixed-precision bf16) - the step on the idle machine (fp32 / bf16 alternated,
# 2 threads), then the base schedule with it (seed 0; one thread, sharing the machine with other runs: its time is
# not a measurement)
for v in "" bf16 "" bf16; do OMP_NUM_THREADS=2 python "$REPO/docs/results/base/experiments/conv/step_breakdown.py" 2 4 $v; done > step_breakdown-bf16.txt
OMP_NUM_THREADS=1 umm train --out bPx-bf16 --no-resume --device cpu --keep-last 20 --no-progress --mixed-precision bf16
umm eval bPx-bf16/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief \
    --json ev128-bPx-bf16.json --out evdir-bPx-bf16
# stop 41: bf16 autocast in the whole schedule. Today's step, warm (stop 40's measure), then seed 1 with bf16 alone on
# the idle machine (timed); seed 2 in fp32 and in bf16 together (one thread each); the step cold (each packed batch's
# first run, as in training) and warm, alternated; then the fp32 defaults seed 1 alone on the idle machine (timed)
for v in "" bf16; do OMP_NUM_THREADS=2 python "$REPO/docs/results/base/experiments/conv/step_breakdown.py" 2 4 $v; done > step_breakdown-stop41.txt
/usr/bin/time -v umm train --out bPx-bf16-s1 --no-resume --device cpu --keep-last 20 --no-progress --seed 1 --mixed-precision bf16
OMP_NUM_THREADS=1 umm train --out bPx-s2 --no-resume --device cpu --keep-last 20 --no-progress --seed 2 &
OMP_NUM_THREADS=1 umm train --out bPx-bf16-s2 --no-resume --device cpu --keep-last 20 --no-progress --seed 2 \
    --mixed-precision bf16 & wait
for v in "" bf16 "" bf16; do OMP_NUM_THREADS=2 python "$REPO/docs/results/base/experiments/conv/step_breakdown.py" 2 8 cold $v; done > step_breakdown-cold.txt
/usr/bin/time -v umm train --out bPx-s1-stop41 --no-resume --device cpu --keep-last 20 --no-progress --seed 1
for r in bPx-bf16-s1 bPx-s2 bPx-bf16-s2 bPx-s1-stop41; do
  umm eval $r/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief --json ev128-$r.json \
      --out evdir-$r
done
# stop 41, last: a smaller record pool (what a per-record latent cache would need to pay off), seed 1, alone
/usr/bin/time -v umm train --out bPx-r10k-s1 --no-resume --device cpu --keep-last 20 --no-progress --seed 1 \
    --set recipe.train_records=10000
umm eval bPx-r10k-s1/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief \
    --json ev128-bPx-r10k-s1.json --out evdir-bPx-r10k-s1
# stop 42: the frozen VAE in bf16 (model.vae_compute_dtype = "bfloat16", now the sft default) and the fused AdamW
# (optim.implementation = "fused", now the default). bV-*: the bf16 VAE with the old for-loop AdamW (the runs were
# started before the fused default existed; today that is --set optim.implementation=for-loop); seed 1 alone on the
# idle machine (timed), seeds 0 and 2 together at one thread each; then the exact new defaults, seed 1, alone (timed),
# and the old defaults, seed 1, alone (timed; bit-identical to stop 41's bPx-s1-stop41)
/usr/bin/time -v umm train --out bV-s1 --no-resume --device cpu --keep-last 20 --no-progress --seed 1 \
    --set optim.implementation=for-loop
for s in 0 2; do OMP_NUM_THREADS=1 umm train --out bV-s$s --no-resume --device cpu --keep-last 20 --no-progress \
    --seed $s --set optim.implementation=for-loop & done; wait
/usr/bin/time -v umm train --out bVF-s1 --no-resume --device cpu --keep-last 20 --no-progress --seed 1
for r in bV-s0 bV-s1 bV-s2 bVF-s1; do
  umm eval $r/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief --json ev128-$r.json \
      --out evdir-$r
done
/usr/bin/time -v umm train --out bPx-s1-stop42 --no-resume --device cpu --keep-last 20 --no-progress --seed 1 \
    --set model.vae_compute_dtype=model --set optim.implementation=for-loop
python "$REPO/bench/bench_train_parts.py"
# stop 42, last: seed 0 of the exact new defaults, alone (timed)
/usr/bin/time -v umm train --out bVF-s0 --no-resume --device cpu --keep-last 20 --no-progress --seed 0
umm eval bVF-s0/checkpoint-1800 --tasks vqa,vqa-short,caption,geneval --n 128 --steps 12 --brief \
    --json ev128-bVF-s0.json --out evdir-bVF-s0
