"""SpanLayout: the mask against a brute-force reading of the semantics table, invariants, the flex mask_mod, the
dense-mask adapter, direct tensor construction and every validation error."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis", reason="property tests need hypothesis (scripts/setup.sh installs it)")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import umm_ops
from umm_ops import SpanLayout, span_mask

MODES = ("causal", "full", "noise")


@st.composite
def layouts(draw, max_docs=4, max_segs=5, max_len=40):
    """(docs, q_lens): 1-4 documents of 1-5 segments, lengths 1..40 (1 made frequent), any modes, q_lens None
    or one random value in [0, len] per document."""
    seg = st.tuples(st.one_of(st.just(1), st.integers(1, max_len)), st.sampled_from(MODES))
    docs = draw(st.lists(st.lists(seg, min_size=1, max_size=max_segs), min_size=1, max_size=max_docs))
    if draw(st.booleans()):
        return docs, None
    q_lens = [draw(st.integers(0, sum(n for n, _ in doc))) for doc in docs]
    return docs, q_lens


def brute_force_mask(docs, q_lens=None):
    """The semantics table, token by token with plain loops (independent of the layout tensors):
    a query and a key of different documents: never; in the query's own segment: causal -> key at or before the
    query's position, full / noise -> always; in an earlier segment of the document: unless that segment is noise;
    in a later segment: never."""
    tokens = []  # (doc, segment index within the doc, mode, position within the doc)
    for d, doc in enumerate(docs):
        pos = 0
        for s, (n, mode) in enumerate(doc):
            for _ in range(n):
                tokens.append((d, s, mode, pos))
                pos += 1
    queries = []
    start = 0
    for d, doc in enumerate(docs):
        n = sum(length for length, _ in doc)
        nq = n if q_lens is None else q_lens[d]
        queries.extend(range(start + n - nq, start + n))  # the query's token = its key position
        start += n
    rows = []
    for qt in queries:
        qd, qs, qmode, qpos = tokens[qt]
        row = []
        for kd, ks, kmode, kpos in tokens:
            if kd != qd:
                ok = False
            elif ks == qs:
                ok = kpos <= qpos if qmode == "causal" else True
            elif ks < qs:
                ok = kmode != "noise"
            else:
                ok = False
            row.append(ok)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(len(queries), len(tokens)), queries, tokens


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_span_mask_matches_semantics(case):
    docs, q_lens = case
    lay = SpanLayout.from_segments(docs, q_lens)
    m = span_mask(lay)
    ref, queries, tokens = brute_force_mask(docs, q_lens)
    assert m.dtype == torch.bool and m.shape == (lay.total_q, lay.total_k)
    assert torch.equal(m, ref)
    # host ints
    lens = [sum(n for n, _ in doc) for doc in docs]
    qls = lens if q_lens is None else q_lens
    assert (lay.num_docs, lay.num_segments) == (len(docs), sum(len(d) for d in docs))
    assert (lay.total_q, lay.total_k, lay.max_seqlen_q, lay.max_seqlen_k) == (sum(qls), sum(lens), max(qls),
                                                                              max(lens))
    for t in lay.tensors():
        assert t.dtype == torch.int32 and t.is_contiguous()
    # positions of the queries, their segments
    assert lay.q_positions().tolist() == queries
    seg_global = {}
    for d, doc in enumerate(docs):
        for s in range(len(doc)):
            seg_global[(d, s)] = len(seg_global)
    assert lay.segment_of_query().tolist() == [seg_global[tokens[p][:2]] for p in queries]
    # invariants: every query sees >= 1 key (itself); no cross-document visibility; noise segments are invisible
    # to the queries of every other segment
    if len(queries):
        assert m.any(1).all()
        assert m[torch.arange(len(queries)), torch.tensor(queries)].all()
    rows = m.tolist()
    for i, p in enumerate(queries):
        for kk, (kd, ks, kmode, _) in enumerate(tokens):
            if kd != tokens[p][0]:
                assert not rows[i][kk]
            if kmode == "noise" and (kd, ks) != tokens[p][:2]:
                assert not rows[i][kk]


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_mask_mod_agrees_with_span_mask(case):
    docs, q_lens = case
    lay = SpanLayout.from_segments(docs, q_lens)
    mm = lay.mask_mod()
    Lq, Lk = lay.total_q, lay.total_k
    qi = torch.arange(Lq + 3)[:, None].expand(Lq + 3, Lk + 5)  # a few padded indices past the ends too
    ki = torch.arange(Lk + 5)[None, :].expand(Lq + 3, Lk + 5)
    zero = torch.zeros((), dtype=torch.long)
    got = mm(zero, zero, qi, ki)
    expect = torch.zeros(Lq + 3, Lk + 5, dtype=torch.bool)
    expect[:Lq, :Lk] = span_mask(lay)
    assert torch.equal(got, expect)


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_from_dense_mask_round_trip(case):
    docs, _ = case
    lay = SpanLayout.from_segments(docs)
    m = span_mask(lay)
    back = SpanLayout.from_dense_mask(m)
    assert torch.equal(span_mask(back), m)
    # documents are never merged (they are disconnected blocks); they may split (a leading noise block
    # is disconnected from the rest of its document: an equivalent layout)
    assert set(lay.cu_seqlens_k.tolist()) <= set(back.cu_seqlens_k.tolist())
    assert back.total_q == back.total_k == lay.total_k


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_direct_construction_equals_from_segments(case):
    docs, q_lens = case
    lay = SpanLayout.from_segments(docs, q_lens)
    direct = SpanLayout(*(t.clone() for t in lay.tensors()))
    for a, b in zip(direct.tensors(), lay.tensors()):
        assert torch.equal(a, b)
    assert (direct.total_q, direct.total_k, direct.max_seqlen_q, direct.max_seqlen_k, direct.num_docs,
            direct.num_segments) == (lay.total_q, lay.total_k, lay.max_seqlen_q, lay.max_seqlen_k, lay.num_docs,
                                     lay.num_segments)
    assert torch.equal(span_mask(direct), span_mask(lay))
    trusted = SpanLayout(*lay.tensors(), max_seqlen_q=lay.max_seqlen_q, max_seqlen_k=lay.max_seqlen_k,
                         validate=False)
    assert (trusted.total_q, trusted.total_k) == (lay.total_q, lay.total_k)  # read lazily
    assert torch.equal(span_mask(trusted), span_mask(lay))


def test_adjacent_same_mode_segments_stay_separate():
    two = span_mask(SpanLayout.from_segments([[(2, "full"), (3, "full")]]))
    one = span_mask(SpanLayout.from_segments([[(5, "full")]]))
    assert not torch.equal(two, one)
    assert not two[0, 2] and two[2, 0] and one[0, 4]
    nn = span_mask(SpanLayout.from_segments([[(2, "noise"), (2, "noise"), (1, "causal")]]))
    assert not nn[2, 0] and not nn[4, 0] and not nn[4, 2] and nn[4, 4]


def test_examples_and_repr():
    lay = SpanLayout.from_segments([[(2, "causal"), (3, "full"), (2, "noise"), (1, "causal")], [(2, "full")]],
                                   q_lens=[3, 2])
    r = repr(lay)
    assert "SpanLayout" in r and "q_lens=[3, 2]" in r
    assert lay.tensors()[0].tolist() == [0, 3, 5]
    assert lay.cu_seqlens_k.tolist() == [0, 8, 10]
    assert lay.seg_offsets.tolist() == [0, 4, 5]
    assert lay.seg_start.tolist() == [0, 2, 5, 7, 8]
    assert lay.seg_end.tolist() == [2, 5, 7, 8, 10]
    assert lay.seg_mode.tolist() == [0, 1, 2, 0, 1]
    assert lay.q_positions().tolist() == [5, 6, 7, 8, 9]
    m = span_mask(lay)
    # the causal token after the noise block sees text + image, not the noise
    assert m[2].tolist() == [True] * 5 + [False, False, True, False, False]
    assert lay.to("cpu") is lay
    with pytest.raises(AttributeError, match="immutable"):
        lay.max_seqlen_q = 3


def test_from_dense_mask_rejects_inexpressible():
    # a sliding window is not expressible as spans
    L = 6
    i = torch.arange(L)
    win = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 2)
    with pytest.raises(ValueError, match="mask is not expressible as spans"):
        SpanLayout.from_dense_mask(win)
    with pytest.raises(ValueError, match="mask is not expressible as spans"):
        SpanLayout.from_dense_mask(torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask is not expressible as spans"):  # bidirectional, but not prefix
        SpanLayout.from_dense_mask(torch.ones(4, 4, dtype=torch.bool).triu())
    with pytest.raises(ValueError, match="square"):
        SpanLayout.from_dense_mask(torch.ones(3, 4, dtype=torch.bool))
    # a plain causal mask and a Cheers-like text + image block
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.equal(span_mask(SpanLayout.from_dense_mask(causal)), causal)
    cheers = span_mask(SpanLayout.from_segments([[(3, "causal"), (4, "full"), (2, "causal")]]))
    back = SpanLayout.from_dense_mask(cheers)
    assert back.segments()[0] == [[(3, "causal"), (4, "full"), (2, "causal")]]


@pytest.mark.parametrize("docs,q_lens,exc,match", [
    ([], None, ValueError, "at least one document"),
    ("abc", None, TypeError, "list of documents"),
    ([[]], None, ValueError, "document 0 is empty"),
    ([[(3, "causal")], []], None, ValueError, "document 1 is empty"),
    ([[(0, "causal")]], None, ValueError, r"length must be > 0, got 0"),
    ([[(-2, "full")]], None, ValueError, r"length must be > 0, got -2"),
    ([[(2.5, "full")]], None, TypeError, "length must be an int, got float"),
    ([[(True, "full")]], None, TypeError, "length must be an int"),
    ([[(3, "bidir")]], None, ValueError, r"unknown mode 'bidir', expected one of 'causal', 'full', 'noise'"),
    ([[(3,)]], None, ValueError, r"expected a \(length, mode\) pair"),
    ([[(3, "causal")]], [4], ValueError, r"q_lens\[0\] must be in \[0, 3\].*got 4"),
    ([[(3, "causal")]], [-1], ValueError, r"q_lens\[0\] must be in \[0, 3\].*got -1"),
    ([[(3, "causal")]], [1, 2], ValueError, "one entry per document: expected 1, got 2"),
    ([[(3, "causal")]], [1.0], TypeError, r"q_lens\[0\] must be an int"),
])
def test_from_segments_errors(docs, q_lens, exc, match):
    with pytest.raises(exc, match=match):
        SpanLayout.from_segments(docs, q_lens)


def test_from_segments_rejects_int32_overflow():
    with pytest.raises(ValueError, match="int32"):
        SpanLayout.from_segments([[(2**30, "causal"), (2**30, "full")]])


def _python_path(monkeypatch):
    from umm_ops.attention import layout as layout_mod
    monkeypatch.setattr(layout_mod, "_HOST", None)  # what a build without the compiled host builder does


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_compiled_host_builder_equals_python_path(case):
    """The compiled builder (umm_ops._C.span_layout_host) and the Python path build identical layouts."""
    from umm_ops.attention import layout as layout_mod
    if layout_mod._host_builder() is None:
        pytest.skip("this build of umm_ops._C has no span_layout_host")
    docs, q_lens = case
    fast = SpanLayout.from_segments(docs, q_lens)
    with pytest.MonkeyPatch.context() as mp:
        _python_path(mp)
        slow = SpanLayout.from_segments(docs, q_lens)
    for a, b in zip(fast.tensors(), slow.tensors()):
        assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b)
    for name in ("num_docs", "num_segments", "max_seqlen_q", "max_seqlen_k", "total_q", "total_k"):
        assert getattr(fast, name) == getattr(slow, name), name
    # tuples as documents / segments take the same path
    tup = SpanLayout.from_segments(tuple(tuple(tuple(seg) for seg in doc) for doc in docs),
                                   None if q_lens is None else tuple(q_lens))
    assert all(torch.equal(a, b) for a, b in zip(tup.tensors(), slow.tensors()))


@pytest.mark.parametrize("python_path", [False, True])
def test_from_segments_errors_both_paths(python_path, monkeypatch):
    """The precise errors hold whichever path runs first (the compiled builder declines bad input)."""
    if python_path:
        _python_path(monkeypatch)
    with pytest.raises(ValueError, match="document 1 is empty"):
        SpanLayout.from_segments([[(3, "causal")], []])
    with pytest.raises(TypeError, match="length must be an int"):
        SpanLayout.from_segments([[(3, "causal"), (True, "full")]])
    with pytest.raises(ValueError, match=r"q_lens\[1\] must be in \[0, 2\]"):
        SpanLayout.from_segments([[(3, "causal")], [(2, "full")]], [1, 3])


def _good():
    return [t.clone() for t in SpanLayout.from_segments([[(2, "causal"), (3, "full")], [(4, "noise")]],
                                                        q_lens=[5, 2]).tensors()]


def _with(i, value):
    ts = _good()
    ts[i] = torch.tensor(value, dtype=torch.int32) if not isinstance(value, torch.Tensor) else value
    return ts


@pytest.mark.parametrize("ts,kw,exc,match", [
    (_with(0, torch.tensor([0, 5, 7])), {}, TypeError, "cu_seqlens_q must be int32, got int64"),
    (_with(3, torch.zeros(3, 1, dtype=torch.int32)), {}, ValueError, "seg_start must be 1-D"),
    (_with(0, [0]), {}, ValueError, "at least one document"),
    (_with(1, [0, 5, 9, 9]), {}, ValueError, "cu_seqlens_k must have D\\+1 = 3 entries"),
    (_with(5, [0, 1]), {}, ValueError, "seg_mode must have S = 3 entries"),
    (_with(0, [1, 5, 7]), {}, ValueError, r"cu_seqlens_q\[0\] must be 0"),
    (_with(0, [0, 5, 4]), {}, ValueError, "cu_seqlens_q must be non-decreasing"),
    (_with(0, [0, 6, 7]), {}, ValueError, "document 0 has 6 queries but only 5 keys"),
    (_with(2, [0, 2, 2]), {}, ValueError, r"seg_offsets\[-1\] must equal the number of segments 3"),
    (_with(3, [0, 3, 5]), {}, ValueError, "segment 1 of document 0 must start at 2"),
    (_with(4, [2, 5, 8]), {}, ValueError, "segments of document 1 must cover its keys"),
    (_with(5, [0, 3, 2]), {}, ValueError, r"seg_mode\[1\] must be 0 \(causal\), 1 \(full\) or 2 \(noise\), got 3"),
    (_good(), {"max_seqlen_k": 4}, ValueError, "max_seqlen_k must be >= the longest document \\(5\\)"),
    (_good(), {"validate": False}, ValueError, "validate=False\\) needs max_seqlen_q and max_seqlen_k"),
    (_good(), {"total_q": 3}, ValueError, r"total_q must equal cu_seqlens_q\[-1\] = 7"),
])
def test_direct_construction_errors(ts, kw, exc, match):
    with pytest.raises(exc, match=match):
        SpanLayout(*ts, **kw)


def test_direct_construction_type_errors():
    ts = _good()
    with pytest.raises(TypeError, match="seg_end must be a torch.Tensor, got list"):
        SpanLayout(*ts[:4], [2, 5, 9], ts[5])
    with pytest.raises(TypeError, match="max_seqlen_q must be a non-negative int"):
        SpanLayout(*ts, max_seqlen_q=2.0)
    with pytest.raises(TypeError, match="span_mask expects a SpanLayout"):
        span_mask(ts)


def test_public_exports():
    assert umm_ops.SpanLayout is SpanLayout and umm_ops.span_mask is span_mask
    for name in ("SpanLayout", "span_attention", "span_mask"):
        assert name in umm_ops.__all__
