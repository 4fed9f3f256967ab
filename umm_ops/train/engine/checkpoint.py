"""Checkpoints of a run (torch.distributed.checkpoint), the run-folder lock, and export to save_pretrained.

Layout of ``out/checkpoint-{step}/``::

    dcp/                     model, optimizer and EMA state through DCP (sharded per rank under FSDP2; resharded
                             on load, so a checkpoint loads on another world size)
    rng/rank{r}.safetensors  torch's CPU (and CUDA) generator states of rank r; rng/rank{r}.json Python's
    trainer_state.json       step, config, world size, loader / schedule / train state, the saved model's
                             architecture (``model_config``: its CheersConfig, so that eval / export / generate
                             need nothing outside the run folder, not even its recipe.init) and, for recipes that
                             read their world from recipe.init, that world (``world``); and a manifest of every
                             other file (size and BLAKE2b), written last by rank 0

A checkpoint is complete or absent: every rank writes into ``.tmp-checkpoint-{step}``; after a barrier rank 0
hashes the files, writes trainer_state.json, fsyncs the tree and renames the folder into place.  Old checkpoints
are pruned by renaming them to ``.trash-*`` first (atomic) and deleting after, so a crash mid-delete leaves a
``.trash-*`` folder that the next run removes, never a half-deleted ``checkpoint-*``.  On resume the newest
checkpoint whose manifest matches its files is loaded; a corrupt one (truncated, garbage, missing files) is
reported by name and the next older one is tried; if none is intact the run stops instead of starting over.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
import warnings
from pathlib import Path

import torch

from ...utils import fsync_tree, optional_import
from .optim import canonical_name

__all__ = ["RunLock", "RunFolderBusy", "Checkpointer", "CorruptCheckpoint", "complete_checkpoints",
           "latest_checkpoint", "read_trainer_state", "load_model_state", "FORMAT", "VERSION"]

FORMAT = "umm_ops-checkpoint"
VERSION = 2
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"
TRASH_PREFIX = ".trash-"
STATE_FILE = "trainer_state.json"


class RunFolderBusy(RuntimeError):
    """Another live run holds the run folder's lock."""


class CorruptCheckpoint(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive lock on a run folder (``out/.lock``: ``flock`` on the file, the holder's pid / host / start time
    written inside).  The kernel releases a flock when its process dies, so the lock of a killed run is stale by
    construction: the next run takes it over and says whose it was."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self._fd = None
        self.previous = None   # the info of a stale lock taken over

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_lock(fd)
            os.close(fd)
            who = (f"pid {info.get('pid')} on {info.get('host')}, started "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.get('time', 0)))}") if info else \
                "another process"
            raise RunFolderBusy(f"run folder {self.folder} is in use by a live run ({who}); wait for it to finish, "
                                f"stop it, or use another --out") from None
        info = _read_lock(fd)
        if info:
            self.previous = info
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_lock(fd) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------------------------- scanning
def read_trainer_state(folder) -> dict:
    folder = Path(folder)
    try:
        with open(folder / STATE_FILE) as f:
            st = json.load(f)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{folder}: {STATE_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{folder}: {STATE_FILE} is unreadable ({e})") from None
    if not isinstance(st, dict) or st.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{folder}: {STATE_FILE} is not a {FORMAT} state")
    if st.get("version") != VERSION:
        raise CorruptCheckpoint(f"{folder}: checkpoint version {st.get('version')!r}, this engine reads version "
                                f"{VERSION}")
    return st


def complete_checkpoints(out) -> list:
    """[(step, folder)] of the folders named checkpoint-{step}, oldest first (complete by construction unless
    damaged afterwards; :meth:`Checkpointer.verify` checks)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out):
    """The newest checkpoint folder of a run folder whose trainer_state.json reads, or None."""
    for _, p in reversed(complete_checkpoints(out)):
        try:
            read_trainer_state(p)
            return p
        except CorruptCheckpoint:
            continue
    return None


def file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest(folder: Path, hashed: bool) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != STATE_FILE:
            rel = str(p.relative_to(folder))
            out[rel] = [p.stat().st_size, file_hash(p) if hashed else None]
    return out


def describe_load_error(folder: Path, e: BaseException) -> str:
    """Why reading `folder`'s dcp/ state failed, for a log line or an error: the exception without torch's advice
    to retry with ``weights_only=False`` (never the right move for a damaged or foreign file: it runs whatever
    the pickle says), and the file at fault - the dcp/ file whose hash differs from the manifest when hashes were
    recorded, else the dcp/ files that could be."""
    failures = getattr(e, "failures", None)  # DCP's CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))[0]
    msg = str(e)
    if "weights_only" in msg:  # torch.load's weights-only unpickler refused the bytes
        detail = msg.rsplit("WeightsUnpickler error:", 1)[-1].strip() if "WeightsUnpickler error:" in msg else ""
        detail = detail.splitlines()[0] if detail else ""
        msg = "the pickled data is not a checkpoint's" + (f" ({detail})" if detail else "") + \
            "; it is never loaded with weights_only=False"
    files = {}
    with contextlib.suppress(Exception):
        files = {rel: dg for rel, (_, dg) in read_trainer_state(folder)["files"].items() if rel.startswith("dcp/")}
    bad = [rel for rel, dg in files.items() if dg is not None and file_hash(folder / rel) != dg]
    if bad:
        where = f"{', '.join(bad)} does not match its hash (damaged)"
    else:
        names = sorted(files) or sorted(str(p.relative_to(folder)) for p in (folder / "dcp").glob("*"))
        where = f"one of {', '.join(names)} is damaged (no hashes recorded to tell which; checkpoint.verify=hash)"
    return f"{type(e).__name__}: {msg[:600]} - {where}"


def _load_errors():
    """What a failed dcp.load raises: any Exception, and DCP's CheckpointException (a BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def _safe_planner():
    """DCP's default load planner unpickles the non-tensor entries of a checkpoint (the optimizer's param groups,
    steps stored as objects) with torch.load(weights_only=False): a damaged or crafted file would run whatever it
    says.  This one reads them with weights_only=True (plain containers, numbers, strings, tensors)."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, with its own helper
                from torch.distributed.checkpoint import default_planner

                default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


# ----------------------------------------------------------------------------------------------- state dicts
@contextlib.contextmanager
def _quiet():
    """DCP warns on every single-process save / load that it 'assumes the intent' to run without a process group:
    that is this engine's intent, so the warning says nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dcp_state(model, optimizer, ema) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def check_weight_names(folder, model_state, prefix: str = "model") -> None:
    """Refuse a checkpoint that holds model weights the model being loaded does not have.  DCP reads only the keys
    it is asked for, so such weights would be dropped without a word: e.g. a head option (``latent_input``) that
    the saved config does not record would load as the plain head and give other results.  A checkpoint whose
    metadata cannot be read is left to the load itself (which reports the damage)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        saved = FileSystemReader(str(Path(folder) / "dcp")).read_metadata().state_dict_metadata
    except Exception:   # damaged: the load that follows fails and says so
        return
    cut = len(prefix) + 1
    extra = sorted(k[cut:] for k in saved if k.startswith(prefix + ".") and k[cut:] not in model_state)
    if extra:
        shown = ", ".join(extra[:6]) + (f" and {len(extra) - 6} more" if len(extra) > 6 else "")
        what = "EMA weight(s)" if prefix == "ema" else "model weight(s)"
        raise ValueError(f"{folder}: the checkpoint holds {len(extra)} {what} that the model built from its "
                         f"saved config does not have ({shown}): the config does not describe the model that was "
                         f"saved (a model option set outside the config?); not loading it without them")


def _set_dcp_state(model, optimizer, ema, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ema is not None:
        ema.load_state_dict(state["ema"])


def _rng_state(device: torch.device):
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def _set_rng_state(tensors: dict, plain: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------------------------- checkpointer
class Checkpointer:
    def __init__(self, out, dist, keep_last: int = 2, verify: str = "hash", log=print):
        self.out, self.dist, self.keep_last, self.verify_mode, self.log = Path(out), dist, keep_last, verify, log

    # ------------------------------------------------------------------ housekeeping
    def clean_leftovers(self) -> None:
        """Remove what killed runs left (temporary and half-deleted folders); rank 0, under the run lock."""
        if not self.dist.is_main or not self.out.is_dir():
            return
        for p in self.out.iterdir():
            if p.name.startswith((TMP_PREFIX, TRASH_PREFIX)) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def _discard(self, folder: Path) -> None:
        """Rename then delete (rank 0): never a half-deleted checkpoint-* folder."""
        trash = self.out / f"{TRASH_PREFIX}{folder.name}-{os.getpid()}-{time.time_ns()}"
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ save
    def save(self, step: int, model, optimizer, ema, train_state: dict) -> Path:
        import torch.distributed.checkpoint as dcp
        save_file = optional_import("safetensors.torch", "save_file")

        d = self.dist
        tmp = self.out / f"{TMP_PREFIX}{step}"
        final = self.out / f"checkpoint-{step}"
        if d.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "rng").mkdir(parents=True)
        d.barrier()
        with _quiet():
            dcp.save(_dcp_state(model, optimizer, ema), checkpoint_id=str(tmp / "dcp"))
        tensors, plain = _rng_state(d.device)
        save_file(tensors, str(tmp / "rng" / f"rank{d.rank}.safetensors"))
        with open(tmp / "rng" / f"rank{d.rank}.json", "w") as f:
            json.dump(plain, f)
        d.barrier()
        if d.is_main:
            state = dict(train_state, format=FORMAT, version=VERSION, step=step, world_size=d.world_size,
                         torch=torch.__version__, time=time.time(),
                         files=_manifest(tmp, hashed=self.verify_mode == "hash"))
            with open(tmp / STATE_FILE, "w") as f:   # last: the folder is now complete
                json.dump(state, f, indent=1)
            fsync_tree(tmp)
            if final.exists():   # the same step saved again (a resumed run): set the old copy aside first
                self._discard(final)
            os.replace(tmp, final)
            for _, p in complete_checkpoints(self.out)[:-self.keep_last]:
                self._discard(p)
        d.barrier()
        return final

    # ------------------------------------------------------------------ verify / load
    def verify(self, folder: Path) -> dict:
        """The trainer state of an intact checkpoint, or CorruptCheckpoint saying what is wrong."""
        st = read_trainer_state(folder)
        files = st.get("files")
        if not isinstance(files, dict) or not files:
            raise CorruptCheckpoint(f"{folder}: {STATE_FILE} has no file manifest")
        for rel, (size, digest) in files.items():
            p = folder / rel
            if not p.is_file():
                raise CorruptCheckpoint(f"{folder}: {rel} is missing")
            if p.stat().st_size != size:
                raise CorruptCheckpoint(f"{folder}: {rel} has {p.stat().st_size} bytes, the manifest says {size} "
                                        f"(truncated or overwritten)")
            if digest is not None and self.verify_mode == "hash" and file_hash(p) != digest:
                raise CorruptCheckpoint(f"{folder}: {rel} does not match its BLAKE2b hash (the file was altered)")
        if not any(r.startswith("dcp/") for r in files):
            raise CorruptCheckpoint(f"{folder}: no dcp/ state in the manifest")
        return st

    def load_latest(self, model, optimizer, ema, check=None):
        """Load the newest intact checkpoint into model / optimizer / EMA and this rank's RNG.  Returns (folder,
        trainer state) or (None, None) when the folder has no checkpoint.  Raises when checkpoints exist but none
        is intact (never starts over silently).  ``check(trainer_state)`` runs before the weights are read (a
        config that cannot resume raises there, before a shape mismatch could be mistaken for corruption)."""
        import torch.distributed.checkpoint as dcp
        load_file = optional_import("safetensors.torch", "load_file")

        d = self.dist
        candidates = [p for _, p in reversed(complete_checkpoints(self.out))]
        if not candidates:
            return None, None
        problems = []
        for folder in candidates:
            err = None
            st = None
            if d.is_main:
                try:
                    st = self.verify(folder)
                except CorruptCheckpoint as e:
                    err = str(e)
            err = d.broadcast_object(err)
            if err is None:
                st = d.broadcast_object(st)
                if check is not None:
                    check(st)
                state = _dcp_state(model, optimizer, ema)
                check_weight_names(folder, state["model"])   # a config mismatch, not damage: raised, not skipped
                try:
                    with _quiet():
                        dcp.load(state, checkpoint_id=str(folder / "dcp"), planner=_safe_planner())
                    _set_dcp_state(model, optimizer, ema, state)
                except _load_errors() as e:  # any failure to read makes this checkpoint unusable
                    err = f"{folder}: loading failed: {describe_load_error(folder, e)}"
                errs = [e for e in d.all_gather_object(err) if e]
                err = errs[0] if errs else None
            if err is not None:
                problems.append(err)
                self.log(f"checkpoint {folder.name} is corrupt, skipped: {err}")
                continue
            for bad in candidates[:candidates.index(folder)]:   # set the corrupt ones aside (kept, never loaded)
                if d.is_main and bad.exists():
                    aside = self.out / f"corrupt-{bad.name}-{time.strftime('%Y%m%d-%H%M%S')}"
                    os.replace(bad, aside)
                    self.log(f"moved the corrupt {bad.name} to {aside.name} (kept for inspection, never loaded)")
            d.barrier()
            if problems:
                self.log(f"resuming from the newest intact checkpoint, {folder.name} (newer ones were corrupt)")
            rng = folder / "rng" / f"rank{d.rank}.safetensors"
            if st.get("world_size") == d.world_size and rng.is_file():
                with open(folder / "rng" / f"rank{d.rank}.json") as f:
                    _set_rng_state(load_file(str(rng)), json.load(f), d.device)
            elif d.is_main:
                self.log(f"note: {folder.name} was written by {st.get('world_size')} rank(s), this run has "
                         f"{d.world_size}: the data stream continues; the global RNG states are not restored (every "
                         f"random draw of the engine and recipes is seeded by step and sample, not by them)")
            return folder, st
        raise CorruptCheckpoint(f"{self.out}: every checkpoint is corrupt, not resuming and not starting over "
                                f"silently:\n  " + "\n  ".join(problems) +
                                "\nremove the damaged folders or start over with --no-resume")


def load_model_state(folder, model, ema: bool = False) -> None:
    """Load a checkpoint's model weights (or its EMA weights) into a bare, unsharded model (one process): what
    ``umm export`` uses."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    read_trainer_state(folder)
    if ema:
        names = {canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        state = {"ema": {n: torch.empty_like(p, dtype=torch.float32) for n, p in names.items()}}
        check_weight_names(folder, names, "ema")
        try:
            with _quiet():
                dcp.load(state, checkpoint_id=str(folder / "dcp"), planner=_safe_planner())
        except _load_errors() as e:
            raise ValueError(f"{folder}: no EMA weights in this checkpoint (train with optim.ema > 0), or it is "
                             f"unreadable: {describe_load_error(folder, e)}") from None
        with torch.no_grad():
            for n, p in names.items():
                p.copy_(state["ema"][n])
        return
    state = {"model": model.state_dict()}
    check_weight_names(folder, state["model"])
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(folder / "dcp"), planner=_safe_planner())
    except _load_errors() as e:
        raise ValueError(f"{folder}: cannot read the model weights: {describe_load_error(folder, e)}") from None
    model.load_state_dict(state["model"])

