"""Quantizing a whole model, block by block: see driver.py and docs/ARCHITECTURE.md."""
from .driver import quantize_model
from .quant_log import LayerLog, QuantizeReport

__all__ = ["quantize_model", "LayerLog", "QuantizeReport"]
