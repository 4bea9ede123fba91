"""The `gptqkit` command, run in-process through gptqkit.cli.main on the tiny model."""
from __future__ import annotations

import json
import math

import pytest

from gptqkit.cli import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def cli_checkpoint(tiny_llama_dir, tiny_text_file, tmp_path_factory):
    """`gptqkit quantize ... --json` once for the whole module: (rc, stdout json, out folder)."""
    out = tmp_path_factory.mktemp("cli") / "q"
    import contextlib
    import io
    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = main(["quantize", str(tiny_llama_dir), "--calib", str(tiny_text_file), "--nsamples", "4",
                   "--seqlen", "32", "--group-size", "32", "--out", str(out), "--no-eval", "--json"])
    return rc, buf_out.getvalue(), out


def test_quantize_json(cli_checkpoint):
    rc, stdout, out = cli_checkpoint
    assert rc == 0
    res = json.loads(stdout)  # stdout holds exactly one JSON document
    assert res["out"] == str(out)
    assert res["config"]["bits"] == 4 and res["config"]["group_size"] == 32
    assert res["calib_tokens"] == 4 * 32
    assert math.isfinite(res["mean_layer_loss"])
    assert "ppl_after" not in res  # --no-eval
    assert out.is_dir() and (out / "quantize_config.json").is_file()
    assert not out.with_name(out.name + ".partial").exists()


def test_inspect_json(cli_checkpoint, capsys):
    _, _, out = cli_checkpoint
    rc, stdout, _ = _run(capsys, "inspect", out, "--json")
    assert rc == 0
    info = json.loads(stdout)
    assert info["quantized_layers"] == 14
    assert info["config"]["bits"] == 4 and info["config"]["group_size"] == 32
    # hidden 64, intermediate 128, 2 kv heads of 16: per block 64*(64+32+32+64) + 3*64*128
    assert info["quantized_params"] == 2 * (64 * 192 + 3 * 64 * 128)
    assert info["files"] == ["model.safetensors"]
    rc, stdout, _ = _run(capsys, "inspect", out)
    assert rc == 0 and "14 quantized layers" in stdout and "bits=4" in stdout


def test_eval_json(cli_checkpoint, tiny_text_file, capsys):
    _, _, out = cli_checkpoint
    rc, stdout, _ = _run(capsys, "eval", out, "--text", tiny_text_file, "--seqlen", "32", "--max-windows", "4",
                         "--json")
    assert rc == 0
    r = json.loads(stdout)
    assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
    assert r["seqlen"] == 32


def test_eval_and_generate_int8_activations(cli_checkpoint, tiny_text_file, tiny_llama_dir, capsys):
    """--int8-activations reaches the layers: eval's perplexity moves a little (the inputs are rounded
    to int8), generate runs; on a float model it is a note, not an error."""
    from gptqkit.kernels import cpu
    if not cpu.i8_available():
        pytest.skip("no int8-activation kernel in this build (needs AVX2)")
    _, _, out = cli_checkpoint
    args = ("eval", out, "--text", tiny_text_file, "--seqlen", "32", "--max-windows", "4", "--json")
    exact = json.loads(_run(capsys, *args)[1])["perplexity"]
    rc, stdout, _ = _run(capsys, *args, "--int8-activations")
    i8 = json.loads(stdout)["perplexity"]
    assert rc == 0 and i8 != exact and abs(i8 / exact - 1) < 0.05
    rc, stdout, _ = _run(capsys, "generate", out, "hello", "--max-new-tokens", "3", "--json", "--int8-activations", "2")
    assert rc == 0 and json.loads(stdout)["new_tokens"] >= 1
    rc, _, stderr = _run(capsys, "eval", tiny_llama_dir, "--text", tiny_text_file, "--seqlen", "32",
                         "--max-windows", "1", "--json", "--int8-activations")
    assert rc == 0 and "applies to GPTQ checkpoints" in stderr


def test_eval_float_model(tiny_llama_dir, tiny_text_file, capsys):
    rc, stdout, _ = _run(capsys, "eval", tiny_llama_dir, "--text", tiny_text_file, "--seqlen", "32",
                         "--max-windows", "2", "--json")
    assert rc == 0 and math.isfinite(json.loads(stdout)["perplexity"])


def test_generate_json(cli_checkpoint, capsys):
    _, _, out = cli_checkpoint
    rc, stdout, _ = _run(capsys, "generate", out, "hello", "--max-new-tokens", "5", "--json")
    assert rc == 0
    r = json.loads(stdout)
    assert r["prompt"] == "hello" and 1 <= r["new_tokens"] <= 5
    assert isinstance(r["completion"], str)


def test_quantize_rtn_overwrite(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "rtn"
    out.mkdir()  # a previous checkpoint: the only kind of folder --overwrite replaces
    (out / "stale.safetensors").write_bytes(b"old run")
    (out / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "quant_method": "gptq"}))
    rc, stdout, stderr = _run(capsys, "quantize", tiny_llama_dir, "--calib", tiny_text_file, "--nsamples", "2",
                              "--seqlen", "16", "--group-size", "32", "--bits", "8", "--method", "rtn", "--out",
                              out, "--no-eval", "--json", "--overwrite")
    assert rc == 0, stderr
    assert not (out / "stale.safetensors").exists()  # replaced, not merged
    assert not out.with_name("rtn.old").exists() and not out.with_name("rtn.partial").exists()
    res = json.loads(stdout)
    assert res["config"]["meta"]["method"] == "rtn"
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["meta"]["method"] == "rtn" and qc["bits"] == 8
    log = json.loads((out / "quant_log.json").read_text())
    assert {x["method"] for x in log["layers"]} == {"rtn"}


@pytest.mark.parametrize("bad", [
    ["--calib", "{missing}"],
    ["--group-size", "0"],
    ["--damp", "2"],
])
def test_bad_input_exit_code_2(bad, tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "q"
    missing = tmp_path / "no_such_file.txt"
    args = ["quantize", tiny_llama_dir, "--nsamples", "2", "--seqlen", "16", "--group-size", "32",
            "--calib", tiny_text_file, "--out", out, "--no-eval", "--json"]
    args += [a.format(missing=missing) for a in bad]
    rc, stdout, stderr = _run(capsys, *args)
    assert rc == 2
    assert "error:" in stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_existing_out_exit_code_2(cli_checkpoint, tiny_llama_dir, tiny_text_file, capsys):
    _, _, out = cli_checkpoint
    before = sorted(p.name for p in out.iterdir())
    rc, _, stderr = _run(capsys, "quantize", tiny_llama_dir, "--calib", tiny_text_file, "--nsamples", "2",
                         "--seqlen", "16", "--group-size", "32", "--out", out, "--no-eval", "--json")
    assert rc == 2 and "error:" in stderr and "exists" in stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_inspect_not_a_checkpoint(tiny_llama_dir, tmp_path, capsys):
    rc, _, stderr = _run(capsys, "inspect", tiny_llama_dir, "--json")
    assert rc == 2 and "error:" in stderr
    rc, _, stderr = _run(capsys, "eval", tmp_path / "nowhere", "--json")
    assert rc == 2 and "error:" in stderr


def test_generate_bad_and_empty_prompt(cli_checkpoint, capsys):
    _, _, out = cli_checkpoint
    rc, _, stderr = _run(capsys, "generate", out, "hi", "--max-new-tokens", "0", "--json")
    assert rc == 2 and "error:" in stderr and "max-new-tokens" in stderr
    rc, _, stderr = _run(capsys, "generate", out, "hi", "--backend", "nope", "--json")
    assert rc == 2 and "error:" in stderr
    rc, stdout, stderr = _run(capsys, "generate", out, "", "--max-new-tokens", "3", "--json")
    assert rc == 0, stderr
    assert json.loads(stdout)["new_tokens"] >= 1


def test_summary_counts_the_interrupted_run():
    from gptqkit.cli import _summary_text
    from gptqkit.pipeline.quant_log import QuantizeReport
    r = {"out": "x", "size_before_bytes": 1 << 20, "size_after_bytes": 1 << 19, "bits_per_param": 4.2,
         "seconds": {"quantize": 3.0, "total": 4.0}, "peak_rss_mb": 100.0}
    rep = QuantizeReport(out="x", forwards=2, calib_tokens=64)
    assert "interruption" not in _summary_text(r, rep, 512)
    line = [ln for ln in _summary_text({**r, "quantize_seconds_before_resume": 5.5}, rep, 512).splitlines()
            if ln.startswith("quantized")][0]
    assert "3.0 s + 5.5 s before the interruption" in line
