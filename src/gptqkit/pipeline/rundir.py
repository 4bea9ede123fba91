"""The run folder `<out>.partial/`: what makes a quantization run resumable and its output
deterministic.

Layout while a run is in progress:

    <out>.partial/
      run_state.json                 fingerprint of the inputs, next block, layer logs
      blocks/block-00012.safetensors every output tensor of block 12 (GPTQ tensors and originals)
      hidden/in-00013-c0000.safetensors   what block 13 receives, per calibration chunk
      hidden/fp-00013-c0000.safetensors   [GPTAQ] the same in the full-precision model
      outside.safetensors            embeddings, final norm, lm_head (written last)
      config.json, tokenizer …       side files, written before finalize

After block i is solved, its tensors and block i+1's input hidden states are written and
fsynced, and only then is run_state.json replaced atomically (temporary file + os.replace).
A run killed at any point (SIGKILL included) therefore finds a state whose files are complete,
and `resume` continues at `next_block` from exactly the hidden states an uninterrupted run
would have had. `finalize()` assembles the final shards by copying bytes from the per-block
files in block order, so shard boundaries and bytes do not depend on where a run stopped.

Without `resume`, an existing `.partial` folder is discarded (logged). With `resume`, a folder
whose inputs differ (another model or changed weight files, config, calibration set, batch size,
dtype or world size) is refused with ResumeError naming what differs; a folder without a state
starts over. The source weights are identified by a digest of each file (size, mtime, the
safetensors header and sampled bytes), so weights swapped under the same file name are caught.

One run at a time: the writing process holds an exclusive flock on `<out>.partial/.lock`
(which records its PID) from before it touches the folder until the folder is published, so a
second run on the same `--out` refuses instead of deleting the first run's blocks. An existing
`out` is replaced (with overwrite) only when it is a checkpoint or empty, never a folder of
other files, and only after the new checkpoint is complete beside it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ResumeError
from ..formats.checkpoint import (COMPLETE_MARK, assemble_shards, publish, read_header, write_error,
                                  write_safetensors)

log = logging.getLogger(__name__)

STATE_FILE = "run_state.json"
STATE_VERSION = 2  # 2: the state records the inputs themselves (with file digests), not only their hash
LOCK_FILE = ".lock"
_SAMPLES, _SAMPLE_BYTES = 16, 64 << 10


def file_digest(path: Path) -> str:
    """Identifies a weight file's content without reading all of it: size, mtime, the safetensors
    header and 16 evenly spaced 64 KiB samples (a full hash of an 8B model's 16 GB would cost
    tens of seconds at every start)."""
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        h.update(head + f.read(min(n, st.st_size)))
        for j in range(_SAMPLES):
            f.seek(st.st_size * j // _SAMPLES)
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]


def _tensor_digest(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    h = hashlib.sha256()
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(model_path: Path, source_files: list[Path], config: dict[str, Any], input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, **extra: Any) -> dict[str, Any]:
    """What must match for a resumed run to produce the same bytes as an uninterrupted one, as
    JSON-able data, so a refusal can say what differs."""
    return json.loads(json.dumps({
        "model": str(Path(model_path).resolve()),
        "weights": {f.name: file_digest(f) for f in sorted(source_files)},
        "config": config,
        "calibration": {"input_ids": _tensor_digest(input_ids), "attention_mask": _tensor_digest(attention_mask)},
        **extra}, sort_keys=True, default=str))


def _digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of what differs between two fingerprints."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            sub = [s for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
            what = {"weights": "weight file(s) changed", "calibration": "calibration"}.get(k, k)
            out.append(f"{what}: {', '.join(sub[:6])}" + (" …" if len(sub) > 6 else ""))
        else:
            out.append(f"{k}: {a!r} then, {b!r} now")
    return out


def check_replaceable(out: Path) -> None:
    """`overwrite` replaces a previous checkpoint or an empty folder, never other files."""
    from ..config import QuantizeConfig
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} is a file, not a folder; choose another output path")
    entries = sorted(p.name for p in out.iterdir())
    try:
        is_ckpt = QuantizeConfig.find(out) is not None
    except CheckpointError:
        is_ckpt = False
    if entries and not is_ckpt:
        raise CheckpointError(
            f"{out} is not a quantized checkpoint (it holds {', '.join(entries[:8])}"
            + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
            + "); overwrite only replaces a checkpoint. Choose another output folder or empty this one")


def check_out(out: str | Path, model_path: str | Path | None, *, overwrite: bool, resume: bool) -> Path:
    """Refuse a bad output path before any work is spent on it; returns it absolute."""
    out = Path(out).expanduser().resolve()  # `--out .` has an empty name; the resolved path does not
    if model_path is not None:
        src = Path(str(model_path)).expanduser()
        if src.is_dir() and (out == src.resolve() or src.resolve() in out.parents):
            raise CheckpointError(f"output {out} is the input model folder or inside it; choose another folder")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} is a file, not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not (overwrite or resume):
            raise CheckpointError(f"output {out} exists and is not empty; pass --overwrite (overwrite=True) "
                                  "to replace a previous checkpoint, or choose another folder")
        if overwrite:
            check_replaceable(out)
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot write output {out}: {parent} is not writable")
    return out


# locks this process holds, by folder: a run abandoned by an exception in this same process (its
# RunDir still referenced by a traceback) must not block the next run of the process
_HELD: dict[str, int] = {}


def _lock(folder: Path) -> int:
    """Exclusive flock on folder/.lock, recording our PID; refuse if another process holds it."""
    key = str(folder.resolve())
    if key in _HELD:
        os.close(_HELD.pop(key))
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise CheckpointError(f"another gptqkit run (PID {holder}) is writing {folder}; wait for it to "
                                  "finish or stop it, or choose another output folder") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd
    return fd


def _unlock(folder: Path, remove: bool = False) -> None:
    """Close our lock. The file stays unless `remove` (when the folder is about to become the
    checkpoint): unlinking a lock file others may have opened would let two runs lock two inodes."""
    fd = _HELD.pop(str(folder.resolve()), None)
    if fd is not None:
        if remove:
            (folder / LOCK_FILE).unlink(missing_ok=True)
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunDir:
    """The `.partial` folder of one run. Only the writing rank creates one."""

    def __init__(self, out: str | Path, fingerprint: dict[str, Any], *, overwrite: bool = False,
                 resume: bool = False, max_shard_bytes: int = 2 << 30, rank: int | None = None):
        """fingerprint: the run's inputs (see fingerprint()). rank: None for a single process; under
        torch.distributed rank 0 creates the folder and the other ranks open it afterwards (only
        their hidden states are theirs to write)."""
        self.out = Path(out)
        self.rank = rank
        self.tmp = self.out.with_name(self.out.name + ".partial")
        self.inputs, self.overwrite, self.max_shard_bytes = fingerprint, overwrite, max_shard_bytes
        self.fingerprint = _digest(fingerprint)
        self.state: dict[str, Any] | None = None
        st = self.tmp / STATE_FILE
        if rank:  # a follower: read the state rank 0 has validated, touch nothing else
            self.state = json.loads(st.read_text()) if resume and st.is_file() else None
            return
        if self.out.exists():
            if not overwrite:
                raise CheckpointError(f"{self.out} already exists; choose another --out or pass overwrite")
            check_replaceable(self.out)
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            _lock(self.tmp)  # before anything in the folder is read or removed
        except OSError as e:
            raise write_error(self.tmp, e) from e
        if resume and st.is_file():
            self.state = self._validated_state(st)
            log.info("resuming %s at block %d", self.tmp, self.state["next_block"])
        else:
            if resume:
                log.info("nothing to resume at %s; starting from the beginning", self.tmp)
            elif any(p.name != LOCK_FILE for p in self.tmp.iterdir()):
                log.warning("discarding the unfinished run in %s (pass --resume / resume=True to continue it)",
                            self.tmp)
            for p in self.tmp.iterdir():
                if p.name != LOCK_FILE:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        try:
            for d in (self.tmp / "blocks", self.tmp / "hidden"):
                d.mkdir(exist_ok=True)
        except OSError as e:
            raise write_error(self.tmp, e) from e

    def _validated_state(self, st: Path) -> dict[str, Any]:
        try:
            state = json.loads(st.read_text())
        except ValueError as e:
            raise ResumeError(f"{st} is unreadable ({e}); run again without --resume to start over") from e
        if state.get("version") != STATE_VERSION:
            raise ResumeError(f"{self.tmp} was written by another gptqkit version; run again without --resume "
                              "to start over")
        if state.get("fingerprint") != self.fingerprint:
            diff = _differences(state.get("inputs", {}), self.inputs) or ["inputs"]
            raise ResumeError(
                f"{self.tmp} holds an unfinished run with different inputs ({'; '.join(diff)}); repeat the "
                "exact command of that run with the same model files and --resume, or run without --resume "
                "to discard it and start over")
        return state

    def release(self) -> None:
        """Give up the lock (finalize does it too); the folder stays for --resume."""
        if not self.rank:
            _unlock(self.tmp)

    # ------------------------------------------------------------------ state
    @property
    def directory(self) -> Path:
        return self.tmp

    @property
    def next_block(self) -> int:
        return int(self.state["next_block"]) if self.state else 0

    def saved(self, key: str, default: Any = None) -> Any:
        return (self.state or {}).get(key, default)

    def block_file(self, i: int) -> Path:
        return self.tmp / "blocks" / f"block-{i:05d}.safetensors"

    def hidden_file(self, i: int, c: int, stream: str = "in") -> Path:
        """stream: 'in' (the quantized model's hidden states) or 'fp' ([GPTAQ] the float model's)."""
        r = "" if self.rank is None else f"r{self.rank:03d}-"
        return self.tmp / "hidden" / f"{stream}-{i:05d}-{r}c{c:04d}.safetensors"

    def write_block(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        write_safetensors(self.block_file(i), tensors, {"format": "pt", "order": json.dumps(list(tensors))})

    def write_hidden(self, i: int, c: int, h: torch.Tensor, stream: str = "in") -> None:
        write_safetensors(self.hidden_file(i, c, stream), {"h": h})

    def load_hidden(self, i: int, c: int, stream: str = "in") -> torch.Tensor:
        from safetensors import safe_open
        f = self.hidden_file(i, c, stream)
        read_header(f)
        with safe_open(str(f), framework="pt") as sf:
            return sf.get_tensor("h")

    def commit(self, next_block: int, **fields: Any) -> None:
        """Record that every block before `next_block` is on disk (after its files are fsynced)."""
        _fsync_dir(self.tmp / "blocks")
        _fsync_dir(self.tmp / "hidden")
        state = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "inputs": self.inputs,
                 "next_block": next_block, **fields}
        tmp = self.tmp / (STATE_FILE + ".tmp")
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(state, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.tmp / STATE_FILE)
        except OSError as e:
            raise write_error(self.tmp / STATE_FILE, e) from e
        _fsync_dir(self.tmp)
        self.state = state
        for f in (self.tmp / "hidden").iterdir():  # only the latest inputs are kept (both streams)
            if not f.name.startswith((f"in-{next_block:05d}-", f"fp-{next_block:05d}-")):
                f.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the end
    def finalize(self, nblocks: int, outside: dict[str, torch.Tensor],
                 copies: list[tuple[Path, list[str]]] = ()) -> Path:
        """Assemble the shards (blocks in order, then `outside`, then tensors copied as stored from
        source files: (file, names)), drop the run files, rename the folder to `out`."""
        outside_file = self.tmp / "outside.safetensors"
        write_safetensors(outside_file, outside, {"format": "pt", "order": json.dumps(list(outside))})
        sources = [self.block_file(i) for i in range(nblocks)] + [outside_file]
        missing = [p.name for p in sources if not p.is_file()]
        sources += list(copies)
        if missing:
            raise CheckpointError(f"{self.tmp} lacks {missing[:3]}; run again without --resume")
        for old in list(self.tmp.glob("*.safetensors")) + [self.tmp / "model.safetensors.index.json"]:
            if old != outside_file:
                old.unlink(missing_ok=True)
        assemble_shards(sources, self.tmp, self.max_shard_bytes)
        # the state goes first: a crash from here on starts over rather than resuming half-deleted files
        (self.tmp / STATE_FILE).unlink(missing_ok=True)
        outside_file.unlink()
        shutil.rmtree(self.tmp / "blocks")
        shutil.rmtree(self.tmp / "hidden")
        (self.tmp / COMPLETE_MARK).write_text("")
        if self.overwrite:
            check_replaceable(self.out)  # a folder of other files may have appeared there meanwhile
        _unlock(self.tmp, remove=True)  # the lock file must not travel into the checkpoint
        _fsync_dir(self.tmp)
        return publish(self.tmp, self.out, self.overwrite)


def fault_hook(point: str, block: int) -> None:
    """Test hook: GPTQKIT_FAULT="<point>:<block>:<action>" with action kill (SIGKILL), interrupt
    (KeyboardInterrupt), term (SIGTERM) or sleep. Points: 'solved' (block solved, nothing written), 'written'
    (block files written, state not yet), 'committed' (state recorded)."""
    spec = os.environ.get("GPTQKIT_FAULT")
    if not spec:
        return
    p, b, action = spec.split(":")
    if p != point or int(b) != block:
        return
    if action == "kill":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        import signal
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "interrupt":
        raise KeyboardInterrupt
    elif action == "sleep":
        import time
        time.sleep(3600)
