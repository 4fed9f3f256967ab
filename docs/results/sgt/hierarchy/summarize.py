"""Tables and plot of the SGT proxy-hierarchy comparison (docs/results/sgt/README.md, "Stop 40").

    .venv/bin/python docs/results/sgt/hierarchy/summarize.py            # reads e1-*.json / e2-*.json beside it
    -> tables.md, summary.json, hierarchy.png (beside it)

Inputs, one pair per model (`run.sh` writes them; `base` is the starting checkpoint, every other model is
`<arm>-s<seed>`; `none200` is `none` at 200 steps, about the understanding samples of a proxy arm): e1-NAME.json = `umm eval --tasks vqa,vqa-short,geneval,seg-miou --n 128 --steps 12`, e2-NAME.json
= `umm eval --tasks probe,attention --n 512`.

For an arm with several seeds the table gives the mean over seeds, each seed's value, and an interval for that mean
that counts the held-out items' noise of every seed (normal approximation: each seed's 95% interval half-width / 1.96
is its standard error; the mean's standard error is sqrt(sum se^2) / k; clipped to [0, 1]; a single seed keeps its
own Wilson / bootstrap interval). That interval does not count the training
seed's own variation beyond what the k seeds show; the seed values are printed so the reader sees it.

The contrasts (tables.md, second table; summary.json "contrasts") are the interval over seeds: a proxy arm against
a control, paired by seed (the same seed evaluates both on the same held-out records), d_s = proxy_s - control_s,
mean(d) +- t(0.975, k - 1) * sd(d) / sqrt(k) over the k seeds both have.
"""
import glob
import json
import math
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = ["none", "none200", "instance_seg", "semantic_seg", "edge", "reconstruction", "denoising"]
FACTS = ["count", "color", "shape", "position"]
PROXIES = ["instance_seg", "semantic_seg", "edge", "reconstruction", "denoising"]
CONTRAST_MEASURES = ["VQA short answer", "VQA multiple choice", "probe shape @ layer 4", "probe count @ layer 4",
                     "attention to image, all layers", "geneval score"]
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}   # Student's t, 0.975 quantile, by degrees of freedom


def load():
    models = {}
    for p in sorted(glob.glob(os.path.join(HERE, "e1-*.json"))):
        name = os.path.basename(p)[3:-5]
        e2 = os.path.join(HERE, f"e2-{name}.json")
        t = dict(json.load(open(p))["tasks"])
        if os.path.exists(e2):
            t.update(json.load(open(e2))["tasks"])
        models[name] = t
    return models


def measures(t):
    """measure name -> (score, ci95 or None) for one model."""
    c = {}

    def put(k, s):
        if s is not None:
            c[k] = (s["score"], s.get("ci95"))

    put("VQA multiple choice", t.get("vqa"))
    put("VQA short answer", t.get("vqa-short"))
    for q in FACTS:
        put(f"short answer: {q}", t.get("vqa-short", {}).get("per_type", {}).get(q))
    if "probe" in t:
        p = t["probe"]
        layers = sorted(p["per_layer"], key=lambda k: int(k.split()[1]))
        for f in FACTS:
            for lay in layers:
                put(f"probe {f} @ {lay}", p["per_probe"].get(f"{f} @ {lay}"))
            c[f"probe {f} chance"] = (p["chance"][f], None)
    if "attention" in t:
        a = t["attention"]
        for lay in sorted(a["per_type"], key=lambda k: int(k.split()[1])):
            put(f"attention to image, {lay}", a["per_type"][lay])
        put("attention to image, all layers", a)
        c["attention uniform"] = (a["metrics"]["uniform"]["score"], None)
    if "geneval" in t:
        g = t["geneval"]
        put("geneval score", g)
        for tag in ("single_object", "counting", "position"):
            put(f"geneval: {tag}", g["per_type"].get(tag))
    if "seg-miou" in t:
        s = t["seg-miou"]
        put("instance map mIoU", s)
        put("instance map matched score", s["metrics"]["matched_score"])
        put("instance count right", s["metrics"]["count_accuracy"])
    return c


def combine(vals):
    """mean over seeds, its interval from the seeds' item intervals, each seed's value."""
    scores = [v[0] for v in vals]
    mean = statistics.mean(scores)
    if len(vals) == 1:
        ci = vals[0][1]
    elif all(v[1] for v in vals):
        se = math.sqrt(sum(((v[1][1] - v[1][0]) / (2 * 1.96)) ** 2 for v in vals)) / len(vals)
        ci = [max(0.0, mean - 1.96 * se), min(1.0, mean + 1.96 * se)]
    else:
        ci = None
    return {"mean": mean, "ci95": ci, "seeds": scores}


def summarize(models):
    per = {name: measures(t) for name, t in models.items()}
    out = {"base": {k: {"mean": v[0], "ci95": v[1], "seeds": [v[0]]} for k, v in per.get("base", {}).items()}}
    for arm in ARMS:
        names = sorted(n for n in per if re.fullmatch(rf"{arm}-s\d+", n))
        if not names:
            continue
        out[arm] = {"seeds_run": [int(n.rsplit("-s", 1)[1]) for n in names]}
        for k in per[names[0]]:
            vals = [per[n][k] for n in names if k in per[n]]
            if len(vals) == len(names):
                out[arm][k] = combine(vals)
    return out


def contrasts(summary):
    """proxy - control per seed (paired), for each proxy arm against `none` and `none200`."""
    out = {}
    for ctrl in ("none", "none200"):
        for arm in PROXIES:
            if arm not in summary or ctrl not in summary:
                continue
            seeds = [s for s in summary[arm]["seeds_run"] if s in summary[ctrl]["seeds_run"]]
            if len(seeds) < 2:
                continue
            row = {"seeds": seeds}
            for k in CONTRAST_MEASURES:
                a, c = summary[arm][k], summary[ctrl][k]
                d = [a["seeds"][summary[arm]["seeds_run"].index(s)] - c["seeds"][summary[ctrl]["seeds_run"].index(s)]
                     for s in seeds]
                m = statistics.mean(d)
                h = T975[len(d) - 1] * statistics.stdev(d) / math.sqrt(len(d))
                row[k] = {"mean": m, "ci95": [m - h, m + h], "per_seed": d}
            out[f"{arm} - {ctrl}"] = row
    return out


def contrast_table(con):
    lines = ["| contrast (seeds) | " + " | ".join(CONTRAST_MEASURES) + " |",
             "|---" * (len(CONTRAST_MEASURES) + 1) + "|"]
    for name, row in con.items():
        cells = [f"{row[k]['mean']:+.3f} [{row[k]['ci95'][0]:+.2f}, {row[k]['ci95'][1]:+.2f}]"
                 for k in CONTRAST_MEASURES]
        lines.append(f"| {name} ({len(row['seeds'])}) | " + " | ".join(cells) + " |")
    return ("\n\nProxy arm minus control, paired by seed: mean difference [95% interval over seeds: t(0.975, k-1) * "
            "sd / sqrt(k)]. An interval that excludes 0 is a difference the seeds support.\n\n"
            + "\n".join(lines) + "\n")


def fmt(d):
    if d is None:
        return "-"
    s = f"{d['mean']:.3f}"
    if d["ci95"]:
        s += f" [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]"
    if len(d["seeds"]) > 1:
        s += " (" + " / ".join(f"{v:.2f}" for v in d["seeds"]) + ")"
    return s


def table(summary):
    cols = [a for a in ["base"] + ARMS if a in summary]
    keys = [k for k in summary[cols[-1]] if k != "seeds_run"]
    lines = ["| measure | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(fmt(summary[c].get(k)) for c in cols) + " |")
    seeds = {a: summary[a].get("seeds_run", [0]) for a in cols}
    head = ("Mean over seeds [95% interval of that mean over the held-out items] (each seed's value). Seeds: "
            + ", ".join(f"{a} {seeds[a]}" for a in cols) + ".\n\n")
    return head + "\n".join(lines) + "\n"


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ["base"] + ARMS if a in summary]
    colors = {a: c for a, c in zip(["base"] + ARMS, ["0.5", "k", "0.8", "C3", "C1", "C2", "C0", "C4"])}
    panels = [
        ("Understanding (n = 128)", ["VQA multiple choice", "VQA short answer", "short answer: shape",
                                     "short answer: count"]),
        ("Linear probe, last LLM layer (n = 512)", ["probe count @ layer 4", "probe shape @ layer 4",
                                                    "probe position @ layer 4"]),
        ("Attention from answers to the image (n = 512)", ["attention to image, layer 1",
                                                          "attention to image, layer 3",
                                                          "attention to image, layer 4",
                                                          "attention to image, all layers"]),
        ("Text-to-image checker (n = 128)", ["geneval score", "geneval: single_object", "geneval: counting",
                                             "geneval: position"]),
        ("Generated instance maps (n = 128)", ["instance map mIoU", "instance map matched score",
                                               "instance count right"]),
    ]
    fig, grid = plt.subplots(2, 3, figsize=(16, 9))
    axes = list(grid.flat)
    for ax, (title, keys) in zip(axes, panels):
        w = 0.8 / len(arms)
        for i, a in enumerate(arms):
            for j, k in enumerate(keys):
                d = summary[a].get(k)
                if d is None:
                    continue
                x = j + (i - (len(arms) - 1) / 2) * w
                err = None
                if d["ci95"]:
                    err = [[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]]
                ax.bar(x, d["mean"], w * 0.9, color=colors[a], alpha=0.75, label=a if j == 0 else None)
                if err:
                    ax.errorbar(x, d["mean"], yerr=err, fmt="none", ecolor="0.2", lw=0.8, capsize=1.5)
                if len(d["seeds"]) > 1:
                    ax.plot([x] * len(d["seeds"]), d["seeds"], "o", ms=2.5, color="w", mec="k", mew=0.5)
        for j, k in enumerate(keys):
            if k.startswith("probe "):  # the majority-class rate of the probed fact (mean over the models)
                ch = [summary[a][k.split(" @ ")[0] + " chance"]["mean"] for a in arms
                      if k.split(" @ ")[0] + " chance" in summary[a]]
                ax.hlines(statistics.mean(ch), j - 0.45, j + 0.45, colors="k", linestyles="dashed", lw=0.8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([k.replace("attention to image, ", "").replace("probe ", "").replace(" @ layer 4", "")
                            .replace("short answer: ", "short: ").replace("geneval: ", "")
                            .replace("instance ", "").replace("VQA ", "") for k in keys], rotation=25, ha="right",
                           fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, None)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].axis("off")
    axes[-1].legend(handles, labels, loc="center", fontsize=10, title="model")
    fig.suptitle("SGT proxy hierarchy on the tiny world: the base + 600 steps of each arm at lr 1e-3 (none200: "
                 "200 steps)\n"
                 "bars: mean over seeds; whiskers: 95% over held-out items; dots: seeds; dashed: the probe's "
                 "majority-class rate", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    summary = summarize(load())
    con = contrasts(summary)
    with open(os.path.join(HERE, "summary.json"), "w") as f:
        json.dump(dict(summary, contrasts=con), f, indent=1)
    with open(os.path.join(HERE, "tables.md"), "w") as f:
        f.write(table(summary) + contrast_table(con))
    plot(summary, os.path.join(HERE, "hierarchy.png"))
    print(contrast_table(con))


if __name__ == "__main__":
    main()
