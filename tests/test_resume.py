"""Resumable, deterministic runs: a run killed with SIGKILL at several points of a block continues
with resume=True and produces the same bytes as an uninterrupted run; fingerprint checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gptqkit.errors import InterruptedRunError, ResumeError

NLAYERS = 6
SHARD = 96 << 10  # small shards, so the assembly and the index are exercised too
# the model files a run must reproduce exactly; quant_log.json/.csv also hold wall-clock timings
LOGS = {"quant_log.json", "quant_log.csv"}

RUN = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from gptqkit import QuantizeConfig
    from gptqkit.pipeline import quantize_model
    from gptqkit.models.source import ModelHandle
    src, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    ids = torch.randint(4, 256, (8, 24), generator=torch.Generator().manual_seed(0))
    quantize_model(ModelHandle(src), ids, QuantizeConfig(bits=4, group_size=32, desc_act=True), out,
                   progress=False, max_shard_bytes=%d, batch_size=%s, resume=resume)
""")


from _arch_helpers import one_thread  # noqa: E402,F401 (autouse fixture: one torch thread)


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, tiny_llama_factory) -> Path:
    return tiny_llama_factory(tmp_path_factory.mktemp("deep") / "model", num_hidden_layers=NLAYERS)


def _run(src: Path, out: Path, *, resume: bool = False, fault: str | None = None, batch_size=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GPTQKIT_FAULT", None)
    if fault:
        env["GPTQKIT_FAULT"] = fault
    script = RUN % (SHARD, batch_size)
    return subprocess.run([sys.executable, "-c", script, str(src), str(out), "1" if resume else "0"],
                          env=env, capture_output=True, text=True, timeout=600)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in LOGS}


@pytest.fixture(scope="module")
def reference(deep_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "q"
    r = _run(deep_model, out)
    assert r.returncode == 0, r.stderr
    return out


def test_same_inputs_same_bytes(deep_model, reference, tmp_path):
    out = tmp_path / "again"
    r = _run(deep_model, out)
    assert r.returncode == 0, r.stderr
    ref = _files(reference)
    assert any(k.startswith("model-") for k in ref) and "model.safetensors.index.json" in ref
    assert _files(out) == ref
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


@pytest.mark.parametrize("fault", ["written:1:kill", "solved:4:kill",
                                   "committed:5:kill"])
def test_sigkill_then_resume_is_byte_identical(deep_model, reference, tmp_path, fault):
    out = tmp_path / "q"
    r = _run(deep_model, out, fault=fault)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    partial = tmp_path / "q.partial"
    assert partial.is_dir() and not out.exists()
    point, block, _ = fault.split(":")
    state = json.loads((partial / "run_state.json").read_text()) if int(block) or point == "committed" else None
    finished = int(block) + 1 if point == "committed" else int(block)
    if state is not None:
        assert state["next_block"] == finished
    r = _run(deep_model, out, resume=True)
    assert r.returncode == 0, r.stderr
    assert not partial.exists()
    assert _files(out) == _files(reference)
    got = json.loads((out / "quant_log.json").read_text())["layers"]
    want = json.loads((reference / "quant_log.json").read_text())["layers"]
    drop = lambda rows: [{k: v for k, v in x.items() if k != "seconds"} for x in rows]  # noqa: E731
    assert drop(got) == drop(want)
    # the report's time counts the interrupted run too, and says how much of it that was
    log = json.loads((out / "quant_log.json").read_text())
    if state is not None:
        assert log["resumed_seconds"] == pytest.approx(state["seconds"]) and log["resumed_seconds"] > 0
        assert log["seconds"] > log["resumed_seconds"]
    assert json.loads((reference / "quant_log.json").read_text())["resumed_seconds"] == 0


def _interrupted_partial(src: Path, out: Path, block: int = 1, **qkw) -> Path:
    from gptqkit import QuantizeConfig
    from gptqkit.pipeline import quantize_model
    from gptqkit.models.source import ModelHandle
    ids = torch.randint(4, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    os.environ["GPTQKIT_FAULT"] = f"committed:{block}:interrupt"
    try:
        with pytest.raises(InterruptedRunError, match="--resume") as e:
            quantize_model(ModelHandle(src), ids, QuantizeConfig(group_size=32, **qkw), out, progress=False)
    finally:
        del os.environ["GPTQKIT_FAULT"]
    assert isinstance(e.value, KeyboardInterrupt)
    return ids


def test_resume_refuses_other_inputs_and_plain_run_discards(deep_model, tmp_path, caplog):
    from gptqkit import QuantizeConfig
    from gptqkit.pipeline import quantize_model
    from gptqkit.models.source import ModelHandle
    out = tmp_path / "q"
    ids = _interrupted_partial(deep_model, out, bits=4)
    partial = tmp_path / "q.partial"
    assert json.loads((partial / "run_state.json").read_text())["next_block"] == 2 and not out.exists()
    with pytest.raises(ResumeError, match="different inputs"):
        quantize_model(ModelHandle(deep_model), ids, QuantizeConfig(bits=8, group_size=32), out,
                       progress=False, resume=True)
    with pytest.raises(ResumeError):
        quantize_model(ModelHandle(deep_model), ids + 1, QuantizeConfig(bits=4, group_size=32), out,
                       progress=False, resume=True)
    assert (partial / "run_state.json").is_file()  # a refused resume touches nothing
    # without resume: the unfinished run is discarded (logged) and the run starts over
    with caplog.at_level("WARNING"):
        quantize_model(ModelHandle(deep_model), ids, QuantizeConfig(bits=8, group_size=32), out, progress=False)
    assert "discarding the unfinished run" in caplog.text
    assert out.is_dir() and not partial.exists()


def test_resume_without_partial_starts_over(deep_model, tmp_path):
    from gptqkit import QuantizeConfig
    from gptqkit.pipeline import quantize_model
    from gptqkit.models.source import ModelHandle
    ids = torch.randint(4, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = QuantizeConfig(group_size=32, method="rtn")
    rep = quantize_model(ModelHandle(deep_model), ids, cfg, tmp_path / "q", progress=False, resume=True)
    assert len(rep.layers) == 7 * NLAYERS and rep.forwards == 0  # RTN needs no block forward
    quantize_model(ModelHandle(deep_model), ids, cfg, tmp_path / "plain", progress=False)
    assert _files(tmp_path / "q") == _files(tmp_path / "plain")
