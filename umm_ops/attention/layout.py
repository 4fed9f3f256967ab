"""Span layouts: which keys each query of a packed batch may attend to (docs/span-attention-contract.md).

A packed batch is a list of documents (samples) concatenated along the token axis; each document is a sequence
of segments (spans) with a mode:

* ``causal`` (text): a query sees every earlier non-noise token of its document and the tokens of its own
  segment up to itself;
* ``full`` (a bidirectional block, e.g. a clean image): earlier non-noise tokens and its whole own segment;
* ``noise`` (BAGEL's noisy latents): like ``full`` for its own queries, and invisible to every other query.

Never across documents.  Adjacent segments with the same mode stay separate segments (two ``full`` segments in a
row are two bidirectional blocks: the first does not see the second).

Cache case: with ``q_lens`` the queries of document i are its LAST ``q_lens[i]`` tokens (keys and values always
cover every token), so query j of document d sits at key position ``p = cu_k[d] + len_k - len_q + j``.

A ``SpanLayout`` holds the int32 layout tensors of the kernel contract (O(number of segments) memory) plus host
ints, so that no kernel launch needs to read device memory to size its grid.
"""
from __future__ import annotations

import array
import itertools

import torch

__all__ = ["SpanLayout", "span_mask", "MODES", "CAUSAL", "FULL", "NOISE"]

CAUSAL, FULL, NOISE = 0, 1, 2
MODES = {"causal": CAUSAL, "full": FULL, "noise": NOISE}
_MODE_NAMES = {v: k for k, v in MODES.items()}
_FIELDS = ("cu_seqlens_q", "cu_seqlens_k", "seg_offsets", "seg_start", "seg_end", "seg_mode")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_SEQ_TYPES = {list, tuple}
_INT32_MAX = 2**31 - 1


def _host_builder():
    """umm_ops._C.span_layout_host when the compiled extension has it (older builds do not), else None."""
    global _HOST
    if _HOST is False:
        from .. import _lib
        _HOST = getattr(_lib._C, "span_layout_host", None) if _lib.loaded() else None
    return _HOST


_HOST = False


def _check_document(d: int, doc) -> None:
    """Raise the precise error for a malformed document (the slow path of from_segments)."""
    if not isinstance(doc, (list, tuple)):
        raise TypeError(f"document {d} must be a list of (length, mode) pairs, got {type(doc).__name__}")
    if len(doc) == 0:
        raise ValueError(f"document {d} is empty: expected at least one (length, mode) segment")
    for s, seg in enumerate(doc):
        if not isinstance(seg, (list, tuple)) or len(seg) != 2:
            raise ValueError(f"document {d} segment {s}: expected a (length, mode) pair, got {seg!r}")
        length, mode = seg
        if not _is_int(length):
            raise TypeError(f"document {d} segment {s}: length must be an int, got {type(length).__name__} "
                            f"{length!r}")
        if length <= 0:
            raise ValueError(f"document {d} segment {s}: length must be > 0, got {length}")
        if mode not in MODES:
            raise ValueError(f"document {d} segment {s}: unknown mode {mode!r}, expected one of "
                             f"'causal', 'full', 'noise' (got {mode!r})")


class SpanLayout:
    """The layout tensors of a packed span-attention batch (all int32, 1-D, contiguous, on one device).

    Attributes (contract order, see :meth:`tensors`): ``cu_seqlens_q`` (D+1,), ``cu_seqlens_k`` (D+1,),
    ``seg_offsets`` (D+1,), ``seg_start`` (S,), ``seg_end`` (S,), ``seg_mode`` (S,) (0 causal, 1 full,
    2 noise); host ints ``num_docs``, ``num_segments``, ``total_q``, ``total_k``, ``max_seqlen_q``,
    ``max_seqlen_k``.

    Build it with :meth:`from_segments` (host lists, microseconds) or directly from tensors::

        SpanLayout(cu_seqlens_q, cu_seqlens_k, seg_offsets, seg_start, seg_end, seg_mode,
                   max_seqlen_q=None, max_seqlen_k=None, validate=True, total_q=None, total_k=None)

    ``validate=True`` checks dtype, shapes, monotonicity and that the segments of every document are sorted,
    non-empty and cover its keys; that READS the tensor values (one device-to-host copy, a sync on CUDA) and fills
    in the host ints.  ``validate=False`` trusts the caller and reads nothing: it needs ``max_seqlen_q`` and
    ``max_seqlen_k`` (upper bounds of the per-document lengths), and ``total_q`` / ``total_k`` should be given
    too (without them, the first use of those attributes reads ``cu_seqlens_*[-1]``) - the form to use inside
    data loaders and CUDA graphs.  Instances are treated as immutable.
    """

    __slots__ = _FIELDS + ("num_docs", "num_segments", "max_seqlen_q", "max_seqlen_k", "_total_q", "_total_k",
                           "_lookups")

    def __init__(self, cu_seqlens_q, cu_seqlens_k, seg_offsets, seg_start, seg_end, seg_mode,
                 max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, validate: bool = True, *,
                 total_q: int | None = None, total_k: int | None = None):
        ts = (cu_seqlens_q, cu_seqlens_k, seg_offsets, seg_start, seg_end, seg_mode)
        for name, t in zip(_FIELDS, ts):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"SpanLayout: {name} must be a torch.Tensor, got {type(t).__name__}")
        for name, v in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k), ("total_q", total_q),
                        ("total_k", total_k)):
            if v is not None and (not _is_int(v) or v < 0):
                raise TypeError(f"SpanLayout: {name} must be a non-negative int or None, got {v!r}")
        if validate:
            host = _validate(ts, max_seqlen_q, max_seqlen_k, total_q, total_k)
            max_seqlen_q, max_seqlen_k, total_q, total_k = host
            ts = tuple(t.contiguous() for t in ts)
        elif max_seqlen_q is None or max_seqlen_k is None:
            raise ValueError("SpanLayout(validate=False) needs max_seqlen_q and max_seqlen_k (host ints): "
                             f"got max_seqlen_q={max_seqlen_q!r}, max_seqlen_k={max_seqlen_k!r}")
        for name, t in zip(_FIELDS, ts):
            object.__setattr__(self, name, t)
        object.__setattr__(self, "num_docs", cu_seqlens_q.shape[0] - 1)
        object.__setattr__(self, "num_segments", seg_start.shape[0])
        object.__setattr__(self, "max_seqlen_q", int(max_seqlen_q))
        object.__setattr__(self, "max_seqlen_k", int(max_seqlen_k))
        object.__setattr__(self, "_total_q", total_q)
        object.__setattr__(self, "_total_k", total_k)
        object.__setattr__(self, "_lookups", None)

    def __setattr__(self, name, value):
        raise AttributeError(f"SpanLayout is immutable (tried to set {name!r}); build a new one")

    # ------------------------------------------------------------------ construction from host lists
    @classmethod
    def from_segments(cls, docs, q_lens=None, device=None) -> "SpanLayout":
        """Layout of documents given as lists of ``(length, mode)`` pairs, mode in {"causal", "full", "noise"}.

        Token order = documents concatenated, segments in order.  ``q_lens`` (one int per document, or None for
        queries = all tokens): the queries of document i are its last ``q_lens[i]`` tokens (0 allowed).
        """
        if not isinstance(docs, (list, tuple)):
            raise TypeError(f"docs must be a list of documents (lists of (length, mode) pairs), got "
                            f"{type(docs).__name__}")
        if len(docs) == 0:
            raise ValueError("docs must contain at least one document, got an empty list")
        if q_lens is not None:
            if not isinstance(q_lens, (list, tuple)):
                raise TypeError(f"q_lens must be a list of ints (one per document) or None, got "
                                f"{type(q_lens).__name__}")
            if len(q_lens) != len(docs):
                raise ValueError(f"q_lens must have one entry per document: expected {len(docs)}, "
                                 f"got {len(q_lens)}")
        # fastest path: the compiled host builder (~5 us for 64 documents); it returns None for anything but the
        # plain well-formed case, which then goes through the Python paths below (and their precise errors)
        host = _host_builder()
        if host is not None:
            r = host(docs, q_lens)
            if r is not None:
                buf, D1, S, max_q, max_k, total_q, total_k = r
                flat = torch.frombuffer(buf, dtype=torch.int32)
                if device is not None:
                    flat = flat.to(device)
                parts = flat.split_with_sizes([D1, D1, D1, S, S, S])
                return cls(*parts, max_seqlen_q=max_q, max_seqlen_k=max_k, validate=False, total_q=total_q,
                           total_k=total_k)
        # fast Python path over all segments at once (plain ints, known modes); anything unusual goes through
        # the per-document checks for a precise message
        try:
            ok = set(map(type, docs)) <= _SEQ_TYPES
            seg_counts = list(map(len, docs))
            segs = [seg for doc in docs for seg in doc]
            ok = ok and min(seg_counts) > 0 and set(map(type, segs)) <= _SEQ_TYPES and set(map(len, segs)) == {2}
            if ok:
                seg_len, mds = zip(*segs)
                seg_mode = list(map(MODES.get, mds))
                ok = set(map(type, seg_len)) == {int} and min(seg_len) > 0 and None not in seg_mode
        except (TypeError, ValueError):
            ok = False
        if not ok:
            for d, doc in enumerate(docs):
                _check_document(d, doc)
            raise AssertionError("unreachable")  # pragma: no cover
        acc = lambda xs: list(itertools.accumulate(xs, initial=0))  # noqa: E731
        offs, ends = acc(seg_counts), acc(seg_len)
        cu_k = [ends[o] for o in offs]
        lens_k = [b - a for a, b in zip(cu_k[:-1], cu_k[1:])]
        if q_lens is None:
            lens_q, cu_q = lens_k, cu_k
        else:
            lens_q = list(q_lens)
            if not (set(map(type, lens_q)) == {int} and all(0 <= ql <= n for ql, n in zip(lens_q, lens_k))):
                for d, (ql, n) in enumerate(zip(lens_q, lens_k)):
                    if not _is_int(ql):
                        raise TypeError(f"q_lens[{d}] must be an int, got {type(ql).__name__} {ql!r}")
                    if ql < 0 or ql > n:
                        raise ValueError(f"q_lens[{d}] must be in [0, {n}] (the length of document {d}), got {ql}")
            cu_q = acc(lens_q)
        if cu_k[-1] > _INT32_MAX:
            raise ValueError(f"the layout has {cu_k[-1]} tokens in total: span layouts index tokens with int32, "
                             f"at most {_INT32_MAX}")
        starts, ends = ends[:-1], ends[1:]
        # one host buffer, one copy to the device, then views
        flat = torch.frombuffer(array.array("i", cu_q + cu_k + offs + starts + ends + seg_mode), dtype=torch.int32)
        if device is not None:
            flat = flat.to(device)
        D1, S = len(cu_q), len(starts)
        parts = flat.split_with_sizes([D1, D1, D1, S, S, S])
        return cls(*parts, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), validate=False,
                   total_q=cu_q[-1], total_k=cu_k[-1])

    # ------------------------------------------------------------------ adapters
    @classmethod
    def from_dense_mask(cls, mask, device=None) -> "SpanLayout":
        """Recover a layout from a dense (L, L) boolean mask (queries = keys, True = may attend) if expressible.

        Documents are the connected diagonal blocks; rows are scanned in order: a row that sees nothing after
        itself is a one-token segment (causal, or noise when no later row of its document sees it; consecutive
        causal tokens are merged), a row that sees later tokens opens a bidirectional block up to its last
        visible token (noise when no later row of the document sees it, else full).  The result is verified by
        rebuilding the mask: raises ``ValueError("mask is not expressible as spans: ...")`` otherwise.
        """
        if not isinstance(mask, torch.Tensor):
            mask = torch.as_tensor(mask)
        if mask.dim() != 2 or mask.shape[0] != mask.shape[1] or mask.shape[0] == 0:
            raise ValueError(f"mask must be a non-empty square (L, L) tensor (queries = keys), got shape "
                             f"{tuple(mask.shape)}")
        if device is None:
            device = mask.device
        m = mask.detach().to("cpu").bool()
        L = m.shape[0]
        # documents: boundary i when no visibility crosses it: blocks m[i:, :i] and m[:i, i:] are empty
        P = torch.zeros(L + 1, L + 1, dtype=torch.int32 if L < 46000 else torch.int64)  # 2-D prefix sums
        P[1:, 1:] = m.to(P.dtype).cumsum(0).cumsum(1)
        i = torch.arange(1, L)
        below = P[L, i] - P[i, i]          # m[i:, :i]
        above = P[i, L] - P[i, i]          # m[:i, i:]
        cuts = [0] + (i[(below + above) == 0]).tolist() + [L]
        diag = m.diagonal().tolist()
        cols = torch.arange(L)
        last_vis = torch.where(m, cols[None, :], -1).amax(1).tolist()  # within the document (no crossings)

        def block_sum(r0, r1, c0, c1):  # number of True in m[r0:r1, c0:c1]
            return int(P[r1, c1] - P[r0, c1] - P[r1, c0] + P[r0, c0])

        docs = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            segs = []
            r = a
            while r < b:
                if not diag[r]:
                    raise ValueError(f"mask is not expressible as spans: token {r} does not attend to itself")
                e = last_vis[r] + 1
                seen_later = block_sum(e, b, r, e) > 0
                if e == r + 1:
                    mode = "causal" if (seen_later or e == b) else "noise"
                    if mode == "causal" and segs and segs[-1][1] == "causal":
                        segs[-1] = (segs[-1][0] + 1, "causal")
                    else:
                        segs.append((1, mode))
                else:
                    segs.append((e - r, "full" if (seen_later or e == b) else "noise"))
                r = e
            docs.append(segs)
        layout = cls.from_segments(docs, device=device)
        rebuilt = span_mask(layout).to("cpu")
        if not torch.equal(rebuilt, m):
            q, k = (rebuilt != m).nonzero()[0].tolist()
            raise ValueError(f"mask is not expressible as spans: the closest span layout {docs} differs at "
                             f"(query {q}, key {k}): mask={bool(m[q, k])}, spans={bool(rebuilt[q, k])}")
        return layout

    # ------------------------------------------------------------------ accessors
    @property
    def total_q(self) -> int:
        if self._total_q is None:
            object.__setattr__(self, "_total_q", int(self.cu_seqlens_q[-1]))
        return self._total_q

    @property
    def total_k(self) -> int:
        if self._total_k is None:
            object.__setattr__(self, "_total_k", int(self.cu_seqlens_k[-1]))
        return self._total_k

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens_q.device

    def tensors(self):
        """(cu_seqlens_q, cu_seqlens_k, seg_offsets, seg_start, seg_end, seg_mode): the contract order."""
        return tuple(getattr(self, n) for n in _FIELDS)

    def to(self, device) -> "SpanLayout":
        device = torch.device(device)
        if device == self.device:
            return self
        return SpanLayout(*(t.to(device) for t in self.tensors()), max_seqlen_q=self.max_seqlen_q,
                          max_seqlen_k=self.max_seqlen_k, validate=False, total_q=self._total_q,
                          total_k=self._total_k)

    def segments(self):
        """The host description [[(length, mode), ...], ...] and the q_lens (reads the tensors)."""
        cu_q, cu_k, offs, st, en, mo = (t.tolist() for t in self.tensors())
        docs = [[(en[s] - st[s], _MODE_NAMES[mo[s]]) for s in range(offs[d], offs[d + 1])]
                for d in range(len(offs) - 1)]
        return docs, [cu_q[d + 1] - cu_q[d] for d in range(len(cu_q) - 1)]

    def __repr__(self) -> str:
        if self.num_segments <= 12 and self.device.type == "cpu":
            docs, qs = self.segments()
            body = "; ".join(" ".join(f"{_MODE_NAMES_SHORT[m]}{n}" for n, m in doc) for doc in docs)
            cache = "" if all(q == sum(n for n, _ in doc) for q, doc in zip(qs, docs)) else f", q_lens={qs}"
            return (f"SpanLayout({self.num_docs} docs, {self.num_segments} segs, q={self._total_q} "
                    f"k={self._total_k}: [{body}]{cache})")
        return (f"SpanLayout(docs={self.num_docs}, segments={self.num_segments}, total_q={self._total_q}, "
                f"total_k={self._total_k}, max_seqlen_q={self.max_seqlen_q}, max_seqlen_k={self.max_seqlen_k}, "
                f"device={self.device})")

    # ------------------------------------------------------------------ per-token lookups
    def _token_tables(self):
        """Per key: (doc id, segment id, segment start, mode) int64; per query: key position p, int64."""
        if self._lookups is None:
            cu_q, cu_k, offs, st, en, mo = (t.long() for t in self.tensors())
            Lq, Lk, D, S = self.total_q, self.total_k, self.num_docs, self.num_segments
            dev = cu_q.device
            seg_k = torch.repeat_interleave(torch.arange(S, device=dev), en - st, output_size=Lk)
            doc_of_seg = torch.repeat_interleave(torch.arange(D, device=dev), offs[1:] - offs[:-1], output_size=S)
            doc_k = doc_of_seg[seg_k]
            start_k = st[seg_k]
            mode_k = mo[seg_k]
            doc_q = torch.repeat_interleave(torch.arange(D, device=dev), cu_q[1:] - cu_q[:-1], output_size=Lq)
            p = torch.arange(Lq, device=dev) + (cu_k[1:] - cu_q[1:])[doc_q]
            object.__setattr__(self, "_lookups", (doc_k, seg_k, start_k, mode_k, p))
        return self._lookups

    def q_positions(self) -> torch.Tensor:
        """(total_q,) int64: the key position p of every query (for tests and RoPE)."""
        return self._token_tables()[4]

    def segment_of_query(self) -> torch.Tensor:
        """(total_q,) int64: the (global) segment index containing each query's position."""
        _, seg_k, _, _, p = self._token_tables()
        return seg_k[p]

    def mask_mod(self):
        """A flex_attention ``mask_mod(b, h, q_idx, kv_idx)`` with the same semantics (B = 1 packed batch;
        q_idx indexes queries, kv_idx keys, so the cache case works with Q_LEN = total_q, KV_LEN = total_k).
        Indices past the ends (block padding) are masked out."""
        doc_k, seg_k, start_k, mode_k, p = self._token_tables()
        Lq, Lk = self.total_q, self.total_k
        if Lq == 0:  # no queries at all: keep the lookup indexable (every entry is masked by in_q)
            p = p.new_zeros(1)

        def mask_mod(b, h, q_idx, kv_idx):
            in_q, in_k = q_idx < Lq, kv_idx < Lk
            qi = torch.clamp(q_idx, 0, max(Lq - 1, 0))
            ki = torch.clamp(kv_idx, 0, max(Lk - 1, 0))
            pq = p[qi]
            sq = seg_k[pq]
            own = (seg_k[ki] == sq) & ((mode_k[pq] != CAUSAL) | (ki <= pq))
            earlier = (doc_k[ki] == doc_k[pq]) & (ki < start_k[pq]) & (mode_k[ki] != NOISE)
            return in_q & in_k & (own | earlier)

        return mask_mod


_MODE_NAMES_SHORT = {"causal": "c", "full": "f", "noise": "n"}


def span_mask(layout: SpanLayout) -> torch.Tensor:
    """The dense (total_q, total_k) boolean mask of a layout (True = may attend).  For tests and debugging:
    O(total_q * total_k) memory."""
    if not isinstance(layout, SpanLayout):
        raise TypeError(f"span_mask expects a SpanLayout, got {type(layout).__name__}")
    from ..backend import _has_values

    if all(_has_values(t) for t in layout.tensors()):
        # a layout built with validate=False is checked here (the dense mask costs far more): an unknown mode or
        # offsets that do not cover the keys would otherwise give a wrong mask without a word
        _validate(layout.tensors(), layout.max_seqlen_q, layout.max_seqlen_k, layout._total_q, layout._total_k)
    doc_k, seg_k, start_k, mode_k, p = layout._token_tables()
    ki = torch.arange(layout.total_k, device=p.device)[None, :]
    pq = p[:, None]
    own = (seg_k[None, :] == seg_k[pq]) & ((mode_k[pq] != CAUSAL) | (ki <= pq))
    earlier = (doc_k[None, :] == doc_k[pq]) & (ki < start_k[pq]) & (mode_k[None, :] != NOISE)
    return own | earlier


def _validate(ts, max_q, max_k, total_q, total_k):
    """Check the layout tensors (reads their values once); returns the host ints."""
    names = _FIELDS
    dev = ts[0].device
    for name, t in zip(names, ts):
        if t.dtype != torch.int32:
            raise TypeError(f"SpanLayout: {name} must be int32, got {str(t.dtype).replace('torch.', '')}")
        if t.dim() != 1:
            raise ValueError(f"SpanLayout: {name} must be 1-D, got shape {tuple(t.shape)}")
        if t.device != dev:
            raise ValueError(f"SpanLayout: all layout tensors must be on one device: cu_seqlens_q is on {dev}, "
                             f"{name} on {t.device}")
    D1 = ts[0].shape[0]
    if D1 < 2:
        raise ValueError(f"SpanLayout: cu_seqlens_q must have D+1 >= 2 entries (at least one document), got "
                         f"shape {tuple(ts[0].shape)}")
    for name, t in zip(names[1:3], ts[1:3]):
        if t.shape[0] != D1:
            raise ValueError(f"SpanLayout: {name} must have D+1 = {D1} entries (like cu_seqlens_q), got "
                             f"{t.shape[0]}")
    S = ts[3].shape[0]
    for name, t in zip(names[4:], ts[4:]):
        if t.shape[0] != S:
            raise ValueError(f"SpanLayout: {name} must have S = {S} entries (like seg_start), got {t.shape[0]}")
    cu_q, cu_k, offs, st, en, mo = (t.tolist() for t in ts)  # the one read of the values
    D = D1 - 1
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k), ("seg_offsets", offs)):
        if cu[0] != 0:
            raise ValueError(f"SpanLayout: {name}[0] must be 0, got {cu[0]}")
    if offs[-1] != S:
        raise ValueError(f"SpanLayout: seg_offsets[-1] must equal the number of segments {S}, got {offs[-1]}")
    lq = [cu_q[d + 1] - cu_q[d] for d in range(D)]
    lk = [cu_k[d + 1] - cu_k[d] for d in range(D)]
    for d in range(D):
        if lq[d] < 0:
            raise ValueError(f"SpanLayout: cu_seqlens_q must be non-decreasing, got {cu_q[d]} then {cu_q[d + 1]}")
        if lk[d] <= 0:
            raise ValueError(f"SpanLayout: cu_seqlens_k must be strictly increasing (documents are non-empty), "
                             f"got {cu_k[d]} then {cu_k[d + 1]} for document {d}")
        if lq[d] > lk[d]:
            raise ValueError(f"SpanLayout: document {d} has {lq[d]} queries but only {lk[d]} keys "
                             f"(queries are the last len_q tokens: len_q <= len_k)")
        if offs[d + 1] <= offs[d]:
            raise ValueError(f"SpanLayout: seg_offsets must be strictly increasing (every document has a segment), "
                             f"got {offs[d]} then {offs[d + 1]} for document {d}")
        pos = cu_k[d]
        for s in range(offs[d], offs[d + 1]):
            if st[s] != pos:
                raise ValueError(f"SpanLayout: segment {s} of document {d} must start at {pos} (segments are "
                                 f"sorted and contiguous from cu_seqlens_k[{d}]), got seg_start={st[s]}")
            if en[s] <= st[s]:
                raise ValueError(f"SpanLayout: segment {s} must be non-empty, got seg_start={st[s]} "
                                 f"seg_end={en[s]}")
            if mo[s] not in (CAUSAL, FULL, NOISE):
                raise ValueError(f"SpanLayout: seg_mode[{s}] must be 0 (causal), 1 (full) or 2 (noise), "
                                 f"got {mo[s]}")
            pos = en[s]
        if pos != cu_k[d + 1]:
            raise ValueError(f"SpanLayout: the segments of document {d} must cover its keys up to "
                             f"cu_seqlens_k[{d + 1}] = {cu_k[d + 1]}, they end at {pos}")
    mq, mk = max(lq), max(lk)
    for name, given, need in (("max_seqlen_q", max_q, mq), ("max_seqlen_k", max_k, mk)):
        if given is not None and given < need:
            raise ValueError(f"SpanLayout: {name} must be >= the longest document ({need}), got {given}")
    for name, given, need in (("total_q", total_q, cu_q[-1]), ("total_k", total_k, cu_k[-1])):
        if given is not None and given != need:
            raise ValueError(f"SpanLayout: {name} must equal cu_seqlens_{name[-1]}[-1] = {need}, got {given}")
    return (mq if max_q is None else max_q, mk if max_k is None else max_k, cu_q[-1], cu_k[-1])
