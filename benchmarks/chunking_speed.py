"""Time of the default run (automatic chunks, chunked in flight) vs one chunk, side by side in one
process, alternating the order each repetition. Prints each run and a JSON summary.

    python benchmarks/chunking_speed.py MODEL_DIR REPEATS

MODEL_DIR: e.g. a copy of the built-in model folder (symlinked files) whose config.json says
num_hidden_layers=3, so that several repetitions fit in a few minutes."""
import sys, time, json, torch, gc
torch.set_num_threads(1)
from gptqkit import QuantizeConfig
from gptqkit.api import load_tokenizer
from gptqkit.data import calibration_batches
from gptqkit.pipeline import quantize_model
from gptqkit.models.source import ModelHandle
path, reps = sys.argv[1], int(sys.argv[2])
tok = load_tokenizer(path)
cal = calibration_batches(tok, "shakespeare", nsamples=64, seqlen=512, seed=0)
res = {"default": [], "one-chunk": []}
for r in range(reps):
    for v in (("default", "one-chunk") if r % 2 == 0 else ("one-chunk", "default")):
        h = ModelHandle(path)
        gc.collect()
        t = time.perf_counter()
        quantize_model(h, cal.input_ids, QuantizeConfig(bits=4, group_size=128), f"/tmp/alt_{v}", progress=False,
                       overwrite=True, batch_size=None if v == "default" else 64)
        res[v].append(round(time.perf_counter() - t, 2))
        print(v, res[v][-1], flush=True)
print(json.dumps(res), "ratio default/one-chunk (sum):", round(sum(res["default"]) / sum(res["one-chunk"]), 3))
