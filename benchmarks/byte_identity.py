"""Byte identity of `gptqkit quantize` across code changes: sha256 of every .safetensors file
(and the shard index) written by the CLI in several run modes, printed as JSON.

A refactor of the pipeline must change no output byte. Run this script once with the old code
and once with the new, on the same machine, and compare:

    PYTHONPATH=/path/to/old/src python benchmarks/byte_identity.py --work /tmp/bi-old > old.json
    PYTHONPATH=/path/to/new/src python benchmarks/byte_identity.py --work /tmp/bi-new > new.json
    python benchmarks/byte_identity.py --compare old.json new.json

Cases on a tiny random Llama (4 blocks, float32; one shard each, tests/test_resume.py covers
sharding):
plain; killed after block 1 then `--resume`; `--max-memory` (hidden states on disk);
`--batch-size` (block replay per chunk); torchrun with 2 processes (gloo); and the paths with
no other byte check: `--lm-head`, `--no-true-sequential`, `--method rtn`, asymmetric gptq_v2.
`--real` adds the README main job's model (the built-in SmolLM2-135M, Shakespeare calibration)
with 8 samples of 128 tokens: plain, resume, max-memory, batch-size, torchrun 2.
Every subprocess runs with OMP_NUM_THREADS=1, so summation order does not depend on the load.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. To be, or not to be, "
        "that is the question: whether 'tis nobler in the mind to suffer the slings and arrows of "
        "outrageous fortune, or to take arms against a sea of troubles. hello world, hello there.\n") * 40

TINY = ["--calib", "{text}", "--nsamples", "8", "--seqlen", "32", "--group-size", "32", "--no-eval", "--json"]
CASES: dict[str, dict] = {
    "plain": {},
    "resume": {"kill_after": 1},
    "max_memory": {"args": ["--max-memory", "4KB"]},
    "max_memory_batch": {"args": ["--max-memory", "4KB", "--batch-size", "3"]},
    "batch_size": {"args": ["--batch-size", "3"]},
    "torchrun2": {"nproc": 2},
    "lm_head": {"args": ["--lm-head"]},
    "not_true_sequential": {"args": ["--no-true-sequential"]},
    "rtn": {"args": ["--method", "rtn"]},
    "asym_v2_no_desc_act": {"args": ["--asym", "--format", "gptq_v2", "--no-desc-act"]},
}

REAL_CASES: dict[str, dict] = {
    "real_plain": {},
    "real_resume": {"kill_after": 10},
    "real_max_memory": {"args": ["--max-memory", "4MB", "--batch-size", "4"]},
    "real_batch_size": {"args": ["--batch-size", "4"]},
    "real_torchrun2": {"nproc": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny(folder: Path) -> Path:
    """A tiny random Llama with a character tokenizer, built in a subprocess so the model
    does not depend on which gptqkit is on the path."""
    if (folder / "config.json").is_file():
        return folder
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'tests')!r})
from conftest import make_tiny_llama
make_tiny_llama({str(folder)!r}, num_hidden_layers=4, intermediate_size=192)
"""
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())
    return folder


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", **extra)
    for k in ("GPTQKIT_FAULT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        if k not in extra:
            env.pop(k, None)
    return env


def _quantize(args: list[str], nproc: int = 1, fault: str | None = None) -> subprocess.CompletedProcess:
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(_free_port()), "-m", "gptqkit", "quantize"]
    else:
        head = [sys.executable, "-m", "gptqkit", "quantize"]
    env = _env(GPTQKIT_FAULT=fault) if fault else _env()
    return subprocess.run(head + args, env=env, capture_output=True, text=True, timeout=3600)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name.endswith((".safetensors", ".safetensors.index.json"))}


def run_case(name: str, case: dict, base: list[str], work: Path) -> dict:
    out = work / name
    args = base + case.get("args", []) + ["--out", str(out), "--overwrite"]
    t0 = time.perf_counter()
    if "kill_after" in case:  # SIGKILL once block k is committed, then continue it
        r = _quantize(args, fault=f"committed:{case['kill_after']}:kill")
        if r.returncode == 0 or not (work / f"{name}.partial").is_dir():
            return {"error": "the fault did not stop the run", "stderr": r.stderr[-2000:]}
        args = args + ["--resume"]
    r = _quantize(args, nproc=case.get("nproc", 1))
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}", "stderr": r.stderr[-2000:]}
    return {"seconds": round(time.perf_counter() - t0, 1), "sha256": digests(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptqkit-byte-identity"))
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--real", action="store_true", help="also the built-in SmolLM2-135M: " + ",".join(REAL_CASES))
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"),
                    help="compare two outputs of this script instead of running")
    a = ap.parse_args()
    if a.compare:
        x, y = (json.loads(p.read_text())["cases"] for p in a.compare)
        verdict = {k: (x[k].get("sha256") == y[k].get("sha256") and "sha256" in x[k]) if k in y else "missing"
                   for k in x}
        print(json.dumps({"identical": all(v is True for v in verdict.values()), "cases": verdict}, indent=1))
        sys.exit(0 if all(v is True for v in verdict.values()) else 1)

    import gptqkit
    a.work.mkdir(parents=True, exist_ok=True)
    text = a.work / "text.txt"
    text.write_text(TEXT)
    src = build_tiny(a.work / "tiny-llama")
    base = [str(src)] + [t.format(text=text) for t in TINY]
    results = {}
    for name in filter(None, a.cases.split(",")):
        results[name] = run_case(name, CASES[name], base, a.work)
    if a.real:  # the README main job's model and calibration text, few samples, no evaluation
        real = ["--nsamples", "8", "--seqlen", "128", "--no-eval", "--json"]
        for name, case in REAL_CASES.items():
            results[name] = run_case(name, case, real, a.work)
    print(json.dumps({"gptqkit": str(Path(gptqkit.__file__).parent), "cases": results}, indent=1))


if __name__ == "__main__":
    main()
