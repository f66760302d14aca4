"""Models the quality benches build when asked: a trained small Qwen3 and a seeded Qwen3 shape."""
from __future__ import annotations

from pathlib import Path

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260k"


def trained_model(folder: Path, texts=None, *, steps: int = 800, seed: int = 0) -> Path:
    """A Qwen3 student of stories260k (hidden 256, intermediate 768, 4 layers, 4/2 heads of 64,
    stories260k's 512-token vocabulary), trained to match stories260k's next-token distributions
    (KL) on text stories260k samples itself: rows that 32-, 64- and 256-blocks all divide, and a
    model that generalises to held-out TinyStories the way stories260k does. The 120 KB of real text
    here is too little to train from directly: a model trained on half of it memorises that half
    (perplexity 2 there, over 300 on the other half). ``texts`` is unused (kept for the callers)."""
    import shutil

    import torch
    import torch.nn.functional as F
    from brecq.models import build_model, small_config
    from brecq.demo.synthetic import _fit
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").exists():
        return folder
    teacher = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    with torch.no_grad():  # a pool of stories260k's own samples, 2 x 8 x 64 sequences of 256 tokens
        start = torch.full((64, 1), teacher.config.bos_token_id)
        pool = torch.cat([teacher.generate(start, do_sample=True, max_new_tokens=255, min_new_tokens=255,
                                           pad_token_id=0) for _ in range(16)])
    config = small_config("qwen3", teacher.config.vocab_size, intermediate_size=768, num_hidden_layers=4,
                          bos_token_id=teacher.config.bos_token_id, eos_token_id=teacher.config.eos_token_id,
                          pad_token_id=0)
    student = build_model(config, seed)
    generator = torch.Generator().manual_seed(seed)

    def batch_loss():
        batch = pool[torch.randint(0, pool.shape[0], (8,), generator=generator)]
        with torch.no_grad():
            target = F.log_softmax(teacher(batch).logits, -1)
        guess = F.log_softmax(student(batch, use_cache=False).logits, -1)
        return F.kl_div(guess, target, log_target=True, reduction="batchmean") / batch.shape[1]

    _fit(student, steps, 3e-3, batch_loss, "distil stories260k", True)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (STORIES / name).exists():
            shutil.copy(STORIES / name, folder / name)
    student.save_pretrained(str(folder))
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
