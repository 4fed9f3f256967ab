"""Figures of docs/results/base "A convolutional stage in the head": flow loss against steps (gen-only and the base
schedule) and the held-out text-to-image score against steps.  Usage: python plot.py [RUNS]: with RUNS (the folder
holding the run folders, gen/ and gen2/ of stops 33-34 beside conv/) the loss curves (means of 100 steps) are
read from the runs' metrics.jsonl into loss_curves.json; without it that file is read."""
import json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = os.path.dirname(os.path.abspath(__file__))


def flow(path, key="flow_loss", every=100):
    rows = [json.loads(l) for l in open(path)]
    pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r and r[key] > 0]
    out = []
    for lo in range(0, max(s for s, _ in pts), every):
        v = [x for s, x in pts if lo < s <= lo + every]
        if v:
            out.append((lo + every, sum(v) / len(v)))
    return zip(*out)


SOURCES = {"gA": "gen/gA", "gJ": "gen2/gJ", "gBase": "gen/gBase", "cG": "conv/cG", "cGC": "conv/cGC",
           "cGL": "conv/cGL", "cB": "conv/cB", "cGP": "conv/cGP"}
cache = os.path.join(HERE, "loss_curves.json")
if len(sys.argv) > 1:
    curves = {k: [list(a) for a in flow(os.path.join(sys.argv[1], v, "metrics.jsonl"))]
              for k, v in SOURCES.items() if os.path.exists(os.path.join(sys.argv[1], v, "metrics.jsonl"))}
    json.dump(curves, open(cache, "w"))
curves = json.load(open(cache))

fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
for name, run, style in [("Cheers head (gA)", "gA", "k--"), ("+ latent_input (gJ)", "gJ", "k-"),
                         ("+ conv stage (cG)", "cG", "C0-"), ("+ conv stage + prompt context (cGC)", "cGC", "C2-"),
                         ("conv stage on x_t + prompt only (cGP)", "cGP", "C5-")]:
    if run in curves:
        ax[0].plot(*curves[run], style, label=name)
ax[0].set(title="text-to-image only: flow loss (uniform t)", xlabel="step", ylabel="flow loss (mean of 100 steps)")
ax[0].legend()
for name, run, style in [("base schedule (gBase)", "gBase", "k-"), ("+ conv stage (cB)", "cB", "C0-")]:
    if run in curves:
        ax[1].plot(*curves[run], style, label=name)
ax[1].set(title="base schedule (all tasks): flow loss", xlabel="step")
ax[1].legend()
pts = {"cG: + conv stage": ("C0", {600: "ev128-cG-600", 1200: "ev128-cG-1200", 1800: "ev128-cG-1800"}),
       "cGL: + logit-normal t": ("C1", {600: "ev128-cGL-600", 1200: "ev128-cGL-1200", 1800: "ev128-cGL-1800"}),
       "cGC: + prompt context": ("C2", {600: "ev128-cGC-600", 1200: "ev128-cGC-1200", 1800: "ev128-cGC-1800"})}
for name, (c, files) in pts.items():
    xs, ys, lo, hi = [], [], [], []
    for s, f in sorted(files.items()):
        p = os.path.join(HERE, f + ".json")
        if os.path.exists(p):
            g = json.load(open(p))["tasks"]["geneval"]
            xs.append(s), ys.append(g["score"]), lo.append(g["score"] - g["ci95"][0]), hi.append(g["ci95"][1] - g["score"])
    if xs:
        ax[2].errorbar(xs, ys, yerr=[lo, hi], fmt="o-" if len(xs) > 1 else "s", color=c, capsize=3, label=name)
peer = os.path.join(HERE, "..", "peer")
for name, run, c in [("UNet peer, logit-normal t (pUs1)", "pUs1", "C3"), ("UNet peer, uniform t (pUu)", "pUu", "C4")]:
    xs, ys = [], []
    for s in (1800, 3600):
        p = os.path.join(peer, run, f"eval-{s}.json")
        if os.path.exists(p):
            xs.append(s), ys.append(json.load(open(p))["score_min_area"])
    if xs:
        ax[2].plot(xs, ys, "^--", color=c, label=name)
ax[2].axhline(0.143, color="k", ls=":", label="Cheers head + latent_input, 3,600 steps (gJ2)")
ax[2].set(title="held-out text-to-image score (n = 128, 95% CI)", xlabel="step (25 images / step)", ylim=(0, 0.6))
ax[2].legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(HERE, "conv.png"), dpi=110)
print("wrote conv.png")
