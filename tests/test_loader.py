"""The resumable packed loader (umm_ops.data.loader): exact resume with 0 and 2 workers, worker-count independence,
equality with pack(), shuffling, state checks, errors."""
from __future__ import annotations

import json

import pytest
import torch

from test_packing import PATCH, check_batch, random_samples
from umm_ops.data.loader import PackedLoader
from umm_ops.data.packing import PackedBatch, PackSpec, Sample, TextItem, pack
from umm_ops.data.tokenizer import ByteTokenizer


class ListDataset:
    """A map-style dataset over a list of Samples."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


class BadDataset(ListDataset):
    def __getitem__(self, i):
        return "not a sample" if i == 5 else self.samples[i]


def make_spec(**kw):
    kw = {"budget": 150, "align": 8, "gen_mode": "noise"} | kw
    return PackSpec(ByteTokenizer(), patch=PATCH, **kw)


def batch_equal(a: PackedBatch, b: PackedBatch) -> bool:
    names = ("input_ids", "position_ids", "labels", "doc_offsets", "image_spans", "image_grids", "timesteps",
             "sample_ids", "text_spans")
    return (all(torch.equal(getattr(a, n), getattr(b, n)) for n in names)
            and all(torch.equal(x, y) for x, y in zip(a.layout.tensors(), b.layout.tensors()))
            and len(a.images) == len(b.images) and all(torch.equal(x, y) for x, y in zip(a.images, b.images))
            and a.metas == b.metas)


@pytest.fixture(scope="module")
def data():
    samples = random_samples(1234, 40)
    return samples, ListDataset(samples)


@pytest.fixture(scope="module")
def reference(data):
    """Two uninterrupted epochs, no workers."""
    loader = PackedLoader(data[1], make_spec(), seed=11)
    epochs = [list(loader), list(loader)]
    assert loader.state_dict()["epoch"] == 2
    return epochs


def test_matches_pack_and_covers_epoch(data, reference):
    samples, ds = data
    loader = PackedLoader(ds, make_spec(), seed=11)
    orders = [loader.order(0), loader.order(1)]
    assert orders[0] != orders[1] and sorted(orders[0]) == list(range(len(samples)))
    for e, batches in enumerate(reference):
        ids = torch.cat([b.sample_ids for b in batches]).tolist()
        assert ids == orders[e]  # every sample once, in the epoch's order
        want = pack([samples[i] for i in orders[e]], make_spec(), seed=loader.pack_seed(e), sample_ids=orders[e])
        assert len(want) == len(batches) and all(batch_equal(a, b) for a, b in zip(want, batches))
        k = 0
        for b in batches:
            check_batch(b, make_spec(), [samples[i] for i in ids[k:k + b.num_docs]])
            k += b.num_docs
    # unshuffled: index order
    plain = list(PackedLoader(ds, make_spec(), shuffle=False))
    assert torch.cat([b.sample_ids for b in plain]).tolist() == list(range(len(samples)))


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_and_exact_resume(data, reference, workers):
    samples, ds = data
    flat = [b for ep in reference for b in ep]
    n0 = len(reference[0])
    assert n0 >= 6, "the test needs several batches per epoch"
    # uninterrupted with workers == uninterrupted without (whatever the samples fetched per worker round trip)
    for fetch in (None, 3):
        loader = PackedLoader(ds, make_spec(), seed=11, num_workers=workers, samples_per_fetch=fetch)
        got = list(loader) + list(loader)
        assert len(got) == len(flat) and all(batch_equal(a, b) for a, b in zip(got, flat))
    # interrupt after k batches (mid-epoch, last batch of an epoch, first of the next), save, resume in a new loader
    for k in (3, n0, n0 + 2):
        first = PackedLoader(ds, make_spec(), seed=11, num_workers=workers)
        taken, it = [], iter(first)
        while len(taken) < k:
            try:
                taken.append(next(it))
            except StopIteration:
                it = iter(first)
        state = json.loads(json.dumps(first.state_dict()))  # plain data: survives a checkpoint file
        del it, first
        resumed = PackedLoader(ds, make_spec(), seed=11, num_workers=workers)
        resumed.load_state_dict(state)
        assert state["epoch"] == (0 if k < n0 else 1)
        rest = []
        while resumed.state_dict()["epoch"] < 2:
            rest.extend(resumed)
        assert len(taken) + len(rest) == len(flat)
        assert all(batch_equal(a, b) for a, b in zip(taken + rest, flat)), f"resume after {k} batches differs"


def test_break_and_continue(data, reference):
    loader = PackedLoader(data[1], make_spec(), seed=11)
    got = []
    for b in loader:
        got.append(b)
        if len(got) == 2:
            break
    got.extend(loader)  # continues the same epoch
    assert len(got) == len(reference[0]) and all(batch_equal(a, b) for a, b in zip(got, reference[0]))
    assert loader.epoch == 1


def test_global_rng_untouched(data):
    before = torch.get_rng_state()
    list(PackedLoader(data[1], make_spec(), seed=3))
    assert torch.equal(before, torch.get_rng_state())


def test_state_errors(data):
    ds = data[1]
    state = PackedLoader(ds, make_spec(), seed=1).state_dict()
    with pytest.raises(ValueError, match="saved with seed=1 but this loader has seed=2"):
        PackedLoader(ds, make_spec(), seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with budget=150 but this loader has budget=300"):
        PackedLoader(ds, make_spec(budget=300), seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="saved with num_samples=40 but this loader has num_samples=39"):
        PackedLoader(ListDataset(ds.samples[:39]), make_spec(), seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"lacks \['position'"):
        PackedLoader(ds, make_spec(), seed=1).load_state_dict({k: v for k, v in state.items() if k != "position"})
    with pytest.raises(ValueError, match="position 41 is past the end"):
        PackedLoader(ds, make_spec(), seed=1).load_state_dict(state | {"position": 41})


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_errors(data, workers):
    with pytest.raises(TypeError, match="sample 5 must be a Sample, got str"):
        list(PackedLoader(BadDataset(data[0]), make_spec(), shuffle=False, num_workers=workers))
    big = ListDataset([Sample([TextItem("x" * 10)]), Sample([TextItem("y" * 500)])])
    with pytest.raises(ValueError, match=r"sample 1 needs 500 tokens, more than the budget of 150"):
        list(PackedLoader(big, make_spec(), shuffle=False, num_workers=workers))


def test_constructor_errors(data):
    with pytest.raises(TypeError, match="map-style"):
        PackedLoader(iter([]), make_spec())
    with pytest.raises(ValueError, match="dataset is empty"):
        PackedLoader(ListDataset([]), make_spec())
    with pytest.raises(TypeError, match="spec must be a PackSpec"):
        PackedLoader(data[1], {"budget": 10})
    with pytest.raises(ValueError, match="num_workers must be an int >= 0"):
        PackedLoader(data[1], make_spec(), num_workers=-1)
    with pytest.raises(ValueError, match="samples_per_fetch must be an int >= 1, got 0"):
        PackedLoader(data[1], make_spec(), samples_per_fetch=0)
    with pytest.raises(ValueError, match="prefetch_factor needs num_workers > 0"):
        PackedLoader(data[1], make_spec(), prefetch_factor=2)
