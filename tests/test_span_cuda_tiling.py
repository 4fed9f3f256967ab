"""The work decomposition of the CUDA span-attention kernels (csrc/cuda/span_attention.cu), replayed on the CPU.

The CUDA kernels cannot run without a GPU, but which (query, key) pairs they compute is decided by plain integer
arithmetic: query blocks and their key range [k_begin, k_hi) (forward / dq), key blocks and their contiguous viewer
range [v_lo, v_hi) (dk / dv), tiles classified EMPTY / FULL / PARTIAL by span.h's span_classify_tile, FULL tiles
masked only by bounds, PARTIAL tiles by allowed(a, hi, k, noise(k)).  This module transcribes that arithmetic
(names follow the kernel source) and checks, on random layouts and for several tile sizes, that every allowed pair
of span_mask is computed exactly once and no other pair is.  A wrong k_hi, viewer range, bound or use of the
classification in the kernels' design shows up here; the CuTe index mapping is checked separately by
csrc/cuda/checks/span_layout_check.cu and the numbers by tests/test_span_cuda.py on a GPU.  The forward's per-tile
arithmetic (online softmax, the non-finite flags and the v scan of stop 47) is also replayed in float64 on the cases
of tests/nonfinite_cases.py: the algorithm follows the contract; whether the CUDA code computes it is the GPU's to say.
"""
from __future__ import annotations

import bisect
import random

import pytest
import torch

from umm_ops import SpanLayout, span_mask

CAUSAL, FULL, NOISE = 0, 1, 2
EMPTY_T, FULL_T, PARTIAL_T = 0, 1, 2
MODES = ("causal", "full", "noise")


# ----------------------------------------------------------------------------------- span.h, transcribed
def segment_of(ss, s0, s1, pos):
    """span_segment_of: the segment of [s0, s1) containing key position pos."""
    return s0 + bisect.bisect_right(ss[s0:s1], pos) - 1


def classify_seg(ss, se, sm, s0, s1, sq, p0, p1, k0, k1):
    if p0 >= p1 or k0 >= k1:
        return EMPTY_T
    a, b = ss[sq], se[sq]
    vis = invis = False
    hi_a = min(k1, a)
    if k0 < hi_a:
        s = segment_of(ss, s0, s1, k0)
        while s < s1 and ss[s] < hi_a:
            if sm[s] == NOISE:
                invis = True
            else:
                vis = True
            if vis and invis:
                return PARTIAL_T
            s += 1
    lo_b, hi_b = max(k0, a), min(k1, b)
    if lo_b < hi_b:
        if sm[sq] != CAUSAL:
            vis = True
        elif hi_b - 1 <= p0:
            vis = True
        elif lo_b > p1 - 1:
            invis = True
        else:
            vis = invis = True
    if k1 > b:
        invis = True
    return (PARTIAL_T if invis else FULL_T) if vis else EMPTY_T


def classify(ss, se, sm, s0, s1, p0, p1, k0, k1):
    if p0 >= p1 or k0 >= k1:
        return EMPTY_T
    vis = invis = False
    s = segment_of(ss, s0, s1, p0)
    while s < s1 and ss[s] < p1:
        c = classify_seg(ss, se, sm, s0, s1, s, max(p0, ss[s]), min(p1, se[s]), k0, k1)
        if c == PARTIAL_T:
            return PARTIAL_T
        if c == FULL_T:
            vis = True
        else:
            invis = True
        if vis and invis:
            return PARTIAL_T
        s += 1
    return (PARTIAL_T if invis else FULL_T) if vis else EMPTY_T


# ----------------------------------------------------------------------------------- the kernels' decomposition
class Lay:
    def __init__(self, layout: SpanLayout):
        self.cu_q, self.cu_k, self.so, self.ss, self.se, self.sm = (t.tolist() for t in layout.tensors())
        self.max_q, self.max_k = layout.max_seqlen_q, layout.max_seqlen_k

    def doc(self, d):
        q_begin, q_end, k_begin, k_end = self.cu_q[d], self.cu_q[d + 1], self.cu_k[d], self.cu_k[d + 1]
        return q_begin, q_end, k_begin, k_end, k_end - q_end, self.so[d], self.so[d + 1]

    def own_range(self, s0, s1, pos):
        s = segment_of(self.ss, s0, s1, pos)
        return self.ss[s], (pos + 1 if self.sm[s] == CAUSAL else self.se[s])

    def key_is_noise(self, s_from, s1, k):
        return self.sm[segment_of(self.ss, s_from, s1, k)] == NOISE


def allowed(a, hi, k, k_noise):
    return (a <= k < hi) or (k < a and not k_noise)


def fwd_blocks(L: Lay, kM: int, kN: int):
    """fwd_dq_kernel's walk: for each query block of each document, (q0, q1, tiles), the non-empty key tiles from
    k_begin to k_hi in order, each as (k0, k1, ok) with ok the (q1 - q0, k1 - k0) mask the kernel applies: bounds
    only on FULL tiles, allowed() per element on PARTIAL ones (rows past the block are never stored)."""
    m_blocks = -(-L.max_q // kM)
    for d in range(len(L.cu_q) - 1):
        q_begin, q_end, k_begin, k_end, shift, s0, s1 = L.doc(d)
        for mb in range(m_blocks):
            q0 = q_begin + mb * kM
            if q0 >= q_end:
                continue
            q1 = min(q0 + kM, q_end)
            p0, p1 = q0 + shift, q1 + shift
            _, k_hi = L.own_range(s0, s1, p1 - 1)
            rows = [L.own_range(s0, s1, p0 + m) for m in range(q1 - q0)]
            tiles = []
            for t in range(-(-(k_hi - k_begin) // kN)):
                k0, k1 = k_begin + t * kN, min(k_begin + (t + 1) * kN, k_hi)  # columns past k1: col_ok false
                cls = classify(L.ss, L.se, L.sm, s0, s1, p0, p1, k0, k1)
                if cls == EMPTY_T:
                    continue
                ok = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
                if cls == PARTIAL_T:
                    s_from = segment_of(L.ss, s0, s1, k0)
                    for n in range(k1 - k0):
                        knoise = L.key_is_noise(s_from, s1, k0 + n)
                        for m, (a, hi) in enumerate(rows):
                            ok[m, n] = allowed(a, hi, k0 + n, knoise)
                tiles.append((k0, k1, ok))
            yield q0, q1, tiles


def fwd_dq_pairs(L: Lay, kM: int, kN: int, counts):
    """fwd_dq_kernel: grid (query block of each document), key tiles from k_begin to k_hi."""
    for q0, q1, tiles in fwd_blocks(L, kM, kN):
        for k0, k1, ok in tiles:
            counts[q0:q1, k0:k1] += ok.to(counts.dtype)


def dkv_pairs(L: Lay, kM: int, kN: int, counts):
    """dkv_kernel: grid (key block of each document), query tiles over the contiguous viewer range."""
    n_blocks = -(-L.max_k // kM)
    for d in range(len(L.cu_q) - 1):
        q_begin, q_end, k_begin, k_end, shift, s0, s1 = L.doc(d)
        for nb in range(n_blocks):
            kb0 = k_begin + nb * kM
            if kb0 >= k_end:
                continue
            kb1 = min(kb0 + kM, k_end)
            seg_first = segment_of(L.ss, s0, s1, kb0)
            any_visible_later, seg_last = False, seg_first
            s = seg_first
            while s < s1 and L.ss[s] < kb1:
                if L.sm[s] != NOISE:
                    any_visible_later = True
                seg_last = s
                s += 1
            lo = kb0 if L.sm[seg_first] == CAUSAL else L.ss[seg_first]
            v_lo = max(lo, q_begin + shift)
            v_hi = k_end if any_visible_later else L.se[seg_last]
            n_tiles = -(-(v_hi - v_lo) // kN) if v_lo < v_hi else 0
            row_noise = [L.key_is_noise(seg_first, s1, k) for k in range(kb0, kb1)]
            for t in range(n_tiles):
                pt0, pt1 = v_lo + t * kN, min(v_lo + (t + 1) * kN, v_hi)
                cls = classify(L.ss, L.se, L.sm, s0, s1, pt0, pt1, kb0, kb1)
                if cls == EMPTY_T:
                    continue
                for n in range(kN):
                    pos = pt0 + n
                    if pos >= pt1:  # col_ok
                        continue
                    assert q_begin + shift <= pos < k_end, "viewer outside the document's queries"
                    a, hi = L.own_range(s0, s1, pos) if cls == PARTIAL_T else (0, 0)
                    for r in range(kb1 - kb0):  # row_ok
                        if cls == FULL_T or allowed(a, hi, kb0 + r, row_noise[r]):
                            counts[pos - shift, kb0 + r] += 1


LENGTHS = (1, 1, 2, 3, 5, 7, 8, 9, 16, 17, 31, 64, 65)


def random_layout(rng):
    docs = [[(rng.choice(LENGTHS), rng.choice(MODES)) for _ in range(rng.randint(1, 6))]
            for _ in range(rng.randint(1, 4))]
    q_lens = None
    if rng.random() < 0.5:
        q_lens = [rng.choice([0, 1, rng.randint(0, sum(n for n, _ in d)), sum(n for n, _ in d)]) for d in docs]
    return docs, q_lens


@pytest.mark.parametrize("tiles", [(4, 4), (4, 8), (8, 4), (16, 8), (64, 64), (64, 32)],
                         ids=lambda t: f"M{t[0]}xN{t[1]}")
def test_kernels_compute_each_allowed_pair_once(tiles, seed):
    kM, kN = tiles
    rng = random.Random(seed)
    fixed = [([[(1, "noise"), (1, "causal"), (1, "full"), (1, "noise"), (1, "causal")]], None),
             ([[(70, "causal"), (33, "full")], [(20, "full"), (45, "causal")]], [1, 50]),
             ([[(9, "noise"), (4, "noise"), (6, "causal")], [(5, "full"), (3, "noise")]], [19, 2])]
    for docs, q_lens in fixed + [random_layout(rng) for _ in range(8)]:
        layout = SpanLayout.from_segments(docs, q_lens)
        L = Lay(layout)
        mask = span_mask(layout)
        for name, fn in (("forward/dq", fwd_dq_pairs), ("dk/dv", dkv_pairs)):
            counts = torch.zeros(mask.shape, dtype=torch.int32)
            fn(L, kM, kN, counts)
            what = f"{name} tiles {kM}x{kN} docs={docs} q_lens={q_lens}"
            assert counts.numel() == 0 or int(counts.max()) <= 1, f"{what}: a pair computed twice"
            missing = (mask & (counts == 0)).nonzero().tolist()
            extra = (~mask & (counts > 0)).nonzero().tolist()
            assert not missing, f"{what}: allowed pairs never computed, e.g. {missing[:5]}"
            assert not extra, f"{what}: disallowed pairs computed, e.g. {extra[:5]}"


# ----------------------------------------------------------------------------------- the forward's numbers
def fwd_replay(L: Lay, kM: int, kN: int, q, k, v, scale: float, scan_v: bool = True):
    """fwd_dq_kernel's forward transcribed in float64 on the CPU: per query block, the key tiles in order; per tile
    the v scan (flag_nonfinite_v: a key whose v row holds a NaN / Inf is flagged and its row zeroed), the mask
    (bounds on FULL tiles, allowed() on PARTIAL ones), the non-finite flags of the row, the online softmax in log2
    units and O += P V; the epilogue's NaN / -inf rules.  q (Lq, Hq, D), k / v (Lk, Hkv, D).  `scan_v=False` leaves
    the v tile as loaded (what the kernel did before stop 47)."""
    Lq, Hq, _ = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.zeros(Hq, Lq, dtype=torch.float64)
    log2e = 1.4426950408889634
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    for h in range(Hq):
        for q0, q1, tiles in fwd_blocks(L, kM, kN):
            row_m = torch.full((q1 - q0,), -float("inf"), dtype=torch.float64)
            row_l = torch.zeros(q1 - q0, dtype=torch.float64)
            bad = torch.zeros(q1 - q0, dtype=torch.bool)
            acc = torch.zeros(q1 - q0, q.shape[2], dtype=torch.float64)
            for k0, k1, ok in tiles:
                vt = v[k0:k1, h // G].double().clone()
                vbad = ~torch.isfinite(vt).all(1)
                if scan_v:
                    vt[vbad] = 0.0
                else:
                    vbad[:] = False
                sv = q[q0:q1, h].double() @ k[k0:k1, h // G].double().T * (scale * log2e)
                fin = torch.isfinite(sv)
                bad |= (ok & (~fin | vbad[None, :])).any(1)
                sv = torch.where(ok & fin, sv, -float("inf"))
                m_new = torch.maximum(row_m, sv.max(1).values)
                none = m_new == -float("inf")
                m_use = torch.where(none, 0.0, m_new)
                alpha = torch.where(none, 1.0, torch.exp2(row_m - m_use))
                pr = torch.exp2(sv - m_use[:, None])
                row_l = row_l * alpha + pr.sum(1)
                acc = acc * alpha[:, None] + pr @ vt
                row_m = m_new
            has = row_l > 0
            l_safe = torch.where(has, row_l, 1.0)
            out[q0:q1, h] = torch.where(bad[:, None], nan, torch.where(has[:, None], acc / l_safe[:, None], 0.0))
            lse[h, q0:q1] = torch.where(bad, nan, torch.where(has, row_m / log2e + torch.log(l_safe), -float("inf")))
    return out, lse


@pytest.mark.parametrize("tiles", [(64, 64), (16, 16), (8, 32)], ids=lambda t: f"M{t[0]}xN{t[1]}")
def test_forward_replay_follows_the_nonfinite_rule(tiles):
    """The forward's tile algorithm, in float64: on every non-finite case of tests/nonfinite_cases.py exactly the
    rows that see the NaN / Inf are NaN and the others equal the reference; without the v scan, Inf in v at key 30
    turns rows 0-29 (same tile, cannot see it) into NaN through 0 * Inf, which is what the scan prevents."""
    import nonfinite_cases as NF
    from umm_ops.reference.attention import span_attention_reference

    kM, kN = tiles
    for case in range(len(NF.CASES)):
        lay, q, k, v, bad = NF.inputs(case)
        want, _ = span_attention_reference(q.double(), k.double(), v.double(), lay, NF.D ** -0.5)
        out, lse = fwd_replay(Lay(lay), kM, kN, q, k, v, NF.D ** -0.5)
        NF.check(out.float(), lse.float(), bad, want, f"replay {tiles} {NF.IDS[case]}")
    case = NF.IDS.index("v-inf")
    lay, q, k, v, bad = NF.inputs(case)
    out, _ = fwd_replay(Lay(lay), kM, kN, q, k, v, NF.D ** -0.5, scan_v=False)
    assert torch.isnan(out[~bad]).any(), "the negative control: without the scan a hidden Inf in v leaks"


def test_cute_layout_check(tmp_path):
    """Compile and run csrc/cuda/checks/span_layout_check.cu (host code: CuTe layouts and MMA / copy partitions of every
    tile configuration of the CUDA kernels; no GPU needed).  Skipped without nvcc or the CUTLASS headers."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = root / "csrc" / "cuda" / "checks" / "span_layout_check.cu"
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    try:
        import cutlass_library

        cutlass = Path(cutlass_library.__file__).parent / "source" / "include"
    except ImportError:
        cutlass = None
    if nvcc is None or cutlass is None or not (cutlass / "cute").is_dir() or not src.exists():
        pytest.skip("needs nvcc, the nvidia-cutlass headers and span_layout_check.cu")
    exe = tmp_path / "span_layout_check"
    cmd = [nvcc, "-std=c++17", "-O0", "--expt-relaxed-constexpr", "-I", str(root / "csrc" / "include"), "-I",
           str(root / "csrc" / "cuda"), "-I", str(src.parent), "-I", str(cutlass), str(src), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"compile failed:\n{build.stdout}\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "all checks passed" in run.stdout, run.stdout + run.stderr
