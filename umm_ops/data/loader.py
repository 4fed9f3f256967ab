"""A resumable loader of packed span batches: shuffle (seeded per epoch) -> load + tokenize samples in DataLoader
workers -> greedy packing under the token budget in the main process.

Determinism: the order of epoch ``e`` is a permutation seeded by ``(seed, e)``; a sample's tokens and timesteps
depend only on its dataset index and ``(seed, e)`` (:func:`~umm_ops.data.packing.encode_sample`), and torch's
DataLoader hands results back in sampler order, so the batches are the same for any ``num_workers``.  They equal
``pack([dataset[i] for i in loader.order(e)], spec, seed=loader.pack_seed(e), sample_ids=loader.order(e))``.

Exact resume: greedy packing of a sample stream depends only on where the stream starts, so the position after a
batch is "the epoch, and the index in the epoch's order of the next batch's first sample".  ``state_dict()`` saves
that; a new loader given it with ``load_state_dict()`` starts its sample stream there and yields exactly the
batches an uninterrupted loader would have.  Samples that workers had prefetched past that point are simply
loaded again.  The dataset must return the same sample for the same index (it may be random per index, seeded by
the index).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ..utils import seed_of
from .packing import GreedyPacker, PackSpec, collate_docs, encode_sample

__all__ = ["PackedLoader", "epoch_order"]

_STATE_VERSION = 1


def _identity(x):
    return x


class _Encoded(Dataset):
    """dataset[i] -> its tokens (runs in the workers)."""

    def __init__(self, dataset, spec: PackSpec, pack_seed: int):
        self.dataset, self.spec, self.pack_seed = dataset, spec, pack_seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return encode_sample(self.dataset[i], self.spec, sample_id=int(i), seed=self.pack_seed)

    def __getitems__(self, indices):  # one worker round trip per chunk of samples
        return [self[i] for i in indices]


def epoch_order(dataset, n: int, seed: int, epoch: int, shuffle: bool) -> list:
    """The dataset indices of an epoch in packing order: a permutation seeded by (seed, epoch) (index order without
    shuffle), then the dataset's own ``curriculum(order, epoch)`` when it has one (e.g. the SFT recipe's
    captions-first start), which must return a permutation of the same indices.  Shared by PackedLoader and the
    training engine's ShardedLoader, so both give the same stream."""
    if shuffle:
        g = torch.Generator().manual_seed(seed_of(seed, int(epoch), "order"))
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    curriculum = getattr(dataset, "curriculum", None)
    if callable(curriculum):
        new = list(curriculum(order, int(epoch)))
        if len(new) != n or set(new) != set(order):
            raise ValueError(f"{type(dataset).__name__}.curriculum must return a permutation of the {n} indices it "
                             f"was given, got {len(new)} indices ({len(set(new) - set(order))} not in the order)")
        order = new
    return order


class PackedLoader:
    """Iterate packed batches (:class:`~umm_ops.data.packing.PackedBatch`) of a map-style dataset of Samples.

    ``iter(loader)`` runs from the current position to the end of the current epoch, then moves to the next epoch
    (so ``for epoch in ...: for batch in loader:`` works, and breaking out and iterating again continues where it
    stopped).  Only one iterator should be live at a time.

    Args:
        dataset: ``len(dataset)`` and ``dataset[i] -> Sample``.
        spec: the :class:`PackSpec` (tokenizer, patch, gen_mode, budget, align, timestep sampler).
        shuffle: a fresh seeded permutation per epoch (else index order).
        seed: seeds the permutations and the timesteps.
        num_workers, prefetch_factor, timeout, multiprocessing_context: passed to ``torch.utils.data.DataLoader``
            (samples are loaded and tokenized in the workers; packing happens in the main process).
        samples_per_fetch: samples a worker loads per round trip (default 8 with workers: halves the inter-process
            overhead per sample; prefetch_factor counts these chunks).  Batches do not depend on it.
    """

    def __init__(self, dataset, spec: PackSpec, *, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                 prefetch_factor: int | None = None, samples_per_fetch: int | None = None, timeout: float = 0,
                 multiprocessing_context=None):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"PackedLoader: dataset must be map-style (len(dataset) and dataset[i] -> Sample), got "
                            f"{type(dataset).__name__}")
        if not isinstance(spec, PackSpec):
            raise TypeError(f"PackedLoader: spec must be a PackSpec, got {type(spec).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"PackedLoader: seed must be an int, got {type(seed).__name__}")
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"PackedLoader: num_workers must be an int >= 0, got {num_workers!r}")
        n = len(dataset)
        if n == 0:
            raise ValueError("PackedLoader: the dataset is empty")
        self.dataset, self.spec, self.shuffle, self.seed = dataset, spec, bool(shuffle), seed
        self.num_workers = num_workers
        self._dl_kwargs = {"timeout": timeout, "multiprocessing_context": multiprocessing_context}
        if num_workers > 0:
            self._dl_kwargs["prefetch_factor"] = 4 if prefetch_factor is None else prefetch_factor
        elif prefetch_factor is not None:
            raise ValueError("PackedLoader: prefetch_factor needs num_workers > 0")
        if samples_per_fetch is None:
            samples_per_fetch = 8 if num_workers else 1
        if not isinstance(samples_per_fetch, int) or isinstance(samples_per_fetch, bool) or samples_per_fetch < 1:
            raise ValueError(f"PackedLoader: samples_per_fetch must be an int >= 1, got {samples_per_fetch!r}")
        self.chunk = samples_per_fetch
        self._n = n
        self._epoch = 0      # epoch of the next batch
        self._pos = 0        # index, in that epoch's order, of the next batch's first sample
        self._batches = 0    # batches yielded so far in that epoch

    # ------------------------------------------------------------------ the deterministic schedule
    def order(self, epoch: int) -> list:
        """The dataset indices of an epoch, in the order they are packed."""
        return epoch_order(self.dataset, self._n, self.seed, epoch, self.shuffle)

    def pack_seed(self, epoch: int) -> int:
        """The ``seed`` given to the packer for an epoch (timesteps of generated images)."""
        return seed_of(self.seed, int(epoch), "pack")

    @property
    def epoch(self) -> int:
        return self.state_dict()["epoch"]

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        if self._pos >= self._n:  # the previous epoch's last batch was taken, its iterator not run to the end
            self._epoch, self._pos, self._batches = self._epoch + 1, 0, 0
        epoch, pos = self._epoch, self._pos
        order = self.order(epoch)
        rest = order[pos:]
        chunks = [rest[i:i + self.chunk] for i in range(0, len(rest), self.chunk)]
        dl = DataLoader(_Encoded(self.dataset, self.spec, self.pack_seed(epoch)), batch_sampler=chunks,
                        num_workers=self.num_workers, collate_fn=_identity,
                        # workers' base seed: from this generator, never from (and never advancing) torch's global RNG
                        generator=torch.Generator().manual_seed(seed_of(self.seed, int(epoch), int(pos), "workers")),
                        **self._dl_kwargs)
        packer = GreedyPacker(self.spec.budget)
        for k, doc in enumerate((d for chunk in dl for d in chunk), start=pos):
            group = packer.add(doc, position=k)
            if group:  # sample k opens the next batch: resume there
                self._pos, self._batches = k, self._batches + 1
                yield collate_docs(group)
        last = packer.flush()
        if last:
            self._pos, self._batches = self._n, self._batches + 1
            yield collate_docs(last)
        self._epoch, self._pos, self._batches = epoch + 1, 0, 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Where the next batch starts (plain ints, JSON-safe), and what it is only valid for."""
        epoch, pos, batches = self._epoch, self._pos, self._batches
        if pos >= self._n:
            epoch, pos, batches = epoch + 1, 0, 0
        return {"version": _STATE_VERSION, "epoch": epoch, "position": pos, "batches_in_epoch": batches,
                "seed": self.seed, "shuffle": self.shuffle, "num_samples": self._n, "budget": self.spec.budget,
                "align": self.spec.align, "patch": self.spec.patch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position.  The loader must have been built the same way (seed, shuffle, dataset
        length, budget, align, patch): a mismatch would yield other batches, so it is an error."""
        if not isinstance(state, dict):
            raise TypeError(f"PackedLoader.load_state_dict: expected a dict from state_dict(), got "
                            f"{type(state).__name__}")
        need = ("version", "epoch", "position", "batches_in_epoch", "seed", "shuffle", "num_samples", "budget",
                "align", "patch")
        missing = [k for k in need if k not in state]
        if missing:
            raise ValueError(f"PackedLoader.load_state_dict: the state lacks {missing} (expected a dict from "
                             f"PackedLoader.state_dict())")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"PackedLoader.load_state_dict: state version {state['version']!r}, this loader "
                             f"reads version {_STATE_VERSION}")
        mine = self.state_dict()
        for k in ("seed", "shuffle", "num_samples", "budget", "align", "patch"):
            if state[k] != mine[k]:
                raise ValueError(f"PackedLoader.load_state_dict: the state was saved with {k}={state[k]!r} but this "
                                 f"loader has {k}={mine[k]!r}; resuming would not reproduce the batches")
        for k in ("epoch", "position", "batches_in_epoch"):
            if not isinstance(state[k], int) or isinstance(state[k], bool) or state[k] < 0:
                raise ValueError(f"PackedLoader.load_state_dict: {k} must be an int >= 0, got {state[k]!r}")
        if state["position"] > self._n:
            raise ValueError(f"PackedLoader.load_state_dict: position {state['position']} is past the end of the "
                             f"epoch ({self._n} samples)")
        self._epoch, self._pos, self._batches = state["epoch"], state["position"], state["batches_in_epoch"]

    def __repr__(self) -> str:
        s = self.state_dict()
        return (f"PackedLoader({self._n} samples, budget={self.spec.budget}, shuffle={self.shuffle}, seed={self.seed}, "
                f"num_workers={self.num_workers}, epoch={s['epoch']}, position={s['position']})")
