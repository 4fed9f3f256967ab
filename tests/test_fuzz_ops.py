"""Fuzzing the public ops (issue 20): random malformed calls, run in subprocesses (umm_ops.fuzz).  No case may
crash its process, hang, or end in anything but a clear refusal (TypeError / ValueError naming what was expected
and what was given) or a result.  The longer run: scripts/fuzz_ops.py."""
from __future__ import annotations

import json

from umm_ops import fuzz as F


def test_fuzz_public_ops():
    results, problems = F.fuzz(600, seed=20, workers=2, timeout=120, batch=150)
    assert len(results) == 600, F.summary(results)
    assert not problems, "\n".join(json.dumps(p)[:400] for p in problems)
    outcomes = {r["outcome"] for r in results}
    assert outcomes == {"refused", "returned"}, F.summary(results)   # the cases reach both ends
    assert len({r["op"] for r in results}) == len(F._valid_calls())  # every public op was fuzzed


def test_fuzz_detects_crashes_hangs_and_unclear_errors(monkeypatch):
    """The harness can fail: a worker that dies, one that hangs and a bare error are each reported with the case
    they were running, and the cases after them still run."""
    import umm_ops.fuzz as fz

    rec = fz.run_case(3)
    assert rec["outcome"] in ("refused", "returned", "unclear") and rec["op"] and rec["how"]
    real_worker_cmd = fz.sys.executable
    # a worker that kills itself on case 5 and sleeps on case 9: run through a small shim module
    shim = (
        "import os, sys, time, json\n"
        "from umm_ops import fuzz as f\n"
        "real = f.run_case\n"
        "def run_case(s):\n"
        "    if s == 5: os.kill(os.getpid(), 9)\n"
        "    if s == 9: time.sleep(60)\n"
        "    if s == 7: return dict(seed=s, op='x', arg='y', how='z', outcome='unclear', error='RuntimeError: ')\n"
        "    return real(s)\n"
        "f.run_case = run_case\n"
    )
    popen = fz.subprocess.Popen

    def fake_popen(cmd, **kw):
        cmd = [real_worker_cmd, "-c", shim + cmd[-1].replace("from umm_ops.fuzz import _worker; ", "f.")]
        return popen(cmd, **kw)

    monkeypatch.setattr(fz.subprocess, "Popen", fake_popen)
    results, problems = fz.fuzz(12, seed=0, workers=1, timeout=8, batch=12)
    kinds = {p["seed"]: p["outcome"] for p in problems}
    assert kinds == {5: "crash", 7: "unclear", 9: "hang"}, problems
    assert sorted(r["seed"] for r in results) == [s for s in range(12) if s not in (5, 9)]


def test_a_case_the_harness_cannot_build_is_reported_not_raised(monkeypatch):
    import umm_ops.fuzz as fz

    def broken(value, rng):
        raise TypeError("no spoiling for this value")

    monkeypatch.setattr(fz, "_spoil", broken)
    rec = fz.run_case(3)
    assert rec["outcome"] == "unbuildable" and "no spoiling" in rec["error"] and rec["seed"] == 3
