"""Running quantized models: the C++ decode runtime and text generation on top of it."""
from .cpu_decoder import (
    CpuDecoder,
    UnsupportedModel,
    cpu_decoder_or_none,
    unsupported_reason,
)
from .generate import Sampling, generate

__all__ = ["CpuDecoder", "Sampling", "UnsupportedModel", "cpu_decoder_or_none", "generate", "unsupported_reason"]
