"""Model construction from configs (no downloads): Qwen3-architecture decoders with seeded weights."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("brecq")

# Linear shapes (in_features -> out_features) of one Qwen3-0.6B decoder layer.
QWEN3_0_6B_LINEAR_SHAPES = {
    "q_proj": (1024, 2048),
    "k_proj": (1024, 1024),
    "v_proj": (1024, 1024),
    "o_proj": (2048, 1024),
    "gate_proj": (1024, 3072),
    "up_proj": (1024, 3072),
    "down_proj": (3072, 1024),
}


def qwen3_config(preset: str = "0.6b", **overrides):
    """A transformers Qwen3Config: ``"0.6b"`` has Qwen3-0.6B's shapes; ``"tiny"`` is a few-MB model
    of the same architecture for tests and the demo."""
    from transformers import Qwen3Config

    presets = {
        "0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=40960, tie_word_embeddings=True, rms_norm_eps=1e-6),
        "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6),
    }
    if preset not in presets:
        raise ValueError(f"qwen3_config: preset must be one of {sorted(presets)}, got {preset!r}")
    return Qwen3Config(**{**presets[preset], **overrides})


def build_model(config, seed: int, dtype: torch.dtype = torch.float32):
    """A causal LM with seeded random weights (initialised as transformers does)."""
    from transformers import AutoModelForCausalLM

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    model.eval()
    log.info("built %s with %.1f M parameters (seed %d)", type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, seed)
    return model
