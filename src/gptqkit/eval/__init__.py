"""Evaluation: perplexity (and, later, task evaluation)."""

from .perplexity import perplexity

__all__ = ["perplexity"]
