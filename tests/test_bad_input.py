"""Every bad input of issue #5, one short test each: its own error class, a message that says
what to do, and nothing at the output path that looks complete. Longer variants of several
cases live in test_checkpoint_io.py, test_cli.py, test_data_text.py and test_quantize_config.py."""
from __future__ import annotations

import errno
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptqkit import QuantizeConfig
from gptqkit.errors import (CalibrationError, CheckpointError, ConfigError, DiskFullError, InterruptedRunError,
                            ModelLoadError, NumericalError)
from gptqkit.pipeline import quantize_model
from gptqkit.models.source import ModelHandle


from _arch_helpers import one_thread  # noqa: E402,F401 (autouse fixture: one torch thread)


def _ids(n: int = 2, L: int = 16) -> torch.Tensor:
    return torch.randint(4, 256, (n, L), generator=torch.Generator().manual_seed(0))


def _quantize(src: Path, out: Path, **kw):
    kw.setdefault("group_size", 32)
    resume = kw.pop("resume", False)
    return quantize_model(ModelHandle(src), _ids(), QuantizeConfig(**kw), out, progress=False, resume=resume)


def _no_complete_output(out: Path) -> None:
    assert not out.exists()  # a .partial folder may stay (resumable), never a folder at `out`


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- model path
def test_missing_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelHandle(tmp_path / "no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        ModelHandle(tmp_path / "empty")


def test_hub_id_offline(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' (offline mode)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match="download it on a networked machine"):
        ModelHandle("someone/some-model")


# ---------------------------------------------------------------- config
@pytest.mark.parametrize("kw", [{"bits": 5}, {"bits": 1}])
def test_unsupported_bits(kw):
    with pytest.raises(ConfigError, match=r"choose one of"):
        QuantizeConfig(**kw)


@pytest.mark.parametrize("gs", [0, -2, 1.5])
def test_unsupported_group_size(gs):
    with pytest.raises(ConfigError, match="-1"):
        QuantizeConfig(group_size=gs)


def test_layer_that_the_bits_cannot_pack(tiny_llama_factory, tmp_path):
    # 3-bit qweight packs 32 inputs per 3 words: a layer with K=48 inputs cannot be stored
    src = tiny_llama_factory(tmp_path / "m48", hidden_size=48, intermediate_size=96)
    out = tmp_path / "q"
    with pytest.raises(ConfigError, match=r"has 48 inputs.*multiple of 32.*dynamic rule"):
        _quantize(src, out, bits=3, group_size=16)
    _no_complete_output(out)
    assert not out.with_name("q.partial").exists()  # checked before any work


# ---------------------------------------------------------------- calibration text
def test_calibration_shorter_than_one_sequence(tiny_llama_dir):
    from gptqkit.api import load_tokenizer
    from gptqkit.data import calibration_batches
    with pytest.raises(CalibrationError, match="one sequence needs 512"):
        calibration_batches(load_tokenizer(tiny_llama_dir), ["too short"], nsamples=2, seqlen=512)


def test_calibration_empty(tmp_path):
    from gptqkit.data import load_text
    p = tmp_path / "empty.txt"
    p.write_text("  \n")
    with pytest.raises(CalibrationError, match="empty"):
        load_text(str(p))


def test_calibration_not_utf8(tmp_path):
    from gptqkit.data import load_text
    p = tmp_path / "latin.txt"
    p.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CalibrationError, match="Re-encode"):
        load_text(str(p))


# ---------------------------------------------------------------- numerics
def _poison(src: Path, dst: Path, name: str, value: float) -> Path:
    _copy_model(src, dst)
    f = dst / "model.safetensors"
    sd = load_file(f)
    sd[name][0, 0] = value
    save_file(sd, str(f), metadata={"format": "pt"})
    return dst


def test_nan_in_weights_names_the_layer(tiny_llama_dir, tmp_path):
    src = _poison(tiny_llama_dir, tmp_path / "m", "model.layers.1.mlp.up_proj.weight", float("nan"))
    out = tmp_path / "q"
    with pytest.raises(NumericalError, match=r"model\.layers\.1\.mlp\.up_proj.*NaN/Inf"):
        _quantize(src, out)
    _no_complete_output(out)


def test_inf_in_activations_names_the_layer(tiny_llama_dir, tmp_path):
    src = _poison(tiny_llama_dir, tmp_path / "m", "model.embed_tokens.weight", float("inf"))
    out = tmp_path / "q"
    ids = _ids()
    ids[:, 3] = 0  # token 0's embedding row holds the Inf
    with pytest.raises(NumericalError, match=r"inputs of model\.layers\.0\.self_attn\.q_proj contain NaN/Inf"):
        quantize_model(ModelHandle(src), ids, QuantizeConfig(group_size=32), out, progress=False)
    _no_complete_output(out)


def test_singular_hessian_falls_back_to_rtn_logged(caplog):
    from gptqkit.quant.gptq import gptq_solve
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    H = -torch.eye(64)  # not positive definite at any damping
    with caplog.at_level("WARNING"):
        r = gptq_solve(W, H, bits=4, group_size=32)
    assert r.method == "rtn-fallback" and "round-to-nearest" in caplog.text
    from gptqkit.quant.rtn import rtn_solve
    rtn = rtn_solve(W, bits=4, group_size=32)  # the fallback is plain round-to-nearest on the same grid
    assert torch.equal(r.q, rtn.q) and torch.equal(r.scales, rtn.scales) and torch.equal(r.zeros, rtn.zeros)


# ---------------------------------------------------------------- damaged model folders
def test_truncated_safetensors(tiny_llama_dir, tmp_path):
    src = _copy_model(tiny_llama_dir, tmp_path / "m")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted.*again"):
        ModelHandle(src)


def test_corrupted_safetensors_header(tiny_llama_dir, tmp_path):
    src = _copy_model(tiny_llama_dir, tmp_path / "m")
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage in the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        ModelHandle(src)


def _with_index(src: Path, dst: Path, target: str) -> Path:
    _copy_model(src, dst)
    (dst / "model.safetensors").rename(dst / "model-00001-of-00001.safetensors")
    names = list(load_file(dst / "model-00001-of-00001.safetensors"))
    wm = {k: "model-00001-of-00001.safetensors" for k in names}
    wm[names[0]] = target
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return dst


def test_index_naming_missing_files(tiny_llama_dir, tmp_path):
    src = _with_index(tiny_llama_dir, tmp_path / "m", "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="missing.*incomplete"):
        ModelHandle(src)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd"])
def test_index_naming_paths_outside_the_folder(tiny_llama_dir, tmp_path, target):
    (tmp_path / "outside.safetensors").write_bytes(b"")
    src = _with_index(tiny_llama_dir, tmp_path / "m", target)
    with pytest.raises(CheckpointError, match="outside"):
        ModelHandle(src)


def test_pickle_only_model_is_refused(tiny_llama_dir, tmp_path):
    src = _copy_model(tiny_llama_dir, tmp_path / "m")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never loads pickles"):
        ModelHandle(src)


def test_trust_remote_code_is_off_by_default():
    import inspect

    from gptqkit import api
    for fn in (ModelHandle.__init__, api.quantize, api.load):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


# ---------------------------------------------------------------- unknown formats
@pytest.mark.parametrize("key,value", [("checkpoint_format", "marlin_v9"), ("quant_method", "awq")])
def test_unknown_checkpoint_format_or_quant_method(tiny_llama_dir, tmp_path, key, value):
    from gptqkit import load
    d = _copy_model(tiny_llama_dir, tmp_path / "ck")
    qc = QuantizeConfig().to_dict()
    qc[key] = value
    qc.pop("format", None)
    (d / "quantize_config.json").write_text(json.dumps(qc))
    cj = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cj, "quantization_config": qc}))
    with pytest.raises(CheckpointError, match=value):
        QuantizeConfig.load(d)
    with pytest.raises(CheckpointError, match=value):
        load(d)
    with pytest.raises(ConfigError, match="choose one of"):
        QuantizeConfig(checkpoint_format=value) if key == "checkpoint_format" else QuantizeConfig(method=value)


# ---------------------------------------------------------------- writing and interruption
def test_disk_full_while_writing_then_resume(tiny_llama_dir, tmp_path, monkeypatch):
    import gptqkit.formats.checkpoint as ckpt
    real = ckpt._open_for_write
    calls = {"n": 0}

    class Full:
        def __init__(self, path):
            self.f = real(path)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    def opener(path):
        calls["n"] += 1
        return Full(path) if calls["n"] >= 3 else real(path)  # block 0 fits, then the disk is full

    monkeypatch.setattr(ckpt, "_open_for_write", opener)
    out = tmp_path / "q"
    with pytest.raises(DiskFullError, match="free space.*--resume"):
        _quantize(tiny_llama_dir, out)
    _no_complete_output(out)
    assert not list(out.with_name("q.partial").rglob("*.tmp"))  # no half-written file left behind
    monkeypatch.setattr(ckpt, "_open_for_write", real)  # space freed
    _quantize(tiny_llama_dir, out, resume=True)
    assert (out / "model.safetensors").is_file()


def test_ctrl_c_keeps_partial_and_cli_says_how_to_resume(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch,
                                                         capsys):
    from gptqkit.cli import main
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama_dir), "--calib", str(tiny_text_file), "--nsamples", "2", "--seqlen", "16",
            "--group-size", "32", "--out", str(out), "--no-eval", "--json"]
    monkeypatch.setenv("GPTQKIT_FAULT", "committed:0:interrupt")  # Ctrl-C right after block 0
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err
    _no_complete_output(out)
    assert json.loads((tmp_path / "q.partial" / "run_state.json").read_text())["next_block"] == 1
    monkeypatch.delenv("GPTQKIT_FAULT")
    assert main(args + ["--resume"]) == 0
    assert (out / "model.safetensors").is_file() and not (tmp_path / "q.partial").exists()
    # the summary counts the interrupted run's seconds too
    assert json.loads(capsys.readouterr().out)["quantize_seconds_before_resume"] > 0


def test_model_folder_without_tokenizer(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    src = tmp_path / "no-tok"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / f, src / f)
    rc, err = _cli(capsys, "quantize", src, "--calib", tiny_text_file, "--nsamples", "2", "--seqlen", "16",
                   "--out", tmp_path / "q", "--no-eval")
    _one_clear_line(rc, err, "no usable tokenizer", "tokenizer.json")
    _no_complete_output(tmp_path / "q")


def test_interrupted_run_error_is_a_keyboard_interrupt():
    assert issubclass(InterruptedRunError, KeyboardInterrupt)
    assert math.isfinite(0.0)


# ---------------------------------------------------------------- every command, through the CLI
# Each case: exit code 2, one "error: ..." line naming the problem, no traceback, nothing written.
def _cli(capsys, *argv) -> tuple[int, str]:
    from gptqkit.cli import main
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _one_clear_line(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_llama_dir):
    d = tmp_path_factory.mktemp("bad_files")
    (d / "nul.txt").write_bytes(b"\0\0abc\0" * 200)
    (d / "wrong.jsonl").write_text('{"content": "x"}\n')
    (d / "short.txt").write_text("hi\n")
    (d / "empty.txt").write_text("")
    no_conf = d / "no_conf"
    no_conf.mkdir()
    (no_conf / "model.safetensors").write_bytes((tiny_llama_dir / "model.safetensors").read_bytes())
    bad_json = d / "bad_json"
    shutil.copytree(tiny_llama_dir, bad_json)
    (bad_json / "config.json").write_text("{not json")
    pickled = d / "pickled"
    pickled.mkdir()
    for f in tiny_llama_dir.glob("*.json"):
        shutil.copy(f, pickled / f.name)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02 a pickle that must never be opened")
    return d


QUANTIZE_CASES = {
    "nsamples 0": (["--nsamples", "0"], ["--nsamples", "at least 1"]),
    "seqlen 0": (["--seqlen", "0"], ["--seqlen", "at least 1"]),
    "seqlen above positions": (["--seqlen", "1000"], ["--seqlen 1000", "maximum of 256 positions"]),
    "eval seqlen above positions": (["--eval-seqlen", "300"], ["--eval-seqlen 300", "256"]),
    "batch size 0": (["--batch-size", "0"], ["--batch-size"]),
    "max windows 0": (["--max-windows", "0"], ["--max-windows"]),
    "max memory not a size": (["--max-memory", "lots"], ["'lots' is not a size"]),
    "group size above a layer": (["--group-size", "4096"], ["group size 4096", "64 inputs"]),
    "group size 0": (["--group-size", "0"], ["group_size=0"]),
    "damp out of range": (["--damp", "-1"], ["damp_percent"]),
    "calib binary": (["--calib", "{d}/nul.txt"], ["binary"]),
    "calib jsonl wrong keys": (["--calib", "{d}/wrong.jsonl"], ['"text" field']),
    "calib too short": (["--calib", "{d}/short.txt"], ["tokens"]),
    "calib empty": (["--calib", "{d}/empty.txt"], ["empty"]),
    "calib missing": (["--calib", "{d}/none.txt"], ["does not exist"]),
}


@pytest.mark.parametrize("case", sorted(QUANTIZE_CASES))
def test_quantize_bad_settings(case, bad_files, tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    extra, words = QUANTIZE_CASES[case]
    out = tmp_path / "q"
    args = ["quantize", tiny_llama_dir, "--calib", tiny_text_file, "--out", out, "--nsamples", "2", "--seqlen", "32",
            "--group-size", "32", "--eval-seqlen", "32"] + [a.format(d=bad_files) for a in extra]
    rc, err = _cli(capsys, *args)
    _one_clear_line(rc, err, *words)
    assert not out.exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("folder,words", [("no_conf", ["no config.json"]), ("bad_json", ["config"]),
                                          ("pickled", ["pickled", "safetensors"])])
@pytest.mark.parametrize("cmd", ["quantize", "eval", "generate", "inspect"])
def test_bad_model_folder_every_command(cmd, folder, words, bad_files, tiny_text_file, tmp_path, capsys):
    src = bad_files / folder
    if cmd == "inspect" and folder == "pickled":
        words = ["no GPTQ quantization config"]  # inspect reads configs and headers, never weights
    args = {"quantize": ["--calib", tiny_text_file, "--out", tmp_path / "q", "--group-size", "32"],
            "eval": ["--text", tiny_text_file], "generate": ["hi"], "inspect": []}[cmd]
    rc, err = _cli(capsys, cmd, src, *args)
    _one_clear_line(rc, err, *words)
    assert not (tmp_path / "q").exists()


def test_eval_empty_text_and_generate_limits(tiny_llama_dir, bad_files, capsys):
    rc, err = _cli(capsys, "eval", tiny_llama_dir, "--text", bad_files / "empty.txt")
    _one_clear_line(rc, err, "empty")
    rc, err = _cli(capsys, "generate", tiny_llama_dir, "hi", "--max-new-tokens", "1000")
    _one_clear_line(rc, err, "maximum of 256 positions")
    rc, err = _cli(capsys, "generate", tiny_llama_dir, "hi", "--temperature", "-1")
    _one_clear_line(rc, err, "--temperature")


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (mounted as root); skipped where mounting is not allowed."""
    mounted = []

    def make(opts: str) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(d)
        return d
    yield make
    for d in mounted:
        if subprocess.run(["umount", str(d)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)
            raise AssertionError(f"{d} was still busy: something kept a file open there after the run failed")


def test_out_on_a_read_only_filesystem(tmpfs, tiny_llama_dir, tiny_text_file, capsys):
    ro = tmpfs("ro,size=1m")
    rc, err = _cli(capsys, "quantize", tiny_llama_dir, "--calib", tiny_text_file, "--out", ro / "q", "--nsamples", "2",
                   "--seqlen", "32", "--group-size", "32", "--no-eval")
    _one_clear_line(rc, err, "not writable")


def test_out_on_a_full_disk_keeps_a_resumable_partial(tmpfs, tiny_llama_dir, tiny_text_file, capsys):
    full = tmpfs("size=96k")
    args = ["quantize", tiny_llama_dir, "--calib", tiny_text_file, "--out", full / "q", "--nsamples", "8",
            "--seqlen", "64", "--group-size", "32", "--no-eval"]
    rc, err = _cli(capsys, *args)
    _one_clear_line(rc, err, "disk full", "--resume")
    assert (full / "q.partial").is_dir() and not (full / "q").exists()
