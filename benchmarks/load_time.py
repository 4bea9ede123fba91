"""One gptqkit.load of a GPTQ checkpoint in this process, timed: the whole load, and the cpu
backend's `prepare` summed over layers. The model's modeling code is imported first (as in the
main job, where the fp32 model was loaded before). Run it alternately with two trees:

    for r in 1 2; do for s in /work/main/src src; do PYTHONPATH=$s python benchmarks/load_time.py /tmp/e2e-smol-4bit 2; done; done
"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
from transformers import AutoConfig, AutoModelForCausalLM
from accelerate import init_empty_weights
cfg = AutoConfig.from_pretrained(sys.argv[1])
with init_empty_weights():
    AutoModelForCausalLM.from_config(cfg)  # import the modeling code first, as the main job has by then
import gptqkit
import gptqkit.kernels.cpu as cpu
cpu.get_op(); cpu.get_lib()
prep = [0.0]
orig = cpu.CpuBackend.prepare
def timed(self, layer):
    t = time.perf_counter(); r = orig(self, layer); prep[0] += time.perf_counter() - t; return r
cpu.CpuBackend.prepare = timed
t = time.perf_counter()
m = gptqkit.load(sys.argv[1])
print(json.dumps({"src": gptqkit.__file__, "load_s": time.perf_counter() - t, "prepare_s": prep[0]}))
