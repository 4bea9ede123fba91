"""GPTQModel compatibility: GPTQModel's README flow (load with a quant config, quantize a list of
strings, save, load for inference, generate from a prompt string) on a tiny model."""
from __future__ import annotations

import json

import pytest
import torch

from _arch_helpers import one_thread  # noqa: F401  (autouse: 1 torch thread)

def _one_text(tiny_text_file) -> str:
    """One repeat (~470 chars) of the shared tiny corpus (tests/conftest.py's tiny_text_file)."""
    return tiny_text_file.read_text().split("\n")[0] + "\n"



def test_gptqmodel_readme_flow(tiny_text_file, tiny_llama_dir, tmp_path):
    from gptqkit.compat.gptqmodel import GPTQModel, QuantizeConfig

    model_id = str(tiny_llama_dir)
    quant_path = tmp_path / "tiny-gptqmodel-4bit"
    calibration_dataset = [s.strip() + "." for s in _one_text(tiny_text_file).split(".") if s.strip()] * 3

    quant_config = QuantizeConfig(bits=4, group_size=32)
    model = GPTQModel.load(model_id, quant_config)
    report = model.quantize(calibration_dataset, batch_size=4)
    model.save(quant_path)

    assert len(report.layers) == 14
    qc = json.loads((quant_path / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["format"]) == (4, 32, "gptq")
    assert (quant_path / "tokenizer.json").is_file()

    model = GPTQModel.load(quant_path)
    result = model.generate("To be, or not", max_new_tokens=6, do_sample=False)[0]
    text = model.tokenizer.decode(result)
    assert text.startswith("To be, or not") and len(result) > len("To be, or not")


def test_gptqmodel_quantize_config_spellings():
    from gptqkit.compat.gptqmodel import QuantizeConfig
    c = QuantizeConfig(bits=8, group_size=64, format="gptq_v2", desc_act=False, mse=2.4, device="cpu",
                       quant_method="gptq", damp_percent=0.05)
    assert (c.bits, c.group_size, c.checkpoint_format, c.mse, c.damp_percent) == (8, 64, "gptq_v2", True, 0.05)
    assert c.for_module("x").bits == 8  # dataclasses.replace still works on the subclass
    with pytest.raises(ValueError, match="quant_method"):
        QuantizeConfig(bits=4, quant_method="awq")


def test_gptqmodel_load_float_without_config_says_what_to_do(tiny_llama_dir):
    from gptqkit.compat.gptqmodel import GPTQModel
    with pytest.raises(ValueError, match="pass a QuantizeConfig"):
        GPTQModel.load(str(tiny_llama_dir))


def test_gptqmodel_save_of_loaded_model_roundtrips(tiny_text_file, tiny_llama_dir, tmp_path):
    """save() of a model loaded from a checkpoint writes a checkpoint gptqkit.load reads back."""
    import gptqkit
    from gptqkit.compat.gptqmodel import GPTQModel, QuantizeConfig
    m = GPTQModel.load(str(tiny_llama_dir), QuantizeConfig(bits=3, group_size=32))
    m.quantize([_one_text(tiny_text_file)] * 2)
    m.save(tmp_path / "a")
    loaded = GPTQModel.load(tmp_path / "a", device="cpu", backend="torch")
    loaded.save(tmp_path / "b")
    ids = torch.tensor([[4, 5, 6, 7]])
    torch.testing.assert_close(gptqkit.load(tmp_path / "b")(ids).logits, loaded(ids).logits)
