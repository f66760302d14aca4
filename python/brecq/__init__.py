"""brecq: post-training quantization of language models with BRECQ.

This package is the application (models, recipes, the demo, later reconstruction, evaluation and
studies); the kernels and the packed format live in :mod:`brecq_ext`.
"""
__version__ = "0.1.0"

from .io import load_quantized, save_quantized  # noqa: E402
from .quantize import quantize, quantize_pretrained  # noqa: E402
from .recipe import Method, Recipe, get_recipe  # noqa: E402


def _register_with_transformers() -> None:
    try:
        from .hf_integration import register
    except ImportError:
        return
    register()


_register_with_transformers()

__all__ = ["quantize", "quantize_pretrained", "load_quantized", "save_quantized", "Recipe", "Method",
           "get_recipe", "__version__"]
