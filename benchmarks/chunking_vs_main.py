"""Time and peak RSS of one quantization of a 3-block copy of the built-in SmolLM2 (64 x 512
tokens of the built-in corpus, 4-bit g128, library defaults). BENCHMARKS.md, "The README main
job after issues 10, 13 and 14", alternates these runs, each in its own process:

    python benchmarks/chunking_vs_main.py none     # the default chunking (chunked in-flight)
    python benchmarks/chunking_vs_main.py 64       # batch_size=64: one chunk

NOMMAP=1 leaves glibc's mmap threshold alone. Prints one JSON line.
"""
import json
import os
import sys
import time
from pathlib import Path

from gptqkit import QuantizeConfig
from gptqkit.api import load_tokenizer
from gptqkit.data import calibration_batches
from gptqkit.models.default import default_model_dir
from gptqkit.models.source import ModelHandle
from gptqkit.pipeline import quantize_model


def three_block_copy(folder: Path = Path("/tmp/s2")) -> Path:
    """The model folder's files symlinked, with num_hidden_layers 3 in config.json."""
    if not (folder / "config.json").is_file():
        src = default_model_dir()
        folder.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name != "config.json" and not (folder / f.name).exists():
                (folder / f.name).symlink_to(f)
        cfg = json.loads((src / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    return folder


def main() -> None:
    if os.environ.get("NOMMAP"):
        import gptqkit.pipeline.driver as driver
        driver.return_large_buffers = lambda: None
    bs = None if sys.argv[1] == "none" else int(sys.argv[1])
    h = ModelHandle(three_block_copy())
    tok = load_tokenizer(h.path)
    cal = calibration_batches(tok, "shakespeare", nsamples=64, seqlen=512, seed=0)
    t = time.perf_counter()
    quantize_model(h, cal.input_ids, QuantizeConfig(bits=4, group_size=128), f"/tmp/chunking-{sys.argv[1]}",
                   progress=False, overwrite=True, batch_size=bs)
    peak = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM")) / 1024
    print(json.dumps({"batch_size": bs, "nommap": bool(os.environ.get("NOMMAP")),
                      "seconds": round(time.perf_counter() - t, 1), "peak_rss_mib": round(peak)}))


if __name__ == "__main__":
    main()
