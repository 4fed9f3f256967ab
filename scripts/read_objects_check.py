"""Teacher-forced accuracy of the colour and shape words of 200 held-out captions of the base world (records
50,000+, single-object scenes by default) for a checkpoint: does the model read the objects?  Chance: colour 0.125,
shape 0.25.  scripts/read_objects_loop.py uses the same measure during its own training.

    python scripts/read_objects_check.py runs/demo/checkpoint-300 [MAX_OBJECTS]
"""
from __future__ import annotations

import sys

import torch

from umm_ops.data.packing import pack
from umm_ops.data.synthetic import COLORS, KINDS, SyntheticWorld, to_samples

BASE_KINDS = ("circle", "square", "triangle", "cross")


def held_out_captions(model, size: int = 64, max_objects: int = 1, n: int = 200, first: int = 50_000,
                      object_scale: float = 1.0) -> list:
    """Packed caption batches of `n` held-out records of the base world."""
    w = SyntheticWorld(size=size, max_objects=max_objects, kinds=BASE_KINDS, two_tone=0.0, object_scale=object_scale)
    samples = [s for i in range(first, first + n) for s in to_samples(w[i], tasks=("caption",))]
    return pack(samples, model.pack_spec(budget=1024), seed=0)


@torch.no_grad()
def word_accuracy(model, held: list) -> dict:
    """{"col": accuracy, "kind": accuracy}: the argmax of the logits at the caption positions whose label is a
    colour (a shape) word, compared with that word."""
    tok = model.tokenizer
    ids = {"col": [tok.encode(" " + c)[0] for c in COLORS if len(tok.encode(" " + c)) == 1],
           "kind": [tok.encode(" " + k)[0] for k in KINDS if len(tok.encode(" " + k)) == 1]}
    was_training = model.training
    model.eval()
    hit = {k: [0, 0] for k in ids}
    for b in held:
        logits = model.llm.logits(model(b, return_outputs=True)["hidden"])
        lab = b.labels
        for key, words in ids.items():
            pos = torch.isin(lab, torch.tensor(words)).nonzero().flatten()
            hit[key][0] += int((logits[pos].argmax(-1) == lab[pos]).sum())
            hit[key][1] += len(pos)
    model.train(was_training)
    return {k: round(a / max(n, 1), 3) for k, (a, n) in hit.items()}


def main(argv) -> int:
    from umm_ops.train.export import load_checkpoint_model

    from umm_ops.cli import _run_world

    model = load_checkpoint_model(argv[0])
    world = _run_world(argv[0])
    held = held_out_captions(model, max_objects=int(argv[1]) if len(argv) > 1 else 1,
                             object_scale=world[2].get("object_scale", 1.0) if world else 1.0)
    print(argv[0], word_accuracy(model, held))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
