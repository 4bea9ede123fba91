"""Benchmark scripts run with benchmarks/ first on sys.path, so a script named like an installed
package hides that package from everything the script imports. transformers 5.25 began importing
the `kernels` package, and benchmarks/kernels.py (since renamed) broke gpu_check this way."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def test_no_benchmark_script_shadows_an_installed_module():
    here = {str(BENCH), str(BENCH.parent), "", "."}
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if p not in here]
    try:
        clashes = []
        for f in sorted(BENCH.glob("*.py")):
            name = f.stem
            if name in sys.builtin_module_names or name in sys.stdlib_module_names:
                clashes.append(f"{f.name} (standard library)")
            elif importlib.util.find_spec(name) is not None:
                clashes.append(f"{f.name} (installed: {importlib.util.find_spec(name).origin})")
    finally:
        sys.path[:] = saved
    assert not clashes, f"rename these benchmark scripts, they hide modules of the same name: {clashes}"
