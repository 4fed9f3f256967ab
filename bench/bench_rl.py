"""Online-RL benchmark: rollout throughput and the time split of one RL step.

    python bench/bench_rl.py --quick        # CPU: tiny preset, a few minutes on 2 cores
    python bench/bench_rl.py                # more rounds, and the `small` preset's LLM for the decoder

Decoder: text tokens/s of the packed KV-cache decoder (``umm_ops.model.sampling.generate`` on the Qwen2 LLM: ragged
prompts packed, no padding) against transformers' ``Qwen2ForCausalLM.generate`` (left-padded batch, its default
dynamic cache) on the same weights, greedy, the same batch and exactly ``new`` tokens per prompt (no stop); the
greedy tokens are compared too.
Images: SDE steps/s of ``umm_ops.rl.rollout_images`` (the prompt prefilled once into the KV cache, the image tokens
recomputed per step) against an eager loop that runs ``umm_ops.model.generate.velocity`` (the whole [prompt, image]
document) at every step; both with CFG.
RL step: one flow-grpo step split into rollout, reward (the pixel checker), reference velocity (no grad), and update
(the policy's log-probs recomputed with gradient, backward, AdamW); peak RSS of a 3-step flow-grpo run with and
without the reference model (separate processes).
Writes bench/results/<device>-rl.json.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _median_time(fn, rounds: int) -> tuple:
    fn()                                               # warm-up
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts


def bench_decoder(preset: str, batch: int, prompt_len: tuple, new: int, rounds: int) -> dict:
    import random

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from umm_ops.model.config import preset as get_preset
    from umm_ops.model.llm import Qwen2LM
    from umm_ops.model.sampling import generate

    cfg = get_preset(preset)
    torch.manual_seed(0)
    ours = Qwen2LM(cfg.llm_config()).eval()
    hf_cfg = Qwen2Config(**{k: v for k, v in cfg.llm.items() if k not in ("architectures",)})
    hf = Qwen2ForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    if [m for m in missing if "lm_head" not in m] or unexpected:
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    rng = random.Random(0)
    V = cfg.llm["vocab_size"]
    prompts = [[rng.randrange(10, V) for _ in range(rng.randint(*prompt_len))] for _ in range(batch)]
    L = max(map(len, prompts))
    pad = 0
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])

    def run_ours():
        with torch.no_grad():
            return generate(ours, prompts, new, stop=[])

    def run_hf():
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, eos_token_id=None, pad_token_id=pad)

    t_ours, raw_ours = _median_time(run_ours, rounds)
    t_hf, raw_hf = _median_time(run_hf, rounds)
    a = [g.tokens for g in run_ours()]
    b = run_hf()[:, L:].tolist()
    same = sum(x == y for s, t in zip(a, b) for x, y in zip(s, t)) / (batch * new)
    return {"preset": preset, "batch": batch, "prompt_len": list(prompt_len), "new_tokens": new,
            "ours_tokens_per_s": batch * new / t_ours, "hf_tokens_per_s": batch * new / t_hf,
            "speedup": t_hf / t_ours, "greedy_tokens_equal": same, "ours_s": raw_ours, "hf_s": raw_hf}


def _model(image_size=64):
    import torch

    from umm_ops.model.cheers import CheersModel

    torch.manual_seed(0)
    m = CheersModel("tiny")
    m.config.image_size = image_size
    return m.eval()


PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow cross", "three pink circles"]


def bench_images(n_prompts: int, group: int, steps: int, cfg_scale: float, rounds: int) -> dict:
    import torch

    import umm_ops
    from umm_ops import rl
    from umm_ops.model.generate import velocity

    m = _model()
    prompts = PROMPTS[:n_prompts]
    sig = umm_ops.SigmaSchedule(0.7)

    def cached():
        return rl.rollout_images(m, prompts, group, seed=0, steps=steps, cfg_scale=cfg_scale, sigma=sig)

    P = [p for p in prompts for _ in range(group)]
    N = len(P)
    n, C = m.latent_shape((64, 64))

    def eager():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(N, n, C, generator=g)
        ts = umm_ops.time_shift(torch.linspace(0, 1, steps + 1, dtype=torch.float64), m.config.time_shift).tolist()
        with torch.no_grad():
            for i in range(steps):
                v = velocity(m, P, x, ts[i], 64, 64, cfg_scale=cfg_scale)
                if i < steps - 1:
                    x = umm_ops.flow_step(x, v, ts[i], ts[i + 1], noise=torch.randn(x.shape, generator=g), sigma=sig)
                else:
                    x = umm_ops.flow_step(x, v, ts[i], ts[i + 1])
            m.vae.decode(x, (64, 64))

    t_c, raw_c = _median_time(cached, rounds)
    t_e, raw_e = _median_time(eager, rounds)
    return {"images": N, "steps": steps, "cfg_scale": cfg_scale, "image_px": 64,
            "cached_steps_per_s": N * steps / t_c, "eager_steps_per_s": N * steps / t_e, "speedup": t_e / t_c,
            "cached_s": raw_c, "eager_s": raw_e}


def bench_rl_step(n_prompts: int, group: int, steps: int, cfg_scale: float, rounds: int) -> dict:
    import copy

    import torch

    import umm_ops
    from umm_ops import rl

    m = _model()
    ref = copy.deepcopy(m).requires_grad_(False)
    prompts = PROMPTS[:n_prompts]
    from umm_ops.data.synthetic import SyntheticWorld

    specs = [r.prompt for r in SyntheticWorld(size=64, seed=0, max_objects=2, length=n_prompts)]
    prompts = [s["text"] for s in specs]
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
    parts = {"rollout": [], "reward": [], "reference": [], "update": []}
    for k in range(rounds + 1):
        t0 = time.perf_counter()
        ro = rl.rollout_images(m, prompts, group, seed=0, step=k, steps=steps, cfg_scale=cfg_scale,
                               sigma=umm_ops.SigmaSchedule(0.7), meta=[{"spec": s} for s in specs])
        t1 = time.perf_counter()
        r, _ = rl.score(rl.PixelCheckReward(), [{"meta": mt, "image": im} for mt, im in zip(ro.meta, ro.images)])
        adv = rl.group_advantages(r, group, scale="std")
        t2 = time.perf_counter()
        with torch.no_grad():
            B, S = ro.t.shape
            from umm_ops.model.generate import velocity

            velocity(ref, [p for p in ro.prompts for _ in range(S)], ro.x.reshape(B * S, *ro.x.shape[2:]),
                     ro.t.reshape(-1), 64, 64, cfg_scale=cfg_scale)
        t3 = time.perf_counter()
        m.train()
        lp, _ = rl.image_logprobs(m, ro)
        loss, _ = rl.flow_pg_loss(lp, ro.logprobs, adv)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t4 = time.perf_counter()
        if k:                                           # the first round warms up
            for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[name].append(dt)
    med = {k: statistics.median(v) for k, v in parts.items()}
    total = sum(med.values())
    return {"prompts": n_prompts, "group": group, "steps": steps, "cfg_scale": cfg_scale, "image_px": 64,
            "recorded_steps": steps - 1, "median_s": med, "share": {k: v / total for k, v in med.items()},
            "raw_s": parts}


def _peak_rss_run(kl_beta: float) -> float:
    code = ("import resource, sys, tempfile\n"
            "from umm_ops.train import Config, train\n"
            "d = tempfile.mkdtemp()\n"
            f"train(Config.build('flow-grpo', overrides=['job.steps=3', 'job.out=' + d, 'job.progress=false', "
            f"'recipe.evaluate=false', 'checkpoint.every=0', 'metrics.plot=false', 'recipe.kl_beta={kl_beta}', "
            "'recipe.train_records=100']))\n"
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RSS")][-1]
    return int(line.split()[1]) / 1024                 # MiB (ru_maxrss is KiB on Linux)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from run import device_name, slug

    rounds = 3 if args.quick else 7
    t0 = time.time()
    res = {"device": device_name("cpu"), "torch": torch.__version__, "quick": args.quick,
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    res["decoder"] = [bench_decoder("tiny", 8, (8, 24), 64, rounds)]
    if not args.quick:
        res["decoder"].append(bench_decoder("small", 8, (8, 24), 32, rounds))
    print("decoder", json.dumps({k: v for k, v in res["decoder"][0].items() if not isinstance(v, list)}), flush=True)
    res["images"] = bench_images(2, 8, 10, 4.0, rounds)
    print("images", json.dumps({k: v for k, v in res["images"].items() if not isinstance(v, list)}), flush=True)
    res["rl_step"] = bench_rl_step(2, 8, 10, 4.0, rounds)
    print("rl_step", json.dumps(res["rl_step"]["median_s"]), json.dumps(res["rl_step"]["share"]), flush=True)
    res["peak_rss_mib"] = {"no_reference": _peak_rss_run(0.0), "with_reference": _peak_rss_run(0.01)}
    print("peak RSS", res["peak_rss_mib"], flush=True)
    res["wall_s"] = time.time() - t0
    out = Path(args.out or os.path.join(HERE, "results", f"{slug(res['device'])}-rl.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    from umm_ops.utils import atomic_write

    atomic_write(out, json.dumps(res, indent=1))
    print(f"wrote {out} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
