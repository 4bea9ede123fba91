"""AutoGPTQ compatibility: AutoGPTQ's README example, unchanged except its import line (and the two
model paths, which point at a tiny local model instead of the hub), quantizes and reloads a model."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from _arch_helpers import one_thread  # noqa: F401  (autouse: 1 torch thread)

# AutoGPTQ README "Quick Tour" (v0.7), verbatim except for the import line
# ("from auto_gptq import ..." -> "from gptqkit.compat.auto_gptq import ...").
AUTOGPTQ_README_EXAMPLE = '''
from transformers import AutoTokenizer, TextGenerationPipeline
from gptqkit.compat.auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig
import logging

logging.basicConfig(
    format="%(asctime)s %(levelname)s [%(name)s] %(message)s", level=logging.INFO, datefmt="%Y-%m-%d %H:%M:%S"
)

pretrained_model_dir = "facebook/opt-125m"
quantized_model_dir = "opt-125m-4bit"

tokenizer = AutoTokenizer.from_pretrained(pretrained_model_dir, use_fast=True)
examples = [
    tokenizer(
        "auto-gptq is an easy-to-use model quantization library with user-friendly apis, based on GPTQ algorithm."
    )
]

quantize_config = BaseQuantizeConfig(
    bits=4,  # quantize model to 4-bit
    group_size=128,  # it is recommended to set the value to 128
    desc_act=False,  # set to False can significantly speed up inference but the perplexity may slightly bad
)

# load un-quantized model, by default, the model will always be loaded into CPU memory
model = AutoGPTQForCausalLM.from_pretrained(pretrained_model_dir, quantize_config)

# quantize model, the examples should be list of dict whose keys can only be "input_ids" and "attention_mask"
model.quantize(examples)

# save quantized model
model.save_quantized(quantized_model_dir)

# save quantized model using safetensors
model.save_quantized(quantized_model_dir, use_safetensors=True)

# push quantized model to Hugging Face Hub.
# to use use_auth_token=True, Login first via huggingface-cli login.
# or pass explcit token with: use_auth_token="hf_xxxxxxx"
# (uncomment the following three lines to enable this feature)
# repo_id = f"YourUserName/{quantized_model_dir}"
# commit_message = f"AutoGPTQ model for {pretrained_model_dir}: {quantize_config.bits}bits, gr{quantize_config.group_size}, desc_act={quantize_config.desc_act}"
# model.push_to_hub(repo_id, commit_message=commit_message, use_auth_token=True)

# alternatively you can save and push at the same time
# (uncomment the following three lines to enable this feature)
# repo_id = f"YourUserName/{quantized_model_dir}"
# commit_message = f"AutoGPTQ model for {pretrained_model_dir}: {quantize_config.bits}bits, gr{quantize_config.group_size}, desc_act={quantize_config.desc_act}"
# model.save_quantized(quantized_model_dir, use_safetensors=True, push_to_hub=True, repo_id=repo_id, commit_message=commit_message, use_auth_token=True)

# load quantized model to the first GPU
model = AutoGPTQForCausalLM.from_quantized(quantized_model_dir, device="cuda:0")

# download quantized model from Hugging Face Hub and load to the first GPU
# model = AutoGPTQForCausalLM.from_quantized(repo_id, device="cuda:0", use_safetensors=True, use_triton=False)

# inference with model.generate
print(tokenizer.decode(model.generate(**tokenizer("auto_gptq is", return_tensors="pt").to(model.device))[0]))

# or you can also use pipeline
pipeline = TextGenerationPipeline(model=model, tokenizer=tokenizer)
print(pipeline("auto-gptq is")[0]["generated_text"])
'''


def run_script(src: str, model_dir: Path, workdir: Path, monkeypatch) -> dict:
    """Run an example script with its hub model id replaced by a local folder, in `workdir`."""
    monkeypatch.chdir(workdir)
    code = src.replace('"facebook/opt-125m"', repr(str(model_dir)))
    ns: dict = {"__name__": "__main__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "autogptq_readme_example.py", "exec"), ns)
    return ns


def test_autogptq_readme_example_unchanged(tiny_llama_factory, tmp_path, monkeypatch, capsys):
    assert AUTOGPTQ_README_EXAMPLE.count("gptqkit") == 1  # only the import line differs
    # hidden 128: the example's group size 128 must fit in a layer (a larger group is refused)
    model_dir = tiny_llama_factory(tmp_path / "model", hidden_size=128, intermediate_size=256)
    ns = run_script(AUTOGPTQ_README_EXAMPLE, model_dir, tmp_path, monkeypatch)
    out = tmp_path / "opt-125m-4bit"
    files = sorted(p.name for p in out.iterdir())
    assert "quantize_config.json" in files and "model.safetensors" in files and "quant_log.json" in files
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["desc_act"]) == (4, 128, False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    printed = capsys.readouterr().out
    assert printed.startswith("auto") and "\nauto-gptq is" in printed  # generate, then the pipeline
    # the reloaded model computes what gptqkit.load computes
    import gptqkit
    ref = gptqkit.load(out)
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    torch.testing.assert_close(ns["model"](ids).logits, ref(ids).logits)


def test_base_quantize_config_defaults_and_roundtrip(tmp_path):
    from gptqkit.compat.auto_gptq import BaseQuantizeConfig
    c = BaseQuantizeConfig()
    assert (c.bits, c.group_size, c.desc_act, c.sym, c.damp_percent) == (4, -1, True, True, 0.01)
    c = BaseQuantizeConfig(bits=3, group_size=32, desc_act=False, sym=False)
    c.save_pretrained(tmp_path)
    d = BaseQuantizeConfig.from_pretrained(tmp_path)
    assert (d.bits, d.group_size, d.desc_act, d.sym) == (3, 32, False, False)


def test_autogptq_keyword_spellings(tiny_llama_dir, tmp_path):
    """The arguments AutoGPTQ scripts pass: batch_size/use_triton/cache_examples_on_gpu to quantize,
    use_safetensors to save, device/use_triton/use_safetensors/inject_fused_* to from_quantized."""
    from transformers import AutoTokenizer

    from gptqkit.compat.auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    examples = [tok("to be or not to be, that is the question " * 2),
                tok("all the world's a stage", return_tensors="pt")]
    m = AutoGPTQForCausalLM.from_pretrained(str(tiny_llama_dir), BaseQuantizeConfig(bits=8, group_size=32),
                                            trust_remote_code=False)
    assert not m.quantized and m.config.num_hidden_layers == 2
    rep = m.quantize(examples, batch_size=1, use_triton=False, cache_examples_on_gpu=False)
    assert len(rep.layers) == 14 and all(l.bits == 8 for l in rep.layers)
    with torch.no_grad():
        y = m(torch.tensor([[5, 6, 7]])).logits  # usable right after quantize, like AutoGPTQ
    assert y.shape == (1, 3, 256)
    m.save_quantized(tmp_path / "q8", use_safetensors=True)
    q = AutoGPTQForCausalLM.from_quantized(str(tmp_path / "q8"), device="cpu", use_safetensors=True,
                                           use_triton=False, inject_fused_attention=False, inject_fused_mlp=False,
                                           disable_exllama=True, trust_remote_code=False, torch_dtype=torch.float32)
    assert q.quantize_config.bits == 8 and q.device.type == "cpu"
    torch.testing.assert_close(q(torch.tensor([[5, 6, 7]])).logits, y)
    # save_quantized of a loaded model copies the checkpoint
    q.save_quantized(tmp_path / "copy")
    assert (tmp_path / "copy" / "quantize_config.json").is_file()


def test_alias_auto_gptq_in_process(monkeypatch):
    import sys
    monkeypatch.delitem(sys.modules, "auto_gptq", raising=False)
    from gptqkit.compat import alias_auto_gptq
    alias_auto_gptq()
    from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig  # noqa: F401
    import gptqkit.compat.auto_gptq as mod
    assert sys.modules["auto_gptq"] is mod
