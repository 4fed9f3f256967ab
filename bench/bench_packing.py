"""Packer throughput: samples/s and tokens/s of umm_ops.data packing on synthetic samples.

    python bench/bench_packing.py --quick     # ~30 s on 2 CPU cores
    python bench/bench_packing.py             # more samples and repeats

Writes bench/results/<device>-packing.json (device named as bench/run.py names it) and prints a table.

Cases (ByteTokenizer, patch 32, images 256 or 512 px -> 64 or 256 tokens, Cheers-like chat samples: a prompt, one
or two images to understand or generate, an answer):
  pack         pack(samples, spec): tokenize + lay out + group + collate (the whole packer, one process)
  encode       the per-sample half alone (what loader workers do)
  collate      the per-batch half alone (concatenation + SpanLayout), from encoded samples
  loader-wN    PackedLoader over an in-memory dataset with N workers (includes moving samples between processes)
  loader-jpeg-wN   the same over a dataset that decodes each image from JPEG bytes (Pillow) in __getitem__
                   (a quarter of the samples)
For context each configuration also reports, for one batch, the time to build its SpanLayout from the segment lists
and the time to build its dense (L, L) boolean mask (span_mask, once): the object a dense-mask model (Cheers' released
code, BAGEL's SDPA fallback) builds per batch instead of a layout.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from run import device_name, slug  # noqa: E402  (bench/run.py: one way to name devices)

import umm_ops  # noqa: E402
from umm_ops import SpanLayout, span_mask  # noqa: E402
from umm_ops.data.loader import PackedLoader  # noqa: E402
from umm_ops.data.packing import (GreedyPacker, ImageItem, PackSpec, Sample, TextItem, collate_docs,  # noqa: E402
                                  encode_sample, pack)
from umm_ops.data.tokenizer import ByteTokenizer  # noqa: E402
from umm_ops.utils import atomic_write  # noqa: E402

WORDS = ("a red circle left of a blue square how many shapes are there in the picture describe the scene "
         "three green triangles above one yellow star on a grey background").split()


def synthetic_samples(n: int, side: int, seed: int = 0) -> list:
    """Chat-formatted samples: understanding (image + question -> answer) and generation (prompt -> image).
    Images come from a small pool (packing keeps references, it never copies pixels)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    pool = [torch.rand(3, side, side, generator=g) * 2 - 1 for _ in range(4)]
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            items = [TextItem("<|im_start|>user\n"), ImageItem(rng.choice(pool)),
                     TextItem(words(rng.randrange(5, 30)) + "?<|im_end|>\n<|im_start|>assistant\n"),
                     TextItem(words(rng.randrange(3, 60)) + "<|im_end|>", loss=True), TextItem("\n")]
            if rng.random() < 0.3:
                items.insert(2, ImageItem(rng.choice(pool)))
        else:
            items = [TextItem("<|im_start|>user\nGenerate: " + words(rng.randrange(5, 40)) +
                              "<|im_end|>\n<|im_start|>assistant\n"),
                     ImageItem(rng.choice(pool), "generate"), TextItem("<|im_end|>", loss=True), TextItem("\n")]
        out.append(Sample(items))
    return out


class ListDataset:
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


class JpegDataset:
    """The same samples with each image stored as JPEG bytes and decoded (Pillow) in __getitem__: the per-sample
    work of a real-format reader, which loader workers take off the main process."""

    def __init__(self, samples, quality: int = 90):
        import io

        from PIL import Image

        self.io, self.Image = io, Image
        codes, self.items = {}, []
        for s in samples:
            row = []
            for it in s.items:
                if isinstance(it, ImageItem):
                    key = id(it.image)
                    if key not in codes:
                        u8 = ((it.image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
                        buf = io.BytesIO()
                        Image.fromarray(u8).save(buf, format="JPEG", quality=quality)
                        codes[key] = buf.getvalue()
                    row.append((codes[key], it.role))
                else:
                    row.append(it)
            self.items.append(row)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        out = []
        for it in self.items[i]:
            if isinstance(it, tuple):
                im = self.Image.open(self.io.BytesIO(it[0])).convert("RGB")
                x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
                it = ImageItem(x.permute(2, 0, 1).float() / 127.5 - 1, it[1])
            out.append(it)
        return Sample(out)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run_case(name, samples, spec, repeats, workers=None):
    batches = pack(samples, spec)
    tokens = sum(b.num_tokens for b in batches)
    if name == "pack":
        sec = timed(lambda: pack(samples, spec), repeats)
    elif name == "encode":
        sec = timed(lambda: [encode_sample(s, spec, i) for i, s in enumerate(samples)], repeats)
    elif name == "collate":
        docs = [encode_sample(s, spec, i) for i, s in enumerate(samples)]
        groups, p = [], GreedyPacker(spec.budget)
        for d in docs:
            grp = p.add(d)
            if grp:
                groups.append(grp)
        groups.append(p.flush())
        sec = timed(lambda: [collate_docs(g) for g in groups], repeats)
    else:
        ds = JpegDataset(samples) if name == "loader-jpeg" else ListDataset(samples)

        def go():
            loader = PackedLoader(ds, spec, seed=0, num_workers=workers)
            assert sum(b.num_docs for b in loader) == len(samples)
        sec = timed(go, max(1, repeats // 2))
    return {"case": name, "samples": len(samples), "tokens": tokens, "batches": len(batches),
            "mean_batch_tokens": tokens / len(batches), "docs_per_batch": len(samples) / len(batches),
            "seconds": sec, "samples_per_s": len(samples) / sec, "tokens_per_s": tokens / sec,
            "ms_per_batch": sec / len(batches) * 1e3}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    ap.add_argument("--out", default=None, help="results file (default bench/results/<device>-packing.json)")
    args = ap.parse_args(argv)
    n, repeats = (400, 3) if args.quick else (2000, 7)
    tok = ByteTokenizer()
    configs = []
    for side, budget, align, gen_mode in ((256, 4096, None, "full"), (512, 8192, None, "full"),
                                          (512, 8192, 128, "noise")):
        spec = PackSpec(tok, patch=32, gen_mode=gen_mode, budget=budget, align=align)
        samples = synthetic_samples(n, side)
        b0 = pack(samples[:64], spec)[0]
        t0 = time.perf_counter()
        span_mask(b0.layout)
        mask_ms = (time.perf_counter() - t0) * 1e3
        layout_ms = timed(lambda: SpanLayout.from_segments(b0.layout.segments()[0]), 20) * 1e3
        cases = ["pack", "encode", "collate", "loader-w0", "loader-w2"]
        if side == 512 and align is None:
            cases += ["loader-jpeg-w0", "loader-jpeg-w2"]
        for c in cases:
            workers = int(c.split("-w")[1]) if c.startswith("loader") else None
            sub = samples[:n // 4] if "jpeg" in c else samples  # decoding dominates: fewer samples suffice
            r = run_case(c if workers is None else c.rsplit("-w", 1)[0], sub, spec, repeats, workers)
            r.update(case=c, image_px=side, budget=budget, align=align, gen_mode=gen_mode,
                     layout_ms_per_batch=layout_ms, dense_mask_ms_per_batch=mask_ms)
            configs.append(r)
            print(f"{c:14s} img {side:3d}px budget {budget:5d} align {str(align):4s} {gen_mode:5s}: "
                  f"{r['samples_per_s']:9.0f} samples/s {r['tokens_per_s'] / 1e6:7.2f} Mtok/s "
                  f"{r['ms_per_batch']:7.3f} ms/batch ({r['docs_per_batch']:.1f} docs, "
                  f"{r['mean_batch_tokens']:.0f} tok; layout {layout_ms:.3f} ms, dense mask {mask_ms:.0f} ms)",
                  flush=True)
    dev = "cpu"
    res = {
        "device": device_name(dev), "device_kind": dev, "mode": "quick" if args.quick else "full",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "umm_ops": umm_ops.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "note": "Packing runs on the CPU whatever the training device. seconds = median over repeats after one "
                "warm-up; tokens include image tokens, wrapper tokens and alignment pads. loader-wN includes "
                "worker start-up (a new DataLoader per epoch) and inter-process transfer of the samples; workers "
                "run torch with 1 thread each. On a shared machine multi-threaded torch ops in the main process "
                "(image range checks, float conversion) slow down sharply when the other cores are busy.",
        "results": configs,
    }
    out = args.out or os.path.join(HERE, "results", f"{slug(res['device'])}-packing.json")
    atomic_write(out, json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
