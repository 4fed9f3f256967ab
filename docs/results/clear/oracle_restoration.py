"""The clear / clear-short items answered with an oracle restoration: where the model asks to restore, the clean
picture is put in its place (umm_ops.model.clear.generate_then_answer(restorations=...)).  Separates the format
from the quality of the model's own restorations.

    python docs/results/clear/oracle_restoration.py runs/clear3 128 OUT.json
"""
import json
import sys

import torch

from umm_ops.cli import _run_world
from umm_ops.data.clear_data import clear_question
from umm_ops.data.degradations import degrade
from umm_ops.data.synthetic import SyntheticWorld
from umm_ops.eval.tasks import EvalContext, pixels
from umm_ops.eval.tasks.mmd_bench import pairs
from umm_ops.eval.tasks.vqa import questions, score_answer, score_short_answer
from umm_ops.train.export import load_checkpoint_model

run, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = load_checkpoint_model(run).eval()
first, size, world = _run_world(run)
w = SyntheticWorld(size=size, length=first + n, **world)
ctx = EvalContext(w, first, n, 0, size, None)      # the eval harness' items (seed 0), as `umm eval` builds them
qa = questions(ctx)
ps = pairs()
offset = ctx.seed_for("mmd-bench", "offset") % len(ps)
res = {}
for mc in (True, False):
    score, key = (score_answer, "answer_letter") if mc else (score_short_answer, "answer")
    got, restored = [], []
    for s in range(0, n, 16):
        b = qa[s:s + 16]
        deg = [degrade(im[None], *ps[(s + k + offset) % len(ps)], seed=0, index=[i])[0] for k, (i, im, _) in enumerate(b)]
        with torch.no_grad():
            r = model.generate_then_answer([pixels(d) for d in deg], [clear_question(q, mc) for _, _, q in b],
                                           seed=ctx.seed_for("clear", b[0][0]),
                                           restorations=[pixels(im) for _, im, _ in b])
        got += [score(x["answer"], q[key]) for x, (_, _, q) in zip(r, b)]
        restored += [x["restored"] for x in r]
    res["clear" if mc else "clear-short"] = {"n": n, "accuracy_with_oracle_restoration": sum(got) / n,
                                             "restored": sum(restored) / n}
    print(res, flush=True)
with open(out, "w") as f:
    json.dump({"run": run, **res}, f, indent=1)
