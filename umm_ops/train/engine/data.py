"""Rank-sharded, resumable loading of packed micro-batches, with the same global batch stream for any world size.

The global stream, a function of the data and the seed only:

    epoch e's order (a permutation seeded by (seed, e))
      -> greedy packing by token length under ``budget`` (order kept; a sample never split; the last micro-batch
         of an epoch closes there)
      -> micro-batches m_0, m_1, ...;  optimizer step k takes m_{kM} .. m_{kM+M-1}  (M = micro-batches per step)

Rank r of W gets the step's micro-batches j with j % W == r (M must be a multiple of W), so every sample is trained
on exactly once per epoch across ranks, every rank gets M / W micro-batches of at most ``budget`` tokens, and the
set of samples of step k (hence, with the engine's loss scaling, its gradient) is the same for W = 1, 2, 4, ...
The state between steps is (epoch, position in that epoch's order of the next step's first sample), identical on
every rank and independent of W: a checkpoint of a 2-rank run resumes on 1 rank with the same stream.

Planning needs every sample's token count.  With ``DataSource.length`` (a cheap count from the index) a rank
encodes only its own samples; without it, each rank encodes the step's samples to count them and keeps its own
(W-fold the encoding work, no more).  The encoded samples of a step are built in ``num_workers`` worker processes
when asked (an order-keeping DataLoader per epoch over the indices this rank needs).

A recipe's data in phases (:class:`~umm_ops.train.spec.DataPhases`) is read by :class:`PhasedLoader`: one such stream
per phase, each from its own start; the state adds the phase.
"""
from __future__ import annotations

from ...utils import seed_of

__all__ = ["ShardedLoader", "PhasedLoader"]

_STATE_VERSION = 1


class ShardedLoader:
    def __init__(self, source, budget: int, micro_per_step: int = 1, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, num_workers: int = 0):
        n = len(source.dataset)
        if n == 0:
            raise ValueError("ShardedLoader: the dataset is empty")
        if micro_per_step < 1 or micro_per_step % world_size:
            raise ValueError(f"ShardedLoader: {micro_per_step} micro-batches per step cannot be split evenly over "
                             f"{world_size} ranks (data.global_tokens / data.budget must be a multiple of the world "
                             f"size)")
        self.source, self.budget, self.M = source, int(budget), int(micro_per_step)
        self.rank, self.world = int(rank), int(world_size)
        self.seed, self.shuffle, self.num_workers = int(seed), bool(shuffle), int(num_workers)
        self._n = n
        self._epoch, self._pos = 0, 0
        self._order_cache: tuple = (None, None)

    # ------------------------------------------------------------------ the deterministic schedule
    def order(self, epoch: int) -> list:
        if self._order_cache[0] == epoch:
            return self._order_cache[1]
        from ...data.loader import epoch_order

        o = epoch_order(self.source.dataset, self._n, self.seed, epoch, self.shuffle)
        self._order_cache = (epoch, o)
        return o

    def pack_seed(self, epoch: int) -> int:
        """The seed handed to ``encode`` for epoch `epoch` (per-sample timesteps are drawn from it and the id)."""
        return seed_of(self.seed, epoch, "pack")

    def _encode(self, epoch: int, idx: int):
        return self.source.encode(self.source.dataset[idx], idx, self.pack_seed(epoch))

    def _plan(self):
        """The next step's micro-batches as lists of (epoch, dataset index), the encoded docs met while counting,
        and the position after the step."""
        epoch, pos = self._epoch, self._pos
        groups, cur, used = [], [], 0
        docs: dict = {}
        length = self.source.length
        while len(groups) < self.M:
            if pos >= self._n:   # epoch end closes the open micro-batch
                if cur:
                    groups.append(cur)
                    cur, used = [], 0
                epoch, pos = epoch + 1, 0
                continue
            idx = self.order(epoch)[pos]
            if length is not None:
                n = int(length(idx))
            else:
                d = self._encode(epoch, idx)
                docs[(epoch, idx)] = d
                n = d.length
            if n > self.budget:
                raise ValueError(f"sample {idx} (epoch {epoch}) needs {n} tokens, more than data.budget = "
                                 f"{self.budget} tokens per micro-batch (samples are never split: raise the budget)")
            if cur and used + n > self.budget:
                groups.append(cur)
                cur, used = [], 0
                if len(groups) == self.M:
                    break
            cur.append((epoch, idx))
            used += n
            pos += 1
        return groups, docs, (epoch, pos)

    def next_step(self) -> list:
        """This rank's micro-batches of the next optimizer step (collated), in global order j = rank, rank + W, ..."""
        groups, docs, after = self._plan()
        mine = groups[self.rank::self.world]
        need = [key for g in mine for key in g if key not in docs]
        if need:
            docs.update(self._load(need))
        batches = [self.source.collate([docs[key] for key in g]) for g in mine]
        self._epoch, self._pos = after
        return batches

    def _load(self, keys: list) -> dict:
        if self.num_workers <= 0 or len(keys) < 2:
            return {k: self._encode(*k) for k in keys}
        pool = self._pool()
        futs = {k: pool.submit(_encode_one, self.source, k[1], self.pack_seed(k[0])) for k in keys}
        return {k: f.result() for k, f in futs.items()}

    def _pool(self):
        if getattr(self, "_executor", None) is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._executor = ProcessPoolExecutor(self.num_workers, mp_context=mp.get_context("spawn"))
        return self._executor

    def close(self) -> None:
        ex = getattr(self, "_executor", None)
        if ex is not None:
            ex.shutdown(cancel_futures=True)
            self._executor = None

    # ------------------------------------------------------------------ state
    @property
    def epoch(self) -> int:
        return self._epoch

    def state_dict(self) -> dict:
        """Where the next step starts: plain ints, JSON-safe, the same on every rank and for any world size."""
        return {"version": _STATE_VERSION, "epoch": self._epoch, "position": self._pos, "seed": self.seed,
                "shuffle": self.shuffle, "num_samples": self._n, "budget": self.budget,
                "micro_per_step": self.M}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"ShardedLoader.load_state_dict: expected a dict, got {type(state).__name__}")
        missing = [k for k in ("version", "epoch", "position", "seed", "shuffle", "num_samples", "budget",
                               "micro_per_step") if k not in state]
        if missing:
            raise ValueError(f"ShardedLoader.load_state_dict: the state lacks {missing}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"ShardedLoader.load_state_dict: state version {state['version']!r}, this loader "
                             f"reads version {_STATE_VERSION}")
        for k in ("seed", "shuffle", "num_samples", "budget", "micro_per_step"):
            if state[k] != getattr(self, {"num_samples": "_n", "micro_per_step": "M"}.get(k, k)):
                raise ValueError(f"ShardedLoader.load_state_dict: the state was saved with {k}={state[k]!r} but this "
                                 f"loader has {k}={getattr(self, {'num_samples': '_n', 'micro_per_step': 'M'}.get(k, k))!r}; "
                                 f"resuming would not continue the same batch stream")
        if not (0 <= state["position"] <= self._n) or state["epoch"] < 0:
            raise ValueError(f"ShardedLoader.load_state_dict: epoch {state['epoch']} / position {state['position']} "
                             f"out of range for {self._n} samples")
        self._epoch, self._pos = int(state["epoch"]), int(state["position"])


class PhasedLoader:
    """The engine's loader: a :class:`ShardedLoader` per phase of the recipe's data (a DataSource is one phase).

    ``next_step(step)`` gives (0-based) optimizer step `step`'s micro-batches from the phase it falls in; entering a
    phase starts that phase's stream at its beginning (phase k > 0 shuffled with ``seed_of(seed, "phase", k)``).
    The state is the current phase and its stream's position, so a run resumes exactly, on any world size."""

    def __init__(self, data, budget: int, micro_per_step: int = 1, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, num_workers: int = 0):
        from ..spec import DataPhases

        self.phases = data.phases if isinstance(data, DataPhases) else ((0, data),)
        self._args = (int(budget), int(micro_per_step), int(rank), int(world_size))
        self.seed, self.shuffle, self.num_workers = int(seed), bool(shuffle), int(num_workers)
        self._k, self._loader = 0, self._make(0)

    def _make(self, k: int) -> ShardedLoader:
        seed = self.seed if k == 0 else seed_of(self.seed, "phase", k)
        return ShardedLoader(self.phases[k][1], *self._args, seed=seed, shuffle=self.shuffle,
                             num_workers=self.num_workers)

    def phase_of(self, step: int) -> int:
        return max(k for k, (first, _) in enumerate(self.phases) if first <= step)

    def next_step(self, step: int) -> list:
        k = self.phase_of(step)
        if k < self._k:
            raise ValueError(f"PhasedLoader: step {step} belongs to phase {k}, but the loader is in phase {self._k} "
                             f"(steps only go forward)")
        if k != self._k:
            self._loader.close()
            self._k, self._loader = k, self._make(k)
        return self._loader.next_step()

    @property
    def phase(self) -> int:
        return self._k

    @property
    def epoch(self) -> int:
        return self._loader.epoch

    def close(self) -> None:
        self._loader.close()

    def state_dict(self) -> dict:
        return {**self._loader.state_dict(), "phase": self._k}

    def load_state_dict(self, state: dict) -> None:
        """A state of this loader, or of a ShardedLoader (phase 0: checkpoints written before phases existed)."""
        if not isinstance(state, dict):
            raise TypeError(f"PhasedLoader.load_state_dict: expected a dict, got {type(state).__name__}")
        k = state.get("phase", 0)
        if isinstance(k, bool) or not isinstance(k, int) or not (0 <= k < len(self.phases)):
            raise ValueError(f"PhasedLoader.load_state_dict: the state is in phase {k!r}, this run's data has "
                             f"{len(self.phases)} phase(s) (first steps {[f for f, _ in self.phases]})")
        loader = self._make(k)
        loader.load_state_dict({key: v for key, v in state.items() if key != "phase"})
        self._loader.close()
        self._k, self._loader = k, loader


def _encode_one(source, idx, pack_seed):
    return source.encode(source.dataset[idx], idx, pack_seed)
