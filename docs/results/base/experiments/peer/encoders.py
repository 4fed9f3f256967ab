"""Figure of docs/results/base "The LLM as a text encoder" (stop 37): held-out text-to-image score at 1,800 steps
(128 prompts, 95% bootstrap interval over the prompts) of the UNet peer with each prompt encoder, and of the Cheers
runs whose generator reads the prompt only through the LLM.  Usage: python encoders.py  (reads the committed
eval JSONs beside it and in ../conv; writes encoders.png)."""
import json, os
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

from umm_ops.eval.stats import bootstrap_mean

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = [("pUc", "2-layer encoder\n(bidirectional)"), ("pUEc", "2-layer encoder\n(causal)"),
        ("pUL", "tiny LLM\n(causal)"), ("pULb", "tiny LLM\n(bidirectional)"),
        ("pULr", "tiny LLM +\n2-layer refiner"), ("pULe", "tiny LLM,\nunit embeddings")]
CHEERS = [("cGP", "conv stage on x_t +\nprompt, beside tokens"), ("cGA", "conv stage alone"),
          ("cGAe", "conv stage alone,\nunit embeddings"), ("gGe", "Cheers head,\nunit embeddings")]


def peer_score(run):
    d = json.load(open(os.path.join(HERE, run, "eval-1800.json")))
    return d["score"], bootstrap_mean(d["items"], seed=0)


def cheers_score(run):
    path = os.path.join(HERE, "..", "conv", f"ev128-{run}-1800.json")
    if not os.path.exists(path):
        return None
    g = json.load(open(path))["tasks"]["geneval"]
    return g["score"], tuple(g["ci95"])


fig, ax = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [6, 4]})
for a, rows, get, title in [(ax[0], PEER, peer_score, "UNet peer, prompt encoder swapped (seed 1)"),
                            (ax[1], CHEERS, cheers_score, "Cheers model, text-to-image only (seed 0)")]:
    got = [(label, get(run)) for run, label in rows]
    got = [(label, r) for label, r in got if r is not None]
    for i, (label, (s, (lo, hi))) in enumerate(got):
        a.bar(i, s, color="C0" if "unit" not in label else "C2")
        a.errorbar(i, s, yerr=[[s - lo], [hi - s]], color="k", capsize=4)
        a.text(i, hi + 0.01, f"{s:.2f}", ha="center")
    a.set_xticks(range(len(got)), [label for label, _ in got], fontsize=8)
    a.set(title=title, ylabel="checker score at 1,800 steps (128 prompts)", ylim=(0, 0.5))
fig.tight_layout()
fig.savefig(os.path.join(HERE, "encoders.png"), dpi=110)
print("wrote encoders.png")
