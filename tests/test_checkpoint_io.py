"""Checkpoint files: the sharded writer (atomic folder, index) and the guarded reader."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import gptqkit.formats.checkpoint as ckpt
from gptqkit.errors import CheckpointError
from gptqkit.formats.checkpoint import INDEX_FILE, ShardWriter, TensorSource, iter_tensors, shard_files


def _tensors(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer.{i}.weight": torch.randn(16, 16, generator=g) for i in range(n)}  # 1 KiB each


def test_several_shards_and_index(tmp_path):
    ts = _tensors(6)
    out = tmp_path / "ck"
    w = ShardWriter(out, max_shard_bytes=2048 + 10)  # two 1 KiB tensors per shard -> 3 shards
    for k, v in ts.items():
        w.add(k, v)
    assert w.finalize() == out
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(ts)  # every tensor listed once
    assert set(index["weight_map"].values()) == set(names)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    # each tensor really is in the shard the index names, and nowhere else
    seen = []
    for name in names:
        with safe_open(str(out / name), framework="pt") as sf:
            for k in sf.keys():
                assert index["weight_map"][k] == name
                assert torch.equal(sf.get_tensor(k), ts[k])
                seen.append(k)
    assert sorted(seen) == sorted(ts)
    assert [p.name for p in shard_files(out)] == names
    got = dict(iter_tensors(out))
    assert got.keys() == ts.keys() and all(torch.equal(got[k], ts[k]) for k in ts)
    src = TensorSource(out)
    assert sorted(src.keys()) == sorted(ts) and torch.equal(src.get("layer.4.weight"), ts["layer.4.weight"])
    assert not out.with_name("ck.partial").exists()


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    ts = _tensors(3)
    out = tmp_path / "ck"
    w = ShardWriter(out)
    w.add_all("m", ts)
    w.finalize()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / INDEX_FILE).exists()
    got = dict(iter_tensors(out))
    assert sorted(got) == sorted(f"m.{k}" for k in ts)


def test_folder_appears_only_at_finalize(tmp_path):
    out = tmp_path / "ck"
    w = ShardWriter(out, max_shard_bytes=1500)
    for k, v in _tensors(4).items():
        w.add(k, v)
    (w.directory / "config.json").write_text("{}")
    assert not out.exists()
    partial = tmp_path / "ck.partial"
    assert partial.is_dir() and w.directory == partial
    assert any(partial.glob("*.safetensors"))  # shards already flushed there
    w.finalize()
    assert out.is_dir() and not partial.exists()
    assert (out / "config.json").is_file()


def test_existing_out_refused_unless_overwrite(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        ShardWriter(out)
    assert (out / "keep.txt").is_file()
    w = ShardWriter(out, overwrite=True)
    w.add("a", torch.ones(3))
    w.finalize()
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_disk_full_raises_checkpoint_error_and_leaves_no_out(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    out = tmp_path / "ck"
    w = ShardWriter(out, max_shard_bytes=1500)
    with pytest.raises(CheckpointError, match="No space left"):
        for k, v in _tensors(4).items():
            w.add(k, v)
        w.finalize()
    assert not out.exists()


def test_disk_full_at_finalize(tmp_path, monkeypatch):
    out = tmp_path / "ck"
    w = ShardWriter(out)
    w.add("a", torch.ones(4))

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointError):
        w.finalize()
    assert not out.exists()


def _write_single(folder, name="model.safetensors"):
    folder.mkdir(exist_ok=True)
    save_file({"a": torch.arange(1000, dtype=torch.float32)}, str(folder / name))
    return folder / name


def test_index_naming_missing_file(tmp_path):
    d = tmp_path / "ck"
    _write_single(d, "model-00001-of-00002.safetensors")
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        shard_files(d)
    with pytest.raises(CheckpointError):
        list(iter_tensors(d))


def test_index_naming_file_outside_folder(tmp_path):
    d = tmp_path / "ck"
    _write_single(d)
    _write_single(tmp_path / "elsewhere", "x.safetensors")
    _write_single(tmp_path, "x.safetensors")  # it exists: refused for where it lies, not absence
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside"):
        shard_files(d)
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {"a": str(tmp_path / "x.safetensors")}}))
    with pytest.raises(CheckpointError, match="outside"):
        shard_files(d)


def test_invalid_index(tmp_path):
    d = tmp_path / "ck"
    _write_single(d)
    (d / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError):
        shard_files(d)


def test_only_pickle_refused(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        shard_files(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError):
        shard_files(empty)
    with pytest.raises(CheckpointError):
        shard_files(tmp_path / "nope")


@pytest.mark.parametrize("cut", [10, 2000])
def test_truncated_file(tmp_path, cut):
    d = tmp_path / "ck"
    f = _write_single(d)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - cut])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        list(iter_tensors(d))
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        TensorSource(d)


def test_out_appearing_during_write_is_not_clobbered(tmp_path):
    out = tmp_path / "ck"
    w = ShardWriter(out)
    w.add("a", torch.ones(4))
    out.mkdir()  # someone else wrote there meanwhile
    with pytest.raises(CheckpointError):
        w.finalize()
    assert list(out.iterdir()) == []
