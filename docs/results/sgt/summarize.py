"""Tables of the SGT comparison from the eval-*.json files beside this script (written by run.sh / run_more.sh).

    .venv/bin/python docs/results/sgt/summarize.py > docs/results/sgt/tables.md
    .venv/bin/python docs/results/sgt/summarize.py --probe > docs/results/sgt/tables-probe.md   # probe-*.json

One row per evaluated model (eval-<arm>[-s<seed>].json); the numbers are `umm eval`'s scores with their 95%
intervals over the held-out items (Wilson / bootstrap); where an arm has several seeds, a row "arm (mean of k
seeds)" gives the mean and the range (min-max) over seeds.
"""
import glob
import json
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def load(prefix="eval"):
    out = {}
    for p in sorted(glob.glob(os.path.join(HERE, f"{prefix}-*.json"))):
        name = os.path.basename(p)[len(prefix) + 1:-5]
        m = re.match(r"(.+?)(?:-s(\d+))?$", name)
        arm, seed = m.group(1), int(m.group(2) or 0)
        out[(arm, seed)] = json.load(open(p))["tasks"]
    return out


def cells(t):
    """name -> (score, ci) of the numbers reported."""
    c = {}

    def put(k, s):
        c[k] = (s["score"], s.get("ci95"))

    if "vqa" not in t:
        return probe_cells(t, c, put)
    put("vqa", t["vqa"])
    for q, s in t["vqa"]["per_type"].items():
        put(f"vqa {q}", s)
    put("vqa-short", t["vqa-short"])
    for q, s in t["vqa-short"]["per_type"].items():
        put(f"short {q}", s)
    p = t["probe"]
    layers = sorted(p["per_layer"], key=lambda k: int(k.split()[1]))
    for f in ("count", "color", "shape", "position"):
        if f"{f} @ {layers[-1]}" in p["per_probe"]:
            put(f"probe {f} (last layer)", p["per_probe"][f"{f} @ {layers[-1]}"])
            best = max(p["per_probe"][f"{f} @ {lay}"]["score"] for lay in layers)
            c[f"probe {f} (best layer)"] = (best, None)
    put("probe (all)", p)
    a = t["attention"]
    for lay in sorted(a["per_type"], key=lambda k: int(k.split()[1])):
        put(f"attention {lay}", a["per_type"][lay])
    put("attention (all layers)", a)
    c["attention uniform"] = (a["metrics"]["uniform"]["score"], None)
    g = t["geneval"]
    put("geneval", g)
    for tag, s in g["per_type"].items():
        put(f"geneval {tag}", s)
    put("seg-miou", t["seg-miou"])
    put("seg count acc", t["seg-miou"]["metrics"]["count_accuracy"])
    return c


def probe_cells(t, c, put):
    """The probe / attention files (probe-*.json, n = 512): every (fact, layer) and every layer."""
    p = t["probe"]
    layers = sorted(p["per_layer"], key=lambda k: int(k.split()[1]))
    for f in ("count", "color", "shape", "position"):
        c[f"chance {f}"] = (p["chance"].get(f), None)
        for lay in layers:
            if f"{f} @ {lay}" in p["per_probe"]:
                put(f"probe {f} @ {lay}", p["per_probe"][f"{f} @ {lay}"])
    put("probe (all)", p)
    a = t["attention"]
    for lay in sorted(a["per_type"], key=lambda k: int(k.split()[1])):
        put(f"attention {lay}", a["per_type"][lay])
    put("attention (all layers)", a)
    c["attention uniform"] = (a["metrics"]["uniform"]["score"], None)
    return c


def fmt(v):
    s, ci = v
    if s is None:
        return "-"
    return f"{s:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def main():
    import sys

    data = load("probe" if "--probe" in sys.argv else "eval")
    rows = {}
    for (arm, seed), t in sorted(data.items()):
        rows[f"{arm} s{seed}"] = cells(t)
    arms = sorted({a for a, _ in data})
    for arm in arms:
        seeds = [s for a, s in data if a == arm]
        if len(seeds) > 1:
            cs = [cells(data[(arm, s)]) for s in seeds]
            agg = {}
            for k in cs[0]:
                vals = [c[k][0] for c in cs if k in c and c[k][0] is not None]
                if vals:
                    agg[k] = (statistics.mean(vals), (min(vals), max(vals)))
            rows[f"{arm} (mean of {len(seeds)} seeds, range)"] = agg
    names = list(rows)
    keys = list(next(iter(rows.values())))
    print("| measure | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for k in keys:
        print(f"| {k} | " + " | ".join(fmt(rows[n][k]) if k in rows[n] else "-" for n in names) + " |")


if __name__ == "__main__":
    main()
