"""Codes held once: a layer on the cpu backend drops its checkpoint `qweight` (the layout's
repacked copy holds every code) and rebuilds it exactly whenever it is read, so state_dict,
save and every reader see the checkpoint's bytes."""
from __future__ import annotations

import copy

import pytest
import torch

from gptqkit.kernels import cpu

pytestmark = pytest.mark.skipif(cpu.get_lib() is None, reason=f"CPU kernel unavailable: {cpu.lib_error()}")
needs_dp = pytest.mark.skipif(not cpu.dp_available(), reason="no AVX-512 BF16 dot-product kernel on this CPU")


@pytest.mark.parametrize("bits,use_dp", [(2, "0"), (3, "0"), (4, "0"), (8, "0"),
                                         pytest.param(4, "1", marks=needs_dp),
                                         pytest.param(3, "1", marks=needs_dp)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_qweight_dropped_and_rebuilt_exactly(make_layer, monkeypatch, bits, use_dp, act_order, fmt):
    monkeypatch.setattr(cpu.CpuBackend, "use_dp", use_dp)
    layer = make_layer(160, 77, bits, 32, sym=False, fmt=fmt, act_order=act_order, bias=True, seed=bits)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.post_init("cpu")
    assert layer.layout.dp == (use_dp == "1")
    assert layer.codes_in_layout and layer._buffers["qweight"] is None
    assert "qweight" not in dict(layer.named_buffers())  # the memory is gone, not hidden
    assert torch.equal(layer.qweight, before["qweight"])
    after = layer.state_dict()
    assert list(after) == list(before)  # same keys, same order
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert layer._buffers["qweight"] is None  # state_dict did not bring the copy back


def test_reload_assign_move_and_copy(make_layer, make_pair, relerr):
    layer, ref = make_pair(make_layer(128, 64, 4, 32, bias=True), "cpu")
    other = make_layer(128, 64, 4, 32, bias=True, seed=9)
    x = torch.randn(3, 128)
    y0 = layer(x)
    # a deep copy runs on its own tensors (the ctypes struct of pointers is rebuilt for the copy)
    dup = copy.deepcopy(layer)
    assert torch.equal(dup(x), y0) and torch.equal(dup.qweight, layer.qweight)
    # loading a state dict restores the buffer and prepares the new codes on the next call
    layer.load_state_dict(other.state_dict())
    assert not layer.codes_in_layout and torch.equal(layer._buffers["qweight"], other.qweight)
    other.post_init("torch")
    assert relerr(layer(x), other(x)) < 2e-5 and layer.codes_in_layout
    # assigning qweight does the same (ref's codes with other's scales and zeros)
    layer.qweight = ref.qweight.clone()
    assert not layer.codes_in_layout and layer.backend is None
    mixed = copy.deepcopy(other)
    mixed.qweight = ref.qweight.clone()
    mixed.post_init("torch")
    assert relerr(layer(x), mixed(x)) < 2e-5 and relerr(layer(x), other(x)) > 1e-2
    layer.load_state_dict(ref.state_dict())
    assert torch.equal(layer(x), y0)
    # a backend that reads qweight (the torch reference here; Triton on CUDA) gets it back as a buffer
    layer.post_init("torch")
    assert not layer.codes_in_layout and torch.equal(layer._buffers["qweight"], ref.qweight)
    assert relerr(layer(x), ref(x)) < 1e-6


def test_ragged_qweight_is_kept(make_layer):
    """A qweight with rows beyond K·b/32 cannot be rebuilt from the codes: it stays a buffer."""
    from gptqkit.kernels.qlinear import QuantLinear
    src = make_layer(96, 40, 4, 32)
    layer = QuantLinear(96, 40, 4, 32)
    layer.load_state_dict(src.state_dict())
    layer.qweight = torch.cat([src.qweight, torch.full((1, 40), 7, dtype=torch.int32)])  # one extra row
    layer.post_init("cpu")
    assert not layer.codes_in_layout and layer.qweight.shape == (13, 40)


@pytest.mark.parametrize("cfg", [dict(bits=4, group_size=32),
                                 dict(bits=3, group_size=32, desc_act=True, static_groups=False, lm_head=True)])
def test_save_after_load_is_byte_identical(tiny_llama_dir, tiny_text_file, tmp_path, cfg):
    """gptqkit's save path (models/loading.py save_quantized) after a load whose layers dropped
    their qweight writes the original checkpoint's bytes."""
    import hashlib

    import gptqkit
    from gptqkit.kernels.qlinear import QuantLinear
    text = tiny_text_file.read_text().split("\n")[0] + "\n"
    src = tmp_path / "q"
    gptqkit.quantize(tiny_llama_dir, [text] * 4, src, gptqkit.QuantizeConfig(**cfg), nsamples=4, seqlen=64,
                     progress=False)
    m = gptqkit.load(src)
    qls = [q for q in m.modules() if isinstance(q, QuantLinear)]
    assert qls and all(q.backend.name == "cpu" and q.codes_in_layout for q in qls)
    if not cfg.get("static_groups", True):
        assert any(q.layout.perm is not None for q in qls)  # act-order rows really were permuted
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    y = m(ids).logits
    m.save(tmp_path / "again")
    files = sorted(p.name for p in src.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "again").glob("*.safetensors"))
    for f in files:
        a, b = (src / f).read_bytes(), (tmp_path / "again" / f).read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), f
    assert torch.equal(gptqkit.load(tmp_path / "again")(ids).logits, y)
