"""Checker score of a run's images on held-out prompts under the flow-grpo rollout sampler (SDE) and under the ODE
sampler, with bootstrap 95% CIs: does what RL learned under its training sampler generalise to new prompts, and does
it transfer to the evaluation sampler?

    python scripts/sde_heldout_score.py RUN [--n 100] [--steps 10] [--seeds 2] [--json out.json]
"""
import argparse
import json
import random

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--samples", type=int, default=2, help="images per prompt (different noise)")
    ap.add_argument("--first", type=int, default=50_000)
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import umm_ops
    from umm_ops import rl
    from umm_ops.cli import _run_world
    from umm_ops.data.synthetic import SyntheticWorld
    from umm_ops.eval.tasks.geneval import score_image
    from umm_ops.train.export import load_checkpoint_model

    model = load_checkpoint_model(args.run)
    first, size, world = _run_world(args.run)
    seed = world.pop("seed", 0)
    w = SyntheticWorld(size=size or 64, seed=seed, length=args.first + args.n, **world)
    recs = [w[args.first + i] for i in range(args.n)]
    out = {"run": args.run, "n": args.n, "steps": args.steps, "samples": args.samples, "cfg": args.cfg}
    for mode in ("sde", "ode"):
        scores = []
        for s in range(0, args.n, 16):
            batch = recs[s:s + 16]
            prompts = [r.prompt["text"] for r in batch]
            if mode == "sde":
                ro = rl.rollout_images(model, prompts, args.samples, seed=1, step=0, keys=[r.index for r in batch],
                                       steps=args.steps, sigma=umm_ops.SigmaSchedule(0.7), cfg_scale=args.cfg)
                imgs = ro.images
            else:
                P = [p for p in prompts for _ in range(args.samples)]
                seeds = [umm_ops.utils.seed_of(1, r.index, j) for r in batch for j in range(args.samples)]
                imgs = model.generate_image(P, steps=args.steps, seed=seeds, cfg_scale=args.cfg)["images"]
            for j, img in enumerate(imgs):
                scores.append(score_image(batch[j // args.samples].prompt, img)["score"])
        per_prompt = [sum(scores[i * args.samples:(i + 1) * args.samples]) / args.samples for i in range(args.n)]
        rng = random.Random(0)
        boots = sorted(sum(rng.choice(per_prompt) for _ in per_prompt) / args.n for _ in range(2000))
        out[mode] = {"score": sum(per_prompt) / args.n, "ci95": [boots[49], boots[1949]]}
        print(mode, out[mode], flush=True)
    if args.json:
        from umm_ops.utils import atomic_write

        atomic_write(args.json, json.dumps(out, indent=1))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
