"""benchmarks/gpu_check.py (issue 11) on the CPU: its tiny mode runs every step (kernels in Triton's
interpreter, a 2-block model quantized and decoded with --device cpu) and reports every target as
"not measured"; the target logic itself is checked on made-up GPU figures."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SLOW = os.environ.get("GPTQKIT_SLOW") == "1"


def _module():
    spec = importlib.util.spec_from_file_location("_gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_tiny_mode_runs_every_step(tmp_path):
    """Reduced form: 4-bit group 32 only and no tile sweep; GPTQKIT_SLOW=1: every bits x group and the sweep."""
    pytest.importorskip("triton")
    out = tmp_path / "gc.json"
    extra = [] if SLOW else ["--bits", "4", "--groups", "32", "--no-sweep"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--json-out", str(out),
                        "--workdir", str(tmp_path / "work"), *extra],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-5000:]
    res = json.loads(out.read_text())
    assert json.loads(r.stdout) == res  # the printed document is the saved one
    assert res["errors"] == {}
    c = res["correctness"]
    assert c["failed"] == 0 and c["cases"] == len(c["all"]) >= (256 if SLOW else 8)
    assert {x["path"] for x in c["all"]} == {"decode", "gemm", "dequant"}
    assert {x["dtype"] for x in c["all"]} == {"float16", "bfloat16"}
    rows = res["timings"]["rows"]
    assert {r["M"] for r in rows} == {1, 4, 16, 64} and all(r["triton_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert all("gemm_ms" in r and "dequant_ms" in r for r in rows if r["M"] == 64)
    if SLOW:
        assert res["timings"]["sweep"] and not any("error" in s for s in res["timings"]["sweep"])
    q = res["quantize"]
    assert q["model"]["blocks"] == 2 and q["layers"] == 14 and q["seconds_to_saved_checkpoint"] > 0
    d = res["decode"]
    assert d["fp_tokens_per_s"] > 0 and d["q4_tokens_per_s"] > 0 and sum(d["q4_backends"].values()) == 14
    assert len(res["targets"]) == 7 and {t["status"] for t in res["targets"]} == {"not measured"}
    assert "targets:" in r.stderr and "not measured" in r.stderr


def _fake(speed1=3.5, floor1=1.2, speed16=2.6, big=(1.1, 0.9), qsec=250.0, dec=2.7, failed=0):
    rows = [{"K": 8192, "N": 8192, "M": 1, "speedup_vs_cublas": speed1, "vs_floor": floor1},
            {"K": 8192, "N": 8192, "M": 16, "speedup_vs_cublas": speed16, "vs_floor": 2.0},
            {"K": 4096, "N": 4096, "M": 256, "speedup_vs_cublas": big[0], "vs_floor": 9.0},
            {"K": 4096, "N": 14336, "M": 1024, "speedup_vs_cublas": big[1], "vs_floor": 9.0}]
    return {"correctness": {"failed": failed, "cases": 10}, "timings": {"rows": rows},
            "quantize": {"model": {"blocks": 32}, "seconds_to_saved_checkpoint": qsec},
            "decode": {"speedup": dec}}


def test_targets_met_not_met_not_measured():
    gc = _module()
    st = {t["target"].split(":")[0]: t["status"] for t in gc.targets(_fake(), "cuda")}
    assert list(st.values()) == ["met", "met", "met", "met", "not met", "met", "met"]
    st = [t["status"] for t in gc.targets(_fake(speed1=2.9, floor1=1.6, speed16=2.4, big=(1.0, 1.2), qsec=301,
                                                dec=2.4, failed=1), "cuda")]
    assert st == ["not met", "not met", "not met", "not met", "met", "not met", "not met"]
    partial = _fake()
    del partial["quantize"], partial["decode"]
    partial["timings"]["rows"] = partial["timings"]["rows"][2:]
    st = [t["status"] for t in gc.targets(partial, "cuda")]
    assert st == ["met", "not measured", "not measured", "not measured", "not met", "not measured", "not measured"]
    assert {t["status"] for t in gc.targets(_fake(), "cpu")} == {"not measured"}  # never "met" off the GPU
