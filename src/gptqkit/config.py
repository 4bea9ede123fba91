"""QuantizeConfig: the one object that says how a model is quantized and how it is stored.

It validates itself at construction, and reads/writes the spellings AutoGPTQ, GPTQModel and
transformers use in `quantize_config.json` and `config.json["quantization_config"]`.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError
from .formats.packing import SUPPORTED_BITS
from .quant.gptq import SOLVE_ORDERS  # act-order's solve orders with static groups (solve_permutation)

FORMATS = ("gptq", "gptq_v2")
# gptq: GPTQ on the partially quantized model's inputs; rtn: round-to-nearest; gptaq: GPTQ with
# asymmetric calibration (GPTAQ, "GPTQ v2"): also matches the full-precision model's outputs
METHODS = ("gptq", "rtn", "gptaq")
# GPTAQ's α, the strength of the asymmetry correction: the reference's (and GPTQModel's) default
GPTAQ_ALPHA = 0.25
QUANTIZE_CONFIG_FILE = "quantize_config.json"

# Calibration defaults, one source for gptqkit.quantize, calibration_batches and `gptqkit
# quantize`: 64 windows of 512 tokens (32k tokens) keep the default job to minutes on a 2-core
# CPU. The GPTQ paper used 128 x 2048; pass more (nsamples/seqlen) for larger models.
DEFAULT_NSAMPLES = 64
DEFAULT_SEQLEN = 512


def _version() -> str:
    from . import __version__
    return __version__


@dataclass
class QuantizeConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    # Act-order with static groups by default: columns are solved in order of decreasing
    # Hessian diagonal (markedly lower error, see BENCHMARKS.md), while groups stay fixed in
    # original column order, so g_idx is the plain c // g and fast kernels need no reordering.
    desc_act: bool = True
    static_groups: bool = True
    # The order act-order solves in, with static groups (quant/gptq.py::solve_permutation):
    # "columns" (default) single columns by decreasing Hessian diagonal, the groups interleaved;
    # "groups" each static group as one contiguous run, groups by their diagonal sum. Same grids,
    # g_idx and layout; only the error compensation's order changes (BENCHMARKS.md, issue 12).
    solve_order: str = "columns"
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.0025
    true_sequential: bool = True
    # Clip search weighted by the layer error (quant/gptq.py): closes markedly more of RTN's gap at
    # every grid measured, across calibration draws, for seconds per model (BENCHMARKS.md, Quality)
    mse: bool = True
    checkpoint_format: str = "gptq"
    lm_head: bool = False
    method: str = "gptq"
    gptaq_alpha: float = GPTAQ_ALPHA   # method="gptaq" only (quant/gptq.py: P = α·triu₁(dXXᵀ·Uᵀ)·U)
    blocksize: int = 128
    # Per-module overrides, GPTQModel's spelling: {"+:regex": {"bits": 8, "group_size": 32},
    # "-:regex": {}} — "+:" (or no prefix) overrides, "-:" leaves the module in full precision.
    dynamic: dict[str, dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits!r} is not supported; choose one of {SUPPORTED_BITS}")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size <= 0):
            raise ConfigError(
                f"group_size={self.group_size!r} is invalid; use -1 (one group per row) or a "
                "positive integer such as 32, 64 or 128")
        if not 0.0 <= float(self.damp_percent) <= 1.0:
            raise ConfigError(f"damp_percent={self.damp_percent!r} must lie in [0, 1] (0.01 is usual)")
        if not 0.0 < float(self.damp_auto_increment) <= 1.0:
            raise ConfigError(f"damp_auto_increment={self.damp_auto_increment!r} must lie in (0, 1]")
        if self.checkpoint_format not in FORMATS:
            raise ConfigError(
                f"checkpoint_format={self.checkpoint_format!r} is unknown; choose one of {FORMATS}")
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is unknown; choose one of {METHODS}")
        if not (isinstance(self.gptaq_alpha, (int, float)) and 0.0 <= float(self.gptaq_alpha) <= 1.0):
            raise ConfigError(f"gptaq_alpha={self.gptaq_alpha!r} must lie in [0, 1] ({GPTAQ_ALPHA} is the "
                              "reference's; 0 makes GPTAQ plain GPTQ at twice the cost)")
        if self.blocksize <= 0:
            raise ConfigError(f"blocksize={self.blocksize!r} must be positive (128 is usual)")
        if self.static_groups and self.group_size == -1:
            # harmless: with one group per row static and dynamic groups coincide
            self.static_groups = False
        if self.solve_order not in SOLVE_ORDERS:
            raise ConfigError(f"solve_order={self.solve_order!r} is unknown; choose one of {SOLVE_ORDERS}")
        if self.solve_order == "groups" and self.group_size == -1:
            self.solve_order = "columns"  # one group per row: the two orders coincide
        if self.solve_order == "groups" and not (self.desc_act and self.static_groups):
            raise ConfigError("solve_order='groups' orders the static groups of act-order: it needs "
                              f"desc_act=True and static_groups=True (got desc_act={self.desc_act}, "
                              f"static_groups={self.static_groups})")
        for pattern, override in (self.dynamic or {}).items():
            try:
                re.compile(pattern[2:] if pattern[:2] in ("+:", "-:") else pattern)
            except re.error as e:
                raise ConfigError(f"dynamic rule {pattern!r} is not a valid regex: {e}") from e
            bad = set(override) - {"bits", "group_size", "sym", "desc_act", "damp_percent", "mse"}
            if bad:
                raise ConfigError(f"dynamic rule {pattern!r} sets unknown keys {sorted(bad)}; "
                                  "allowed: bits, group_size, sym, desc_act, damp_percent, mse")
            if not pattern.startswith("-:"):
                dataclasses.replace(self, dynamic=None, **override)  # validates the values

    def needs_calibration(self) -> bool:
        """False for round-to-nearest (dynamic rules cannot change the method): no Hessian, so
        no block forwards."""
        return self.method != "rtn"

    def for_module(self, name: str) -> "QuantizeConfig | None":
        """The config that applies to module `name` after dynamic rules; None = keep in full precision."""
        for pattern, override in (self.dynamic or {}).items():
            neg = pattern.startswith("-:")
            rx = pattern[2:] if pattern[:2] in ("+:", "-:") else pattern
            if re.search(rx, name):
                if neg:
                    return None
                return dataclasses.replace(self, dynamic=None, **override)
        return self

    # ---------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        """The dict written to quantize_config.json and config.json["quantization_config"]."""
        d: dict[str, Any] = {
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "static_groups": self.static_groups,
            "damp_percent": self.damp_percent,
            "damp_auto_increment": self.damp_auto_increment,
            "true_sequential": self.true_sequential,
            "mse": 2.4 if self.mse else 0.0,
            "lm_head": self.lm_head,
            "quant_method": "gptq",
            "checkpoint_format": self.checkpoint_format,
            "format": self.checkpoint_format,  # GPTQModel's newer spelling
            "pack_dtype": "int32",
            "model_name_or_path": None,
            "model_file_base_name": None,
            "meta": {"quantizer": [f"gptqkit:{_version()}"], "method": self.method,
                     "blocksize": self.blocksize,
                     **({"gptaq_alpha": self.gptaq_alpha} if self.method == "gptaq" else {}),
                     **({"solve_order": self.solve_order} if self.solve_order != "columns" else {}), **self.meta},
        }
        if self.dynamic:
            d["dynamic"] = self.dynamic
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizeConfig":
        """Read any of the AutoGPTQ / GPTQModel / transformers spellings."""
        qm = str(d.get("quant_method", "gptq")).lower()
        if qm != "gptq":
            raise CheckpointError(
                f"quant_method={qm!r}: gptqkit reads GPTQ checkpoints only (quant_method 'gptq')")
        if d.get("is_marlin_format"):
            raise CheckpointError("this checkpoint is stored in Marlin's repacked layout "
                                  "(is_marlin_format=true); gptqkit reads the standard GPTQ layout only")
        fmt = d.get("checkpoint_format") or d.get("format") or "gptq"
        if fmt not in FORMATS:
            raise CheckpointError(
                f"checkpoint_format={fmt!r} is unknown; gptqkit reads {FORMATS}. Convert the "
                "checkpoint to the standard GPTQ layout with the tool that wrote it")
        meta = dict(d.get("meta") or {})

        def get(key: str, default: Any) -> Any:
            # GPTQModel >= 4 writes the solver settings (damp_percent, damp_auto_increment,
            # static_groups, true_sequential, mse) under "meta" rather than at the top level
            return d.get(key, meta.get(key, default))

        mse = get("mse", False)
        # GPTQModel records a GPTAQ ("v2") run as meta["gptaq"] = {"alpha": ..., "device": ...}
        gptqmodel_gptaq = meta.get("gptaq") if isinstance(meta.get("gptaq"), dict) else None
        try:
            return cls(
                bits=int(d["bits"]),
                group_size=int(d.get("group_size", 128)),
                sym=bool(d.get("sym", True)),
                desc_act=bool(d.get("desc_act", d.get("act_order", False))),
                static_groups=bool(get("static_groups", False)),
                damp_percent=float(get("damp_percent", 0.01)),
                damp_auto_increment=float(get("damp_auto_increment", 0.0025) or 0.0025),
                true_sequential=bool(get("true_sequential", True)),
                mse=bool(mse),
                checkpoint_format=fmt,
                lm_head=bool(d.get("lm_head", False)),
                method=str(meta.get("method", "gptaq" if gptqmodel_gptaq else "gptq")),
                gptaq_alpha=float(meta.get("gptaq_alpha", (gptqmodel_gptaq or {}).get("alpha", GPTAQ_ALPHA))),
                blocksize=int(meta.get("blocksize", 128)),
                solve_order=str(meta.get("solve_order", "columns")),
                dynamic=d.get("dynamic") or None,
                meta={k: v for k, v in meta.items()
                      if k not in ("quantizer", "method", "blocksize", "gptaq_alpha", "solve_order")},
            )
        except KeyError as e:
            raise CheckpointError(f"quantization config lacks required field {e}") from e

    def save(self, directory: str | Path) -> None:
        Path(directory, QUANTIZE_CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def find(cls, directory: str | Path) -> "QuantizeConfig | None":
        """The GPTQ config of a folder (quantize_config.json, else config.json["quantization_config"]),
        or None when it holds neither (a float model). A config that is there but unreadable raises."""
        directory = Path(directory)
        qc = directory / QUANTIZE_CONFIG_FILE
        if qc.is_file():
            return cls.from_dict(_read_json(qc))
        cfg = directory / "config.json"
        if cfg.is_file():
            d = _read_json(cfg).get("quantization_config")
            if d:
                return cls.from_dict(d)
        return None

    @classmethod
    def load(cls, directory: str | Path) -> "QuantizeConfig":
        """As find(), but a folder without a GPTQ config is an error."""
        found = cls.find(directory)
        if found is None:
            raise CheckpointError(
                f"{directory} holds no GPTQ quantization config (neither {QUANTIZE_CONFIG_FILE} nor "
                "config.json['quantization_config']); is it a quantized checkpoint?")
        return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
