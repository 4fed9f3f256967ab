"""Fuzzing the public ops with malformed calls, each batch in a subprocess (issue 20).

A case is (op, which argument is spoiled, how): one valid call of a public op with ONE argument replaced by a
wrong dtype / shape / device / type, an empty or non-contiguous tensor, a non-finite or out-of-range number.
The call must either return or raise a refusal that names what was expected and what was given; it must never
crash the process (a signal), hang, or raise anything else.

* ``run_case(seed)`` (in the worker) -> dict(op, arg, how, outcome, error)
* ``fuzz(n, seed, workers, timeout, backend)`` (in the parent) -> list of problems (empty: all good); a worker that
  dies or hangs is reported with the case it was running, the cases after it run in a fresh worker.

Used by tests/test_fuzz_ops.py (a few hundred cases, in CI) and scripts/fuzz_ops.py (as many as you like).
A refusal counts as clear when it is a TypeError / ValueError / BackendUnavailableError whose message says what
was given ("got ...") and what was expected ("must", "expected", ...) - a heuristic that catches bare messages
from deep inside torch or Python, not a proof of quality.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

REFUSALS = ("TypeError", "ValueError", "BackendUnavailableError")
EXPECTS = ("must", "expect", "need", "only", "unknown", "one of", "not ", "required")  # words that state what was expected


# ----------------------------------------------------------------------------------------------- cases (worker)
def _valid_calls():
    """{op name: (callable, {arg name: valid value}, positional arg names)}: small valid calls of every public op."""
    import torch

    import umm_ops
    from umm_ops import SpanLayout

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    lay = SpanLayout.from_segments([[(3, "causal"), (4, "full")], [(2, "noise"), (3, "causal")]])
    return {
        "flow_step": (umm_ops.flow_step, dict(x=r(2, 3, 4), v=r(2, 3, 4), t=0.2, t_next=0.3, noise=r(2, 3, 4),
                                               sigma=0.3, return_logprob=True)),
        "flow_logprob": (umm_ops.flow_logprob, dict(x=r(2, 6), x_next=r(2, 6), v=r(2, 6), t=torch.tensor([0.2, 0.4]),
                                                     t_next=torch.tensor([0.3, 0.5]), sigma=0.3)),
        "flow_kl": (umm_ops.flow_kl, dict(v=r(2, 6), v_ref=r(2, 6), t=0.2, t_next=0.3, sigma=0.3)),
        "time_shift": (umm_ops.time_shift, dict(t=torch.tensor([0.1, 0.9]), a=0.5)),
        "gated_detail_residual": (umm_ops.gated_detail_residual,
                                  dict(low=r(2, 3, 8), high=r(2, 3, 8), gate_hidden=r(2, 3, 8), w_gate=r(8),
                                       b_gate=r(1), ln_weight=r(8), ln_bias=r(8), eps=1e-5)),
        "adaln_modulate": (umm_ops.adaln_modulate, dict(x=r(2, 3, 8), shift=r(2, 8), scale=r(2, 8), eps=1e-6,
                                                         norm="rms", weight=r(8), bias=r(8))),
        "gated_residual": (umm_ops.gated_residual, dict(x=r(2, 3, 8), gate=r(2, 8), y=r(2, 3, 8))),
        "span_attention": (umm_ops.span_attention, dict(q=r(12, 2, 8), k=r(12, 1, 8), v=r(12, 1, 8), layout=lay,
                                                         softmax_scale=None)),
        "compress_tokens": (umm_ops.compress_tokens, dict(x=r(1, 16, 4), grid_hw=(4, 4), ln_weight=r(4),
                                                           ln_bias=r(4), weight=r(6, 16), bias=r(6), factor=2,
                                                           activation="gelu", eps=1e-6)),
        "expand_tokens": (umm_ops.expand_tokens, dict(y=r(1, 4, 6), grid_hw=(4, 4), weight=r(16, 6), bias=r(16),
                                                       factor=2)),
        "pack_latents": (umm_ops.pack_latents, dict(z=r(1, 2, 4, 4), running_mean=r(8), running_var=r(8).abs(),
                                                     factor=2, eps=1e-4)),
        "unpack_latents": (umm_ops.unpack_latents, dict(tokens=r(1, 4, 8), grid_hw=(4, 4), running_mean=r(8),
                                                         running_var=r(8).abs(), factor=2, eps=1e-4)),
        "SpanLayout.from_segments": (SpanLayout.from_segments, dict(docs=[[(3, "causal"), (4, "full")]],
                                                                    q_lens=None)),
        "linear_cross_entropy": (umm_ops.linear_cross_entropy,
                                 dict(hidden=r(4, 6), weight=r(9, 6), targets=torch.tensor([1, 8, -100, 0]), bias=r(9),
                                      ignore_index=-100, reduction="mean", label_smoothing=0.1, z_loss=1e-3,
                                      softcap=5.0)),
        "linear_logprob": (umm_ops.linear_logprob, dict(hidden=r(4, 6), weight=r(9, 6), targets=torch.tensor([1, 8, 3, 0]),
                                                         temperature=0.8, return_entropy=True)),
    }


def _spoil(value, rng: random.Random):
    """(how, spoiled value) for a valid argument value."""
    import torch

    if isinstance(value, torch.Tensor):
        options = [
            ("dtype int64", lambda: value.long()),
            ("dtype bool", lambda: value > 0),
            ("dtype float64", lambda: value.double()),
            ("dtype bfloat16", lambda: value.bfloat16()),
            ("extra dim", lambda: value[None]),
            ("one dim less", lambda: value.reshape(-1) if value.dim() > 1 else value[0]),
            ("last dim + 1", lambda: torch.cat([value, value[..., :1]], -1) if value.dim() else value[None]),
            ("first dim + 1", lambda: torch.cat([value, value[:1]], 0) if value.dim() else value[None]),
            ("empty", lambda: value[:0] if value.dim() else value.reshape(1)[:0]),
            ("non-contiguous", lambda: value.transpose(0, -1).contiguous().transpose(0, -1)
             if value.dim() > 1 else value.repeat(2)[::2]),
            ("NaN", lambda: value.clone().fill_(float("nan"))),
            ("Inf", lambda: value.clone().fill_(float("inf"))),
            ("meta", lambda: value.to("meta")),
            ("0-dim", lambda: value.reshape(-1)[0]),
            ("None", lambda: None),
            ("a list", lambda: value.tolist()),
            ("a str", lambda: "tensor"),
            ("requires grad", lambda: value.detach().clone().requires_grad_(True)),
        ]
        if not value.is_floating_point():  # integer tensors (token ids): no NaN / Inf / gradient; out-of-range ids
            options = [o for o in options if o[0] not in ("NaN", "Inf", "requires grad")] + [
                ("out of range", lambda: value + 1000), ("negative", lambda: -value.abs() - 2),
                ("dtype int32", lambda: value.int()), ("dtype float32", lambda: value.float())]
    elif isinstance(value, bool):
        options = [("None", lambda: None), ("a str", lambda: "yes"), ("an int 2", lambda: 2)]
    elif isinstance(value, (int, float)):
        options = [("NaN", lambda: float("nan")), ("Inf", lambda: float("inf")), ("-Inf", lambda: float("-inf")),
                   ("negative", lambda: -abs(value) - 1), ("zero", lambda: 0), ("huge", lambda: 1e30),
                   ("a str", lambda: str(value)), ("None", lambda: None), ("a bool", lambda: True),
                   ("a float", lambda: float(value) + 0.5), ("a list", lambda: [value])]
    elif isinstance(value, str):
        options = [("unknown str", lambda: "nonsense"), ("None", lambda: None), ("an int", lambda: 3),
                   ("upper case", lambda: value.upper())]
    elif isinstance(value, tuple):
        options = [("floats", lambda: tuple(v + 0.5 for v in value)), ("strs", lambda: tuple(str(v) for v in value)),
                   ("one item", lambda: value[:1]), ("three items", lambda: value + value[:1]),
                   ("negative", lambda: tuple(-v for v in value)), ("zeros", lambda: (0, 0)),
                   ("odd", lambda: tuple(v + 1 for v in value)), ("None", lambda: None)]
    elif isinstance(value, list):
        options = [("empty list", lambda: []), ("None", lambda: None), ("a str", lambda: "docs"),
                   ("bad mode", lambda: [[(3, "sideways")]]), ("zero length", lambda: [[(0, "causal")]]),
                   ("float length", lambda: [[(2.5, "causal")]]), ("nested wrong", lambda: [[3, "causal"]])]
    elif value is None:
        options = [("a str", lambda: "x"), ("an int", lambda: 3), ("a list", lambda: [1, 2]),
                   ("NaN", lambda: float("nan"))]
    else:  # SpanLayout and other objects
        options = [("None", lambda: None), ("a str", lambda: "layout"), ("an int", lambda: 3)]
    how, make = rng.choice(options)
    return how, make()


def _case(seed: int):
    """Case `seed` (deterministic): (op name, op, its keyword arguments with one spoiled, that argument, how)."""
    rng = random.Random(seed)
    calls = _valid_calls()
    name = sorted(calls)[rng.randrange(len(calls))]
    fn, kwargs = calls[name]
    arg = sorted(kwargs)[rng.randrange(len(kwargs))]
    how, bad = _spoil(kwargs[arg], rng)
    return name, fn, dict(kwargs, **{arg: bad}), arg, how


def run_case(seed: int) -> dict:
    """Build and run case `seed` (deterministic); never raises."""
    import torch

    try:
        name, fn, kwargs, arg, how = _case(seed)
    except Exception as e:  # noqa: BLE001 - a bug of this harness, not of an op: reported as such
        return dict(seed=seed, op=None, arg=None, how=None, outcome="unbuildable",
                    error=f"{type(e).__name__}: {str(e)[:300]}")
    rec = dict(seed=seed, op=name, arg=arg, how=how)
    try:
        out = fn(**kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        # one backward through all outputs (outputs of one op share its graph: a second backward would find the
        # saved tensors freed)
        diff = [o.float().sum() for o in outs
                if isinstance(o, torch.Tensor) and o.requires_grad and o.device.type != "meta" and o.numel()]
        if diff:
            sum(diff).backward()
        rec.update(outcome="returned")
    except Exception as e:  # noqa: BLE001 - classified below
        msg = str(e)
        clear = type(e).__name__ in REFUSALS and "got" in msg and any(w in msg for w in EXPECTS)
        rec.update(outcome="refused" if clear else "unclear", error=f"{type(e).__name__}: {msg[:300]}")
    return rec


def _worker(seeds: list[int], backend: str | None) -> None:
    """Run the cases, one JSON line each on stdout: a 'start' line before (so a crash names its case), the
    result after."""
    import warnings

    import torch  # noqa: F401 - before umm_ops (the extension links to torch)

    import umm_ops

    warnings.simplefilter("ignore")
    ctx = umm_ops.use_backend(backend) if backend else None
    if ctx is not None:
        ctx.__enter__()
    for s in seeds:
        print(json.dumps({"start": s}), flush=True)
        print(json.dumps(run_case(s)), flush=True)


# ----------------------------------------------------------------------------------------------- parent
def fuzz(n: int, seed: int = 0, workers: int = 1, timeout: float = 60.0, backend: str | None = None,
         batch: int = 100, log=None) -> tuple[list[dict], list[dict]]:
    """Run n cases (seeds seed .. seed + n - 1) in subprocess batches.  Returns (results, problems): a problem
    is an unclear refusal, a crash (the worker died with a signal or a non-zero status) or a hang (no case
    finished within `timeout` seconds of the batch's start)."""
    seeds = list(range(seed, seed + n))
    results, problems = [], []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    pending = [seeds[i:i + batch] for i in range(0, len(seeds), batch)]
    running: list = []
    while pending or running:
        while pending and len(running) < max(1, workers):
            chunk = pending.pop(0)
            cmd = [sys.executable, "-c", f"from umm_ops.fuzz import _worker; _worker({chunk!r}, {backend!r})"]
            running.append((chunk, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                    env=env)))
        chunk, proc = running.pop(0)
        try:
            out, err = proc.communicate(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            hung = True
        started, done = None, set()
        for line in out.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "start" in rec:
                started = rec["start"]
            else:
                done.add(rec["seed"])
                results.append(rec)
                if rec["outcome"] in ("unclear", "unbuildable"):
                    problems.append(rec)
        bad_exit = hung or proc.returncode != 0
        if bad_exit:
            culprit = started if started is not None and started not in done else None
            rec = dict(seed=culprit, outcome="hang" if hung else "crash", returncode=proc.returncode,
                       error=err.strip().splitlines()[-1][:300] if err.strip() else "")
            if culprit is not None:
                rec.update(describe(culprit))
            problems.append(rec)
            rest = [s for s in chunk if s not in done and s != culprit]
            if rest:
                pending.insert(0, rest)
        if log:
            log(f"fuzz: {len(results)} / {n} cases, {len(problems)} problems")
    return results, problems


def describe(seed: int) -> dict:
    """The op, argument and spoiling of case `seed`, without running it."""
    name, _, _, arg, how = _case(seed)
    return dict(op=name, arg=arg, how=how)


def summary(results: list[dict]) -> str:
    by = {}
    for r in results:
        by[r["outcome"]] = by.get(r["outcome"], 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(by.items())) + f" (of {len(results)} cases)"
