"""The chunked in-flight mode (pipeline/relay.py): one forward per block over several chunks,
the same bytes as the replay at the same chunking, errors and Ctrl-C handled across threads."""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from _arch_helpers import build_tiny, calib_ids, one_thread  # noqa: F401 (autouse fixture)
from test_architectures import CASES, V


def _quantize(src: Path, out: Path, ids, monkeypatch, relay: bool, **kw):
    from gptqkit import QuantizeConfig
    from gptqkit.models.source import ModelHandle
    from gptqkit.pipeline import block, quantize_model
    monkeypatch.setattr(block, "CHUNKED_IN_FLIGHT", relay)
    return quantize_model(ModelHandle(src), ids, QuantizeConfig(bits=4, group_size=32), out, progress=False,
                          batch_size=kw.pop("batch_size", 2), **kw)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix in (".safetensors", ".json")
            and p.name != "quant_log.json"}


def _block_calls(monkeypatch) -> list[int]:
    """Count forwards of decoder blocks (one call = one chunk through one block)."""
    from gptqkit.pipeline.block import BlockQuantizer
    calls = []
    init = BlockQuantizer.__init__

    def counting(self, blk, *a, **k):
        init(self, blk, *a, **k)
        calls.append(0)
        blk.register_forward_pre_hook(lambda m, args: calls.__setitem__(-1, calls[-1] + 1))
    monkeypatch.setattr(BlockQuantizer, "__init__", counting)
    return calls


# llama: q/k/v and gate/up share inputs; gptj: attention and MLP in parallel on one input;
# gpt2: Conv1D layers turned into Linears, fused qkv
@pytest.mark.parametrize("case", ["llama", "gptj", "gpt2"])
def test_same_bytes_as_replay(case, tmp_path, monkeypatch):
    src = build_tiny(case, tmp_path / "src", **CASES[case])
    ids = calib_ids(V, n=5)  # chunks of 2, 2, 1: a ragged last chunk
    calls = _block_calls(monkeypatch)
    a = _quantize(src, tmp_path / "relay", ids, monkeypatch, relay=True)
    relay_calls = list(calls)
    b = _quantize(src, tmp_path / "replay", ids, monkeypatch, relay=False)
    assert _files(tmp_path / "relay") == _files(tmp_path / "replay")
    assert a.forwards == 2 and b.forwards > 2        # the report's count: 1 per block
    assert relay_calls == [3, 3]                     # measured: each of 3 chunks once per block
    assert all(c > 3 for c in calls[2:])             # the replay runs the chunks several times


def test_same_bytes_with_padding(tmp_path, monkeypatch):
    """Masked (padded) rows are left out of the Hessians alike in both modes."""
    src = build_tiny("llama", tmp_path / "src", **CASES["llama"])
    ids = calib_ids(V, n=4)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[3, 5:] = 0
    _quantize(src, tmp_path / "relay", ids, monkeypatch, relay=True, attention_mask=mask)
    _quantize(src, tmp_path / "replay", ids, monkeypatch, relay=False, attention_mask=mask)
    assert _files(tmp_path / "relay") == _files(tmp_path / "replay")


def test_moe_blocks_replay(tmp_path, monkeypatch, caplog):
    """Routed experts: a chunk may skip an expert, so those blocks replay (and still finish)."""
    src = build_tiny("mixtral", tmp_path / "src", **CASES["mixtral"])
    calls = _block_calls(monkeypatch)
    rep = _quantize(src, tmp_path / "q", calib_ids(V, n=4), monkeypatch, relay=True)
    assert rep.forwards > 2 and all(c > 2 for c in calls)


def test_undecided_falls_back_to_replay(tmp_path, monkeypatch, caplog):
    """Forced onto an MoE block, the chunks stop at different experts: the block is replayed
    and the run finishes with every linear solved."""
    from gptqkit.pipeline import block
    src = build_tiny("mixtral", tmp_path / "src", **CASES["mixtral"])
    monkeypatch.setattr(block, "has_fused_or_routed", lambda blk: False)
    with caplog.at_level(logging.INFO, logger="gptqkit"):
        rep = _quantize(src, tmp_path / "q", calib_ids(V, n=4, L=8), monkeypatch, relay=True, batch_size=1)
    assert "replaying the block instead" in caplog.text
    assert rep.forwards > 2 and all(lay.method.startswith(("gptq", "rtn")) for lay in rep.layers)
    assert not any(t.name.startswith("gptqkit-chunk") for t in threading.enumerate())


def test_worker_error_reaches_the_caller(tmp_path, monkeypatch):
    from gptqkit.errors import NumericalError
    from gptqkit.pipeline import block
    src = build_tiny("llama", tmp_path / "src", **CASES["llama"])
    solve = block.solve
    n = []

    def failing(job, zero_min):
        n.append(job.name)
        if len(n) == 4:   # o_proj of block 0, solved in a worker thread
            raise NumericalError("boom")
        solve(job, zero_min)
    monkeypatch.setattr(block, "solve", failing)
    with pytest.raises(NumericalError, match="boom"):
        _quantize(src, tmp_path / "q", calib_ids(V), monkeypatch, relay=True)
    assert not any(t.name.startswith("gptqkit-chunk") for t in threading.enumerate())


def test_ctrl_c_stops_workers_and_resume_gives_same_bytes():
    """SIGINT reaches the main thread only: it aborts the suspended chunks, the run raises
    InterruptedRunError and keeps its finished blocks, and the resumed run has the bytes of an
    uninterrupted one. Run in a fresh interpreter: in a clean checkout's full run, state left by
    earlier tests (first-use kernel builds among them) kept the signal from arriving in time."""
    import subprocess
    import sys
    env = dict(os.environ, GPTQKIT_CTRL_C_BODY="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"{__file__}::test_ctrl_c_body"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.skipif(os.environ.get("GPTQKIT_CTRL_C_BODY") != "1", reason="run by the test above, in its own process")
def test_ctrl_c_body(tmp_path, monkeypatch):
    from gptqkit.errors import InterruptedRunError
    from gptqkit.pipeline import block
    src = build_tiny("llama", tmp_path / "src", **CASES["llama"])
    ids = calib_ids(V)
    _quantize(src, tmp_path / "whole", ids, monkeypatch, relay=True)
    solve = block.solve
    n = []
    handled = threading.Event()

    def on_sigint(sig, frame):  # Python's own handler, noting when the main thread ran it
        handled.set()
        signal.default_int_handler(sig, frame)

    def interrupting(job, zero_min):
        n.append(job.name)
        if len(n) == 7 + 4:  # block 1, o_proj: chunk 1 waits suspended, chunk 0 too
            os.kill(os.getpid(), signal.SIGINT)
            # until the main thread has taken the signal (a fixed wait was too short on a loaded
            # machine, and the run then finished uninterrupted)
            assert handled.wait(120.0), "the main thread never handled SIGINT"
        solve(job, zero_min)
    monkeypatch.setattr(block, "solve", interrupting)
    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        with pytest.raises(InterruptedRunError):
            _quantize(src, tmp_path / "q", ids, monkeypatch, relay=True)
    finally:
        signal.signal(signal.SIGINT, old)
    assert handled.is_set()
    assert not any(t.name.startswith("gptqkit-chunk") for t in threading.enumerate())
    monkeypatch.setattr(block, "solve", solve)
    _quantize(src, tmp_path / "q", ids, monkeypatch, relay=True, resume=True)
    assert _files(tmp_path / "q") == _files(tmp_path / "whole")


# ---------------------------------------------------------------------- the relay on its own
def test_relay_order_and_rounds():
    from gptqkit.pipeline.relay import Relay
    log = []
    relay = Relay(3, lambda key: log.append(("solve", key)))

    def work(c):
        for key in ("a", "b"):
            log.append((c, key))
            relay.stop(c, key)
        log.append((c, "end"))
    relay.run(work)
    assert log == [(0, "a"), (1, "a"), (2, "a"), ("solve", "a"), (0, "b"), (1, "b"), (2, "b"), ("solve", "b"),
                   (0, "end"), (1, "end"), (2, "end")]


def test_relay_undecided():
    from gptqkit.pipeline.relay import Relay, Undecided
    relay = Relay(2, lambda key: None)
    with pytest.raises(Undecided):
        relay.run(lambda c: relay.stop(c, "a") if c == 0 else None)  # chunk 1 never stops


# ---------------------------------------------------------------------- the default chunk size
def _smollm2_shapes():
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9)


def test_auto_chunk_from_shapes_and_free_memory(caplog):
    from gptqkit.pipeline.plan import auto_chunk
    cfg = _smollm2_shapes()
    with caplog.at_level(logging.INFO, logger="gptqkit"):
        plenty = auto_chunk(cfg, 64, 512, torch.float32, 64 << 30)
    assert "sequences per chunk" in caplog.text and "free memory" in caplog.text
    assert 1 < plenty < 64 and 64 % plenty == 0                # several equal chunks
    tight = auto_chunk(cfg, 64, 512, torch.float32, 512 << 20)  # 64 MB for one chunk's transients
    assert 1 <= tight < plenty
    assert auto_chunk(cfg, 64, 2048, torch.float32, 64 << 30) < plenty  # L² attention scores
    assert auto_chunk(cfg, 4, 16, torch.float32, 64 << 30) == 4         # a small job: one chunk


def _run_auto(src, out, ids, free, **kw):
    """A default (no batch_size) run that sees `free` bytes of free memory; the small-job floor
    of the budget is lowered to 3 sequences' transients of the tiny llama, so it is cut into chunks."""
    import psutil
    from gptqkit import QuantizeConfig
    from gptqkit.models.source import ModelHandle
    from gptqkit.pipeline import plan, quantize_model
    mp = pytest.MonkeyPatch()
    mp.setattr(plan, "_MIN_BUDGET", 3 * 16 * 4 * (3 * 128 + 6 * 64 + 2 * 4 * 16))
    mp.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": free})())
    try:
        # no clip search: it makes this tiny model's codes robust to the chunking's summation
        # order, and the test needs the chunking to show in the bytes
        return quantize_model(ModelHandle(src), ids, QuantizeConfig(bits=4, group_size=32, mse=False), out,
                              progress=False,
                              **kw)
    finally:
        mp.undo()


def test_resume_reuses_the_chunk_size_it_chose(tmp_path, monkeypatch, caplog):
    """The automatic chunk size depends on free memory; a resumed run that sees less free
    memory keeps the interrupted run's chunks and writes the same bytes."""
    from gptqkit.errors import InterruptedRunError
    src = build_tiny("llama", tmp_path / "src", **CASES["llama"])
    ids = calib_ids(V, n=6)
    calls = _block_calls(monkeypatch)
    _run_auto(src, tmp_path / "small", ids, free=8 * 16 * 4 * (3 * 128 + 6 * 64 + 2 * 4 * 16))
    assert calls[0] == 6   # little free memory: 1 sequence per chunk
    _run_auto(src, tmp_path / "whole", ids, free=10 << 30)
    assert calls[2] == 2   # plenty: 3 sequences per chunk
    monkeypatch.setenv("GPTQKIT_FAULT", "committed:0:interrupt")
    with pytest.raises(InterruptedRunError):
        _run_auto(src, tmp_path / "q", ids, free=10 << 30)
    monkeypatch.delenv("GPTQKIT_FAULT")
    with caplog.at_level(logging.INFO, logger="gptqkit"):
        _run_auto(src, tmp_path / "q", ids, free=8 * 16 * 4 * (3 * 128 + 6 * 64 + 2 * 4 * 16), resume=True)
    assert "resuming with the interrupted run's 3 sequences per chunk" in caplog.text
    assert calls[-1] == 2  # block 1 of the resumed run: the interrupted run's 2 chunks
    assert _files(tmp_path / "q") == _files(tmp_path / "whole")
    assert _files(tmp_path / "small") != _files(tmp_path / "whole")  # the chunking does change bytes
