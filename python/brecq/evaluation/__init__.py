"""Evaluation of causal LMs, full-precision or quantized."""
from .perplexity import PerplexityResult, perplexity

__all__ = ["perplexity", "PerplexityResult"]
