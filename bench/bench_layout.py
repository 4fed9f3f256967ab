"""Span-layout build time (issue 3 target: under 50 us for 64 documents).

Times ``SpanLayout.from_segments(docs)`` for packed batches of 8 / 64 / 256 BAGEL-like documents (text + ViT span +
clean latent + noisy latent, bench/span_cases.py's generator) on the host, with the compiled host builder and with
the pure-Python path (what a build without the extension runs), plus the copy to the GPU when one is present.
For comparison, what flex_attention users pay per packing is create_block_mask (its time is in the span-attention
table: flex+bm minus flex).

    python bench/bench_layout.py [--quick]    -> bench/results/<device>-layout.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import umm_ops  # noqa: E402
from run import device_name, slug  # noqa: E402
from umm_ops.attention import layout as layout_mod  # noqa: E402


def bagel_like(n_docs: int, seed: int = 0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lat = rng.randint(256, 1024)
        docs.append([(rng.randint(16, 300), "causal"), (rng.randint(256, 729), "full"), (lat, "full"),
                     (lat, "noise")])
    return docs


def median_us(fn, reps: int) -> float:
    for _ in range(min(200, reps)):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    reps = 500 if args.quick else 5000
    compiled = layout_mod._host_builder() is not None
    rows = []
    for n in (8, 64, 256):
        docs = bagel_like(n)
        segs = sum(map(len, docs))
        row = {"docs": n, "segments": segs, "tokens": sum(x for d in docs for x, _ in d)}
        row["host_us"] = median_us(lambda: umm_ops.SpanLayout.from_segments(docs), reps)
        saved = layout_mod._HOST
        layout_mod._HOST = None
        try:
            row["python_path_us"] = median_us(lambda: umm_ops.SpanLayout.from_segments(docs), reps)
        finally:
            layout_mod._HOST = saved
        if torch.cuda.is_available():
            def to_gpu():
                umm_ops.SpanLayout.from_segments(docs, device="cuda")
                torch.cuda.synchronize()
            row["to_cuda_us"] = median_us(to_gpu, reps)
        rows.append(row)
        print(f"{n:4d} docs ({segs:4d} segments, {row['tokens']:6d} tokens): from_segments "
              f"{row['host_us']:7.1f} us{' (compiled builder)' if compiled else ''}, pure Python "
              f"{row['python_path_us']:7.1f} us" + (f", to cuda {row['to_cuda_us']:.1f} us" if "to_cuda_us" in row
                                                    else ""))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = device_name(dev)
    out = {"device": name, "compiled_host_builder": compiled, "torch": torch.__version__, "rows": rows,
           "target": "64 documents under 50 us (issue 3)"}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"{slug(name)}-layout.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
