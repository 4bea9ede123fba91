"""Quantization of a whole model, block by block (see docs/ARCHITECTURE.md)."""
