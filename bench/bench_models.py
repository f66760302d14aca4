"""Models the quality benches build when asked: a trained small Qwen3 and a seeded Qwen3 shape."""
from __future__ import annotations

from pathlib import Path


def trained_model(folder: Path, texts) -> Path:
    """A small Qwen3 (hidden 256, intermediate 512, 2 layers, 4/2 heads of 64, vocabulary 1024) trained
    by brecq.models.stories_model on ``texts`` for 600 steps: rows that 32-, 64- and 256-blocks
    divide, and peaked predictions, unlike stories260k's 64/172-wide rows."""
    from brecq.models import stories_model

    if not (folder / "config.json").exists():
        stories_model(folder, texts, "qwen3", steps=600, seed=0)
    return folder


def seeded_model(folder: Path, texts) -> Path:
    """A seeded (untrained) Qwen3 shape whose rows 256-blocks divide: hidden 512, intermediate 1536,
    8 layers, 8/4 heads of 64, vocabulary 2048. It shows a pipeline; its quality numbers mean nothing."""
    from brecq.models import build_model, byte_level_bpe_tokenizer, small_config

    if not (folder / "config.json").exists():
        tokenizer = byte_level_bpe_tokenizer(texts[:2000], 2048, folder)
        config = small_config("qwen3", 2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                              num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                              eos_token_id=tokenizer.eos_token_id)
        build_model(config, seed=0).save_pretrained(str(folder))
    return folder
