"""brecq: post-training quantization of language models with BRECQ.

This package is the application (models, recipes, the demo, later reconstruction, evaluation and
studies); the kernels and the packed format live in :mod:`brecq_ext`.
"""
__version__ = "0.1.0"
