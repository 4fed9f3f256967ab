// Span attention (docs/span-attention-contract.md): torch-free params and the layout arithmetic shared by the
// CPU kernel (csrc/cpu/span_attention.cpp) and a future CUDA kernel.
//
// Layout recap.  Document d owns keys [cu_k[d], cu_k[d+1]) and queries [cu_q[d], cu_q[d+1]); its queries are the
// LAST len_q of its len_k tokens, so query index i sits at key position p = i + (cu_k[d+1] - cu_q[d+1]).  The
// segments seg_offsets[d] .. seg_offsets[d+1]-1 tile the document's key range in order (global key coords).
//
//   allowed(q, k) = k in doc(q) and ( (k in S_q and (mode(S_q) != causal or k <= p))
//                                     or (k < start(S_q) and mode(S_k) != noise) )
//
// The structure that makes this cheap: the keys a query sees are
//   (a) every key of the non-noise segments of its document that lie before its own segment S_q
//       (the same set for all queries of S_q), plus
//   (b) its own segment, up to p when S_q is causal, whole otherwise.
// Transposed: the keys of segment T are seen by the queries of T (causal: those at p >= k) and, when T is not
// noise, by every query after T in the document -- one contiguous range of query positions per key.
// So only the causal diagonal of a segment needs a per-element bound; every other (query block, key block) tile is
// entirely visible or entirely invisible and is classified from the segment table alone.
#pragma once
#include <cstdint>

#include "umm/params.h"

namespace umm {

enum SpanMode : int32_t { kSpanCausal = 0, kSpanFull = 1, kSpanNoise = 2 };
enum SpanTile : int { kTileEmpty = 0, kTileFull = 1, kTilePartial = 2 };

// q: (total_q, Hq, Dh), k/v: (total_k, Hkv, Dh) with unit head-dim stride and head stride Dh; the row strides
// (elements between consecutive tokens) are given.  out/dout/dq share q's layout (o_row_stride), dk/dv k's.
// lse / delta: (Hq, total_q) float32.
struct SpanParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;         // forward: written; backward: read (the saved forward output)
  float* lse;        // forward: written; backward: read
  const void* dout;  // backward only
  void* dq;
  void* dk;
  void* dv;
  float* delta;  // backward workspace (Hq * total_q floats): rowsum(dout * out)
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  const int32_t* seg_offsets;
  const int32_t* seg_start;
  const int32_t* seg_end;
  const int32_t* seg_mode;
  int64_t total_q, total_k, Hq, Hkv, Dh, num_docs, num_segments, max_seqlen_q, max_seqlen_k;
  int64_t q_row_stride, k_row_stride, v_row_stride, o_row_stride;
  float softmax_scale;
};

// Offset from a query index of document d to its key position: p = i + span_query_shift(d).
UMM_HD int64_t span_query_shift(const int32_t* cu_q, const int32_t* cu_k, int64_t d) {
  return int64_t(cu_k[d + 1]) - int64_t(cu_q[d + 1]);
}

// The segment of [s0, s1) (one document's, sorted and contiguous) that contains key position pos
// (binary search; pos must lie in the document).
UMM_HD int64_t span_segment_of(const int32_t* seg_start, int64_t s0, int64_t s1, int64_t pos) {
  int64_t lo = s0, hi = s1 - 1;  // answer in [lo, hi]
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (seg_start[mid] <= pos) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Keys visible to the query at key position p of segment sq of a document whose segments start at s0:
//   prefix: the non-noise segments among [s0, sq) (whole),
//   own:    [own_lo, own_hi) -- the own segment up to p (causal) or whole (full / noise).
struct SpanVisible {
  int64_t seg_first, seg_own;
  int64_t own_lo, own_hi;
};

UMM_HD SpanVisible span_visible(const int32_t* seg_start, const int32_t* seg_end, const int32_t* seg_mode,
                                int64_t s0, int64_t sq, int64_t p) {
  SpanVisible v;
  v.seg_first = s0;
  v.seg_own = sq;
  v.own_lo = seg_start[sq];
  v.own_hi = seg_mode[sq] == kSpanCausal ? p + 1 : int64_t(seg_end[sq]);
  return v;
}

// Transposed structure: the query POSITIONS that see key position k of segment t (document key range ends at
// doc_end, first query position q_first): [lo, hi), contiguous.  Empty when lo >= hi.
UMM_HD void span_key_viewers(const int32_t* seg_start, const int32_t* seg_end, const int32_t* seg_mode, int64_t t,
                             int64_t k, int64_t q_first, int64_t doc_end, int64_t* lo, int64_t* hi) {
  int64_t a = seg_mode[t] == kSpanCausal ? k : int64_t(seg_start[t]);
  *lo = a > q_first ? a : q_first;
  *hi = seg_mode[t] == kSpanNoise ? int64_t(seg_end[t]) : doc_end;
}

// Tile classification for queries at key positions [p0, p1), all in segment sq, against keys [k0, k1) of the same
// document (segments [s0, s1)).  Arithmetic on the segment table: O(number of segments overlapping [k0, k1)).
UMM_HD int span_classify_tile_seg(const int32_t* seg_start, const int32_t* seg_end, const int32_t* seg_mode,
                                  int64_t s0, int64_t s1, int64_t sq, int64_t p0, int64_t p1, int64_t k0,
                                  int64_t k1) {
  if (p0 >= p1 || k0 >= k1) return kTileEmpty;
  const int64_t a = seg_start[sq], b = seg_end[sq];
  bool vis = false, invis = false;
  // (a) keys before the own segment: visible iff their segment is not noise (same for every query of sq).
  const int64_t hi_a = k1 < a ? k1 : a;
  if (k0 < hi_a) {
    for (int64_t s = span_segment_of(seg_start, s0, s1, k0); s < s1 && seg_start[s] < hi_a; ++s) {
      if (seg_mode[s] == kSpanNoise) invis = true;
      else vis = true;
      if (vis && invis) return kTilePartial;
    }
  }
  // (b) keys of the own segment.
  const int64_t lo_b = k0 > a ? k0 : a, hi_b = k1 < b ? k1 : b;
  if (lo_b < hi_b) {
    if (seg_mode[sq] != kSpanCausal) {
      vis = true;
    } else {
      // query p sees keys <= p: every pair visible iff hi_b - 1 <= p0; none iff lo_b > p1 - 1.
      if (hi_b - 1 <= p0) vis = true;
      else if (lo_b > p1 - 1) invis = true;
      else vis = invis = true;
    }
  }
  // (c) keys after the own segment: never visible.
  if (k1 > b) invis = true;
  return vis ? (invis ? kTilePartial : kTileFull) : kTileEmpty;
}

// General tile: queries [p0, p1) (key positions) of one document may span several segments.
UMM_HD int span_classify_tile(const int32_t* seg_start, const int32_t* seg_end, const int32_t* seg_mode, int64_t s0,
                              int64_t s1, int64_t p0, int64_t p1, int64_t k0, int64_t k1) {
  if (p0 >= p1 || k0 >= k1) return kTileEmpty;
  bool vis = false, invis = false;
  for (int64_t s = span_segment_of(seg_start, s0, s1, p0); s < s1 && seg_start[s] < p1; ++s) {
    const int64_t lo = p0 > seg_start[s] ? p0 : int64_t(seg_start[s]);
    const int64_t hi = p1 < seg_end[s] ? p1 : int64_t(seg_end[s]);
    const int c = span_classify_tile_seg(seg_start, seg_end, seg_mode, s0, s1, s, lo, hi, k0, k1);
    if (c == kTilePartial) return kTilePartial;
    if (c == kTileFull) vis = true;
    else invis = true;
    if (vis && invis) return kTilePartial;
  }
  return vis ? (invis ? kTilePartial : kTileFull) : kTileEmpty;
}

}  // namespace umm
