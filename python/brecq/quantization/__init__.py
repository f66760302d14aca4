"""Turning a model into a quantized one: recipes (which layers get which bits and method),
calibration data, the decoder blocks and their inputs, BRECQ block reconstruction with AdaRound,
the RTN and GPTQ baselines, and ``quantize``, the entry point that runs them. Nothing is imported
here, so that ``preset_names`` stays importable without torch."""
