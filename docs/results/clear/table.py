"""The stage comparison table of docs/results/clear: clear / clear-short (and mmd-bench-short) evaluations of the
same held-out items, grouped by model; a group of several files is one model trained with several seeds.

    python docs/results/clear/table.py --ref START.json --group NAME A.json [B.json:TASK ...] [--group ...] \
        [--out table.json]        # FILE:TASK picks one task of a file that holds several

Per group: the accuracy on degraded pictures (mean over its runs; 95% interval: bootstrap over items of the
per-item mean over runs, and, with >= 2 runs, the spread of the runs' scores as a t-interval), per level (low /
mid / high), on the clean pictures, the share of answers that restored first (degraded / clean pictures), the
restorations' PSNR and checker score, and the paired differences to --ref on the same items (per-item mean over
runs minus the ref's item, paired bootstrap): of the accuracy, and of the PSNR and checker score on the items that
the ref and every run restored.  Items must be the same in every file (the same n, seed and task).
"""
import json
import math
import random
import statistics
import sys

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def load(spec):
    """PATH (a file of one task) or PATH:TASK."""
    path, _, task = spec.partition(":")
    d = json.load(open(path))
    tasks = d["tasks"]
    if not task:
        if len(tasks) != 1:
            raise SystemExit(f"{path} holds tasks {sorted(tasks)}: name one as {path}:TASK")
        (task,) = tasks
    t = tasks[task]
    return task, {it["index"]: it for it in t["items"]}, t


def boot(vals, n=4000, seed=0):
    rng = random.Random(seed)
    k = len(vals)
    means = sorted(sum(vals[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return [round(means[int(0.025 * n)], 4), round(means[int(0.975 * n) - 1], 4)]


def mean(v):
    return sum(v) / len(v) if v else float("nan")


def summarise(paths, ref_items=None):
    runs = [load(p) for p in paths]
    keys = sorted(runs[0][1])
    for p, (_, its, _) in zip(paths, runs):
        if sorted(its) != keys:
            raise SystemExit(f"{p}: not the same items as {paths[0]}")
    per_item = [mean([its[i]["score"] for _, its, _ in runs]) for i in keys]
    row = {"runs": len(runs), "files": paths, "score": round(mean(per_item), 4), "ci95_items": boot(per_item)}
    scores = [mean([its[i]["score"] for i in keys]) for _, its, _ in runs]
    row["run_scores"] = [round(s, 4) for s in scores]
    if len(runs) >= 2:
        h = T975[len(runs) - 1] * statistics.stdev(scores) / math.sqrt(len(runs))
        row["ci95_runs"] = [round(mean(scores) - h, 4), round(mean(scores) + h, 4)]
    for lv in ("low", "mid", "high"):
        ks = [i for i in keys if runs[0][1][i]["level"] == lv]
        row[lv] = round(mean([its[i]["score"] for _, its, _ in runs for i in ks]), 4)
    first = runs[0][1][keys[0]]
    if "clean" in first:
        row["clean"] = round(mean([its[i]["clean"] for _, its, _ in runs for i in keys]), 4)
    if "restored" in first:
        row["restored"] = round(mean([its[i]["restored"] for _, its, _ in runs for i in keys]), 4)
        row["restored_clean"] = round(mean([its[i]["restored_clean"] for _, its, _ in runs for i in keys]), 4)
        ps = [its[i]["psnr"] for _, its, _ in runs for i in keys if "psnr" in its[i]]
        row["psnr_restored"] = round(mean(ps), 3) if ps else None
        cs = [its[i]["checker"] for _, its, _ in runs for i in keys if "checker" in its[i]]
        row["checker_restored"] = round(mean(cs), 4) if cs else None
        cd = [its[i]["checker_degraded"] for _, its, _ in runs for i in keys if "checker_degraded" in its[i]]
        row["checker_degraded"] = round(mean(cd), 4) if cd else None
    if ref_items is not None:
        if sorted(ref_items) != keys:
            raise SystemExit(f"{paths[0]}: not the same items as the reference")
        d = [per_item[k] - ref_items[i]["score"] for k, i in enumerate(keys)]
        row["diff_to_ref"] = round(mean(d), 4)
        row["diff_ci95"] = boot(d)
        for m in ("psnr", "checker"):       # restorations: items restored by the ref and by every run
            both = [i for i in keys if m in ref_items[i] and all(m in its[i] for _, its, _ in runs)]
            if both:
                dm = [mean([its[i][m] for _, its, _ in runs]) - ref_items[i][m] for i in both]
                row[f"{m}_diff_to_ref"] = round(mean(dm), 4)
                row[f"{m}_diff_ci95"] = boot(dm)
                row[f"{m}_diff_items"] = len(both)
    return row


def main(argv):
    out, ref, groups = None, None, []
    k = 0
    while k < len(argv):
        a = argv[k]
        if a == "--out":
            out, k = argv[k + 1], k + 2
        elif a == "--ref":
            ref, k = argv[k + 1], k + 2
        elif a == "--group":
            groups.append([argv[k + 1], []])
            k += 2
        else:
            groups[-1][1].append(a)
            k += 1
    ref_items = load(ref)[1] if ref else None
    rows = {name: summarise(paths, ref_items) for name, paths in groups}
    cols = ["score", "low", "mid", "high", "clean", "restored", "restored_clean", "psnr_restored",
            "checker_restored", "diff_to_ref", "psnr_diff_to_ref", "checker_diff_to_ref"]
    print("| model | runs | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c)
            s = "-" if v is None else f"{v}"
            if c == "score":
                s += f" {r['ci95_items']}" + (f" runs {r['ci95_runs']}" if "ci95_runs" in r else "")
            if c == "diff_to_ref" and v is not None:
                s += f" {r['diff_ci95']}"
            if c in ("psnr_diff_to_ref", "checker_diff_to_ref") and v is not None:
                s += f" {r[c.replace('to_ref', 'ci95')]}"
            cells.append(s)
        print(f"| {name} | {r['runs']} | " + " | ".join(cells) + " |")
    if out:
        with open(out, "w") as f:
            json.dump({"ref": ref, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
