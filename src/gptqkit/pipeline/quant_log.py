"""What a run reports: one row per quantized linear (quant_log.json / quant_log.csv) and totals."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LayerLog:
    name: str
    bits: int
    group_size: int
    method: str
    loss: float
    damp: float
    tokens: int
    seconds: float

    @classmethod
    def of(cls, job) -> "LayerLog":
        """The row of a solved linears.LinearJob."""
        r = job.result
        return cls(job.name, job.cfg.bits, job.cfg.group_size, r.method, r.loss, r.damp, job.tokens,
                   round(job.seconds, 4))


@dataclass
class QuantizeReport:
    out: str
    layers: list[LayerLog] = field(default_factory=list)
    seconds: float = 0.0         # quantizing, all runs together (a resumed run adds its own)
    resumed_seconds: float = 0.0  # of `seconds`, those of the interrupted run(s) this one resumed
    forwards: int = 0            # block forward passes over the whole calibration set
    calib_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_loss"] = sum(x.loss for x in self.layers) / max(1, len(self.layers))
        return d


def write_quant_log(folder: Path, report: QuantizeReport) -> None:
    (folder / "quant_log.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    with open(folder / "quant_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(LayerLog.__dataclass_fields__))
        w.writeheader()
        w.writerows(asdict(x) for x in report.layers)
