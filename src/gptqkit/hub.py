"""Sharing a checkpoint: a model card (README.md) and the upload to the Hugging Face Hub.

`push_to_hub(dir, repo_id)` writes README.md into the checkpoint (unless one exists), then uploads
the files `upload_plan(dir)` lists with huggingface_hub's HfApi: create_repo(exist_ok=True), then
one upload_folder commit. The HfApi object can be passed in (tests pass a mock; no network).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
# what a checkpoint folder holds that belongs on the Hub (the report page too, if rendered)
UPLOAD_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                   "quantize_config.json", "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja", "*.model", "*.tiktoken", "quant_log.json",
                   "quant_log.csv", "eval.json", "report.html", CARD_FILE)


def upload_plan(directory: str | Path) -> list[str]:
    """The files (relative names, sorted) an upload of `directory` sends."""
    import fnmatch
    d = Path(directory)
    names = [p.name for p in d.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted(n for n in names if any(fnmatch.fnmatch(n, pat) for pat in UPLOAD_PATTERNS))


def _read(d: Path, name: str) -> dict[str, Any]:
    p = d / name
    return json.loads(p.read_text()) if p.is_file() else {}


def model_card(directory: str | Path, repo_id: str | None = None, base_model: str | None = None) -> str:
    """README.md text for a gptqkit checkpoint: config, calibration, perplexity, how to load it."""
    from . import __version__
    from .config import QuantizeConfig

    d = Path(directory)
    cfg = QuantizeConfig.load(d)
    qd = cfg.to_dict()
    model_cfg = _read(d, "config.json")
    qlog = _read(d, "quant_log.json")
    ev = _read(d, "eval.json")
    cal = cfg.meta.get("calibration") or {}
    repo = repo_id or f"<user>/{d.name}"
    name = repo.split("/")[-1]
    base = base_model or cfg.meta.get("base_model")

    def ppl(k: str):
        v = ev.get(k)
        return v.get("perplexity") if isinstance(v, dict) else v

    front = ["---", "library_name: transformers", "tags:", "- gptq", f"- {cfg.bits}-bit", "- gptqkit",
             "- quantized"]
    if base:
        front += [f"base_model: {base}", "base_model_relation: quantized"]
    front += ["pipeline_tag: text-generation", "---", ""]
    lines = [f"# {name}", "",
             f"GPTQ {cfg.bits}-bit quantization of {f'[{base}](https://huggingface.co/{base})' if base else 'a causal LM'}"
             f" ({model_cfg.get('model_type', '?')}), made with gptqkit {__version__}. Standard GPTQ checkpoint "
             f"(`checkpoint_format: {cfg.checkpoint_format}`): transformers, vLLM, SGLang, TGI, GPTQModel and "
             "AutoGPTQ read it.", "",
             "## Quantization", "", "| setting | value |", "|---|---|"]
    for k in ("bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent", "true_sequential", "mse",
              "lm_head", "checkpoint_format"):
        lines.append(f"| {k} | `{json.dumps(qd[k])}` |")
    if cfg.dynamic:
        lines.append(f"| dynamic | `{json.dumps(cfg.dynamic)}` |")
    lines.append(f"| method | `{cfg.method}` |")
    lines += ["", "## Calibration data", ""]
    if cal:
        lines.append(f"{cal.get('nsamples', '?')} sequences of {cal.get('seqlen', '?')} tokens from "
                     f"`{cal.get('source', '?')}` (seed {cal.get('seed', '?')}).")
    else:
        lines.append("Not recorded.")
    if qlog:
        lines += ["", f"{len(qlog.get('layers', []))} layers quantized in {qlog.get('seconds', 0):.1f} s; "
                      f"mean GPTQ layer loss {qlog.get('mean_loss', float('nan')):.4g} (per-layer log: "
                      "`quant_log.csv`, `quant_log.json`; `gptqkit report` renders it as HTML)."]
    lines += ["", "## Evaluation", ""]
    if ppl("ppl_after") is not None:
        lines += ["| model | perplexity |", "|---|---|"]
        if ppl("ppl_before") is not None:
            lines.append(f"| original | {ppl('ppl_before'):.3f} |")
        lines.append(f"| this checkpoint | {ppl('ppl_after'):.3f} |")
        lines += ["", f"Perplexity on `{ev.get('text', '?')}`"
                      + (f", windows of {ev['seqlen']} tokens" if ev.get("seqlen") else "") + "."]
    else:
        lines.append("Perplexity was not measured for this upload.")
    lines += ["", "## Use", "", "gptqkit (CPU and CUDA kernels):", "", "```python", "import gptqkit",
              "from transformers import AutoTokenizer", f'model = gptqkit.load("{repo}")',
              f'tok = AutoTokenizer.from_pretrained("{repo}")',
              'out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=32)',
              "print(tok.decode(out[0]))", "```", "", "```bash", f"gptqkit generate {repo} \"Hello\"",
              f"gptqkit eval {repo}", "```", "",
              "transformers (needs `gptqmodel` and `optimum` installed):", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")', "```", "",
              "vLLM:", "", "```bash", f"vllm serve {repo} --quantization gptq", "```", "", "```python",
              "from vllm import LLM", f'llm = LLM(model="{repo}", quantization="gptq")',
              'print(llm.generate("Hello")[0].outputs[0].text)', "```", ""]
    return "\n".join(front + lines)


def write_model_card(directory: str | Path, repo_id: str | None = None, base_model: str | None = None,
                     overwrite: bool = False) -> Path:
    p = Path(directory) / CARD_FILE
    if p.exists() and not overwrite:
        log.info("%s exists; keeping it", p)
        return p
    p.write_text(model_card(directory, repo_id, base_model), encoding="utf-8")
    return p


def push_to_hub(directory: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
                commit_message: str | None = None, create_pr: bool = False, base_model: str | None = None,
                api: Any = None) -> Any:
    """Write the model card (unless README.md exists) and upload the checkpoint to `repo_id`.
    Returns what HfApi.upload_folder returns (a CommitInfo with the commit URL)."""
    from .config import QuantizeConfig

    d = Path(directory)
    cfg = QuantizeConfig.load(d)  # refuse to upload something that is not a GPTQ checkpoint
    if "/" not in repo_id:
        raise ValueError(f"repo id {repo_id!r} should be 'user-or-org/name'")
    write_model_card(d, repo_id, base_model)
    files = upload_plan(d)
    if not any(f.endswith(".safetensors") for f in files):
        raise FileNotFoundError(f"{d} holds no .safetensors files to upload")
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    msg = commit_message or f"gptqkit: {cfg.bits}-bit GPTQ, group size {cfg.group_size}, desc_act={cfg.desc_act}"
    log.info("uploading %d files from %s to %s", len(files), d, repo_id)
    return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(d), allow_patterns=files,
                             commit_message=msg, create_pr=create_pr)
