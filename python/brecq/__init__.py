"""brecq: post-training quantization of language models with BRECQ.

This package is the application (models, recipes, reconstruction, evaluation, studies, exports,
the command line); the kernels and the packed format live in :mod:`brecq_ext`.

Importing it is cheap: the public names below load their modules (and torch) on first use, so
that ``brecq --help`` answers at once. Registration with transformers, which lets
``AutoModelForCausalLM.from_pretrained`` load brecq-saved models, happens as soon as transformers'
quantizer registry is imported, whether that was before ``import brecq`` or after it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from ._lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {"load_quantized": ".io", "save_quantized": ".io", "quantize": ".quantization.quantize",
         "quantize_pretrained": ".quantization.quantize", "Method": ".quantization.recipe",
         "Recipe": ".quantization.recipe", "get_recipe": ".quantization.recipe"}

__all__ = ["quantize", "quantize_pretrained", "load_quantized", "save_quantized", "Recipe", "Method",
           "get_recipe", "__version__"]


__getattr__ = lazy_attributes(__name__, _LAZY)


def _register_with_transformers() -> None:
    try:
        from .hf_integration import register
    except ImportError:
        return
    register()


_TRIGGER = "transformers.quantizers.auto"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs the registration right after transformers' quantizer registry module executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot; and find the real spec without finding ourselves
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_module
        return spec


if _TRIGGER in sys.modules:
    _register_with_transformers()
else:
    sys.meta_path.insert(0, _RegisterAfterImport())
