"""Streaming: one block's weights in memory at a time, calibration activations on disk under
max_memory (same bytes as keeping them in memory), and resumable in that mode too. Peak RSS on
the real model and a 120-block one is measured by benchmarks/memory.py (BENCHMARKS.md, Memory)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gptqkit import QuantizeConfig
from gptqkit.errors import ConfigError, InterruptedRunError
from gptqkit.pipeline import quantize_model
from gptqkit.pipeline.plan import parse_size
from gptqkit.models.source import ModelHandle

NLAYERS = 4


from _arch_helpers import one_thread  # noqa: E402,F401 (autouse fixture: one torch thread)


@pytest.fixture(scope="module")
def model4(tmp_path_factory, tiny_llama_factory) -> Path:
    return tiny_llama_factory(tmp_path_factory.mktemp("m4") / "model", num_hidden_layers=NLAYERS)


def _ids() -> torch.Tensor:
    return torch.randint(4, 256, (6, 16), generator=torch.Generator().manual_seed(0))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith("quant_log")}


def test_parse_size():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("512MiB") == 512 << 20 and parse_size("2e9") == 2 * 10**9
    assert parse_size(None) is None and parse_size(123) == 123
    with pytest.raises(ConfigError, match="4GB"):
        parse_size("lots")


def test_one_block_materialized_at_a_time(model4, tmp_path, monkeypatch):
    handle = ModelHandle(model4)
    assert handle.streaming
    blocks = handle.model.model.layers
    peak = {"blocks": 0}
    real = ModelHandle.materialize

    def materialize(self, prefix):
        real(self, prefix)
        live = sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks)
        peak["blocks"] = max(peak["blocks"], live)

    monkeypatch.setattr(ModelHandle, "materialize", materialize)
    assert all(p.device.type == "meta" for p in blocks.parameters())  # nothing read before its turn
    quantize_model(handle, _ids(), QuantizeConfig(group_size=32), tmp_path / "q", progress=False)
    assert peak["blocks"] == 1
    assert all(p.device.type == "meta" for p in blocks.parameters())  # finished blocks were freed


def test_activations_on_disk_give_the_same_bytes(model4, tmp_path, caplog):
    cfg = dict(group_size=32, desc_act=True)
    quantize_model(ModelHandle(model4), _ids(), QuantizeConfig(**cfg), tmp_path / "mem", progress=False,
                   batch_size=2)
    with caplog.at_level("INFO", logger="gptqkit.pipeline"):
        quantize_model(ModelHandle(model4), _ids(), QuantizeConfig(**cfg), tmp_path / "disk", progress=False,
                       max_memory="4KB")  # chunk size chosen from the budget: 1 sequence
    assert "kept on disk" in caplog.text
    quantize_model(ModelHandle(model4), _ids(), QuantizeConfig(**cfg), tmp_path / "disk2", progress=False,
                   batch_size=2, max_memory="4KB")
    assert _files(tmp_path / "disk2") == _files(tmp_path / "mem")
    assert (tmp_path / "disk" / "model.safetensors").is_file()


def test_activations_on_disk_resume(model4, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "q"
    kw = dict(progress=False, batch_size=3, max_memory=1000)
    quantize_model(ModelHandle(model4), _ids(), QuantizeConfig(group_size=32), ref, **kw)
    os.environ["GPTQKIT_FAULT"] = "committed:1:interrupt"
    try:
        with pytest.raises(InterruptedRunError):
            quantize_model(ModelHandle(model4), _ids(), QuantizeConfig(group_size=32), out, **kw)
    finally:
        del os.environ["GPTQKIT_FAULT"]
    hidden = sorted(p.name for p in (tmp_path / "q.partial" / "hidden").iterdir())
    assert hidden == ["in-00002-c0000.safetensors", "in-00002-c0001.safetensors"]  # only the latest kept
    quantize_model(ModelHandle(model4), _ids(), QuantizeConfig(group_size=32), out, resume=True, **kw)
    assert _files(out) == _files(ref)


def test_tied_embedding_freed_while_blocks_run(tmp_path, tiny_llama_factory, monkeypatch):
    """A tied lm_head is the embedding under a second name: freeing the embedding's name alone
    left the lm_head holding the whole matrix (on SmolLM2, 108 MiB through every block)."""
    path = tiny_llama_factory(tmp_path / "tied", num_hidden_layers=2, tie_word_embeddings=True)
    handle = ModelHandle(path)
    m = handle.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    seen = []
    real = ModelHandle.materialize

    def materialize(self, prefix):
        real(self, prefix)
        seen.append((m.lm_head.weight.device.type, m.model.embed_tokens.weight.device.type))

    monkeypatch.setattr(ModelHandle, "materialize", materialize)
    quantize_model(handle, _ids(), QuantizeConfig(group_size=32), tmp_path / "q", progress=False)
    assert seen == [("meta", "meta")] * 2
