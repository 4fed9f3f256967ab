"""Sample packing (umm_ops.data.packing): round trip, budgets, layouts (checked against span_mask), labels,
alignment, timesteps, determinism, errors."""
from __future__ import annotations

import random

import pytest
import torch

from umm_ops import SpanLayout, span_mask
from umm_ops.data.packing import (ImageItem, LogitNormalTimesteps, PackedBatch, PackSpec, Sample, TextItem,
                                  UniformTimesteps, chat_sample, pack, unpack)
from umm_ops.data.tokenizer import ByteTokenizer, chat_template

PATCH = 8
WORDS = ["a", "red", "circle", " ", "left of", "éß", "漢字", "\n", "<|im_start|>", "<|im_end|>", "?"]


def random_sample(rng: random.Random, max_items: int = 5, max_side: int = 4, sid=None) -> Sample:
    """Interleaved text and images (sides 1..max_side tokens of PATCH pixels), random roles and loss flags."""
    items = []
    for _ in range(rng.randrange(1, max_items + 1)):
        if rng.random() < 0.35:
            h, w = rng.randrange(1, max_side + 1) * PATCH, rng.randrange(1, max_side + 1) * PATCH
            g = torch.Generator().manual_seed(rng.randrange(2**31))
            img = torch.rand(3, h, w, generator=g) * 2 - 1
            items.append(ImageItem(img, rng.choice(["understand", "generate"])))
        else:
            text = "".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 6)))
            items.append(TextItem(text, loss=rng.random() < 0.5))
    if not any(isinstance(i, ImageItem) or i.text for i in items):
        items.append(TextItem("x"))
    return Sample(items, {"sid": sid} if sid is not None else {})


def random_samples(seed: int, n: int, **kw) -> list:
    rng = random.Random(seed)
    return [random_sample(rng, sid=i, **kw) for i in range(n)]


def spec_for(gen_mode="full", budget=256, align=None, **kw):
    return PackSpec(ByteTokenizer(), patch=PATCH, gen_mode=gen_mode, budget=budget, align=align, **kw)


def expected_mask(batch: PackedBatch, gen_mode: str) -> torch.Tensor:
    """The attention mask the batch should have, from its documents and image spans alone (not its layout):
    text tokens causal within their document; an image's tokens see each other and every earlier token of the
    document; with gen_mode "noise" a generated image's tokens are seen by nobody outside it."""
    L = batch.num_tokens
    offs = batch.doc_offsets.tolist()
    doc = torch.zeros(L, dtype=torch.long)
    for d in range(len(offs) - 1):
        doc[offs[d]:offs[d + 1]] = d
    block = torch.arange(L)          # a per-token block id: own index for text, the span start for image tokens
    hidden = torch.zeros(L, dtype=torch.bool)
    for start, n, role in batch.image_spans.tolist():
        block[start:start + n] = start
        hidden[start:start + n] = role == 1 and gen_mode == "noise"
    is_image = block != torch.arange(L)
    for start, n, _ in batch.image_spans.tolist():
        is_image[start] = True
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    same_doc = doc[:, None] == doc[None, :]
    own_block = (block[:, None] == block[None, :]) & ((k <= q) | is_image[:, None])
    before = (k < block[:, None]) & ~hidden[None, :]
    return same_doc & (own_block | before)


def check_batch(batch: PackedBatch, spec: PackSpec, samples: list) -> None:
    """Every invariant of a packed batch, against the samples it holds."""
    tok = spec.tokenizer
    L, D = batch.num_tokens, batch.num_docs
    assert L <= spec.budget
    for name in ("input_ids", "position_ids", "labels", "doc_offsets", "image_spans", "image_grids", "sample_ids",
                 "text_spans"):
        assert getattr(batch, name).dtype == torch.int64, name
    assert batch.timesteps.dtype == torch.float32
    assert batch.input_ids.shape == batch.position_ids.shape == batch.labels.shape == (L,)
    offs = batch.doc_offsets.tolist()
    assert offs[0] == 0 and offs[-1] == L and len(offs) == D + 1 == len(samples) + 1
    # positions restart at 0 per document
    for d in range(D):
        assert batch.position_ids[offs[d]:offs[d + 1]].tolist() == list(range(offs[d + 1] - offs[d]))
    # the layout passes SpanLayout's own validation and matches the documents
    lay = batch.layout
    SpanLayout(*lay.tensors())  # validate=True re-reads and checks every tensor
    assert lay.cu_seqlens_k.tolist() == offs and lay.cu_seqlens_q.tolist() == offs
    # images: spans hold <|image_pad|> wrapped in <|vision_start|> / <|vision_end|>; grids, timesteps, roles
    img_items = [it for s in samples for it in s.items if isinstance(it, ImageItem)]
    assert len(batch.images) == len(img_items) == batch.image_spans.shape[0] == batch.timesteps.shape[0]
    ids = batch.input_ids
    for (start, n, role), (gh, gw), t, x, it in zip(batch.image_spans.tolist(), batch.image_grids.tolist(),
                                                     batch.timesteps.tolist(), batch.images, img_items):
        assert x is it.image and role == (it.role == "generate")
        assert (gh * PATCH, gw * PATCH) == tuple(x.shape[1:]) and n == gh * gw
        assert (ids[start:start + n] == tok.special("<|image_pad|>")).all()
        assert ids[start - 1] == tok.special("<|vision_start|>") and ids[start + n] == tok.special("<|vision_end|>")
        d = next(d for d in range(D) if offs[d] <= start < offs[d + 1])
        if spec.align:
            assert (start - offs[d]) % spec.align == 0
        if role == 0:
            assert t == 1.0
        else:
            assert 0.0 < t < 1.0
    # mask semantics, independently of the layout tensors
    assert torch.equal(span_mask(lay), expected_mask(batch, spec.gen_mode))
    # labels: next-token targets exactly on the tokens of loss=True text items (not a document's first token)
    exp = torch.full((L,), -100, dtype=torch.int64)
    for start, n, loss, d in batch.text_spans.tolist():
        if loss:
            for i in range(max(start, offs[d] + 1), start + n):
                exp[i - 1] = ids[i]
    assert torch.equal(batch.labels, exp)
    # the label targets decode to the loss texts, document by document
    for d, s in enumerate(samples):
        lab = batch.labels[offs[d]:offs[d + 1]]
        want = tok.encode("".join(it.text for it in s.items if isinstance(it, TextItem) and it.loss))
        first = next(it for it in s.items if isinstance(it, ImageItem) or it.text)
        if isinstance(first, TextItem) and first.loss:  # nothing predicts a document's first token
            want = want[1:]
        assert lab[lab != -100].tolist() == want


@pytest.mark.parametrize("gen_mode", ["full", "noise"])
@pytest.mark.parametrize("align", [None, 1, 16])
def test_round_trip_and_invariants(seed, gen_mode, align):
    spec = spec_for(gen_mode, budget=160, align=align)
    samples = random_samples(seed, 24)
    batches = pack(samples, spec, seed=seed)
    got, k = [], 0
    for b in batches:
        check_batch(b, spec, samples[k:k + b.num_docs])
        assert b.sample_ids.tolist() == list(range(k, k + b.num_docs))  # order preserved
        k += b.num_docs
        got.extend(unpack(b, spec.tokenizer))
    assert k == len(samples)
    assert got == samples  # texts, loss flags, images (exact pixels), roles, metas
    # greedy: a batch is closed only when the next sample does not fit
    for b, nxt in zip(batches[:-1], batches[1:]):
        assert b.num_tokens + (nxt.doc_offsets[1] - nxt.doc_offsets[0]).item() > spec.budget


def test_alignment_pads(seed):
    tok = ByteTokenizer()
    spec = spec_for(budget=4096, align=32)
    img = torch.zeros(3, 2 * PATCH, 3 * PATCH)
    s = Sample([TextItem("abc", loss=True), ImageItem(img), TextItem("de", loss=True), ImageItem(img, "generate"),
                TextItem("f", loss=True)])
    b, = pack([random_sample(random.Random(seed)), s], spec)
    o = b.doc_offsets[1].item()
    ids = b.input_ids[o:].tolist()
    pad, vs, ve = tok.pad_id, tok.special("<|vision_start|>"), tok.special("<|vision_end|>")
    # "abc" + 28 pads + <|vision_start|> -> image at 32; then 6 image tokens, <|vision_end|>, "de" (ends at 41),
    # 22 pads + <|vision_start|> -> image at 64
    assert ids[:32] == list(b"abc") + [pad] * 28 + [vs]
    assert ids[38:41] == [ve] + list(b"de") and ids[41:63] == [pad] * 22 and ids[63] == vs
    assert [r[0] - o for r in b.image_spans.tolist()[-2:]] == [32, 64]
    # pads are causal text without loss: no label targets a pad, and a pad token sees exactly the earlier tokens
    lab = b.labels[o:]
    assert (lab != pad).all() and (lab[2:31] == -100).all()
    m = span_mask(b.layout)
    p = o + 10
    assert m[p, o:o + 11].all() and not m[p, o + 11:].any() and not m[p, :o].any()
    # without align there are no pads
    b2, = pack([s], spec_for(budget=4096))
    assert pad not in b2.input_ids.tolist()
    assert b2.image_spans[:, 0].tolist() == [4, 4 + 6 + 1 + 2 + 1]


def test_timesteps_deterministic_per_sample(seed):
    samples = random_samples(seed, 12)
    samples.append(Sample([TextItem("draw"), ImageItem(torch.zeros(3, PATCH, PATCH), "generate")]))
    spec = spec_for(budget=512)
    a = pack(samples, spec, seed=7)
    b = pack(samples, spec_for(budget=128), seed=7)   # other batch composition: same per-sample timesteps
    c = pack(samples, spec, seed=8)
    ta, tb, tc = (torch.cat([x.timesteps for x in bs]) for bs in (a, b, c))
    assert torch.equal(ta, tb)
    gen = torch.cat([x.image_spans[:, 2] for x in a]) == 1
    assert gen.any() and not torch.equal(ta[gen], tc[gen])
    assert (ta[~gen] == 1).all()
    # sample_ids seed the timesteps: the same sample under another id gets another t
    one = [samples[-1]]
    assert pack(one, spec, seed=7, sample_ids=[3])[0].timesteps != pack(one, spec, seed=7, sample_ids=[4])[0].timesteps
    assert pack(one, spec, seed=7, sample_ids=[3])[0].sample_ids.tolist() == [3]


def test_deterministic(seed):
    samples = random_samples(seed, 10)
    spec = spec_for("noise", budget=200, align=8)
    for a, b in zip(pack(samples, spec, seed=1), pack(samples, spec, seed=1)):
        for name in ("input_ids", "position_ids", "labels", "doc_offsets", "image_spans", "image_grids",
                     "timesteps", "sample_ids", "text_spans"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert all(torch.equal(x, y) for x, y in zip(a.layout.tensors(), b.layout.tensors()))


def test_samplers(seed):
    g = torch.Generator().manual_seed(seed)
    t = UniformTimesteps(eps=0.01)(1000, g)
    assert t.dtype == torch.float32 and t.min() >= 0.01 and t.max() <= 0.99 and 0.45 < t.mean() < 0.55
    t = LogitNormalTimesteps(mean=0.0, std=1.0)(1000, g)
    assert 0 < t.min() and t.max() < 1 and 0.45 < t.median() < 0.55
    ts = LogitNormalTimesteps(shift=0.3)(1000, torch.Generator().manual_seed(seed))
    t0 = LogitNormalTimesteps()(1000, torch.Generator().manual_seed(seed))
    assert (ts < t0).all()  # a < 1 moves every t towards noise (t = 0)
    with pytest.raises(ValueError, match="eps must be in"):
        UniformTimesteps(eps=0.5)
    with pytest.raises(ValueError, match="std and shift must be > 0"):
        LogitNormalTimesteps(std=0)
    spec = spec_for(timestep_sampler=LogitNormalTimesteps())
    b, = pack([Sample([ImageItem(torch.zeros(3, 8, 8), "generate")])], spec)
    assert 0 < b.timesteps.item() < 1


def test_to_device():
    b, = pack(random_samples(0, 3), spec_for(budget=1024))
    c = b.to("cpu")
    assert torch.equal(c.input_ids, b.input_ids) and c.layout.total_k == b.num_tokens
    if torch.cuda.is_available():
        g = b.to("cuda")
        assert g.input_ids.is_cuda and g.layout.device.type == "cuda" and all(x.is_cuda for x in g.images)
        assert g.device.type == "cuda"


def test_chat_sample():
    img = torch.zeros(3, 16, 16)
    msgs = [{"role": "user", "content": ["Describe ", img, {"type": "text", "text": "."}]},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": "Now draw one."},
            {"role": "assistant", "content": [{"type": "image", "image": img}]}]
    s = chat_sample(msgs, meta={"k": 1})
    text = "".join(it.text if isinstance(it, TextItem) else "<image>" for it in s.items)
    assert text == chat_template(msgs)
    assert [it.role for it in s.items if isinstance(it, ImageItem)] == ["understand", "generate"]
    assert [it.text for it in s.items if isinstance(it, TextItem) and it.loss] == ["A square.<|im_end|>",
                                                                                  "<|im_end|>"]
    assert s.meta == {"k": 1}
    b, = pack([s], spec_for(budget=1024))
    lab = b.labels[b.labels != -100].tolist()
    assert ByteTokenizer().decode(lab) == "A square.<|im_end|><|im_end|>"


def test_errors():
    tok = ByteTokenizer()
    big = Sample([TextItem("x" * 100)])
    with pytest.raises(ValueError, match=r"sample 1 needs 100 tokens, more than the budget of 64"):
        pack([Sample([TextItem("a")]), big], spec_for(budget=64))
    with pytest.raises(ValueError, match=r"sample 7 \(position 1\) needs 100 tokens"):
        pack([Sample([TextItem("a")]), big], spec_for(budget=64), sample_ids=[3, 7])
    with pytest.raises(ValueError, match=r"sample 0 item 1: image of 8x12 pixels is not a multiple of the patch"):
        pack([Sample([TextItem("a"), ImageItem(torch.zeros(3, 8, 12))])], spec_for())
    with pytest.raises(ValueError, match="produces no tokens"):
        pack([Sample([TextItem("")])], spec_for())
    with pytest.raises(ValueError, match=r"values must lie in \[-1, 1\], got min 0.0 max 2.0"):
        ImageItem(torch.tensor([0.0, 2.0]).expand(3, 1, 2))
    with pytest.raises(ValueError, match="values must lie in"):
        ImageItem(torch.full((3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"shape \(3, H, W\).*got \(1, 4, 4\)"):
        ImageItem(torch.zeros(1, 4, 4))
    with pytest.raises(TypeError, match="floating point"):
        ImageItem(torch.zeros(3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="role must be 'understand' or 'generate', got 'edit'"):
        ImageItem(torch.zeros(3, 4, 4), "edit")
    with pytest.raises(TypeError, match="loss must be a bool"):
        TextItem("a", loss=1)
    with pytest.raises(ValueError, match="items is empty"):
        Sample([])
    with pytest.raises(TypeError, match="item 0 must be a TextItem or an ImageItem, got str"):
        Sample(["text"])
    with pytest.raises(TypeError, match="sample 0 must be a Sample, got dict"):
        pack([{"items": []}], spec_for())
    with pytest.raises(ValueError, match="gen_mode must be 'full'.*got 'hidden'"):
        PackSpec(tok, gen_mode="hidden")
    with pytest.raises(ValueError, match="budget must be a positive int, got 0"):
        PackSpec(tok, budget=0)
    with pytest.raises(ValueError, match="align must be None or a positive int"):
        PackSpec(tok, align=0)
    with pytest.raises(TypeError, match="tokenizer must provide"):
        PackSpec(object())
    with pytest.raises(ValueError, match="one id per sample: 1 samples, 2 ids"):
        pack([big], spec_for(budget=1000), sample_ids=[1, 2])
    bad = spec_for(timestep_sampler=lambda n, g: torch.rand(n + 1, generator=g))
    with pytest.raises(TypeError, match=r"must return a \(1,\) float tensor"):
        pack([Sample([ImageItem(torch.zeros(3, 8, 8), "generate")])], bad)
    bad = spec_for(timestep_sampler=lambda n, g: torch.full((n,), 1.5))
    with pytest.raises(ValueError, match="outside \\[0, 1\\] for sample 0"):
        pack([Sample([ImageItem(torch.zeros(3, 8, 8), "generate")])], bad)
    with pytest.raises(TypeError, match="expected a PackedBatch"):
        unpack("batch", tok)


def test_layout_runs_span_attention(seed):
    """A packed batch's layout drives span_attention: the output equals plain masked-softmax attention under the
    mask derived from the batch's documents and image spans (float64)."""
    import umm_ops

    samples = random_samples(seed, 6, max_side=3)
    spec = spec_for("noise", budget=4096, align=4)
    b, = pack(samples, spec)
    L, H, Dh = b.num_tokens, 2, 16
    q, k, v = (torch.randn(L, H, Dh, dtype=torch.float64) for _ in range(3))
    out = umm_ops.span_attention(q, k, v, b.layout)
    m = expected_mask(b, "noise")
    s = torch.einsum("qhd,khd->hqk", q, k) / Dh**0.5
    ref = torch.einsum("hqk,khd->qhd", s.masked_fill(~m, float("-inf")).softmax(-1), v)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
