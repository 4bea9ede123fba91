"""Calibration and evaluation text: built-in corpora, files, lists and datasets."""

from .calibration import CalibrationSet, calibration_batches, tokenize_text
from .text import (
    BUILTIN_CORPORA,
    SHAKESPEARE_EVAL_WORKS,
    load_text,
    shakespeare_split,
    strip_gutenberg,
)

__all__ = [
    "BUILTIN_CORPORA",
    "SHAKESPEARE_EVAL_WORKS",
    "CalibrationSet",
    "calibration_batches",
    "load_text",
    "shakespeare_split",
    "strip_gutenberg",
    "tokenize_text",
]
