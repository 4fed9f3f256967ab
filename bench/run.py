"""Run the umm_ops benchmark suite, then write results (JSON naming the device), a table and a plot.

    python bench/run.py --quick          # the small built-in default (~2 min on 2 CPU cores)
    python bench/run.py                  # full sweep at the Cheers model's sizes -> bench/results/<device>.json
    python bench/run.py -k gated_detail  # a subset (pytest -k expression)

Quick runs write under bench/results/quick/ (not committed); full runs write bench/results/<device>.json and
bench/results/<device>.png, which are committed so that sessions without that device can compare.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ATTN_PEERS = ("sdpa_dense", "flex_cached", "flex_with_mask")  # span-attention peers (bench/span_cases.py)
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(64 * 2**30), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def build_results(bench_json: dict, device: str, quick: bool) -> dict:
    import torch

    import umm_ops

    rows = []
    for b in bench_json["benchmarks"]:
        info = b["extra_info"]
        med = b["stats"]["median"]
        rows.append({
            "case": info["case"], "op": info["op"], "direction": info["direction"], "images": info["images"],
            "dtype": info["dtype"], "shape": info["shape"], "impl": info["impl"], "bytes": info["bytes"],
            "median_ms": med * 1e3, "min_ms": b["stats"]["min"] * 1e3, "rounds": b["stats"]["rounds"],
            "GBps": info["bytes"] / med / 1e9,
        })
        if "allowed_pairs" in info:  # attention: FLOPs over allowed (q, k) pairs only, fwd 1 + bwd 2.5
            mult = 3.5 if info["direction"] == "fwd+bwd" else 1.0
            flops = 4 * info["allowed_pairs"] * info["head_dim"] * info["heads_q"] * mult
            rows[-1].update({k: info[k] for k in ("allowed_pairs", "heads_q", "heads_kv", "head_dim", "tokens")})
            rows[-1].update(flops=flops, TFLOPs=flops / med / 1e12)
        elif "flops" in info:  # GEMM-bound cases (compress / expand tokens, bench/tokens_cases.py)
            rows[-1].update(flops=info["flops"], TFLOPs=info["flops"] / med / 1e12)
    copy = [r for r in rows if r["op"] == "copy"]
    copy_gbps = copy[0]["GBps"] if copy else None
    by_case: dict = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    for impls in by_case.values():
        for r in impls.values():
            if copy_gbps:
                r["frac_copy_bw"] = r["GBps"] / copy_gbps
            for peer in ("eager", "compile", *ATTN_PEERS):
                if peer in impls and r["impl"] != peer:
                    r[f"speedup_vs_{peer}"] = impls[peer]["median_ms"] / r["median_ms"]
            if "mm" in impls and r["impl"] != "mm":  # fraction of the plain GEMM's rate (torch.mm, pre-unfolded)
                r["frac_of_mm"] = impls["mm"]["median_ms"] / r["median_ms"]
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = None
    return {
        "device": device_name(device),
        "device_kind": device,
        "mode": "quick" if quick else "full",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_v,
        "umm_ops": umm_ops.__version__,
        "umm_ops_build": umm_ops.backends()["cuda"] | {"extension": umm_ops.backends()["extension"]["loaded"]},
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_isa": umm_ops.backends()["cpu"].get("isa"),
        "malloc_env": MALLOC_ENV if device == "cpu" else None,
        "copy_GBps": copy_gbps,
        "note": "GB/s counts the bytes an ideal kernel moves (each input read once, each output written once); "
                "times are medians of pytest-benchmark rounds after warm-up (torch.compile warmed up first).",
        "results": rows,
    }


def print_table(res: dict) -> None:
    by_case: dict = {}
    for r in res["results"]:
        if "allowed_pairs" not in r and "flops" not in r:  # attention / GEMM rows: their own tables below
            by_case.setdefault(r["case"], {})[r["impl"]] = r
    title = f"umm_ops benchmarks on {res['device']} ({res['mode']}), copy bandwidth {res['copy_GBps'] or 0:.1f} GB/s"
    header = ["op", "dir", "img", "dtype", "umm_ops ms", "eager ms", "compile ms", "umm GB/s", "% copy",
              "x eager", "x compile"]
    body = []
    for case, impls in by_case.items():
        u = impls.get("umm_ops")
        if u is None:
            continue
        e, c = impls.get("eager"), impls.get("compile")
        body.append([
            u["op"], u["direction"], str(u["images"]), u["dtype"], f"{u['median_ms']:.3f}",
            f"{e['median_ms']:.3f}" if e else "-", f"{c['median_ms']:.3f}" if c else "-", f"{u['GBps']:.1f}",
            f"{100 * u.get('frac_copy_bw', 0):.0f}%", f"{u.get('speedup_vs_eager', float('nan')):.2f}",
            f"{u.get('speedup_vs_compile', float('nan')):.2f}",
        ])
        if "umm_ops[triton]" in impls:
            t = impls["umm_ops[triton]"]
            body.append(["  (triton)", "", "", "", f"{t['median_ms']:.3f}", "", "", f"{t['GBps']:.1f}",
                         f"{100 * t.get('frac_copy_bw', 0):.0f}%", f"{t.get('speedup_vs_eager', float('nan')):.2f}",
                         f"{t.get('speedup_vs_compile', float('nan')):.2f}"])
    _print_rows(title, header, body, ("op", "dir", "dtype"))
    print_gemm_table(res)
    print_attention_table(res)


def print_gemm_table(res: dict) -> None:
    """GEMM-bound token cases: median ms per implementation, TFLOP/s, fraction of the plain GEMM's rate."""
    by_case: dict = {}
    for r in res["results"]:
        if "flops" in r and "allowed_pairs" not in r:
            by_case.setdefault(r["case"], {})[r["impl"]] = r
    names = ("umm_ops", "umm_ops[triton]", "eager", "compile", "mm")
    short = {"umm_ops": "umm", "umm_ops[triton]": "triton", "eager": "eager", "compile": "compile", "mm": "mm"}
    present = [n for n in names if any(n in impls for impls in by_case.values())]
    header = ["op", "dir", "img", "dtype", *(f"{short[n]} ms" for n in present), "umm TF/s", "% of mm",
              "x eager", "x compile"]
    body = []
    for impls in by_case.values():
        any_r = next(iter(impls.values()))
        u = impls.get("umm_ops")
        body.append([
            any_r["op"], any_r["direction"], str(any_r["images"]), any_r["dtype"],
            *(f"{impls[n]['median_ms']:.3f}" if n in impls else "-" for n in present),
            f"{u['TFLOPs']:.3f}" if u else "-", f"{100 * u['frac_of_mm']:.0f}%" if u and "frac_of_mm" in u else "-",
            f"{u['speedup_vs_eager']:.2f}" if u and "speedup_vs_eager" in u else "-",
            f"{u['speedup_vs_compile']:.2f}" if u and "speedup_vs_compile" in u else "-",
        ])
    _print_rows(f"GEMM-bound token ops on {res['device']} ({res['mode']}); mm = torch.mm on the pre-unfolded "
                "tensor (fwd+bwd: the three GEMMs); % of mm = mm time / umm time", header, body,
                ("op", "dir", "dtype"))


def _print_rows(title, header, body, left) -> None:
    if not body:
        return
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in header:
            table.add_column(h, justify="left" if h in left else "right")
        from rich.markup import escape

        for row in body:
            table.add_row(*(escape(c) for c in row))
        Console(width=160).print(table)
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in body:
            print("  ".join(x.ljust(w) for x, w in zip(row, widths)))


def print_attention_table(res: dict) -> None:
    """Span-attention cases: median ms per implementation, achieved TFLOP/s (allowed pairs only) and speedups."""
    by_case: dict = {}
    for r in res["results"]:
        if "allowed_pairs" in r:
            by_case.setdefault(r["case"], {})[r["impl"]] = r
    impl_names = ("umm_ops", *ATTN_PEERS)
    short = {"umm_ops": "umm", "sdpa_dense": "sdpa", "flex_cached": "flex", "flex_with_mask": "flex+bm"}
    header = ["layout", "dir", "tokens", "dtype", *(f"{short[n]} ms" for n in impl_names), "umm TF/s",
              "best peer TF/s", "umm GB/s", *(f"x {short[n]}" for n in ATTN_PEERS)]
    body = []
    for impls in by_case.values():
        any_r = next(iter(impls.values()))
        u = impls.get("umm_ops")
        peers = [impls[n] for n in ATTN_PEERS if n in impls]
        best = max(peers, key=lambda r: r["TFLOPs"]) if peers else None
        body.append([
            any_r["op"].replace("span_attention[", "").rstrip("]"), any_r["direction"], str(any_r["tokens"]),
            any_r["dtype"],
            *(f"{impls[n]['median_ms']:.3f}" if n in impls else "-" for n in impl_names),
            f"{u['TFLOPs']:.3f}" if u else "-", f"{best['TFLOPs']:.3f} {short[best['impl']]}" if best else "-",
            f"{u['GBps']:.1f}" if u else "-",
            *(f"{u[f'speedup_vs_{n}']:.2f}" if u and f"speedup_vs_{n}" in u else "-" for n in ATTN_PEERS),
        ])
    _print_rows(f"span_attention on {res['device']} ({res['mode']}); flex = cached BlockMask, flex+bm = "
                "create_block_mask timed in; TF/s = 4 * allowed pairs * Dh * Hq / time (x 3.5 fwd+bwd)",
                header, body, ("layout", "dir", "dtype"))


def plot(res: dict, path: str) -> None:
    """One panel per (op, direction): achieved GB/s against the number of images, per implementation and dtype."""
    try:
        import matplotlib
    except ImportError:
        print("[bench] matplotlib not installed: no plot (results JSON and table are complete)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["results"] if r["op"] != "copy" and "allowed_pairs" not in r
            and "flops" not in r]  # attention and GEMM-bound token ops: tables only
    panels = list(dict.fromkeys((r["op"], r["direction"]) for r in rows))
    if not panels:  # e.g. `-k span`: attention cases are in the table only
        return
    ncol = 4 if len(panels) > 4 else len(panels)
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    colors = {"umm_ops": "tab:green", "umm_ops[triton]": "tab:olive", "eager": "tab:gray", "compile": "tab:blue"}
    styles = {"float32": "-", "bfloat16": "--", "float16": ":"}
    for ax, (op, direction) in zip(axes.flat, panels):
        sel = [r for r in rows if r["op"] == op and r["direction"] == direction]
        for impl in colors:
            for dt in styles:
                pts = sorted((r["images"], r["GBps"]) for r in sel if r["impl"] == impl and r["dtype"] == dt)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[dt], marker="o", ms=3,
                            color=colors[impl], label=f"{impl} {dt}")
        if res["copy_GBps"]:
            ax.axhline(res["copy_GBps"], color="k", ls="-.", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op} {direction}", fontsize=9)
        ax.set_xlabel("images", fontsize=8)
        ax.set_ylabel("GB/s", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8)
    fig.suptitle(f"umm_ops vs eager / torch.compile: achieved GB/s (ideal bytes / median time); dash-dot = copy "
                 f"bandwidth {res['copy_GBps'] or 0:.0f} GB/s - {res['device']} ({res['mode']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small built-in default")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("-k", dest="select", default=None, help="pytest -k expression to run a subset")
    ap.add_argument("--out-dir", default=None, help="where results go (default bench/results[/quick])")
    ap.add_argument("--replot", default=None, metavar="RESULTS_JSON", help="only redraw table and plot of a results file")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            res = json.load(f)
        print_table(res)
        plot(res, os.path.splitext(args.replot)[0] + ".png")
        return 0

    import torch

    from umm_ops.utils import atomic_write

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = args.out_dir or os.path.join(HERE, "results", "quick" if args.quick else "")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.json")
        cmd = [sys.executable, "-m", "pytest", os.path.join(HERE, "test_ops.py"), "-q", "-p", "no:cacheprovider",
               "--benchmark-json", raw, "--benchmark-columns=median,min,rounds", "--benchmark-sort=name",
               "--bench-device", device]
        if args.quick:
            cmd.append("--quick")
        if args.select:
            cmd += ["-k", args.select]
        print("[bench]", " ".join(cmd), flush=True)
        env = dict(os.environ)
        # inductor's compile-worker pool keeps processes alive that steal cycles from the timed CPU runs
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        if device == "cpu":
            # PyTorch's CPU allocator is plain malloc: glibc hands large freed blocks back to the OS and every
            # call then pays first-touch page faults on its outputs (up to ~4x the kernel time here), in an
            # order that depends on each implementation's allocation pattern.  Like the caching allocator on
            # CUDA, keep freed memory (same setting for every implementation; recorded in the results).
            env.update(MALLOC_ENV)
        log = os.path.join(out_dir, "pytest-benchmark.log")
        print(f"[bench] running (pytest-benchmark output: {log}) ...", flush=True)
        with open(log, "w") as lf:
            rc = subprocess.call(cmd, cwd=HERE, env=env, stdout=lf, stderr=subprocess.STDOUT)
        if rc != 0 or not os.path.exists(raw):
            with open(log) as lf:
                print("".join(lf.readlines()[-40:]), file=sys.stderr)
            print(f"[bench] pytest failed (exit {rc})", file=sys.stderr)
            return rc or 1
        with open(raw) as f:
            bench_json = json.load(f)
    res = build_results(bench_json, device, args.quick)
    name = slug(res["device"])
    if args.select:
        name += "-subset"
    jpath = os.path.join(out_dir, f"{name}.json")
    ppath = os.path.join(out_dir, f"{name}.png")
    atomic_write(jpath, json.dumps(res, indent=1))
    print_table(res)
    plot(res, ppath)
    print(f"[bench] results: {jpath}" + (f"\n[bench] plot:    {ppath}" if os.path.exists(ppath) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
