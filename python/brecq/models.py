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


# The pre-tokenizer split of Qwen2/Qwen3's byte-level BPE tokenizer (llama.cpp calls it "qwen2").
QWEN2_PRETOKENIZER = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_level_bpe_tokenizer(texts, vocab_size: int, path=None):
    """A Qwen2/Qwen3-style tokenizer (the Qwen2 regex split, byte-level BPE, ``<|endoftext|>``,
    ``<|im_start|>``, ``<|im_end|>``) trained on ``texts``: a stand-in for Qwen3's own tokenizer,
    which no hub can be reached for here, with the same structure. Saved to ``path`` if given."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZER), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def small_config(model_type: str, vocab_size: int, **overrides):
    """A small config of one of the architectures ``brecq quantize`` supports (llama, mistral, qwen2,
    qwen3): 2 layers, hidden 256, 4 query and 2 key/value heads of 64, intermediate 512."""
    from transformers import AutoConfig

    shapes = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                  initializer_range=0.08, tie_word_embeddings=model_type in ("qwen3", "qwen2"))
    if model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ValueError(f"small_config: model_type must be llama, mistral, qwen2 or qwen3, got {model_type!r}")
    return AutoConfig.for_model(model_type, **{**shapes, **overrides})


def stories_model(out_dir, texts, model_type: str = "qwen3", *, vocab_size: int = 1024, steps: int = 200,
                  seed: int = 0):
    """A small model of ``model_type`` (``small_config``) with a byte-level BPE tokenizer, both
    trained briefly on ``texts`` (about 15 s on 2 cores), saved as a Hugging Face folder. Random
    weights give near-flat next-token distributions whose top-1 flips on float noise; a little
    training gives the peaked ones real models have, so comparisons of two runtimes' logits mean
    something."""
    from pathlib import Path

    from .demo.synthetic import _fit

    out = Path(out_dir)
    texts = list(texts)
    tokenizer = byte_level_bpe_tokenizer(texts, vocab_size, out)
    config = small_config(model_type, len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = build_model(config, seed)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    stream = torch.tensor(ids)
    generator = torch.Generator().manual_seed(seed)

    def batch_loss():
        starts = torch.randint(0, stream.numel() - 129, (8,), generator=generator)
        batch = torch.stack([stream[s:s + 128] for s in starts.tolist()])
        return model(batch, labels=batch, use_cache=False).loss

    loss = _fit(model, steps, 3e-3, batch_loss, f"train stories-{model_type}", False)
    log.info("stories-%s: final training loss %.3f", model_type, loss)
    model.save_pretrained(str(out))
    return out
