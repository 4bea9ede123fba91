"""Issue 14: `quantize --out` is checked before any work; each bad --out is one clean line, exit 2."""
from __future__ import annotations

from gptqkit.cli import main


def _run(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def _quantize(capsys, src, calib, out, *extra):
    return _run(capsys, "quantize", src, "--calib", calib, "--nsamples", "2", "--seqlen", "16",
                "--group-size", "32", "--out", out, "--no-eval", *extra)


def test_out_is_input(tiny_llama_dir, tiny_text_file, capsys):
    rc, msg = _quantize(capsys, tiny_llama_dir, tiny_text_file, tiny_llama_dir, "--overwrite")
    assert rc == 2 and "input model folder" in msg and "Traceback" not in msg


def test_out_inside_input(tiny_llama_dir, tiny_text_file, capsys):
    rc, msg = _quantize(capsys, tiny_llama_dir, tiny_text_file, tiny_llama_dir / "q")
    assert rc == 2 and "input model folder" in msg and not (tiny_llama_dir / "q").exists()


def test_out_is_file(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    f = tmp_path / "f.txt"
    f.write_text("x")
    rc, msg = _quantize(capsys, tiny_llama_dir, tiny_text_file, f)
    assert rc == 2 and "is a file" in msg and f.read_text() == "x"


def test_out_not_empty(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    rc, msg = _quantize(capsys, tiny_llama_dir, tiny_text_file, tmp_path)
    assert rc == 2 and "not empty" in msg and (tmp_path / "keep.txt").read_text() == "x"
