"""The engine's rank-sharded loader (umm_ops.train.engine.data.ShardedLoader) on a toy dataset of known lengths:
the global stream does not depend on the world size, every sample is trained on exactly once per epoch across ranks,
the state resumes on any world size, and a cheap length function gives the same stream as encoding."""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from umm_ops.train.engine.data import ShardedLoader
from umm_ops.train.spec import DataSource


@dataclass
class Doc:
    index: int
    length: int
    seed: int


class Toy:
    """Sample i has a fixed pseudo-random length in [5, 40] tokens; records every index it is asked for."""

    def __init__(self, n: int):
        rng = random.Random(7)
        self.lengths = [rng.randint(5, 40) for _ in range(n)]
        self.loaded: list = []

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        self.loaded.append(i)
        return i


def _source(n=50, with_length=False):
    ds = Toy(n)
    return DataSource(ds, encode=lambda s, i, seed: Doc(i, ds.lengths[i], seed),
                      collate=lambda docs: [(d.index, d.seed) for d in docs],
                      length=(lambda i: ds.lengths[i]) if with_length else None)


def _global_steps(world: int, steps: int, M: int = 4, budget: int = 64, **kw) -> list:
    """The global micro-batches of each step, assembled from every rank's share."""
    loaders = [ShardedLoader(_source(**kw), budget, M, rank=r, world_size=world, seed=3) for r in range(world)]
    out = []
    for _ in range(steps):
        shares = [ld.next_step() for ld in loaders]
        assert len({len(s) for s in shares}) == 1 and len(shares[0]) == M // world
        step = [None] * M
        for r, share in enumerate(shares):
            for k, mb in enumerate(share):
                step[r + k * world] = mb
        out.append(step)
    assert len({str(ld.state_dict()) for ld in loaders}) == 1   # every rank agrees on the position
    return out


def test_same_global_stream_for_any_world_size():
    one, two, four = (_global_steps(w, 12) for w in (1, 2, 4))
    assert one == two == four
    # the micro-batches are greedy packs under the budget, order kept
    for step in one:
        for mb in step:
            assert sum(_source().dataset.lengths[i] for i, _ in mb) <= 64


def test_every_sample_once_per_epoch():
    ds_len = 50
    steps = _global_steps(2, 20)
    seen_by_epoch: dict = {}
    for step in steps:
        for mb in step:
            for idx, seed in mb:
                seen_by_epoch.setdefault(seed, []).append(idx)   # the pack seed identifies the epoch
    epochs = list(seen_by_epoch.values())
    assert len(epochs) >= 3
    for full in epochs[:-1]:   # complete epochs: each index exactly once
        assert sorted(full) == list(range(ds_len))
    assert epochs[0] != epochs[1]   # reshuffled per epoch


def test_resume_on_another_world_size():
    straight = _global_steps(1, 10)
    a = [ShardedLoader(_source(), 64, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(6):
        for ld in a:
            ld.next_step()
    state = a[0].state_dict()
    b = ShardedLoader(_source(), 64, 4, rank=0, world_size=1, seed=3)
    b.load_state_dict(state)
    assert [b.next_step() for _ in range(4)] == straight[6:]


def test_length_function_gives_the_same_stream_and_loads_only_own_samples():
    assert _global_steps(2, 8) == _global_steps(2, 8, with_length=True)
    src = _source(with_length=True)
    ld = ShardedLoader(src, 64, 4, rank=1, world_size=2, seed=3)
    mine = [idx for _ in range(5) for mb in ld.next_step() for idx, _ in mb]
    assert sorted(src.dataset.loaded) == sorted(mine)   # nothing of rank 0's was loaded


def test_errors():
    with pytest.raises(ValueError, match="3 micro-batches per step cannot be split evenly over 2 ranks"):
        ShardedLoader(_source(), 64, 3, rank=0, world_size=2)
    ld = ShardedLoader(_source(), 16, 1)
    with pytest.raises(ValueError, match="needs .* tokens, more than data.budget = 16"):
        for _ in range(50):
            ld.next_step()
    good = ShardedLoader(_source(), 64, 4, seed=3)
    other = ShardedLoader(_source(), 64, 4, seed=4)
    with pytest.raises(ValueError, match="saved with seed=3 but this loader has seed=4"):
        other.load_state_dict(good.state_dict())


def test_phased_loader_switches_streams_and_resumes():
    """DataPhases: step s reads the stream of the last phase starting at or before s; each phase's stream is a
    ShardedLoader of its own (phase k > 0 shuffled with seed_of(seed, "phase", k)) from its beginning; the state
    carries the phase, a state without one (written before phases existed) is phase 0, and a state of an unknown
    phase or a step going back is refused."""
    from umm_ops.train.engine.data import PhasedLoader
    from umm_ops.train.spec import DataPhases
    from umm_ops.utils import seed_of

    a, b = _source(50), _source(30)
    ld = PhasedLoader(DataPhases(((0, a), (3, b))), 64, 2, seed=3)
    got = [ld.next_step(s) for s in range(6)]
    ref_a, ref_b = ShardedLoader(_source(50), 64, 2, seed=3), ShardedLoader(_source(30), 64, 2,
                                                                           seed=seed_of(3, "phase", 1))
    assert got == [ref_a.next_step() for _ in range(3)] + [ref_b.next_step() for _ in range(3)]
    assert ld.phase == 1 and ld.state_dict() == {**ref_b.state_dict(), "phase": 1}
    # resume inside phase 1, and from a phase-0 state across the boundary
    again = PhasedLoader(DataPhases(((0, _source(50)), (3, _source(30)))), 64, 2, seed=3)
    again.load_state_dict(ld.state_dict())
    assert again.next_step(6) == ref_b.next_step()
    early = PhasedLoader(DataPhases(((0, _source(50)), (3, _source(30)))), 64, 2, seed=3)
    st = ShardedLoader(_source(50), 64, 2, seed=3)
    st.next_step()
    early.load_state_dict(st.state_dict())   # no "phase": a plain loader's state
    assert early.phase == 0 and early.next_step(1) == got[1] and early.next_step(3) == got[3]
    with pytest.raises(ValueError, match="steps only go forward"):
        early.next_step(0)
    with pytest.raises(ValueError, match="phase 2, this run's data has 2 phase"):
        early.load_state_dict({**ld.state_dict(), "phase": 2})
    # a single DataSource is one phase, its state the ShardedLoader's plus phase 0
    one = PhasedLoader(_source(50), 64, 2, seed=3)
    assert [one.next_step(s) for s in range(3)] == got[:3] and one.state_dict()["phase"] == 0
    for bad in [(), ((1, a),), ((0, a), (0, b)), ((0, a), (2.0, b)), (a,)]:
        with pytest.raises(ValueError, match="DataPhases"):
            DataPhases(bad)
