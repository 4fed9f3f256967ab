"""The training engine on one process (umm_ops.train): exact resume, atomic and verified checkpoints, corrupt-checkpoint
fallback, the run-folder lock, config changes on resume, the loss falls, the engine adds nothing to a bare loop, the
CLI.  Multi-process runs (DDP / FSDP2 / SIGKILL) are in test_train_distributed.py.

Small runs: the tiny preset on 32 px synthetic pictures with 384-token micro-batches, a few steps each."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from umm_ops.train import Config, ConfigError, train
from umm_ops.train.engine.checkpoint import CorruptCheckpoint, RunFolderBusy, RunLock, latest_checkpoint
from conftest import read_metrics

BASE = {"job.steps": 4, "job.device": "cpu", "job.progress": False, "recipe.image_size": 32, "data.budget": 384,
        "recipe.evaluate": False, "recipe.train_records": 500, "checkpoint.every": 2, "checkpoint.keep_last": 3,
        "metrics.log_every": 100, "schedule.warmup": 2, "optim.lr": 2e-3,
        "recipe.caption_first": 0}   # the engine's tests see the whole mix from step 0 (the curriculum: its own test)


def _cfg(out, extra: dict | None = None, **kw) -> Config:
    values = dict(BASE)
    values["job.out"] = str(out)
    values.update({k.replace("__", "."): v for k, v in kw.items()})
    values.update(extra or {})
    return Config.build("sft", values=values)


def _dcp(folder: Path, key: str = "model") -> dict:
    """A checkpoint's DCP state (model or optim) as plain tensors, read back in one process."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.pt")
        dcp_to_torch_save(str(folder / "dcp"), path)
        return torch.load(path, weights_only=False)[key]


def _same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: max |diff| {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class _Crash(Exception):
    pass


def _crash_at(n):
    def hook(step, rec):
        if step == n:
            raise _Crash
    return hook


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 uninterrupted steps (checkpoints 2 and 4): the reference the resume tests compare with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(_cfg(out))
    return out


def test_resume_is_bitwise_exact(straight, tmp_path):
    """(3 steps, crash before the step-4 checkpoint) + resume == 4 straight steps, bitwise: losses, gradient norms,
    parameters, optimizer moments, loader position."""
    cut = tmp_path / "cut"
    with pytest.raises(_Crash):
        train(_cfg(cut), on_step=_crash_at(3))
    assert latest_checkpoint(cut).name == "checkpoint-2"
    assert [r["step"] for r in read_metrics(cut)] == [1, 2, 3]
    s = train(_cfg(cut))
    assert s["resumed_from_step"] == 2 and s["steps_this_run"] == 2
    a, b = read_metrics(straight), read_metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]   # the lost step 3 was dropped from the log and redone
    for ra, rb in zip(a, b):
        for k in ("loss", "text_loss", "flow_loss", "lr", "grad_norm", "tokens", "docs", "epoch"):
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])
    assert len({r["loss"] for r in a}) == 4   # the loss moves: equal logs are not equal by accident
    ca, cb = straight / "checkpoint-4", cut / "checkpoint-4"
    _same(_dcp(ca, "model"), _dcp(cb, "model"), "model")
    _same(_dcp(ca, "optim"), _dcp(cb, "optim"), "optim")
    sa, sb = (json.load(open(p / "trainer_state.json")) for p in (ca, cb))
    assert sa["loader"] == sb["loader"] and sa["schedule"] == sb["schedule"] and sa["step"] == 4
    first, last = _dcp(straight / "checkpoint-2"), _dcp(ca)
    assert any(not torch.equal(first[k], last[k]) for k in last if k.startswith("llm."))   # training moved weights


def test_failed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    """A save that fails half-way (disk full) leaves checkpoint-1 intact and no checkpoint-2; leftovers of a hard
    kill (temporary / trash folders, a checkpoint folder without trainer_state.json) are never loaded and are
    cleaned up by the next run."""
    import torch.distributed.checkpoint as dcp

    out = tmp_path / "run"
    cfg = _cfg(out, job__steps=3, checkpoint__every=1, checkpoint__keep_last=5)
    real = dcp.save

    def failing(state, checkpoint_id):
        if ".tmp-checkpoint-2" in str(checkpoint_id):
            Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
            raise OSError("no space left on device (simulated)")
        return real(state, checkpoint_id=checkpoint_id)
    monkeypatch.setattr(dcp, "save", failing)
    with pytest.raises(OSError, match="simulated"):
        train(cfg)
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-1" in names and "checkpoint-2" not in names, names
    monkeypatch.setattr(dcp, "save", real)
    (out / ".trash-checkpoint-0-1-2" / "dcp").mkdir(parents=True)        # a prune killed mid-delete
    (out / "checkpoint-7" / "dcp").mkdir(parents=True)                    # no trainer_state.json
    s = train(cfg)
    assert s["resumed_from_step"] == 1   # checkpoint-7 was reported corrupt, set aside and skipped
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith((".tmp", ".trash"))], names
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert [n for n in names if n.startswith("corrupt-checkpoint-7-")], names


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "state"])
def test_corrupt_newest_checkpoint_falls_back(straight, tmp_path, damage, capsys):
    """The newest checkpoint damaged after the fact: reported by name, the run resumes from the newest intact one
    (checkpoint-2) and ends where the uninterrupted run ended (bitwise)."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shard = out / "checkpoint-4" / "dcp" / "__0_0.distcp"
    if damage == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif damage == "garbage":   # same size, different bytes: only the hash can tell
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size // 2)
            f.write(os.urandom(4096))
    elif damage == "missing":
        (out / "checkpoint-4" / "rng" / "rank0.safetensors").unlink()
    else:
        (out / "checkpoint-4" / "trainer_state.json").write_text('{"format": ')
    (out / "metrics.jsonl").unlink()
    s = train(_cfg(out, job__steps=5))
    err = capsys.readouterr().out
    assert "checkpoint-4 is corrupt" in err and "newest intact checkpoint, checkpoint-2" in err, err
    assert s["resumed_from_step"] == 2
    assert [r["step"] for r in read_metrics(out)] == [3, 4, 5]
    assert [r["loss"] for r in read_metrics(out)][:2] == [r["loss"] for r in read_metrics(straight)][2:]


@pytest.mark.parametrize("verify", ["hash", "size"])
def test_garbage_optimizer_state_names_the_file_never_unsafe_loading(straight, tmp_path, capsys, verify):
    """Issue 20: the optimizer's pickled entries of the newest checkpoint overwritten with garbage of the same
    size.  The message names the damaged file (or, without hashes, the files that could be) and never passes on
    torch's advice to retry with weights_only=False; the run resumes from checkpoint-2."""
    import shutil

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    dcp_dir = out / "checkpoint-4" / "dcp"
    md = FileSystemReader(str(dcp_dir)).read_metadata()
    spans = [(info.relative_path, info.offset, info.length) for idx, info in md.storage_data.items()
             if idx.fqn.startswith("optim") and isinstance(md.state_dict_metadata[idx.fqn], BytesStorageMetadata)]
    assert spans
    for rel, off, n in spans:
        with open(dcp_dir / rel, "r+b") as f:
            f.seek(off)
            f.write(b"\x80\x02garbage!" * (n // 10) + b"!" * (n % 10))
    s = train(_cfg(out, job__steps=5, checkpoint__verify=verify))
    log = capsys.readouterr().out
    assert s["resumed_from_step"] == 2
    assert "checkpoint-4 is corrupt" in log and "weights_only=False will likely" not in log
    if verify == "hash":  # the manifest's hash check finds the file before anything is unpickled
        assert "dcp/__0_0.distcp does not match its BLAKE2b hash" in log, log
    else:                 # loading fails; the message names the candidates and refuses unsafe loading
        assert "loading failed" in log and "dcp/__0_0.distcp" in log, log
        assert "never loaded with weights_only=False" in log or "weights_only" not in log, log


def test_all_checkpoints_corrupt_is_an_error(straight, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    for ck in ("checkpoint-2", "checkpoint-4"):
        with open(out / ck / "dcp" / "__0_0.distcp", "r+b") as f:
            f.truncate(100)
    with pytest.raises(CorruptCheckpoint, match="every checkpoint is corrupt.*not starting over"):
        train(_cfg(out, job__steps=5))
    assert (out / "checkpoint-4").is_dir()   # nothing deleted


def test_run_folder_lock(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out):
        with pytest.raises(RunFolderBusy, match=f"run folder {out} is in use by a live run \\(pid {os.getpid()}"):
            train(_cfg(out, job__steps=1))
    assert not (out / "checkpoint-1").exists()
    # a lock left by a killed run (its file and holder info, no flock): taken over, saying so
    (out / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "time": 0}))
    train(_cfg(out, job__steps=1))
    assert "took over the stale lock" in capsys.readouterr().out and (out / "checkpoint-1").is_dir()


def test_run_folder_lock_across_processes(tmp_path):
    """A second `umm train` on a folder that a live process holds is refused with exit code 2 and a clear message."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from umm_ops.train.engine.checkpoint import "
                               f"RunLock; RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run([sys.executable, "-m", "umm_ops", "train", "--out", str(out), "--steps", "1"],
                             capture_output=True, text=True)
        assert res.returncode == 2 and f"is in use by a live run (pid {holder.pid}" in res.stderr, res.stderr
    finally:
        holder.kill()
        holder.wait()


def test_resume_refuses_a_different_run_and_accepts_new_lr(tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(out, job__steps=2, job__progress=True))   # the rich progress bar path (as on a terminal)
    with pytest.raises(ValueError, match="job.seed=0.*job.seed=1"):
        train(_cfg(out, job__steps=3, job__seed=1))
    with pytest.raises(ValueError, match="recipe.image_size=32.*recipe.image_size=64"):
        train(_cfg(out, job__steps=3, recipe__image_size=64))
    capsys.readouterr()
    s = train(_cfg(out, job__steps=3, optim__lr=1e-3))
    assert s["resumed_from_step"] == 2
    assert "optim.lr 0.002 -> 0.001" in capsys.readouterr().out
    assert read_metrics(out)[-1]["lr"] == 1e-3   # step 3 follows the new schedule (cosine start: the new peak)


def test_loss_falls(tmp_path):
    """25 steps on fresh synthetic batches: the text loss (byte vocabulary, ln 263 = 5.6 at init) falls clearly.
    Measured (seed 0, CPU): see the assertion messages."""
    out = tmp_path / "run"
    s = train(_cfg(out, job__steps=25, data__budget=512, schedule__warmup=5, checkpoint__every=0,
                   checkpoint__keep_last=1))
    rows = read_metrics(out)
    assert len(rows) == 25 and all(r["lr"] > 0 for r in rows)

    def mean(key, sl, rs=rows):
        return sum(r[key] for r in rs[sl]) / len(rs[sl])
    first, last = slice(0, 5), slice(-5, None)
    assert mean("text_loss", last) < 0.7 * mean("text_loss", first), [r["text_loss"] for r in rows]
    gen = [r for r in rows if r["flow_images"] > 0]
    assert len(gen) >= 10
    # images read (understood) are counted apart from the generated ones: the caption / vqa samples hold them
    assert all(isinstance(r["read_images"], int) for r in rows) and sum(r["read_images"] for r in rows) > 0
    assert mean("flow_loss", last, gen) < mean("flow_loss", first, gen) + 0.05, [r["flow_loss"] for r in gen]
    assert os.path.getsize(s["loss_curve"]) > 10_000
    lrs = [r["lr"] for r in rows]
    assert lrs[:5] == sorted(lrs[:5]) and lrs[5:] == sorted(lrs[5:], reverse=True) and lrs[4] == 2e-3


@pytest.mark.parametrize("extra", [{"parallel.activation_checkpointing": True}, {"data.num_workers": 2}],
                         ids=["activation-checkpointing", "loader-workers"])
def test_variants_compute_the_same(straight, tmp_path, extra):
    """Activation checkpointing (recompute in backward) and loader worker processes change nothing, bitwise."""
    out = tmp_path / "run"
    train(_cfg(out, extra, job__steps=2))
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(straight)][:2]
    assert [r["grad_norm"] for r in read_metrics(out)] == [r["grad_norm"] for r in read_metrics(straight)][:2]


def test_blocks_are_the_transformer_blocks_not_the_conv_stages_layers():
    """find_blocks (the units of activation checkpointing and FSDP2) lists the LLM's, the ViT's and the head's
    transformer blocks and nothing inside the head's conv stage (parallel_atomic: its lists hold single convolutions
    and attention layers; checkpointing those one by one changed the gradients' summation order, measured)."""
    from umm_ops.model import CheersModel
    from umm_ops.train.engine.parallelize import find_blocks

    m = CheersModel("tiny")
    blocks = {id(b) for _, _, b in find_blocks(m)}
    inside = {id(x) for x in m.head.conv_stage.modules()}
    assert blocks and not blocks & inside
    assert {id(layer) for layer in m.llm.model.layers} <= blocks


def test_bf16_mixed_precision_runs(straight, tmp_path):
    """bf16 autocast (one process): the first loss within bf16's error of the float32 one (2^-8 relative per
    rounding; measured below 1 %)."""
    out = tmp_path / "run"
    train(_cfg(out, {"parallel.mixed_precision": "bf16"}, job__steps=2))
    a, b = read_metrics(straight)[0], read_metrics(out)[0]
    assert b["loss"] == pytest.approx(a["loss"], rel=3e-2)


def test_engine_equals_a_bare_loop(straight):
    """The engine adds nothing to the computation: the SFT computation written as a plain loop over the same global
    stream (PackedLoader: the same greedy packing and seeds), policy draws, AdamW and schedule gives the same losses,
    bitwise."""
    from umm_ops.train.recipes.sft import bare_loop

    assert bare_loop(_cfg(straight)) == [r["loss"] for r in read_metrics(straight)]


def test_logit_normal_timesteps_reach_the_packer_and_match_a_bare_loop(straight, tmp_path):
    """recipe.timesteps = logit_normal: the recipe's packer draws generated images' t with LogitNormalTimesteps
    (uniform is the default, Cheers'); the engine still equals the bare loop and differs from the uniform run."""
    from umm_ops.data.packing import LogitNormalTimesteps, UniformTimesteps
    from umm_ops.train.recipes.sft import SFTRecipe, bare_loop

    cfg = _cfg(tmp_path / "ln", job__steps=2, recipe__timesteps="logit_normal")
    model = SFTRecipe().build_model(cfg)
    assert isinstance(SFTRecipe().build_data(cfg, model).encode.spec.timestep_sampler, LogitNormalTimesteps)
    assert isinstance(SFTRecipe().build_data(_cfg(straight), model).encode.spec.timestep_sampler, UniformTimesteps)
    train(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "ln")]
    assert bare_loop(cfg) == losses and losses != [r["loss"] for r in read_metrics(straight)][:2]
    with pytest.raises(ConfigError, match="recipe.timesteps = 'cosine': must be one of"):
        Config.build("sft", overrides=["recipe.timesteps=cosine"])


def test_ema_and_export(tmp_path):
    """optim.ema: the EMA follows ema = d ema + (1 - d) param per step (checked against an independent recursion
    over the saved parameters of each step); `umm export --ema` writes those weights; TensorBoard events hold the
    logged losses."""
    from umm_ops.cli import main
    from umm_ops.model.checkpoint import read_safetensors_folder

    out = tmp_path / "run"
    d = 0.5
    train(_cfg(out, job__steps=2, checkpoint__every=1, optim__ema=d, metrics__tensorboard=True))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(out / "tensorboard"))
    ev.Reload()
    assert [e.value for e in ev.Scalars("train/loss")] == pytest.approx([r["loss"] for r in read_metrics(out)])
    p1, p2 = _dcp(out / "checkpoint-1"), _dcp(out / "checkpoint-2")
    ema2 = _dcp(out / "checkpoint-2", "ema")
    init = _dcp_init(out)
    for name in list(ema2)[:20]:
        want = d * (d * init[name] + (1 - d) * p1[name]) + (1 - d) * p2[name]
        torch.testing.assert_close(ema2[name], want.float(), rtol=1e-6, atol=1e-7)
    assert main(["export", str(out), "--out", str(tmp_path / "ema"), "--ema"]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "raw")]) == 0
    e, r = read_safetensors_folder(tmp_path / "ema"), read_safetensors_folder(tmp_path / "raw")
    name = next(n for n in ema2 if n.startswith("llm."))
    torch.testing.assert_close(e[name], ema2[name])
    torch.testing.assert_close(r[name], p2[name])


def _dcp_init(out):
    """The parameters at step 0: the recipe's model built as the engine builds it."""
    from umm_ops.train.recipes.sft import SFTRecipe
    from umm_ops.utils import seed_of

    torch.manual_seed(seed_of(0, "model-init"))
    return SFTRecipe().build_model(_cfg(out)).state_dict()


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key optim.learning_rate; \\[optim\\] has"):
        Config.build("sft", overrides=["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="optim.lr = 'fast' \\(str\\) is not a valid float"):
        Config.build("sft", overrides=["optim.lr=fast"])
    with pytest.raises(ConfigError, match="job.steps = 0: must be >= 1"):
        Config.build("sft", overrides=["job.steps=0"])
    with pytest.raises(ConfigError, match="recipe.image_size = 48: must be a multiple of 32"):
        Config.build("sft", overrides=["recipe.image_size=48"])
    with pytest.raises(ConfigError, match="recipe.tasks = \\('caption', 'dance'\\): must be distinct names"):
        Config.build("sft", overrides=["recipe.tasks=caption,dance"])
    with pytest.raises(ConfigError, match="parallel.mode = 'zero3' is not allowed; use one of"):
        Config.build("sft", overrides=["parallel.mode=zero3"])
    with pytest.raises(ConfigError, match="data.global_tokens = 1000: must be a multiple of data.budget = 384"):
        Config.build("sft", overrides=["data.budget=384", "data.global_tokens=1000"])
    with pytest.raises(ConfigError, match="mixed precision keeps float32 master weights"):
        Config.build("sft", overrides=["model.dtype=bfloat16", "parallel.mixed_precision=bf16"])
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        Config.build("sft", overrides=["optim.lr"])
    with pytest.raises(ConfigError, match="optim.lr = nan is not allowed"):
        Config.build("sft", overrides=["optim.lr=nan"])
    with pytest.raises(ValueError, match="unknown recipe 'dance'; recipes: \\[.*'sft'"):
        Config.build("dance")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optimizer]\nlr = 1\n")
    with pytest.raises(ConfigError, match="unknown section \\[optimizer\\]"):
        Config.build("sft", toml=bad)
    bad.write_text("[optim\nlr = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.build("sft", toml=bad)
    with pytest.raises(TypeError, match="expected a umm_ops.train.Config"):
        train({"steps": 3})


def test_lr_scales_groups_and_schedule():
    """optim.lr_scales: a parameter trains at scale * the scheduled lr (first matching prefix), decay stays on
    matrices only, a prefix matching nothing and a malformed item are errors."""
    from umm_ops.train.engine.optim import LRSchedule, build_optimizer

    model = torch.nn.ModuleDict({"vit": torch.nn.Linear(3, 4), "proj": torch.nn.Linear(4, 2),
                                 "llm": torch.nn.Linear(2, 2)})
    cfg = Config.build("sft", overrides=["optim.lr=0.01", "optim.lr_scales=vit.:0.1,proj.weight:0.5,proj.:0.25"])
    assert cfg.optim.lr_scales == ("vit.:0.1", "proj.weight:0.5", "proj.:0.25")
    opt = build_optimizer(model, cfg.optim)
    LRSchedule(0.01, steps=10, warmup=0, decay="constant").apply(opt, 3)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    wd = cfg.optim.weight_decay
    assert lr_of[id(model["vit"].weight)] == (pytest.approx(0.001), wd)
    assert lr_of[id(model["vit"].bias)] == (pytest.approx(0.001), 0.0)
    assert lr_of[id(model["proj"].weight)] == (pytest.approx(0.005), wd)
    assert lr_of[id(model["proj"].bias)] == (pytest.approx(0.0025), 0.0)
    assert lr_of[id(model["llm"].weight)] == (pytest.approx(0.01), wd)
    # one step of AdamW moves a parameter by ~its group's lr (the first Adam step is lr * sign(grad))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sum(m(torch.ones(1, m.in_features)).sum() for m in model.values()).backward()
    opt.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert moved["vit.bias"] == pytest.approx(0.001, rel=1e-3) and moved["llm.bias"] == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ValueError, match="match no trainable parameter"):
        build_optimizer(model, Config.build("sft", overrides=["optim.lr_scales=vision.:0.1"]).optim)
    for bad in ("vit.", "vit.:0", "vit.:fast", ":0.1"):
        with pytest.raises(ConfigError, match="optim.lr_scales: each item must be 'name-prefix:scale'"):
            Config.build("sft", overrides=[f"optim.lr_scales={bad}"])


def test_optimizer_implementations_agree():
    """optim.implementation: PyTorch's fused AdamW kernel (the default), foreach and for-loop give the same
    parameters after a few steps with lr scales and decay groups, up to float32 rounding (the kernels order the
    same arithmetic differently: a few ulps); an unknown name is refused."""
    from umm_ops.train.engine.optim import build_optimizer

    torch.manual_seed(0)
    ref = torch.nn.ModuleDict({"vit": torch.nn.Linear(16, 32), "llm": torch.nn.Linear(32, 8),
                               "norm": torch.nn.LayerNorm(8)})
    grads = [[torch.randn_like(p) for p in ref.parameters()] for _ in range(5)]
    out = {}
    for impl in ("fused", "foreach", "for-loop"):
        model = copy.deepcopy(ref)
        cfg = Config.build("sft", overrides=["optim.lr=0.01", "optim.lr_scales=vit.:0.1"]
                           + ([f"optim.implementation={impl}"] if impl != "fused" else []))
        opt = build_optimizer(model, cfg.optim)
        assert bool(opt.defaults.get("fused")) == (impl == "fused")
        for gs in grads:
            for p, g in zip(model.parameters(), gs):
                p.grad = g.clone()
            opt.step()
        out[impl] = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(out["fused"], ref.parameters()))
    for impl in ("foreach", "for-loop"):
        for a, b in zip(out["fused"], out[impl]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)   # parameters O(0.1-1): a few float32 ulps
    with pytest.raises(ConfigError, match="optim.implementation"):
        Config.build("sft", overrides=["optim.implementation=fast"])


def test_config_toml_round_trip_and_precedence(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('recipe_name = "sft"\n[optim]\nlr = 3e-4\nbetas = [0.8, 0.9]\n[job]\nsteps = 7\n[recipe]\n'
                 'tasks = ["vqa"]\n')
    cfg = Config.build("sft", toml=f, values={"job.steps": 9}, overrides=["optim.lr=1e-4"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.8, 0.9) and cfg.job.steps == 9
    assert cfg.recipe.tasks == ("vqa",)
    g = tmp_path / "again.toml"
    g.write_text(cfg.to_toml())
    assert Config.build("sft", toml=g).to_dict() == cfg.to_dict() == Config.from_dict(cfg.to_dict()).to_dict()


def test_cli_train_generate_export(tmp_path, capsys):
    """`python -m umm_ops train` in a fresh interpreter (the real entry point); the rest through cli.main."""
    from umm_ops.cli import main

    out = tmp_path / "demo"
    args = ["train", "--steps", "2", "--image-size", "32", "--budget", "384", "--out", str(out), "--device", "cpu"]
    res = subprocess.run([sys.executable, "-m", "umm_ops", *args, "--save-every", "1", "--log-every", "1",
                          "--eval-vqa", "2", "--eval-images", "1", "--eval-captions", "1", "--eval-steps", "2",
                          "--no-progress"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "step     2/2 | loss" in res.stdout and "eval vqa:" in res.stdout and "eval images:" in res.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 2 and summary["eval"]["vqa"]["n"] == 2 and summary["eval"]["images"]["n"] == 1
    for f in ("loss_curve.png", "eval/grid.png", "eval/generated-0.png", "config.toml",
              "checkpoint-2/trainer_state.json"):
        assert (out / f).is_file(), f
    assert main(args + ["--no-eval", "--no-progress"]) == 0   # a second `umm train` resumes: nothing left to do
    assert "resumed from checkpoint-2" in capsys.readouterr().out

    from PIL import Image

    png = tmp_path / "img.png"
    assert main(["generate", str(out), "--prompt", "a red circle", "--out", str(png), "--steps", "2"]) == 0
    assert Image.open(png).size == (32, 32)   # the checkpoint's default size is the size it was trained at
    assert main(["generate", str(out / "checkpoint-1"), "--prompt", "Describe the image.", "--text", "--image",
                 str(png), "--max-new-tokens", "4"]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "a red circle", "--out", str(png), "--steps",
                 "2"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["train", "--image-size", "40", "--out", str(tmp_path / "x")]) == 2
    assert "recipe.image_size = 40: must be a multiple of 32" in capsys.readouterr().err
    assert main(["train", "--set", "optim.lr=-1", "--out", str(tmp_path / "x")]) == 2
    assert "optim.lr = -1.0: must be a finite number > 0" in capsys.readouterr().err
    assert main(["train", "--list-recipes"]) == 0 and "sft" in capsys.readouterr().out.split()
    assert main(["train", "--recipe", "nope", "--steps", "1"]) == 2
    assert "unknown recipe 'nope'; recipes: ['clear-bridge', 'clear-grpo', 'clear-sft', 'flow-grpo', 'r3', 'sft', 'sgt', 'vae', 'vit']" in capsys.readouterr().err
    assert main(["train", "--print-config", "--lr", "3e-4", "--set", "job.steps=5"]) == 0
    printed = capsys.readouterr().out
    assert "lr = 0.0003" in printed and "steps = 5" in printed


def test_dataset_mix_is_deterministic():
    from umm_ops.train.recipes.sft import SyntheticSFTDataset

    ds = SyntheticSFTDataset(32, seed=3, records=20)
    assert len(ds) == 60
    assert [ds[i].meta["task"] for i in range(6)] == ["caption", "vqa", "generate"] * 2
    a, b = ds[4], SyntheticSFTDataset(32, seed=3, records=20)[4]
    assert [getattr(x, "text", None) for x in a.items] == [getattr(x, "text", None) for x in b.items]
    with pytest.raises(IndexError, match="out of range"):
        ds[60]


def test_dataset_task_weights_and_world_keys():
    from umm_ops.train.recipes.sft import SyntheticSFTDataset

    ds = SyntheticSFTDataset(32, seed=3, records=20, tasks=("caption", "vqa"), task_weights=(1, 3),
                             max_objects=2, kinds=("circle", "square"), colors=("red", "green", "blue", "yellow"),
                             two_tone=0.0)
    assert len(ds) == 80
    assert [ds[i].meta["task"] for i in range(8)] == ["caption", "vqa", "vqa", "vqa"] * 2
    # the repeats of a task on one record pick their questions independently (not the same one three times)
    picks = {tuple(ds[4 * r + k].items[1].text for k in (1, 2, 3)) for r in range(20)}
    assert any(len(set(p)) > 1 for p in picks)
    objs = [o for r in range(20) for o in ds.world[r].scene["objects"]]
    assert {o["kind"] for o in objs} <= {"circle", "square"} and {o["color"] for o in objs} <= {"red", "green",
                                                                                                 "blue", "yellow"}
    assert all(ds.world[r].scene["background"]["kind"] == "plain" for r in range(20))
    with pytest.raises(ConfigError, match="recipe.task_weights = \\(1, 2\\): must be \\(\\) or one int >= 1 per task"):
        Config.build("sft", overrides=["recipe.task_weights=1,2"])
    with pytest.raises(ConfigError, match="recipe.task_weights"):
        Config.build("sft", overrides=["recipe.task_weights=1,0,1"])
    # the default weights follow the tasks named (so --tasks alone never conflicts with them)
    assert Config.build("sft").recipe.tasks == ("caption", "vqa", "vqa_short", "generate", "segment")
    assert Config.build("sft").recipe.weights() == (2, 1, 1, 1, 1)
    assert Config.build("sft", overrides=["recipe.tasks=vqa,generate"]).recipe.weights() == (1, 1)
    # vqa_short: the record's questions answered with the word, vqa: with the option letter
    ds = SyntheticSFTDataset(32, seed=3, records=4, tasks=("vqa", "vqa_short"), max_objects=2)
    for r in range(4):
        mc, short = ds[2 * r], ds[2 * r + 1]
        assert "\nA. " in mc.items[1].text and mc.items[2].text[0] in "ABCD"
        assert "single word or phrase" in short.items[1].text and "\nA. " not in short.items[1].text
        q = next(q for q in ds.world[r].vqa if short.items[1].text.startswith(q["question"]))
        assert short.items[2].text.startswith(q["answer"]) and short.meta["task"] == "vqa"
    # vqa_chain: the same options, answered "<option> (<letter>)" and the end token
    ds = SyntheticSFTDataset(32, seed=3, records=4, tasks=("vqa_chain",), max_objects=2)
    for r in range(4):
        s = ds[r]
        q = next(q for q in ds.world[r].vqa if s.items[1].text.startswith(q["question"]))
        assert "\nA. " in s.items[1].text and s.items[1].text.endswith("then its letter.")
        assert s.items[2].text == f" {q['answer']} ({q['answer_letter']})<|im_end|>" and s.items[2].loss
        assert q["options"]["ABCD".index(q["answer_letter"])] == q["answer"] and s.meta["task"] == "vqa_chain"
    with pytest.raises(ConfigError, match="recipe.colors"):
        Config.build("sft", overrides=["recipe.colors=red,green"])
    cfg = Config.build("sft", overrides=["recipe.kinds=circle,square", "recipe.two_tone=0"])
    assert cfg.recipe.world_kwargs()["kinds"] == ("circle", "square")



def test_dataset_chat_task_reads_one_picture_for_three_turns():
    """chat: the record's picture once, then its caption, a multiple-choice question (the one a vqa slot would pick)
    and a short-answer question about another of its questions, in an order drawn per record (every order occurs);
    questions unsupervised, answers supervised and ending with the end token; deterministic; packs with the
    answers' tokens as the only labels."""
    from umm_ops.data.packing import ImageItem, TextItem, encode_sample
    from umm_ops.data.synthetic import END
    from umm_ops.train.recipes.sft import SyntheticSFTDataset

    ds = SyntheticSFTDataset(32, seed=3, records=60, tasks=("chat", "vqa"), max_objects=2)
    orders = set()
    for r in range(60):
        s, mc = ds[2 * r], ds[2 * r + 1]
        rec = ds.world[r]
        assert s.meta["task"] == "chat" and sorted(s.meta["turns"]) == ["caption", "vqa", "vqa_short"]
        assert isinstance(s.items[0], ImageItem) and s.items[0].role == "understand"
        assert torch.equal(s.items[0].image, rec.image.float() / 127.5 - 1.0)
        assert sum(isinstance(it, ImageItem) for it in s.items) == 1 and len(s.items) == 7
        qs, ans = s.items[1::2], s.items[2::2]
        assert all(isinstance(t, TextItem) and not t.loss for t in qs) and all(t.loss for t in ans)
        assert all(t.text.endswith(END) for t in ans)
        turn = dict(zip(s.meta["turns"], zip(qs, ans)))
        assert turn["caption"][0].text == "Describe the image." and turn["caption"][1].text == rec.caption + END
        assert turn["vqa"][0].text == mc.items[1].text and turn["vqa"][1].text == mc.items[2].text   # a vqa slot's
        short_q = next(q for q in rec.vqa if turn["vqa_short"][0].text.startswith(q["question"] + "\n"))
        assert "single word or phrase" in turn["vqa_short"][0].text
        assert turn["vqa_short"][1].text == short_q["answer"] + END
        if len(rec.vqa) > 1:   # another question than the multiple-choice one
            assert not mc.items[1].text.startswith(short_q["question"] + "\n")
        orders.add(tuple(s.meta["turns"]))
    assert len(orders) == 6
    again = SyntheticSFTDataset(32, seed=3, records=60, tasks=("chat", "vqa"), max_objects=2)[8]
    assert [getattr(x, "text", None) for x in again.items] == [getattr(x, "text", None) for x in ds[8].items]
    from umm_ops.data.packing import PackSpec
    from umm_ops.data.tokenizer import ByteTokenizer

    spec = PackSpec(ByteTokenizer(), patch=16)
    enc = encode_sample(ds[8], spec)
    assert len(enc.images) == 1 and len(enc.image_rows) == 1
    assert int(enc.labels.ne(-100).sum()) == sum(len(spec.tokenizer.encode(t.text)) for t in ds[8].items[2::2])


def test_captions_first_curriculum():
    """recipe.caption_first: epoch 0 of both loaders opens with that many caption samples (in the shuffled order),
    then every other sample once; later epochs are plain permutations; a curriculum that is not a permutation is an
    error."""
    from umm_ops.data.loader import PackedLoader, epoch_order
    from umm_ops.train.engine.data import ShardedLoader
    from umm_ops.train.recipes.sft import SFTRecipe, SyntheticSFTDataset

    ds = SyntheticSFTDataset(32, seed=3, records=20, tasks=("vqa", "caption"), task_weights=(2, 1), caption_first=8)
    plain = epoch_order(None, len(ds), 5, 0, True)
    o = epoch_order(ds, len(ds), 5, 0, True)
    assert sorted(o) == list(range(len(ds))) and o != plain
    assert [ds[i].meta["task"] for i in o[:8]] == ["caption"] * 8
    # the opening captions are the order's last ones: the mix after them keeps its share of captions
    assert o[:8] == [i for i in plain if i % 3 == 2][-8:] and o[8:] == [i for i in plain if i not in set(o[:8])]
    assert o[8:28] == plain[:20]
    assert epoch_order(ds, len(ds), 5, 1, True) == epoch_order(None, len(ds), 5, 1, True)
    ds.caption_first = 1000     # more than there are: every caption first, then the rest
    o = epoch_order(ds, len(ds), 5, 0, True)
    assert [ds[i].meta["task"] for i in o] == ["caption"] * 20 + ["vqa"] * 40
    ds.caption_first = 0
    assert epoch_order(ds, len(ds), 5, 0, True) == plain
    # the engine's loader and the bare loop's loader follow the same order
    import types

    from umm_ops.data.packing import PackSpec
    from umm_ops.data.tokenizer import load_tokenizer

    cfg = Config.build("sft", overrides=["recipe.image_size=32", "recipe.train_records=20", "recipe.caption_first=8"])
    ds = SFTRecipe()._dataset(cfg)
    assert ds.caption_first == 8
    want = epoch_order(ds, len(ds), 5, 0, True)
    assert [ds[i].meta["task"] for i in want[:8]] == ["caption"] * 8
    spec = PackSpec(tokenizer=load_tokenizer("world"), patch=32, budget=256)
    assert ShardedLoader(types.SimpleNamespace(dataset=ds), 256, seed=5).order(0) == want
    assert PackedLoader(ds, spec, seed=5).order(0) == want

    class Bad:
        def curriculum(self, order, epoch):
            return order[:-1] + order[:1]

    with pytest.raises(ValueError, match="Bad.curriculum must return a permutation of the 6 indices"):
        epoch_order(Bad(), 6, 0, 0, True)
    with pytest.raises(ConfigError, match="recipe.caption_first"):
        Config.build("sft", overrides=["recipe.caption_first=-1"])


def test_recipe_engine_defaults_sit_under_files_and_flags(tmp_path, capsys):
    """The sft recipe's base schedule (Recipe.engine_defaults) is the default; a TOML file, shorthands and --set
    override it; --help shows it."""
    from umm_ops.train.recipes.sft import SFTRecipe

    d = SFTRecipe().engine_defaults()
    cfg = Config.build("sft")
    vae = Config.build("vae")
    assert cfg.job.steps == d["job.steps"] != vae.job.steps and cfg.optim.lr == d["optim.lr"]
    assert cfg.optim.lr_scales == d["optim.lr_scales"] != vae.optim.lr_scales
    toml = tmp_path / "run.toml"
    toml.write_text("[job]\nsteps = 7\n")
    assert Config.build("sft", toml=str(toml)).job.steps == 7
    assert Config.build("sft", overrides=["optim.lr=1e-4"]).optim.lr == 1e-4
    from umm_ops.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert f"[job.steps, default {d['job.steps']}]" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_final_phase_resumes_exactly_and_matches_a_bare_loop(straight, tmp_path):
    """recipe.finish_at: from that step on the run trains on finish_tasks only (here understanding: no image to
    generate), logged as phase 1; a crash before the boundary (resume from checkpoint-2 into step 3, the first of
    the final phase) and one inside the final phase (from checkpoint-4) resume bitwise; the engine equals the bare
    loop, which switches its own PackedLoader at the same step."""
    from umm_ops.train.recipes.sft import bare_loop

    kw = dict(job__steps=6, recipe__finish_at=3, recipe__finish_tasks=("vqa", "vqa_short"),
              recipe__finish_weights=(2, 1))
    phased = tmp_path / "phased"
    train(_cfg(phased, **kw))
    a = read_metrics(phased)
    assert [r.get("phase") for r in a] == [0, 0, 1, 1, 1, 1]
    assert sum(r["flow_images"] for r in a[:2]) > 0 and all(r["flow_images"] == 0 for r in a[2:])
    assert all(r["read_images"] == r["docs"] for r in a[2:])   # every final-phase sample reads its picture
    assert bare_loop(_cfg(phased, **kw)) == [r["loss"] for r in a]
    for crash, resumed in ((3, 2), (5, 4)):
        cut = tmp_path / f"cut{crash}"
        with pytest.raises(_Crash):
            train(_cfg(cut, **kw), on_step=_crash_at(crash))
        assert train(_cfg(cut, **kw))["resumed_from_step"] == resumed
        b = read_metrics(cut)
        for ra, rb in zip(a, b, strict=True):
            for k in ("loss", "grad_norm", "tokens", "docs", "phase"):
                assert ra[k] == rb[k], (crash, ra["step"], k, ra[k], rb[k])
    # without the phase the steps from 3 on differ (the phase is what changed them)
    plain = read_metrics(straight)   # the same run without the phase (4 steps)
    assert [r["loss"] for r in plain][:2] == [r["loss"] for r in a[:2]]
    assert plain[2]["loss"] != a[2]["loss"] and "phase" not in plain[0]


def test_final_phase_config_errors(tmp_path):
    for kw, msg in [(dict(recipe__finish_at=1, recipe__finish_tasks=("vqa",)), "recipe.finish_at = 1: must be a step >= 2"),
                    (dict(recipe__finish_at=3), "recipe.finish_tasks = \\(\\): must be distinct names"),
                    (dict(recipe__finish_tasks=("vqa",)), "given exactly when finish_at > 0"),
                    (dict(recipe__finish_at=3, recipe__finish_tasks=("vqa", "vqa")), "must be distinct names"),
                    (dict(recipe__finish_at=3, recipe__finish_tasks=("vqa",), recipe__finish_weights=(1, 2)),
                     "recipe.finish_weights = \\(1, 2\\): must be \\(\\) or one int"),
                    (dict(recipe__finish_at=3, recipe__finish_tasks=("clear_data",)), "may name clear_data only")]:
        with pytest.raises(ConfigError, match=msg):
            _cfg(tmp_path / "x", **kw)


def test_latent_input_runs_evaluates_and_refuses_an_init_without_it(straight, tmp_path):
    """model.latent_input builds the head's latent input into a fresh model; the checkpoint loads back with it (eval /
    export rebuild the architecture from the run's config); it is run-defining; an init without it is refused."""
    from umm_ops.train.export import load_checkpoint_model

    out = tmp_path / "lat"
    train(_cfg(out, job__steps=2, checkpoint__every=2, model__latent_input=True))
    m = load_checkpoint_model(out)
    assert m.config.head.latent_input and m.head.latent_embed.weight.abs().sum() > 0   # trained off zero
    with pytest.raises(ValueError, match="cannot resume: the run was started with model.latent_input=True"):
        train(_cfg(out, job__steps=3, checkpoint__every=2))
    with pytest.raises(ConfigError, match="recipe.init .* is a model without the latent input"):
        train(_cfg(tmp_path / "b", job__steps=1, model__latent_input=True, recipe__init=str(straight)))
    # continuing a run that has it needs no flag: the checkpoint's architecture holds
    train(_cfg(tmp_path / "c", job__steps=1, recipe__init=str(out)))
    assert load_checkpoint_model(tmp_path / "c").config.head.latent_input
    # a checkpoint whose saved config does not describe its weights (the option dropped from trainer_state.json):
    # loading builds the architecture the checkpoint recorded; without that record (checkpoints before it) the
    # weights are refused by name, not loaded as the plain head; on resume too (resuming reads the config), and
    # the checkpoint is not set aside as corrupt
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    for ts in bad.glob("checkpoint-*/trainer_state.json"):
        st = json.loads(ts.read_text())
        st["config"]["model"]["latent_input"] = False
        ts.write_text(json.dumps(st))
    assert load_checkpoint_model(bad).config.head.latent_input
    for ts in bad.glob("checkpoint-*/trainer_state.json"):
        st = json.loads(ts.read_text())
        del st["model_config"]
        ts.write_text(json.dumps(st))
    with pytest.raises(ValueError, match=r"holds 2 model weight\(s\) .*\(head.latent_embed.bias, "
                                         r"head.latent_embed.weight\)"):
        load_checkpoint_model(bad)
    with pytest.raises(ValueError, match="head.latent_embed.bias"):
        train(_cfg(bad, job__steps=3, checkpoint__every=2))
    assert (bad / "checkpoint-2").is_dir() and not list(bad.glob("corrupt-*"))


def test_conv_widths_trains_loads_back_and_is_run_defining(straight, tmp_path):
    """The head's convolutional stage: the tiny preset has one (widths 64, 128, 192, beside the token stages, with
    the prompt's states and embeddings); model.conv_* (None: the preset's) change it for a fresh model (a TOML
    list; [] removes it); the checkpoint loads back with it; resuming with other values, or giving values an init
    does not have, is refused."""
    from umm_ops.train.export import load_checkpoint_model

    m = load_checkpoint_model(straight)                         # the defaults: the preset's stage
    h = m.config.head
    assert (h.conv_widths, h.conv_context, h.conv_inputs, h.conv_context_embeddings) == ((64, 128, 192), True,
                                                                                         "latent", True)
    plain = dict(model__conv_context=False, model__conv_inputs="all", model__conv_context_embeddings=False)
    out = tmp_path / "conv"
    train(_cfg(out, job__steps=2, checkpoint__every=2, model__conv_widths=[16, 32], **plain))
    m = load_checkpoint_model(out)
    assert m.config.head.conv_widths == (16, 32) and m.head.conv_stage.conv_out.weight.abs().sum() > 0
    assert m.head.conv_stage.pool_context is None and m.head.context_norm is None
    with pytest.raises(ValueError, match=r"cannot resume: the run was started with .*model.conv_widths=\[16, 32\]"):
        train(_cfg(out, job__steps=3, checkpoint__every=2))
    with pytest.raises(ConfigError, match=r"recipe.init .* has \[64, 128, 192\]"):
        train(_cfg(tmp_path / "b", job__steps=1, model__conv_widths=[16, 32], recipe__init=str(straight)))
    with pytest.raises(ValueError, match="head.conv_widths must be"):
        train(_cfg(tmp_path / "c", job__steps=1, model__conv_widths=[12]))
    # Cheers' head on the tiny preset ([] takes the preset's options of the stage with it); an init without a
    # stage refuses one
    train(_cfg(tmp_path / "none", job__steps=1, model__conv_widths=[]))
    m = load_checkpoint_model(tmp_path / "none")
    assert m.head.conv_stage is None and m.head.context_norm is None and not m.config.head.conv_context
    with pytest.raises(ConfigError, match="has no convolutional stage"):
        train(_cfg(tmp_path / "b2", job__steps=1, model__conv_widths=[16, 32], recipe__init=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="head.conv_context = True needs the convolutional stage"):
        train(_cfg(tmp_path / "b3", job__steps=1, model__conv_widths=[], model__conv_context=True))
    # the prompt context: an init whose stage lacks it is refused
    with pytest.raises(ConfigError, match="has no prompt context in its convolutional stage"):
        train(_cfg(tmp_path / "d", job__steps=1, model__conv_widths=[16, 32], model__conv_context=True,
                   recipe__init=str(out)))
    # the stage alone (the token stages get no gradient: test_model_head): it trains and loads back
    train(_cfg(tmp_path / "alone", job__steps=1, model__conv_widths=[16, 32], model__conv_inputs="alone",
               model__conv_context_embeddings=False))
    m = load_checkpoint_model(tmp_path / "alone")
    assert m.config.head.conv_inputs == "alone" and m.head.conv_stage.conv_out.weight.abs().sum() > 0
    with pytest.raises(ValueError, match="conv_inputs = 'alone' needs head.conv_context = True"):
        train(_cfg(tmp_path / "e", job__steps=1, model__conv_widths=[16, 32], model__conv_inputs="alone",
                   model__conv_context=False, model__conv_context_embeddings=False))
    # the prompt's input embeddings in that context: trained, loaded back; an init without them is refused
    train(_cfg(tmp_path / "emb", job__steps=4, model__conv_widths=[16, 32], model__conv_inputs="alone"))
    m = load_checkpoint_model(tmp_path / "emb")   # (4 steps: the first moves only the zero-initialised conv_out)
    assert m.config.head.conv_context_embeddings and m.head.context_norm.weight.ne(1).any()
    with pytest.raises(ConfigError, match="has no input embeddings in its prompt context"):
        train(_cfg(tmp_path / "f", job__steps=1, model__conv_context_embeddings=True, recipe__init=str(tmp_path / "alone")))


def test_a_run_from_an_init_loads_without_it(tmp_path, monkeypatch):
    """Every checkpoint records the architecture it saved (model_config): a run started from recipe.init loads
    (eval / export / generate) with its init gone, or named relative to another directory, even when the init's
    architecture is not the preset's - to the same weights as loading through the init.  A checkpoint without the
    record (written before it existed) still needs its init and says so."""
    from umm_ops.train.engine.checkpoint import STATE_FILE, load_model_state, read_trainer_state
    from umm_ops.train.engine.trainer import _recorded
    from umm_ops.train.export import load_checkpoint_model
    from umm_ops.train.spec import get_recipe

    work = tmp_path / "work"
    work.mkdir()
    # the init: not the preset's head, and another world than the defaults
    train(_cfg(work / "base", job__steps=1, model__conv_widths=[16, 32], recipe__max_objects=1))
    monkeypatch.chdir(work)
    child = tmp_path / "child"
    train(_cfg(child, job__steps=2, checkpoint__every=2, recipe__init="base"))       # relative to `work`
    ck = latest_checkpoint(child)
    st = read_trainer_state(ck)
    assert st["model_config"]["head"]["conv_widths"] == [16, 32]
    cfg = Config.from_dict(st["config"])
    assert cfg.recipe.init == "base"
    through_init = get_recipe("sft").build_model(cfg)       # the way before the record: rebuilt from the init
    load_model_state(ck, through_init)
    monkeypatch.chdir(tmp_path)                             # "base" no longer names it ...
    shutil.move(work / "base", tmp_path / "moved")          # ... nor does any path
    m = load_checkpoint_model(child)
    assert m.config.head.conv_widths == (16, 32)
    _same(m.state_dict(), through_init.state_dict(), "model")
    # flow-grpo (and its family) read their world from the init: recorded too (`umm eval` draws from it)
    rl = Config.build("flow-grpo", values={"recipe.init": str(tmp_path / "moved"), "job.out": str(tmp_path / "r")})
    rec = _recorded(get_recipe("flow-grpo"), rl, m)
    assert rec["world"]["max_objects"] == 1
    # a checkpoint written before the record: rebuilt from its init, which must be there
    st.pop("model_config")
    (ck / STATE_FILE).write_text(json.dumps(st))
    with pytest.raises(FileNotFoundError, match=r"recipe.init 'base'.*relative paths are read from"):
        load_checkpoint_model(child)
    monkeypatch.chdir(work)
    shutil.move(tmp_path / "moved", work / "base")
    _same(load_checkpoint_model(child).state_dict(), through_init.state_dict(), "model")


def test_embedding_multiplier_is_a_fresh_models_and_run_defining(straight, tmp_path):
    """model.embedding_multiplier builds the LLM with it (the checkpoint loads back with it); resuming with another
    value, or giving another value than recipe.init's, is refused; the same value as the init's is accepted."""
    from umm_ops.train.export import load_checkpoint_model

    out = tmp_path / "em"
    train(_cfg(out, job__steps=1, checkpoint__every=1, model__embedding_multiplier=50))
    assert load_checkpoint_model(out).llm.config.embedding_multiplier == 50.0
    with pytest.raises(ValueError, match="cannot resume: the run was started with model.embedding_multiplier=50"):
        train(_cfg(out, job__steps=2, checkpoint__every=1))
    with pytest.raises(ConfigError, match="model.embedding_multiplier = 50.*was trained with 1.0"):
        train(_cfg(tmp_path / "b", job__steps=1, model__embedding_multiplier=50, recipe__init=str(straight)))
    train(_cfg(tmp_path / "c", job__steps=1, model__embedding_multiplier=50, recipe__init=str(out)))
    assert load_checkpoint_model(tmp_path / "c").llm.config.embedding_multiplier == 50.0


def test_latent_to_llm_trains_and_runs_older_than_a_key_still_resume(straight, tmp_path):
    """model.latent_to_llm builds the LLM's latent input into a fresh model and loads back with it; an init without
    it is refused.  A run whose saved config predates an engine key (here: no model.latent_to_llm) resumes with the
    key at its default instead of being refused as a changed run-defining setting."""
    from conftest import read_metrics

    from umm_ops.train.export import load_checkpoint_model

    out = tmp_path / "l2l"
    train(_cfg(out, job__steps=2, checkpoint__every=2, model__latent_to_llm=True))
    m = load_checkpoint_model(out)
    assert m.config.latent_to_llm and m.latent_to_llm.proj.weight.abs().sum() > 0   # trained off zero
    with pytest.raises(ConfigError, match="recipe.init .* is a model without it"):
        train(_cfg(tmp_path / "b", job__steps=1, model__latent_to_llm=True, recipe__init=str(straight)))
    old = tmp_path / "old"
    shutil.copytree(straight, old)
    for ts in old.glob("checkpoint-*/trainer_state.json"):
        st = json.loads(ts.read_text())
        del st["config"]["model"]["latent_to_llm"]
        ts.write_text(json.dumps(st))
    train(_cfg(old, job__steps=5))
    assert [r["step"] for r in read_metrics(old) if "loss" in r] == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="cannot resume: the run was started with model.latent_to_llm=False"):
        train(_cfg(old, job__steps=6, model__latent_to_llm=True))


def test_vae_compute_dtype_default_record_init_and_resume(straight, tmp_path):
    """model.vae_compute_dtype: the base schedule's default is bf16 for the frozen VAE, recorded in its checkpoints;
    "model" computes it in the model's dtype (a different first loss, within bf16's error); the setting is
    run-defining, and it applies to a model from recipe.init too (not architecture)."""
    from umm_ops.train.export import load_checkpoint_model

    assert Config.build("sft").model.vae_compute_dtype == "bfloat16"
    assert load_checkpoint_model(straight).config.vae.compute_dtype == "bfloat16"
    out = tmp_path / "fp32"
    train(_cfg(out, job__steps=1, checkpoint__every=1, model__vae_compute_dtype="model"))
    assert load_checkpoint_model(out).config.vae.compute_dtype is None
    a, b = read_metrics(straight)[0]["loss"], read_metrics(out)[0]["loss"]
    assert a != b and b == pytest.approx(a, rel=2e-2)
    with pytest.raises(ValueError, match="cannot resume: the run was started with model.vae_compute_dtype="):
        train(_cfg(out, job__steps=2, checkpoint__every=1))
    train(_cfg(tmp_path / "init", job__steps=1, recipe__init=str(out)))
    assert load_checkpoint_model(tmp_path / "init").config.vae.compute_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="model.vae_compute_dtype"):
        Config.build("sft", overrides=["model.vae_compute_dtype=float16"])
