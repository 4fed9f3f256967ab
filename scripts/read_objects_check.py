"""Teacher-forced accuracy of the colour and shape words of 200 held-out single-object captions of the base world
(records 50,000+) for a checkpoint: does the model read the objects?  (The same measure as
scripts/read_objects_loop.py, for a trained run.)  Chance: colour 0.125, shape 0.25.

    python scripts/read_objects_check.py runs/demo/checkpoint-300 [MAX_OBJECTS]
"""
import sys

import torch

from umm_ops.data.synthetic import SyntheticWorld, to_samples, COLORS, KINDS
from umm_ops.data.packing import pack
from umm_ops.train.export import load_checkpoint_model
m = load_checkpoint_model(sys.argv[1]); m.eval(); tok = m.tokenizer
MAXO = int(sys.argv[2]) if len(sys.argv) > 2 else 1
col_ids = {tok.encode(" "+c)[0] for c in COLORS if len(tok.encode(" "+c))==1}
kind_ids = {tok.encode(" "+k)[0] for k in KINDS if len(tok.encode(" "+k))==1}
w = SyntheticWorld(size=64, max_objects=MAXO, kinds=("circle","square","triangle","cross"), two_tone=0.0)
held = pack([s for i in range(50000, 50200) for s in to_samples(w[i], tasks=("caption",))], m.pack_spec(budget=1024), seed=0)
hit = {"col":[0,0], "kind":[0,0]}
with torch.no_grad():
    for b in held:
        logits = m.llm.logits(m(b, return_outputs=True)["hidden"]); lab = b.labels
        for ids, key in ((col_ids,"col"),(kind_ids,"kind")):
            mask = torch.zeros_like(lab, dtype=torch.bool)
            for t in ids: mask |= lab == t
            pos = mask.nonzero().flatten()
            hit[key][0] += int((logits[pos].argmax(-1) == lab[pos]).sum()); hit[key][1] += len(pos)
print(sys.argv[1], {k: round(a/max(n,1),3) for k,(a,n) in hit.items()})
