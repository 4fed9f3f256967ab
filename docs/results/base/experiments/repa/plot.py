"""repa.png: text-to-image-only runs, checker score (128 held-out prompts, 95% bootstrap interval) against steps."""
import json

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 4))
for run, label, style in [("tG", "defaults, seed 0", "C0--"), ("tGr", "+ REPA 0.5, seed 0", "C0-"),
                          ("tG-s1", "defaults, seed 1", "C1--"), ("tGr-s1", "+ REPA 0.5, seed 1", "C1-")]:
    steps, s, lo, hi = [], [], [], []
    for k in (600, 1200, 1800):
        t = json.load(open(f"ev128-{run}-{k}.json"))["tasks"]["geneval"]
        steps.append(k); s.append(t["score"]); lo.append(t["ci95"][0]); hi.append(t["ci95"][1])
    ax.plot(steps, s, style, marker="o", label=label)
    ax.fill_between(steps, lo, hi, color=style[:2], alpha=0.08)
ax.axhline(0.5, color="grey", lw=0.8, ls=":")
ax.set_xlabel("step (25 text-to-image samples per step)")
ax.set_ylabel("checker score, 128 held-out prompts")
ax.set_title("Text-to-image only: REPA on the conv stage (AMD EPYC, 2 vCPU)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("repa.png", dpi=110)
