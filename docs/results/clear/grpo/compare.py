"""Paired comparison of clear-short evaluations on the same held-out items (same seeds): per-item scores, the
difference to the first file, with a paired bootstrap 95% interval.

    python docs/results/clear/grpo/compare.py BASE.json RUN.json [RUN.json ...] [--out OUT.json]
"""
import json
import random
import sys


def items(path):
    d = json.load(open(path))
    t = d["tasks"]["clear-short"]
    return {it["index"]: it for it in t["items"]}, t


def main(argv):
    out = None
    if "--out" in argv:
        k = argv.index("--out")
        out, argv = argv[k + 1], argv[:k] + argv[k + 2:]
    base, _ = items(argv[0])
    rows = {}
    for p in argv:
        its, t = items(p)
        if sorted(its) != sorted(base):
            raise SystemExit(f"{p}: not the same items as {argv[0]}")
        keys = sorted(base)
        d = [its[i]["score"] - base[i]["score"] for i in keys]
        rng = random.Random(0)
        boots = sorted(sum(d[rng.randrange(len(d))] for _ in d) / len(d) for _ in range(10000))
        rows[p] = {"score": t["score"], "ci95": t["ci95"], "n": t["n"],
                   "clean": sum(its[i]["clean"] for i in keys) / len(keys),
                   "restored": sum(its[i]["restored"] for i in keys) / len(keys),
                   "restored_clean": sum(its[i]["restored_clean"] for i in keys) / len(keys),
                   "psnr_restored": t.get("psnr_restored"),
                   "diff_to_first": sum(d) / len(d), "diff_ci95": [boots[249], boots[9749]]}
        r = rows[p]
        print(f"{p}: {r['score']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] clean {r['clean']:.3f} restored "
              f"{r['restored']:.2f}/{r['restored_clean']:.2f} psnr {r['psnr_restored']} diff {r['diff_to_first']:+.3f} "
              f"[{r['diff_ci95'][0]:+.3f}, {r['diff_ci95'][1]:+.3f}]")
    if out:
        json.dump(rows, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
