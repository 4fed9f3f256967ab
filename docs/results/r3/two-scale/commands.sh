#!/bin/bash
# The measurements of docs/results/r3/README.md ("Two-scale CFG of edits ..."): one thread, lowest priority, on the
# shared 2-vCPU machine; OUT is any folder outside runs/ (the runs are read only).
set -e
export OMP_NUM_THREADS=1
OUT=${OUT:-out-r3}
ev() { name=$1; shift; nice -n 19 umm eval "$@" --out $OUT/$name --brief; }
for m in r3sft1 r3rl1; do
  ev edit-$m-one runs/$m --tasks edit --n 512 --steps 12
  ev edit-$m-two runs/$m --tasks edit --n 512 --steps 12 --image-cfg 1.5 --cfg-renorm text_channel
  ev edit-$m-two-norenorm runs/$m --tasks edit --n 512 --steps 12 --image-cfg 1.5
  ev edit-$m-two-interval runs/$m --tasks edit --n 512 --steps 12 --image-cfg 1.5 --cfg-renorm text_channel \
      --cfg-interval 0.4,1.0
done
ev edit-r3sft1-none runs/r3sft1 --tasks edit --n 512 --steps 12 --cfg 1
ev refine-r3sft1-one runs/r3sft1 --tasks refine --n 64 --rounds 3 --steps 12
ev refine-r3sft1-two runs/r3sft1 --tasks refine --n 64 --rounds 3 --steps 12 --image-cfg 1.5 --cfg-renorm text_channel
ev refine-r3sft1-two-interval runs/r3sft1 --tasks refine --n 64 --rounds 3 --steps 12 --image-cfg 1.5 \
    --cfg-renorm text_channel --cfg-interval 0.4,1.0
S=$OUT
python docs/results/r3/summarize.py docs/results/r3/two-scale/summary.json \
    sft-none=$S/edit-r3sft1-none sft-one=$S/edit-r3sft1-one sft-two=$S/edit-r3sft1-two \
    sft-two-norenorm=$S/edit-r3sft1-two-norenorm sft-two-interval=$S/edit-r3sft1-two-interval \
    rl-one=$S/edit-r3rl1-one rl-two=$S/edit-r3rl1-two rl-two-norenorm=$S/edit-r3rl1-two-norenorm \
    rl-two-interval=$S/edit-r3rl1-two-interval refine-one=$S/refine-r3sft1-one refine-two=$S/refine-r3sft1-two \
    refine-two-interval=$S/refine-r3sft1-two-interval \
    --pair sft-one sft-two sft-one sft-two-norenorm sft-one sft-two-interval sft-none sft-one rl-one rl-two \
           rl-one rl-two-norenorm rl-one rl-two-interval sft-one rl-one refine-one refine-two refine-one refine-two-interval
