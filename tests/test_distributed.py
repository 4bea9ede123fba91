"""torch.distributed: `torchrun --nproc-per-node 2 -m gptqkit quantize` on CPU (gloo) against the
single-process run on the same inputs. Hessians are summed in another order and the solves run
on different ranks; in float32 a rounding tie flipped by that order can cascade through GPTQ's
error feedback, so both runs compute in float64, where almost all codes must match,
dequantized weights must agree closely and the logits of the loaded checkpoints too."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from _arch_helpers import dequantized_weights, one_thread  # noqa: F401 (autouse fixture)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quantize_cmd(src, text, out, *extra) -> list[str]:
    return ["quantize", str(src), "--calib", str(text), "--nsamples", "6", "--seqlen", "32", "--group-size", "32",
            "--desc-act", "--out", str(out), "--no-eval", "--json", "--dtype", "float64", *extra]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_match_single_process(tiny_llama_factory, tiny_text_file, tmp_path):
    from gptqkit.formats.checkpoint import iter_tensors
    from gptqkit.models.loading import load_quantized
    src = tiny_llama_factory(tmp_path / "m", num_hidden_layers=3)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    for k in ("GPTQKIT_FAULT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    single, multi = tmp_path / "single", tmp_path / "multi"
    r = subprocess.run([sys.executable, "-m", "gptqkit", *_quantize_cmd(src, tiny_text_file, single, "--batch-size", "3")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(_free_port()), "-m", "gptqkit",
                        *_quantize_cmd(src, tiny_text_file, multi)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('"out"') == 1  # rank 0 alone prints
    assert not (tmp_path / "multi.partial").exists()

    a, b = dict(iter_tensors(single)), dict(iter_tensors(multi))
    assert a.keys() == b.keys()
    for k in a:  # what is not quantized is copied bit for bit; g_idx (act-order) almost always agrees
        if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
            assert torch.equal(a[k], b[k]), k
    wa, wb = dequantized_weights(single), dequantized_weights(multi)
    same = total = 0
    for name in wa:
        Wa, Wb = wa[name][0], wb[name][0]
        step = (Wa.abs().max() / 7).item()  # about one 4-bit step
        same += int((Wa - Wb).abs().le(1e-3 * step).sum())
        total += Wa.numel()
        assert (Wa - Wb).abs().mean().item() < 0.01 * step, name
    assert same / total > 0.995, same / total

    ids = torch.randint(4, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        la = load_quantized(single, backend="torch")(input_ids=ids).logits
        lb = load_quantized(multi, backend="torch")(input_ids=ids).logits
    assert torch.allclose(la, lb, atol=0.05 * la.abs().max().item(), rtol=0), (la - lb).abs().max()
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean().item() > 0.95
