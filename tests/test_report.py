"""`gptqkit report DIR`: the self-contained HTML page of a checkpoint's per-layer log, checked as
data, as HTML, and rendered in a real headless browser (Debian's chromium; skipped if absent)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from _arch_helpers import one_thread  # noqa: F401  (autouse: 1 torch thread)

def _one_text(tiny_text_file) -> str:
    """One repeat (~470 chars) of the shared tiny corpus (tests/conftest.py's tiny_text_file)."""
    return tiny_text_file.read_text().split("\n")[0] + "\n"



@pytest.fixture(scope="module")
def qdir(tiny_text_file, tiny_llama_factory, tmp_path_factory):
    import gptqkit
    base = tmp_path_factory.mktemp("report")
    src = tiny_llama_factory(base / "src", num_hidden_layers=3)
    out = base / "q4"
    gptqkit.quantize(src, [_one_text(tiny_text_file)] * 4, out, gptqkit.QuantizeConfig(bits=4, group_size=32),
                     nsamples=4, seqlen=64, progress=False)
    (out / "eval.json").write_text(json.dumps({"text": "shakespeare-eval", "ppl_before": {"perplexity": 12.5},
                                               "ppl_after": {"perplexity": 12.9}}))
    return out


def test_layer_kinds():
    from gptqkit.report import layer_kind
    assert [layer_kind(f"model.layers.3.{n}") for n in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "attn.c_attn", "mlp.experts.3.w2")] == \
        ["q", "k", "v", "o", "gate", "up", "down", "qkv", "down"]
    assert layer_kind("lm_head") == "lm_head" and layer_kind("model.layers.0.weird") == "other"


def test_collect_and_html(qdir):
    from gptqkit.report import collect, render_html
    info = collect(qdir)
    assert len(info["layers"]) == 21 and info["quantized_params"] > 0
    assert 4.0 < info["bits_per_param_quantized"] < 6.0   # 4 bits + scales/zeros of groups of 32
    assert info["size_bytes"] < info["size_fp16_bytes"]
    page = render_html(info)
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert page.count('class="pt kind-') == 21
    for kind in ("q", "k", "v", "o", "gate", "up", "down"):
        assert f"kind-{kind}\"" in page
    assert "12.500" in page and "12.900" in page  # perplexity from eval.json
    assert "1e-" in page or "1e0" in page        # log-scale decade labels


def test_cli_report(qdir, tmp_path, capsys):
    from gptqkit.cli import main
    out = tmp_path / "r.html"
    assert main(["report", str(qdir), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2  # not a checkpoint: clear error, exit 2


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_report_in_headless_browser(qdir, tmp_path):
    """Renders the page in chromium: the DOM holds the SVG with one circle per layer, and a
    screenshot is written (outside the repo; GPTQKIT_REPORT_SCREENSHOT=path keeps a copy to look at)."""
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); browser check skipped")
    from gptqkit.report import write_report
    page = write_report(qdir, tmp_path / "report.html")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"]
    dom = subprocess.run([exe, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="loss-plot"' in dom.stdout and len(re.findall(r'<circle class="pt ', dom.stdout)) == 21
    shot = tmp_path / "report.png"
    r = subprocess.run([exe, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a blank 1200x900 page is ~5 KB
    keep = os.environ.get("GPTQKIT_REPORT_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
