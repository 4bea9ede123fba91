"""Choosing where quantization runs (issue 11): 'auto' means CUDA when torch sees a GPU, with a log
line; an explicit 'cuda' without one is an error; the choice reaches the model handle, and
Hessians are float32 on CUDA. CUDA itself is faked here (CI has no GPU): these tests cover the
selection logic, not the GPU run (benchmarks/gpu_check.py does that on a device)."""
from __future__ import annotations

import logging

import pytest
import torch

import gptqkit.api as api
from gptqkit.errors import ConfigError
from gptqkit.pipeline.linears import hessian_dtype as _hessian_dtype


def _fake_cuda(monkeypatch, available: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake H200")


@pytest.mark.parametrize("arg", ["auto", None])
def test_auto_picks_cuda_when_available_and_says_so(monkeypatch, caplog, arg):
    _fake_cuda(monkeypatch, True)
    with caplog.at_level(logging.INFO, logger="gptqkit.api"):
        dev = api.resolve_device(arg)
    assert dev == torch.device("cuda")
    assert "quantizing on the GPU" in caplog.text and "Fake H200" in caplog.text


def test_auto_falls_back_to_cpu(monkeypatch, caplog):
    _fake_cuda(monkeypatch, False)
    with caplog.at_level(logging.INFO, logger="gptqkit.api"):
        assert api.resolve_device("auto") == torch.device("cpu")
    assert "on the CPU" in caplog.text


def test_explicit_devices(monkeypatch):
    _fake_cuda(monkeypatch, False)
    assert api.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        api.resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a device"):
        api.resolve_device("gpu0")
    _fake_cuda(monkeypatch, True)
    assert api.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert api.resolve_device("cpu") == torch.device("cpu")  # an explicit CPU stays on the CPU


class _Reached(Exception):
    pass


@pytest.mark.parametrize("available,asked,expect", [(True, "auto", "cuda"), (False, "auto", "cpu"),
                                                    (True, "cpu", "cpu")])
def test_quantize_passes_the_device_to_the_model_handle(monkeypatch, tmp_path, available, asked, expect):
    _fake_cuda(monkeypatch, available)
    seen = {}

    def fake_handle(path, dtype, device, trust_remote_code):
        seen["device"] = device
        raise _Reached

    monkeypatch.setattr(api, "ModelHandle", fake_handle)
    (tmp_path / "m").mkdir()
    monkeypatch.setattr(api, "resolve_model", lambda m: tmp_path / "m")
    with pytest.raises(_Reached):
        api.quantize(tmp_path / "m", ["text"], tmp_path / "out", device=asked)
    assert seen["device"] == torch.device(expect)


def test_hessians_are_float32_on_cuda():
    assert _hessian_dtype(torch.float64, torch.device("cuda")) == torch.float32
    assert _hessian_dtype(torch.bfloat16, "cuda:0") == torch.float32
    assert _hessian_dtype(torch.float64, torch.device("cpu")) == torch.float64  # exact CPU comparisons
    assert _hessian_dtype(torch.float32, "cpu") == torch.float32
    assert _hessian_dtype(torch.float64) == torch.float64


def test_cli_quantize_device_flag(monkeypatch, tmp_path, tiny_llama_dir, tiny_text_file, capsys):
    """--device is resolved before any work (auto: CUDA when seen, else CPU; an explicit CUDA device
    without a GPU is refused with exit code 2) and the resolved device reaches api.quantize."""
    from gptqkit import cli
    seen = []

    def fake_quantize(*a, **k):
        seen.append(k.get("device"))
        raise _Reached

    monkeypatch.setattr(api, "quantize", fake_quantize)
    args = ["quantize", str(tiny_llama_dir), "--calib", str(tiny_text_file), "--no-eval", "--group-size", "32"]
    for extra in ([], ["--device", "cpu"]):
        with pytest.raises(_Reached):
            cli.main(args + ["--out", str(tmp_path / f"o{len(seen)}"), *extra])
    assert seen == [torch.device("cpu"), torch.device("cpu")]
    assert cli.main(args + ["--out", str(tmp_path / "o9"), "--device", "cuda:0"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err and seen == [torch.device("cpu")] * 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    with pytest.raises(_Reached):
        cli.main(args + ["--out", str(tmp_path / "o8")])
    assert seen[-1] == torch.device("cuda") and "quantizing and evaluating on cuda" in capsys.readouterr().err
