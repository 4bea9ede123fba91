"""The run folder `<out>.partial/`: what makes a quantization run resumable and its output
deterministic.

Layout while a run is in progress:

    <out>.partial/
      run_state.json                 fingerprint of the inputs, next block, layer logs
      blocks/block-00012.safetensors every output tensor of block 12 (GPTQ tensors and originals)
      hidden/in-00013-c0000.safetensors   what block 13 receives, per calibration chunk
      outside.safetensors            embeddings, final norm, lm_head (written last)
      config.json, tokenizer …       side files, written before finalize

After block i is solved, its tensors and block i+1's input hidden states are written and
fsynced, and only then is run_state.json replaced atomically (temporary file + os.replace).
A run killed at any point (SIGKILL included) therefore finds a state whose files are complete,
and `resume` continues at `next_block` from exactly the hidden states an uninterrupted run
would have had. `finalize()` assembles the final shards by copying bytes from the per-block
files in block order, so shard boundaries and bytes do not depend on where a run stopped.

Without `resume`, an existing `.partial` folder is discarded (logged). With `resume`, a folder
whose fingerprint differs (another model, config, calibration set, batch size, dtype or world
size) is refused with ResumeError; a folder without a state starts over.
"""
from __future__ import annotations

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
STATE_VERSION = 1


def _hash_tensor(h, t: torch.Tensor | None) -> None:
    if t is None:
        h.update(b"none")
        return
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def fingerprint(model_path: Path, source_files: list[Path], config: dict[str, Any], input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, **extra: Any) -> str:
    """What must match for a resumed run to produce the same bytes as an uninterrupted one."""
    h = hashlib.sha256()
    h.update(str(Path(model_path).resolve()).encode())
    for f in sorted(source_files):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    _hash_tensor(h, input_ids)
    _hash_tensor(h, attention_mask)
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


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

    def __init__(self, out: str | Path, fingerprint: str, *, overwrite: bool = False, resume: bool = False,
                 max_shard_bytes: int = 2 << 30, rank: int | None = None):
        """rank: None for a single process; under torch.distributed rank 0 creates the folder and
        the other ranks open it afterwards (only their hidden states are theirs to write)."""
        self.out = Path(out)
        self.rank = rank
        if rank:  # a follower: read the state rank 0 has validated, touch nothing else
            self.tmp = self.out.with_name(self.out.name + ".partial")
            self.fingerprint, self.overwrite, self.max_shard_bytes = fingerprint, overwrite, max_shard_bytes
            st = self.tmp / STATE_FILE
            self.state = json.loads(st.read_text()) if resume and st.is_file() else None
            return
        if self.out.exists() and not overwrite:
            raise CheckpointError(f"{self.out} already exists; choose another --out or pass overwrite")
        self.tmp = self.out.with_name(self.out.name + ".partial")
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self.state: dict[str, Any] | None = None
        st = self.tmp / STATE_FILE
        if resume and st.is_file():
            try:
                state = json.loads(st.read_text())
            except ValueError as e:
                raise ResumeError(f"{st} is unreadable ({e}); run again without --resume to start over") from e
            if state.get("version") != STATE_VERSION or state.get("fingerprint") != fingerprint:
                raise ResumeError(
                    f"{self.tmp} holds an unfinished run with different inputs (model, config, calibration "
                    "data, batch size, dtype or number of processes); repeat the exact command of that run "
                    "with --resume, or run without --resume to discard it and start over")
            self.state = state
            log.info("resuming %s at block %d", self.tmp, state["next_block"])
        elif self.tmp.exists():
            if resume:
                log.info("%s has no finished block; starting from the beginning", self.tmp)
            else:
                log.warning("discarding the unfinished run in %s (pass --resume / resume=True to continue it)",
                            self.tmp)
            shutil.rmtree(self.tmp)
        elif resume:
            log.info("nothing to resume at %s; starting from the beginning", self.tmp)
        for d in (self.tmp, self.tmp / "blocks", self.tmp / "hidden"):
            d.mkdir(parents=True, exist_ok=True)

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

    def hidden_file(self, i: int, c: int) -> Path:
        r = "" if self.rank is None else f"r{self.rank:03d}-"
        return self.tmp / "hidden" / f"in-{i:05d}-{r}c{c:04d}.safetensors"

    def write_block(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        write_safetensors(self.block_file(i), tensors, {"format": "pt", "order": json.dumps(list(tensors))})

    def write_hidden(self, i: int, c: int, h: torch.Tensor) -> None:
        write_safetensors(self.hidden_file(i, c), {"h": h})

    def load_hidden(self, i: int, c: int) -> torch.Tensor:
        from safetensors import safe_open
        f = self.hidden_file(i, c)
        read_header(f)
        with safe_open(str(f), framework="pt") as sf:
            return sf.get_tensor("h")

    def commit(self, next_block: int, **fields: Any) -> None:
        """Record that every block before `next_block` is on disk (after its files are fsynced)."""
        _fsync_dir(self.tmp / "blocks")
        _fsync_dir(self.tmp / "hidden")
        state = {"version": STATE_VERSION, "fingerprint": self.fingerprint, "next_block": next_block, **fields}
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
        for f in (self.tmp / "hidden").iterdir():  # only the latest inputs are kept
            if not f.name.startswith(f"in-{next_block:05d}-"):
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
        _fsync_dir(self.tmp)
        return publish(self.tmp, self.out, self.overwrite)


def fault_hook(point: str, block: int) -> None:
    """Test hook: GPTQKIT_FAULT="<point>:<block>:<action>" with action kill (SIGKILL), interrupt
    (KeyboardInterrupt) or sleep. Points: 'solved' (block solved, nothing written), 'written'
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
    elif action == "interrupt":
        raise KeyboardInterrupt
    elif action == "sleep":
        import time
        time.sleep(3600)
