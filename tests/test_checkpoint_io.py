"""Checkpoint files: shard assembly (names, index), the run folder published atomically, and the
guarded reader."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import gptqkit.formats.checkpoint as ckpt
from gptqkit.errors import CheckpointError, DiskFullError
from gptqkit.formats.checkpoint import (INDEX_FILE, TensorSource, assemble_shards, iter_tensors, shard_files,
                                        write_safetensors)
from gptqkit.pipeline.rundir import RunDir


def _tensors(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer.{i}.weight": torch.randn(16, 16, generator=g) for i in range(n)}  # 1 KiB each


def _sources(folder, ts, per_file: int = 2) -> list:
    """ts written into safetensors files of `per_file` tensors each, the way the pipeline writes
    its per-block files (write order recorded in the metadata)."""
    folder.mkdir()
    items, files = list(ts.items()), []
    for i in range(0, len(items), per_file):
        part = dict(items[i:i + per_file])
        write_safetensors(folder / f"s{i}.safetensors", part, {"format": "pt", "order": json.dumps(list(part))})
        files.append(folder / f"s{i}.safetensors")
    return files


def test_several_shards_and_index(tmp_path):
    ts = _tensors(6)
    out = tmp_path / "ck"
    out.mkdir()
    names = assemble_shards(_sources(tmp_path / "src", ts, per_file=3), out, 2048 + 10)  # 2 per shard
    assert names == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == names
    index = json.loads((out / INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(ts)  # every tensor listed once
    assert set(index["weight_map"].values()) == set(names)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    # each tensor really is in the shard the index names, in write order across shards
    seen = []
    for name in names:
        with safe_open(str(out / name), framework="pt") as sf:
            for k in sorted(sf.keys()):
                assert index["weight_map"][k] == name
                assert torch.equal(sf.get_tensor(k), ts[k])
                seen.append(k)
    assert seen == list(ts)
    assert [p.name for p in shard_files(out)] == names
    got = dict(iter_tensors(out))
    assert got.keys() == ts.keys() and all(torch.equal(got[k], ts[k]) for k in ts)
    src = TensorSource(out)
    assert sorted(src.keys()) == sorted(ts) and torch.equal(src.get("layer.4.weight"), ts["layer.4.weight"])


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    ts = _tensors(4)
    files = _sources(tmp_path / "src", ts)
    out = tmp_path / "ck"
    out.mkdir()
    # a (file, names) source copies just those tensors
    assert assemble_shards([files[0], (files[1], ["layer.3.weight"])], out, 2 << 30) == ["model.safetensors"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / INDEX_FILE).exists()
    got = dict(iter_tensors(out))
    assert sorted(got) == ["layer.0.weight", "layer.1.weight", "layer.3.weight"]
    assert all(torch.equal(got[k], ts[k]) for k in got)


def _run_dir(out, ts, **kw) -> RunDir:
    """A run folder holding `ts` as block 0 and block 1, not yet finalized."""
    run = RunDir(out, "fingerprint", **kw)
    items = list(ts.items())
    run.write_block(0, dict(items[: len(items) // 2]))
    run.write_block(1, dict(items[len(items) // 2:]))
    return run


def test_folder_appears_only_at_finalize(tmp_path):
    out, ts = tmp_path / "ck", _tensors(4)
    run = _run_dir(out, ts, max_shard_bytes=1500)
    (run.directory / "config.json").write_text("{}")
    assert not out.exists()
    partial = tmp_path / "ck.partial"
    assert partial.is_dir() and run.directory == partial
    assert run.finalize(2, {}) == out
    assert out.is_dir() and not partial.exists()
    assert (out / "config.json").is_file() and (out / INDEX_FILE).is_file()
    got = dict(iter_tensors(out))
    assert got.keys() == ts.keys() and all(torch.equal(got[k], ts[k]) for k in ts)


def test_existing_out_refused_unless_overwrite(tmp_path):
    from gptqkit.config import QuantizeConfig
    out = tmp_path / "ck"
    earlier = _run_dir(out, _tensors(2))  # an earlier checkpoint, config included
    QuantizeConfig().save(earlier.directory)
    earlier.finalize(2, {})
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        RunDir(out, "fingerprint")
    assert (out / "model.safetensors").read_bytes() == before
    run = RunDir(out, "fingerprint", overwrite=True)
    run.write_block(0, {"a": torch.ones(3)})
    run.finalize(1, {})
    assert dict(iter_tensors(out)).keys() == {"a"}


def test_disk_full_raises_checkpoint_error_and_leaves_no_out(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    out = tmp_path / "ck"
    run = RunDir(out, "fingerprint")
    monkeypatch.setattr(ckpt, "_open_for_write", full)
    with pytest.raises(DiskFullError, match="No space left"):
        run.write_block(0, _tensors(2))
    assert not out.exists()


def test_disk_full_at_finalize(tmp_path, monkeypatch):
    out = tmp_path / "ck"
    run = _run_dir(out, _tensors(2))

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_open_for_write", full)
    with pytest.raises(DiskFullError):
        run.finalize(2, {})
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
    run = _run_dir(out, _tensors(2))
    out.mkdir()  # someone else wrote there meanwhile
    with pytest.raises(CheckpointError):
        run.finalize(2, {})
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ round trip with our writer
ROUNDTRIP = {
    "sym4-v1": dict(bits=4, group_size=32, sym=True, desc_act=False, static_groups=False, checkpoint_format="gptq"),
    "asym3-v2-act": dict(bits=3, group_size=32, sym=False, desc_act=True, static_groups=False,
                         checkpoint_format="gptq_v2"),
    "asym8-v1-static": dict(bits=8, group_size=64, sym=False, desc_act=True, static_groups=True,
                            checkpoint_format="gptq"),
}
QUANT_KEYS = ("bits", "group_size", "desc_act", "sym", "static_groups", "damp_percent", "true_sequential",
              "quant_method", "checkpoint_format", "meta")


@pytest.fixture(scope="module", params=list(ROUNDTRIP))
def quantized(request, tiny_llama_dir, tiny_text_file, tmp_path_factory):
    import gptqkit
    kw = ROUNDTRIP[request.param]
    out = tmp_path_factory.mktemp("rt") / "q"
    text = tiny_text_file.read_text()
    texts = [text[i * 150:] for i in range(4)]
    rep = gptqkit.quantize(tiny_llama_dir, texts, out, nsamples=4, seqlen=32, progress=False, **kw)
    return out, kw, rep


def _reference_from_checkpoint(src, out):
    """The float model with every quantized linear's weight replaced by the checkpoint's
    dequantized weight, computed from the stored tensors with the packing functions."""
    from transformers import AutoModelForCausalLM

    from gptqkit.config import QuantizeConfig
    from gptqkit.formats.packing import unpack_qweight, unpack_qzeros
    from gptqkit.quant.grid import dequantize
    cfg = QuantizeConfig.load(out)
    t = dict(iter_tensors(out))
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    names = [k[: -len(".qweight")] for k in t if k.endswith(".qweight")]
    with torch.no_grad():
        for name in names:
            lin = ref.get_submodule(name)
            q = unpack_qweight(t[f"{name}.qweight"], cfg.bits)
            z = unpack_qzeros(t[f"{name}.qzeros"], cfg.bits, lin.out_features, cfg.checkpoint_format)
            lin.weight.copy_(dequantize(q, t[f"{name}.scales"], z, t[f"{name}.g_idx"], torch.float32).T)
            if lin.bias is not None:
                lin.bias.copy_(t[f"{name}.bias"].float())
    return ref, names, t


def test_round_trip(quantized, tiny_llama_dir):
    import csv

    import gptqkit
    from gptqkit.formats.packing import unpack_qzeros
    out, kw, rep = quantized
    assert out.is_dir() and not out.with_name(out.name + ".partial").exists()
    # config in both places
    qc = json.loads((out / "quantize_config.json").read_text())
    cj = json.loads((out / "config.json").read_text())["quantization_config"]
    for d in (qc, cj):
        for k in QUANT_KEYS:
            assert k in d, k
        assert d["quant_method"] == "gptq" and d["checkpoint_format"] == kw["checkpoint_format"]
        assert d["bits"] == kw["bits"] and d["group_size"] == kw["group_size"] and d["sym"] == kw["sym"]
        assert d["desc_act"] == kw.get("desc_act", False)
        assert d["static_groups"] == kw.get("static_groups", False)
        assert any(str(x).startswith("gptqkit") for x in d["meta"]["quantizer"])
    # logs: one row per quantized layer (2 blocks x 7 linears)
    log = json.loads((out / "quant_log.json").read_text())
    assert len(log["layers"]) == 14 == len(rep.layers)
    with open(out / "quant_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 14 and {r["name"] for r in rows} == {x["name"] for x in log["layers"]}
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()

    ref, names, t = _reference_from_checkpoint(tiny_llama_dir, out)
    assert len(names) == 14
    bits = kw["bits"]
    for name in names:
        g_idx = t[f"{name}.g_idx"].long()
        K = g_idx.numel()
        g = kw["group_size"]
        assert t[f"{name}.qweight"].shape[0] == K * bits // 32 and t[f"{name}.g_idx"].dtype == torch.int32
        assert t[f"{name}.scales"].dtype == torch.float16 and t[f"{name}.qzeros"].dtype == torch.int32
        if kw.get("desc_act") and not kw.get("static_groups"):
            assert sorted(g_idx.tolist()) == sorted((torch.arange(K) // g).tolist())  # a permutation of groups
        else:
            assert torch.equal(g_idx, torch.arange(K) // g)
        if kw["sym"]:
            z = unpack_qzeros(t[f"{name}.qzeros"], bits, t[f"{name}.scales"].shape[1], kw["checkpoint_format"])
            assert (z == 2 ** (bits - 1)).all()
        if kw["sym"] and bits == 4 and kw["checkpoint_format"] == "gptq":
            assert (t[f"{name}.qzeros"] == 0x77777777).all()
    assert t["model.embed_tokens.weight"].dtype == torch.float32  # non-quantized tensors keep their dtype

    ids = torch.randint(4, 60, (2, 16), generator=torch.Generator().manual_seed(1))
    for backend in ("torch", None):
        model = gptqkit.load(out, backend=backend)
        with torch.no_grad():
            got, want = model(ids).logits, ref(ids).logits
        err = (got - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item() + 1e-6, (backend, err)
    from transformers import AutoModelForCausalLM
    fp = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (fp(ids).logits - want).abs().max() > 1e-3  # the weights really were quantized


def test_calibration_examples_with_padding(tiny_llama_dir, tmp_path):
    import gptqkit
    g = torch.Generator().manual_seed(0)
    lengths = [20, 32, 9, 27]
    examples = []
    for n in lengths:
        ids = torch.randint(4, 60, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * n})
    out = tmp_path / "q"
    rep = gptqkit.quantize(tiny_llama_dir, examples, out, bits=4, group_size=32, nsamples=4, seqlen=32,
                           progress=False)
    assert rep.calib_tokens == sum(lengths)
    # the Hessians saw the real tokens only, not the padding
    assert all(layer.tokens == sum(lengths) for layer in rep.layers), [l.tokens for l in rep.layers]
    cal = json.loads((out / "quantize_config.json").read_text())["meta"]["calibration"]
    assert cal["nsamples"] == 4 and cal["seqlen"] == 32
    model = gptqkit.load(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([examples[2]["input_ids"]])).logits).all()


def test_quantize_refuses_existing_out(tiny_llama_dir, tmp_path):
    import gptqkit
    out = tmp_path / "q"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError):
        gptqkit.quantize(tiny_llama_dir, ["hello world " * 20], out, nsamples=2, seqlen=16, group_size=32,
                         progress=False)
    assert (out / "mine.txt").read_text() == "keep"
