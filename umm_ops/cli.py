"""Command line: `python -m umm_ops info` (what was compiled, what runs here).  Benchmarks: bench/run.py."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    import umm_ops

    rep = umm_ops.backends()
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    ext = rep["extension"]
    print(f"umm_ops {umm_ops.__version__}  torch {rep['torch']} (cuda {rep['torch_cuda']})  python {rep['python']}")
    print(f"device           : {rep['device']}  ({rep['cpu_threads']} CPU threads)")
    print(f"compiled module  : {'loaded' if ext['loaded'] else 'NOT loaded: ' + str(ext['error'])}"
          + (f" (built against torch {ext['built_against_torch']})" if ext["loaded"] else ""))
    print(f"cpu kernels      : {'yes' if rep['cpu']['compiled'] else 'no'}")
    c = rep["cuda"]
    print(f"cuda kernels     : {'compiled for sm ' + str(c['archs']) if c['compiled'] else 'not compiled'}; "
          f"device {'present' if c['device_available'] else 'absent'} -> {'runnable' if c['runnable'] else 'not runnable'}")
    t = rep["triton"]
    print(f"triton           : {t['version'] if t['installed'] else 'not importable'}"
          f"{' (interpreter)' if t['interpreter'] else ''} -> {'runnable' if t['runnable'] else 'not runnable'}")
    print("reference        : runnable")
    print("kernels          : " + "; ".join(
        f"{op} [{', '.join(b for b in bk if b != 'reference')}]" for op, bk in rep["kernels"].items()
        if not op.endswith(("_backward", "_bwd"))))
    print(f"forced backend   : {rep['forced'] or 'none (auto)'}")
    if rep["forced"] is None:
        print(f"auto choice      : cpu tensors -> {rep['auto']['cpu']}; cuda tensors -> {rep['auto']['cuda'] or 'n/a'}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="umm_ops", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="what was compiled and what can run here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_info)

    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
