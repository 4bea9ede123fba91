"""lm-evaluation-harness adapter (optional package `lm_eval`).

`GPTQKitLM` is lm_eval's HFLM over a model that gptqkit loaded (QuantLinear layers, gptqkit's
kernels), registered as lm_eval model "gptqkit", so both of these work:

    gptqkit eval CHECKPOINT --tasks hellaswag,arc_easy --limit 100
    lm_eval --model gptqkit --model_args pretrained=CHECKPOINT,backend=cpu --tasks hellaswag

(`import gptqkit.eval.harness` first for the second form, e.g. `python -m lm_eval` from a script.)
Tasks are lm_eval's, or local YAML task files in `include_path`; nothing here needs the network
beyond what a task's own dataset needs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without lm_eval
    HFLM = None
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None


def _require() -> None:
    if HFLM is None:
        raise ImportError("lm-evaluation-harness is not installed: pip install 'gptqkit[eval]' "
                          f"(or pip install lm_eval) ({_IMPORT_ERROR})")


if HFLM is not None:
    @register_model("gptqkit")
    class GPTQKitLM(HFLM):
        """HFLM over a gptqkit-loaded model. `pretrained` is a loaded model or a checkpoint path."""

        def __init__(self, pretrained: Any, tokenizer: Any = None, backend: str | None = None,
                     device: str = "cpu", batch_size: int | str = 1, **kwargs: Any):
            import torch

            if isinstance(pretrained, (str, Path)):
                from ..api import load, load_tokenizer
                path = pretrained
                pretrained = load(path, backend=None if backend in (None, "auto") else backend, device=device,
                                  dtype=kwargs.pop("dtype", None))
                tokenizer = tokenizer or load_tokenizer(path)
            kwargs.pop("dtype", None)
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, device=str(device),
                             batch_size=batch_size, dtype=next(pretrained.parameters()).dtype
                             if isinstance(pretrained, torch.nn.Module) else "auto", **kwargs)
else:  # keep the name importable for type checks and a clear error
    class GPTQKitLM:  # type: ignore[no-redef]
        def __init__(self, *args: Any, **kwargs: Any):
            _require()


def run_tasks(model: Any, tokenizer: Any, tasks: Sequence[str], *, include_path: str | Path | None = None,
              limit: float | None = None, batch_size: int = 1, num_fewshot: int | None = None,
              device: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run lm_eval tasks on a loaded model; returns {"results": {task: {metric: value}}, "config": ...}."""
    _require()
    import lm_eval
    from lm_eval.tasks import TaskManager

    dev = device or str(next(model.parameters()).device)
    lm = GPTQKitLM(model, tokenizer=tokenizer, device=dev, batch_size=batch_size)
    tm = TaskManager(include_path=str(include_path) if include_path else None)
    if limit is not None and float(limit) >= 1:
        limit = int(limit)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=tm, log_samples=False, bootstrap_iters=0, **kwargs)
    results = {t: {k: v for k, v in m.items() if k != "alias"} for t, m in out["results"].items()}
    return {"results": results, "n_samples": out.get("n-samples"), "versions": out.get("versions"),
            "config": {k: str(v) for k, v in (out.get("config") or {}).items()}}
