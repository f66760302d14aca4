"""The offline demos: the quickstart (one Qwen3-architecture model built from a config, quantized
and measured) and the demo study (the README's main command), with the synthetic tasks its two
small models are trained on."""
