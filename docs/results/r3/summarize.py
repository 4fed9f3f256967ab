"""Small summaries of `umm eval` results for docs/results/r3 (no per-item lists), and paired comparisons of two
results on the same items (same records, same seeds): mean difference with a seeded bootstrap 95% interval.

    python docs/results/r3/summarize.py OUT.json NAME=EVAL_DIR ... [--pair NAME_A NAME_B ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from umm_ops.eval.stats import bootstrap_mean


def _load(d):
    return json.loads((Path(d) / "eval.json").read_text())


def _small(task: dict) -> dict:
    return {k: v for k, v in task.items() if k not in ("items", "grid_png", "needs")}


def main(argv):
    out, rest = argv[0], argv[1:]
    pairs = []
    if "--pair" in rest:
        i = rest.index("--pair")
        rest, p = rest[:i], rest[i + 1:]
        pairs = [(p[j], p[j + 1]) for j in range(0, len(p), 2)]
    runs = dict(a.split("=", 1) for a in rest)
    res = {name: _load(d) for name, d in runs.items()}
    summary = {"runs": {}, "paired": {}}
    for name, r in res.items():
        summary["runs"][name] = {"model": r["model"], "records": r["records"], "steps": r["steps"],
                                 "guidance": r.get("guidance"),
                                 "tasks": {t: _small(v) for t, v in r["tasks"].items()}}
    for a, b in pairs:
        for t in res[a]["tasks"]:
            ia, ib = res[a]["tasks"][t]["items"], res[b]["tasks"].get(t, {}).get("items")
            if ib is None:
                continue
            if [x["index"] for x in ia] != [x["index"] for x in ib]:
                raise ValueError(f"{a} and {b} hold different items for {t}")
            d = [y["score"] - x["score"] for x, y in zip(ia, ib)]
            lo, hi = bootstrap_mean(d, (0, "paired", t, a, b))
            summary["paired"][f"{t}: {b} - {a}"] = {"mean": round(sum(d) / len(d), 6),
                                                     "ci95": [round(lo, 6), round(hi, 6)], "n": len(d),
                                                     "b_better": sum(x > 0 for x in d),
                                                     "a_better": sum(x < 0 for x in d)}
    Path(out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary["paired"], indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
