"""The umm_ops flow ops inside a small Flow-GRPO training loop (the image half of CLEAR's / R3's RL).

A toy velocity model (adaLN-Zero blocks built from umm_ops.adaln_modulate and umm_ops.gated_residual) maps
noise to 2-D "images" (vectors).  Each iteration:
  1. roll out a group of SDE trajectories from shared noise with umm_ops.flow_step, recording every sample and
     its log-prob;
  2. score the final samples (reward: closeness to a target), advantages = reward - group mean (Dr.GRPO);
  3. pick ONE trajectory step (round robin, as CLEAR does) and train through umm_ops.flow_logprob of the
     recorded sample under the current velocity, PPO-clipped, plus umm_ops.flow_kl to a frozen reference.

    python python/flow_grpo_example.py --iters 20
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn

import umm_ops


class Block(nn.Module):
    """adaLN-Zero MLP block: x + gate * MLP(modulate(norm(x), shift, scale))."""

    def __init__(self, dim: int):
        super().__init__()
        self.mod = nn.Linear(dim, 3 * dim)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, x, c):  # x (B, L, D), c (B, D)
        shift, scale, gate = self.mod(c).chunk(3, dim=-1)  # strided (B, D) chunks: no copies
        h = umm_ops.adaln_modulate(x, shift, scale, norm="rms")
        return umm_ops.gated_residual(x, gate, self.mlp(h))


class Velocity(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2):
        super().__init__()
        self.inp = nn.Linear(2, dim)
        self.t_emb = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.out = nn.Linear(dim, 2)

    def forward(self, x, t):  # x (B, L, 2), t (B,)
        c = self.t_emb(t[:, None])
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, c)
        return self.out(h)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="sampling steps per trajectory")
    ap.add_argument("--points", type=int, default=16, help="tokens per sample")
    ap.add_argument("--sigma", type=float, default=0.3, help="constant SDE noise level (CLEAR: 0.3)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    policy = Velocity()
    ref = copy.deepcopy(policy).requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    target = torch.tensor([1.0, -1.0])
    G, L = args.group, args.points
    ts = umm_ops.time_shift(torch.linspace(0, 1, args.steps + 1), 0.5)  # Cheers' shift: more steps near noise
    mean_reward = 0.0
    for it in range(args.iters):
        # 1. rollout (no grad): a group shares its initial noise, the SDE noise differs per member
        with torch.no_grad():
            x = torch.randn(1, L, 2).expand(G, L, 2).contiguous()
            traj = []
            for k in range(args.steps):
                t, tn = ts[k].expand(G), ts[k + 1].expand(G)
                v = policy(x, t)
                x_next, logp = umm_ops.flow_step(x, v, t, tn, noise=torch.randn_like(x), sigma=args.sigma,
                                                 return_logprob=True)
                traj.append((x, x_next, t, tn, logp))
                x = x_next
            reward = -((x - target) ** 2).mean(dim=(1, 2))
            adv = reward - reward.mean()
        mean_reward = reward.mean().item()
        # 2-3. one recorded step per optimiser step (round robin), PPO-clip on its log-prob ratio + KL
        xs, xn, t, tn, old_logp = traj[it % (args.steps - 1)]  # the last step is deterministic-ish: skip it
        v = policy(xs, t)
        logp = umm_ops.flow_logprob(xs, xn, v, t, tn, args.sigma)
        ratio = torch.exp(logp - old_logp)
        pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv).mean()
        kl = umm_ops.flow_kl(v, ref(xs, t), t, tn, args.sigma).mean()
        loss = pg + 0.01 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % max(1, args.iters // 10) == 0 or it == args.iters - 1:
            print(f"iter {it:3d}  reward {mean_reward:+.4f}  ratio {ratio.mean().item():.4f}  kl {kl.item():.2e}")
    return mean_reward


if __name__ == "__main__":
    main()
