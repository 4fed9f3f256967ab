"""Paired contrast over seeds: python contrast.py NEW1.json,NEW2.json BASE1.json,BASE2.json (umm eval --json files)."""
import json, sys, math
new, base = [s.split(",") for s in sys.argv[1:3]]
T = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}
for task in ("vqa", "vqa-short", "caption", "geneval"):
    a = [json.load(open(f))["tasks"][task]["score"] for f in new]
    b = [json.load(open(f))["tasks"][task]["score"] for f in base]
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    if len(d) > 1:
        sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1)); h = T[len(d) - 1] * sd / math.sqrt(len(d))
    else:
        h = float("nan")
    print(f"{task:10s} new {' / '.join(f'{x:.3f}' for x in a)} (mean {sum(a)/len(a):.3f})  base {' / '.join(f'{x:.3f}' for x in b)} "
          f"(mean {sum(b)/len(b):.3f})  diff {m:+.3f} [{m-h:+.3f}, {m+h:+.3f}]")
