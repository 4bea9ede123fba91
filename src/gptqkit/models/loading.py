"""Loading a GPTQ checkpoint (ours or anyone's) as an ordinary transformers model.

The model is built on the meta device; every module that has a `qweight` in the checkpoint
becomes a QuantLinear with the bits/group size the tensors imply; tensors are then assigned
straight from the safetensors files. Which modules are quantized is read from the tensors,
not guessed from the architecture, so peers' checkpoints (lm_head quantized, mixed bits,
skipped layers) load as they are.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import types
from pathlib import Path

import torch
from torch import nn

from ..config import QuantizeConfig
from ..errors import CheckpointError
from ..formats.checkpoint import GPTQ_TENSORS, iter_tensors
from ..kernels.qlinear import QuantLinear
from .source import resolve_model_path

log = logging.getLogger(__name__)


def _bits_from_shapes(qweight_rows: int, K: int) -> int:
    for b in (2, 3, 4, 8):
        if K * b // 32 == qweight_rows and (K * b) % 32 == 0:
            return b
    raise CheckpointError(f"qweight with {qweight_rows} rows fits no bit width for {K} inputs")


def check_gptq_tensors(name: str, K: int, N: int, bits: int, config_bits: int, tensors: dict) -> int:
    """Refuse a layer whose tensors disagree with each other or with the config, and return its
    number of groups. Kernels index scales by g_idx unguarded, so an out-of-range g_idx would read
    other memory or give silently wrong logits."""
    if bits != config_bits:
        raise CheckpointError(f"{name}: qweight {tuple(tensors[name + '.qweight'].shape)} holds {bits}-bit codes for "
                              f"{K} inputs, but the quantization config says {config_bits} bits; the config or "
                              "the tensors are wrong (re-export the checkpoint, or fix bits / dynamic in the config)")
    scales, qzeros = tensors[f"{name}.scales"], tensors.get(f"{name}.qzeros")
    want = {"qweight": (K * bits // 32, N), "scales": (scales.shape[0], N)}
    if qzeros is not None:  # writers differ in tail padding: any word count that holds N values
        words = qzeros.shape[-1] if qzeros.dim() == 2 and qzeros.shape[-1] * 32 // bits >= N else -(-N * bits // 32)
        want["qzeros"] = (scales.shape[0], words)
    if f"{name}.g_idx" in tensors:
        want["g_idx"] = (K,)
    for part, shape in want.items():
        got = tuple(tensors[f"{name}.{part}"].shape)
        if got != shape:
            raise CheckpointError(f"{name}.{part} has shape {got}, expected {shape} for a {bits}-bit layer with "
                                  f"{K} inputs and {N} outputs; the checkpoint is corrupted or mislabelled")
    G = scales.shape[0]
    g_idx = tensors.get(f"{name}.g_idx")
    if g_idx is not None and g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise CheckpointError(f"{name}.g_idx holds group {int(g_idx.min()) if int(g_idx.min()) < 0 else int(g_idx.max())}"
                              f", outside the {G} groups of its scales; the checkpoint is corrupted")
    return G


def _read_off_map(folder: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The named tensors read with plain file reads (no memory map)."""
    from ..formats.checkpoint import _ST_DTYPES, read_header, shard_files
    dtypes = {v: k for k, v in _ST_DTYPES.items()}
    out: dict[str, torch.Tensor] = {}
    for f in shard_files(folder):
        head, data = read_header(f)
        with open(f, "rb") as fh:
            for k in sorted(names & head.keys()):
                e = head[k]
                a, b = e["data_offsets"]
                t = torch.empty(e["shape"], dtype=dtypes[e["dtype"]])
                fh.seek(data + a)
                if b > a and fh.readinto(t.view(-1).view(torch.uint8).numpy()) != b - a:
                    raise CheckpointError(f"{f} is truncated at {k}; download or copy it again")
                out[k] = t
    return out


def _rows_wanted(backend: str | None, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the loader tries exact rows (kernels/exact_rows.py) for the embedding and head."""
    return backend != "torch" and device.type == "cpu" and dtype is torch.float32 \
        and os.environ.get("GPTQKIT_EXACT_ROWS", "1") != "0"


def _row_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the model's input embedding and output head weights."""
    want = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return {f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if any(m is w for w in want)}


@contextlib.contextmanager
def _one_thread():
    """torch ops on one intra-op thread for the duration: the backends' `prepare` is hundreds of
    small elementwise ops (unpack, sort, repack) per model, each a parallel region when torch has
    more threads. On the 2-core machine of BENCHMARKS.md (the main job's "after" pass) one thread
    prepared SmolLM2's 210 layers in 0.1-0.5 s and two threads took 5-18 s while other jobs ran
    (each region waits for a descheduled thread). CUDA backends are unaffected (their work is on the
    GPU). The thread count is process-wide: torch work in other threads during a load runs on one
    thread too."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def load_quantized(path: str | Path, *, backend: str | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load a GPTQ checkpoint folder (or hub id) as a transformers model with QuantLinear layers.

    dtype: dtype of the non-quantized weights and of activations; default float32 on CPU
    (fast there) and float16 on CUDA.
    """
    with _one_thread():  # hundreds of small tensor ops; see _one_thread
        return _load_quantized(path, backend=backend, device=device, dtype=dtype,
                               trust_remote_code=trust_remote_code)


def _load_quantized(path, *, backend, device, dtype, trust_remote_code) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(path)
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    qcfg = QuantizeConfig.load(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we install the quantized layers ourselves
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)

    tensors = dict(iter_tensors(path))
    qnames = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    # [arch] MoE checkpoints store one Linear per expert (experts.{e}.gate_proj …); transformers 5
    # builds fused 3-D expert parameters, so rebuild the per-expert structure the quantizer used
    from .moe import has_fused_experts, unfuse_experts
    if has_fused_experts(model) and any(re.search(r"\.experts\.\d+\.", k) for k in tensors):
        unfuse_experts(model)
    if not qnames:
        raise CheckpointError(f"{path} has a GPTQ config but no qweight tensors; the checkpoint is incomplete")
    for name in qnames:
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"checkpoint has quantized layer {name!r}, which this model does not have") from e
        if isinstance(old, nn.Linear):
            K, N = old.in_features, old.out_features
        elif type(old).__name__ == "Conv1D":  # [arch] GPT-2: weight [in, out]; GPTQ packs it as a Linear
            K, N = old.weight.shape
        else:
            raise CheckpointError(f"{name} is a {type(old).__name__}, not a Linear; cannot hold GPTQ tensors")
        bits = _bits_from_shapes(tensors[f"{name}.qweight"].shape[0], K)
        cfg = qcfg.for_module(name) or qcfg
        G = check_gptq_tensors(name, K, N, bits, cfg.bits, tensors)
        gs = cfg.group_size if cfg.group_size != -1 else K
        if -(-K // gs) != G:  # group size not what the config says: trust the tensors
            gs = K if G == 1 else -(-K // G)
        ql = QuantLinear(K, N, bits, gs, bias=f"{name}.bias" in tensors,
                         checkpoint_format=qcfg.checkpoint_format, dtype=dtype)
        _set_submodule(model, name, ql)

    if "lm_head.qweight" in tensors:
        model.config.tie_word_embeddings = False
    state = dict(tensors)
    # floats that are not GPTQ metadata take the model dtype; GPTQ tensors keep theirs
    qparts = tuple(f".{n}" for n in GPTQ_TENSORS)
    qset = set(qnames)
    def keep(k: str, t: torch.Tensor) -> bool:
        return k.endswith(qparts) or (k.rsplit(".", 1)[0] in qset and k.endswith(".bias")) \
            or not t.is_floating_point()
    convert = {k for k, t in state.items() if not keep(k, t) and t.dtype != dtype}
    # When some tensors change dtype, the others are copied off the safetensors memory map too: one
    # tensor left on the map keeps the file mapped, and with it the pages of the tensors read only
    # to be converted (SmolLM2's fp32 embedding loaded as bf16: 113 MB more RSS, measured).
    # Without conversions, taking the tensors as they are measured less RSS than copying them,
    # except the codes: the CPU backend's layout replaces `qweight` after prepare (codes held
    # once), but pages read through the map stay resident as long as the file is mapped (and the
    # kernel maps neighbouring pages on each fault), so the GPTQ tensors are read with plain file
    # reads instead and only the other weights stay on the map.
    if convert:
        state = {k: (t.to(dtype) if k in convert else t.clone()) for k, t in state.items()}
    else:
        gptq = {k for k in state if k.endswith(qparts) or (k.rsplit(".", 1)[0] in qset and k.endswith(".bias"))}
        state.update(_read_off_map(path, gptq))
    # the embedding and head in an exact smaller form where their values allow it (applied below):
    # checked on a file-read copy, one tensor at a time, so the map never holds their fp32 pages
    # (a tensor that does not qualify stays on the map, read only where used)
    rows: dict = {}
    if _rows_wanted(backend, device, dtype):
        from ..kernels.exact_rows import exact_rows
        for k in sorted(_row_keys(model) & state.keys()):
            t = state[k] if convert else _read_off_map(path, {k})[k]
            if t.dtype is torch.float32 and (r := exact_rows(t)) is not None:
                rows[k] = r
            del t
    tensors.clear()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    still_meta += [n for n, b in model.named_buffers() if b is not None and b.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{path} lacks tensors the model needs, e.g. {still_meta[:5]}; "
                              "the checkpoint is incomplete or for another architecture")
    if unexpected:
        log.warning("ignoring %d tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])
    model.to(device)
    chosen: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.post_init(backend)
            chosen[m.backend.name] = chosen.get(m.backend.name, 0) + 1
    log.info("loaded %s: %d quantized layers, backends %s", path, len(qnames), chosen)
    del state
    from ..heap import release_heap
    release_heap()  # the checkpoint's read buffers and the kernels' unpacking scratch
    model.eval()
    model.quantize_config = qcfg
    # what transformers' save_pretrained writes into config.json, so a re-saved model is a GPTQ checkpoint
    model.config.quantization_config = qcfg.to_dict()
    model._gptqkit_source = path
    model.save = types.MethodType(save_quantized, model)
    from .kv_cache import use_growing_cache
    use_growing_cache(model)  # generate(): a KV cache that appends without copying the whole cache
    if backend != "torch":  # the torch reference stays torch end to end
        from ..kernels.cpu import use_fast_head
        use_fast_head(model)  # an fp32 CPU lm_head at decode: a GEMV at the memory's rate (else a no-op)
    if rows:
        from ..kernels.exact_rows import use_exact_rows
        use_exact_rows(model, rows)
    from .decode import enable as lean_decode
    lean_decode(model)  # one-token steps without transformers' per-call machinery (llama family, CPU)
    return model


_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "quant_log.json",
               "quant_log.csv")


def save_quantized(model: nn.Module, out: str | Path, tokenizer=None, max_shard_size: str = "4GB") -> Path:
    """Write a loaded gptqkit model as a GPTQ checkpoint (`model.save(dir)`): the QuantLinear buffers are
    the checkpoint tensors; config.json carries quantization_config and quantize_config.json is written
    too. Tokenizer and quant_log files are copied from the folder it was loaded from unless `tokenizer`
    is given."""
    import shutil
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    qcfg: QuantizeConfig = model.quantize_config
    model.config.quantization_config = qcfg.to_dict()
    from safetensors import SafetensorError

    from ..formats.checkpoint import write_error
    try:
        model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
        _relayout_shards(out)
        qcfg.save(out)
    except OSError as e:
        raise write_error(out, e) from e
    except SafetensorError as e:  # its I/O errors (a full disk among them) are not OSError
        raise CheckpointError(f"writing {out} failed ({e}); free space or choose another folder, then save "
                              "again") from e
    src = getattr(model, "_gptqkit_source", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if src is not None and Path(src).resolve() != out.resolve():
        for name in _SIDE_FILES:
            if (Path(src) / name).is_file() and (tokenizer is None or not name.startswith(("tokenizer", "special"))):
                shutil.copy(Path(src) / name, out / name)
    return out


def _relayout_shards(out: Path) -> None:
    """Rewrite the shards transformers wrote in gptqkit's own safetensors layout (tensors by
    decreasing element size, then name; formats/checkpoint.py), which orders the data differently
    from transformers' writer (by dtype). The tensors are the same either way; with one layout a
    gptqkit checkpoint loaded and saved again is byte-identical to the original (tested)."""
    from safetensors import safe_open
    from ..formats.checkpoint import write_safetensors
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata()
            tensors = {k: sf.get_tensor(k).clone() for k in sf.keys()}  # off the map before rewriting
        write_safetensors(f, tensors, meta)
