"""The silent failures of issue 14, each made loud: resume onto changed weights or settings,
two runs on one output folder, --overwrite onto user files or the input, SIGTERM, and
checkpoints whose g_idx or bits disagree with their tensors. Every refusal is one line on
stderr, exit code 2, no traceback, and the user's files are untouched."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptqkit.cli import main

BASE = ["--nsamples", "4", "--seqlen", "32", "--group-size", "32", "--no-eval"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _refused(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def _model_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture
def model(tiny_llama_factory, tmp_path) -> Path:
    """A private copy (tests here change its files)."""
    return tiny_llama_factory(tmp_path / "model", num_hidden_layers=3)


def _interrupted(capsys, model: Path, calib: Path, out: Path, *extra) -> None:
    """A run stopped by Ctrl-C right after block 0 is committed."""
    os.environ["GPTQKIT_FAULT"] = "committed:0:interrupt"
    try:
        rc, _, err = _run(capsys, "quantize", model, "--calib", calib, "--out", out, *BASE, *extra)
    finally:
        del os.environ["GPTQKIT_FAULT"]
    assert rc == 130 and "--resume" in err, err


def test_resume_refuses_changed_weights_of_the_same_size(model, tiny_llama_factory, tiny_text_file, tmp_path,
                                                         capsys):
    out = tmp_path / "q"
    _interrupted(capsys, model, tiny_text_file, out)
    other = tiny_llama_factory(tmp_path / "other", seed=1, num_hidden_layers=3)
    st = (model / "model.safetensors").stat()
    assert (other / "model.safetensors").stat().st_size == st.st_size
    shutil.copyfile(other / "model.safetensors", model / "model.safetensors")
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # same name, size and mtime
    rc, _, err = _run(capsys, "quantize", model, "--calib", tiny_text_file, "--out", out, *BASE, "--resume")
    _refused(rc, err, "weight file(s) changed: model.safetensors", "--resume")
    assert not out.exists() and (tmp_path / "q.partial" / "blocks" / "block-00000.safetensors").is_file()


def test_resume_with_other_settings_lists_the_differences(model, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "q"
    _interrupted(capsys, model, tiny_text_file, out)
    rc, _, err = _run(capsys, "quantize", model, "--calib", tiny_text_file, "--out", out, *BASE, "--bits", "8",
                      "--resume")
    _refused(rc, err, "different inputs", "config:", "bits")
    rc, _, err = _run(capsys, "quantize", model, "--calib", tiny_text_file, "--out", out, *BASE, "--resume")
    assert rc == 0, err  # the same command still resumes


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < seconds, "the first run did not reach block 1"
        time.sleep(0.2)


def _cli_proc(model: Path, calib: Path, out: Path, fault: str, *extra) -> subprocess.Popen:
    env = dict(os.environ, GPTQKIT_FAULT=fault, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "gptqkit", "quantize", str(model), "--calib", str(calib),
                             "--out", str(out), *BASE, "--json", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_second_run_on_the_same_out_is_refused_naming_the_pid(model, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "q"
    first = _cli_proc(model, tiny_text_file, out, "committed:0:sleep")  # holds the lock, block 0 done
    try:
        state = tmp_path / "q.partial" / "run_state.json"
        _wait_for(state, first)
        before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "q.partial").rglob("*"))
        for extra in ([], ["--overwrite"], ["--resume"]):
            rc, _, err = _run(capsys, "quantize", model, "--calib", tiny_text_file, "--out", out, *BASE,
                              "--bits", "8", *extra)
            _refused(rc, err, f"PID {first.pid}")
        assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "q.partial").rglob("*")) == before
        assert json.loads(state.read_text())["next_block"] == 1
    finally:
        first.send_signal(signal.SIGTERM)
        _, ferr = first.communicate(timeout=120)
    assert first.returncode == 130 and "--resume" in ferr and "Traceback" not in ferr, ferr
    rc, _, err = _run(capsys, "quantize", model, "--calib", tiny_text_file, "--out", out, *BASE, "--resume")
    assert rc == 0, err  # the lock died with its holder
    assert not (out / ".lock").exists()


def test_sigterm_then_resume_is_byte_identical(model, tiny_text_file, tmp_path, capsys):
    # every part at the interrupted process's thread count (1): floating-point sums, and with them
    # the clip search's near-ties, depend on it, so byte identity is promised at equal threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _sigterm_then_resume(model, tiny_text_file, tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _sigterm_then_resume(model, tiny_text_file, tmp_path, capsys):
    ref = tmp_path / "ref"
    rc, _, err = _run(capsys, "quantize", model, "--calib", tiny_text_file, "--out", ref, *BASE)
    assert rc == 0, err
    out = tmp_path / "q"
    proc = _cli_proc(model, tiny_text_file, out, "committed:1:sleep")
    _wait_for(tmp_path / "q.partial" / "blocks" / "block-00001.safetensors", proc)
    while json.loads((tmp_path / "q.partial" / "run_state.json").read_text())["next_block"] < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert not out.exists()
    rc, _, err = _run(capsys, "quantize", model, "--calib", tiny_text_file, "--out", out, *BASE, "--resume")
    assert rc == 0, err
    assert _model_bytes(out) == _model_bytes(ref) and _model_bytes(ref)


def test_overwrite_refuses_a_folder_of_user_files(model, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "data.safetensors").write_bytes(b"not a checkpoint")
    rc, _, err = _run(capsys, "quantize", model, "--calib", tiny_text_file, "--out", out, *BASE, "--overwrite")
    _refused(rc, err, "not a quantized checkpoint", "thesis.tex")
    assert (out / "thesis.tex").read_text() == "years of work" and len(list(out.iterdir())) == 2
    assert not (tmp_path / "mine.partial").exists()


@pytest.mark.parametrize("where", ["input", "inside"])
def test_overwrite_never_writes_over_the_input(model, tiny_text_file, tmp_path, capsys, where):
    before = _model_bytes(model)
    out = model if where == "input" else model / "q"
    rc, _, err = _run(capsys, "quantize", model, "--calib", tiny_text_file, "--out", out, *BASE, "--overwrite")
    _refused(rc, err, "input model folder")
    assert _model_bytes(model) == before and not (model / "q").exists()


def test_overwrite_replaces_a_previous_checkpoint(model, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "q"
    for bits in ("4", "8"):
        rc, _, err = _run(capsys, "quantize", model, "--calib", tiny_text_file, "--out", out, *BASE, "--bits", bits,
                          "--overwrite")
        assert rc == 0, err
    assert json.loads((out / "quantize_config.json").read_text())["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "q"]  # no .old or .partial left


# ---------------------------------------------------------------- checkpoints that lie
@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tiny_text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "q"
    assert main(["quantize", str(tiny_llama_dir), "--calib", str(tiny_text_file), "--out", str(out), *BASE,
                 "--json"]) == 0
    return out


def _copy(checkpoint: Path, dst: Path) -> Path:
    shutil.copytree(checkpoint, dst)
    return dst


def test_g_idx_out_of_range_is_refused_at_load(checkpoint, tiny_text_file, tmp_path, capsys):
    bad = _copy(checkpoint, tmp_path / "bad")
    t = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    G = t[f"{name}.scales"].shape[0]
    t[f"{name}.g_idx"] = t[f"{name}.g_idx"].clone()
    t[f"{name}.g_idx"][7] = G  # one past the last group
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    for cmd in (["eval", bad, "--text", tiny_text_file, "--seqlen", "32"], ["generate", bad, "hi"]):
        rc, _, err = _run(capsys, *cmd)
        _refused(rc, err, f"{name}.g_idx", f"outside the {G} groups")


def test_config_bits_that_disagree_with_the_tensors(checkpoint, tiny_text_file, tmp_path, capsys):
    bad = _copy(checkpoint, tmp_path / "bad")
    for f in ("quantize_config.json", "config.json"):
        d = json.loads((bad / f).read_text())
        (d.get("quantization_config") or d)["bits"] = 8
        (bad / f).write_text(json.dumps(d))
    for cmd in (["eval", bad, "--text", tiny_text_file, "--seqlen", "32"], ["inspect", bad]):
        rc, _, err = _run(capsys, *cmd)
        _refused(rc, err, "4-bit", "says 8 bits")


def test_inspect_counts_mixed_bits_per_layer(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    """bits per parameter of a dynamic (mixed-bit) checkpoint: each layer counted at its own width."""
    from gptqkit import QuantizeConfig, quantize
    out = tmp_path / "mixed"
    cfg = QuantizeConfig(bits=4, group_size=32, dynamic={r"+:mlp\.": {"bits": 8}}, method="rtn")
    quantize(tiny_llama_dir, str(tiny_text_file), out, cfg, nsamples=2, seqlen=32, progress=False)
    rc, stdout, err = _run(capsys, "inspect", out, "--json")
    assert rc == 0, err
    info = json.loads(stdout)
    # per block: attention 64x(64+32+32+64) at 4 bits, MLP 3x64x128 at 8 bits
    assert info["bits_histogram"] == {"4": 8, "8": 6}
    assert info["quantized_params"] == 2 * (64 * 192 + 3 * 64 * 128)
    assert info["files"] == ["model.safetensors"]


@pytest.mark.parametrize("damage", ["truncated", "missing shard"])
def test_damaged_checkpoint_every_reader(checkpoint, tiny_text_file, tmp_path, capsys, damage):
    bad = _copy(checkpoint, tmp_path / "bad")
    f = bad / "model.safetensors"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        (bad / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    for cmd in (["eval", bad, "--text", tiny_text_file, "--seqlen", "32"], ["generate", bad, "hi"],
                ["inspect", bad]):
        rc, _, err = _run(capsys, *cmd)
        _refused(rc, err, "truncated" if damage == "truncated" else "missing")
