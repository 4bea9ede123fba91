"""benchmarks/vs_gptqmodel.py: `--model` is a documented option (a built-in name such as
gemma3-270m, or a folder), not only the internal argument its worker subprocesses receive."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_gptqmodel.py"


def test_model_option_is_documented():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--model MODEL" in r.stdout
    assert "gemma3-270m" in r.stdout
    assert "--worker" not in r.stdout  # the internal arguments stay hidden

