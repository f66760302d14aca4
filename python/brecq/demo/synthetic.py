"""Synthetic tasks and a small model trained on them, for the offline demo study.

Everything here is generated from a seed: a byte-level BPE tokenizer, a small "world" of facts,
ARC-style multiple-choice questions about those facts and SQuAD-style reading questions (a third
of them unanswerable), written in the study's parquet layouts, and Qwen3-architecture models
trained briefly on them: a "base" model (language modelling of fact statements and question/answer
text) and a "fine-tuned" one (the base further trained on the evaluator's prompts). The point is a
model whose accuracy is real enough that quantization can change it, not a good model.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger("brecq")

THINGS = ["apple", "banana", "cherry", "grape", "lemon", "lime", "plum", "pear", "peach", "melon", "kiwi", "olive",
          "carrot", "tomato", "pepper", "onion", "potato", "pumpkin", "corn", "bean", "rose", "tulip", "daisy",
          "lily", "violet", "frog", "crow", "swan", "flamingo", "canary", "panda", "zebra", "tiger", "fox", "bear",
          "wolf", "shark", "whale", "snail", "crab"]
COLORS = ["red", "yellow", "green", "blue", "orange", "purple", "black", "white", "brown", "pink"]
NAMES = ["Tom", "Anna", "Ben", "Lily", "Max", "Mia", "Sam", "Zoe", "Leo", "Ivy", "Dan", "Eva"]
OBJECTS = ["ball", "kite", "hat", "box", "cup", "car", "book", "bag", "bike", "boat"]
PLACES = ["park", "school", "beach", "farm", "shop", "zoo", "lake", "garden"]


# Bumped whenever the data or the training below changes, so that trained demo models are not reused.
DEMO_TRAINING_VERSION = 3


def world(seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    return {thing: rng.choice(COLORS) for thing in THINGS}


def make_tokenizer(path: Path, texts: list[str], vocab_size: int = 640):
    """A byte-level BPE tokenizer in Qwen's style (``brecq.models.byte_level_bpe_tokenizer``) trained
    on the demo's own texts, so that its words are single tokens: a small model then copies a
    three-word answer as three tokens, not a dozen characters. It adds ``<|im_start|>`` as the
    beginning-of-sequence token, as training does, so evaluation prompts start as training saw."""
    from tokenizers import processors

    from ..models import byte_level_bpe_tokenizer

    fast = byte_level_bpe_tokenizer(texts, vocab_size)
    fast.bos_token = "<|im_start|>"
    fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", fast.bos_token_id)])
    fast.save_pretrained(str(path))
    return fast


def arc_items(facts: dict, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        thing = rng.choice(THINGS)
        right = facts[thing]
        options = rng.sample([c for c in COLORS if c != right], 3) + [right]
        rng.shuffle(options)
        letters = "ABCD"
        question = f"What color is the {thing}? " + " ".join(f"{l}. {o}" for l, o in zip(letters, options))
        items.append({"title": f"synthetic_arc_{i}", "question": question, "answer": letters[options.index(right)]})
    return items


def squad_items(n: int, seed: int, unanswerable_share: float | None = None) -> list[dict]:
    """SQuAD-style items about one person: the context says what they have, in one sentence, maybe
    beside a sentence about where they went; an unanswerable item's context says only where they
    went. Every third item is unanswerable (the evaluation file), or each with probability
    ``unanswerable_share`` (training text, drawn one at a time).

    Why one person: picking the asked-for person among several needs attention that matches names
    (induction-style retrieval), which the demo's 0.8 M-parameter model did not learn in the few
    minutes of training it gets on 2 cores (exact match 4-10 % with two or three people per story,
    in scratch runs); it does learn to find the answer sentence and copy its span, and to see that
    no sentence answers."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        person = rng.choice(NAMES)
        color, obj = rng.choice(COLORS), rng.choice(OBJECTS)
        went = f"{person} went to the {rng.choice(PLACES)}."
        unanswerable = i % 3 == 2 if unanswerable_share is None else rng.random() < unanswerable_share
        if unanswerable:
            context, answer = went, ""
        else:
            sentences = [f"{person} has a {color} {obj}."]
            if rng.random() < 0.5:
                sentences.insert(rng.randrange(2), went)
            context, answer = " ".join(sentences), f"a {color} {obj}"
        items.append({"title": "Synthetic", "context": context, "question": f"What does {person} have?",
                      "answer": answer})
    return items


def base_corpus(facts: dict, rng: random.Random, count: int) -> list[str]:
    """Fact statements and question/answer text (the 'pretraining' of the base model)."""
    texts = []
    for _ in range(count):
        kind = rng.random()
        thing = rng.choice(THINGS)
        if kind < 0.4:
            texts.append(f"The {thing} is {facts[thing]}.")
        elif kind < 0.7:
            texts.append(f"Question: What color is the {thing}?\nAnswer: {facts[thing]}")
        else:
            item = squad_items(1, rng.randrange(1 << 30), unanswerable_share=1 / 3)[0]
            texts.append(f"{item['context']} Question: {item['question']} Answer: {item['answer'] or 'nobody knows'}")
    return texts


def finetune_corpus(facts: dict, rng: random.Random, count: int, squad_share: float = 0.85) -> list[tuple[str, str]]:
    """(prompt, answer) pairs (the 'fine-tuning'): SQuAD-style items in the evaluator's own prompt
    format, and, to keep the facts the base model learnt, fact questions in the base corpus's form
    (the demo scores ARC-style items by log-likelihood for both models)."""
    from ..evaluation.data import SquadItem
    from ..evaluation.tasks import NO_ANSWER, squad_prompt

    texts = []
    for _ in range(count):
        if rng.random() < squad_share:
            raw = squad_items(1, rng.randrange(1 << 30), unanswerable_share=1 / 3)[0]
            item = SquadItem("x", "", raw["context"], raw["question"], (raw["answer"],) if raw["answer"] else ())
            texts.append((squad_prompt(item), f" {raw['answer'] or NO_ANSWER}"))
        else:
            thing = rng.choice(THINGS)
            texts.append((f"Question: What color is the {thing}?\nAnswer:", f" {facts[thing]}"))
    return texts


def _fit(model, steps: int, lr: float, batches, desc: str, show_progress: bool) -> float:
    """AdamW with a one-cycle schedule over ``batches()`` -> loss; returns the mean of the last 20."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=not show_progress):
        loss = batches()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


def train(model, tokenizer, texts: list[str], steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
          desc: str, show_progress: bool = True) -> float:
    """Causal-LM training on ``texts`` packed into one stream; returns the final mean loss."""
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for text in texts:
        ids.extend([tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    stream = torch.tensor(ids, dtype=torch.long)

    def batch_loss():
        starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])
        return model(batch, labels=batch, use_cache=False).loss

    return _fit(model, steps, lr, batch_loss, desc, show_progress)


def train_supervised(model, tokenizer, pairs: list[tuple[str, str]], steps: int, batch_size: int, lr: float,
                     seed: int, desc: str, show_progress: bool = True) -> float:
    """Fine-tuning on (prompt, answer) pairs with the loss on the answer tokens only."""
    gen = torch.Generator().manual_seed(seed)
    encoded = []
    for prompt, answer in pairs:
        p = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((p, a))

    def batch_loss():
        idx = torch.randint(0, len(encoded), (batch_size,), generator=gen).tolist()
        length = max(len(encoded[i][0]) + len(encoded[i][1]) for i in idx)
        ids = torch.full((batch_size, length), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, length), -100, dtype=torch.long)
        mask = torch.zeros((batch_size, length), dtype=torch.long)
        for row, i in enumerate(idx):
            p, a = encoded[i]
            ids[row, :len(p) + len(a)] = torch.tensor(p + a)
            labels[row, len(p):len(p) + len(a)] = torch.tensor(a)
            mask[row, :len(p) + len(a)] = 1
        return model(ids, attention_mask=mask, labels=labels, use_cache=False).loss

    return _fit(model, steps, lr, batch_loss, desc, show_progress)


def build_demo_models(out: Path, seed: int = 0, base_steps: int = 800, finetune_steps: int = 600,
                      show_progress: bool = True) -> dict:
    """Tokenizer, data files and the two trained models under ``out``; returns their paths. Models
    trained earlier with the same seed, steps and brecq version are reused (``out/trained.json``,
    written last), so a rerun of the demo does not train again."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .. import __version__
    from ..io import atomic_write_text
    from ..models import build_model, qwen3_config

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    key = {"seed": seed, "base_steps": base_steps, "finetune_steps": finetune_steps, "brecq": __version__,
           "recipe": DEMO_TRAINING_VERSION}
    record = out / "trained.json"
    paths = {"base": out / "models" / "base", "fine-tuned": out / "models" / "fine-tuned"}
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("key") == key and all((p / "config.json").exists() for p in paths.values()):
            log.info("reusing the demo models trained earlier in %s", out)
            return {"paths": paths, "data": out / "data", "base_loss": saved["base_loss"],
                    "finetune_loss": saved["finetune_loss"], "reused": True}
    data = out / "data"
    data.mkdir(exist_ok=True)
    facts = world(seed)
    corpus_rng = random.Random(seed + 3)
    base_texts = base_corpus(facts, corpus_rng, 6000)
    ft_pairs = finetune_corpus(facts, random.Random(seed + 6), 4000)
    tokenizer = make_tokenizer(out / "tokenizer", base_texts + [p + a for p, a in ft_pairs])
    pq.write_table(pa.Table.from_pylist(arc_items(facts, 200, seed + 1)), data / "synthetic-arc.parquet")
    pq.write_table(pa.Table.from_pylist(squad_items(150, seed + 2)), data / "synthetic-squad.parquet")
    (data / "calibration-base.txt").write_text("\n\n".join(base_corpus(facts, random.Random(seed + 4), 400)))
    (data / "calibration-finetuned.txt").write_text(
        "\n\n".join(p + a for p, a in finetune_corpus(facts, random.Random(seed + 5), 300)))

    config = qwen3_config("tiny", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    model = build_model(config, seed=seed)
    base_loss = train(model, tokenizer, base_texts, base_steps, 16, 192, 3e-3, seed, "train base", show_progress)
    model.save_pretrained(str(paths["base"]))
    tokenizer.save_pretrained(str(paths["base"]))
    ft_loss = train_supervised(model, tokenizer, ft_pairs, finetune_steps, 12, 3e-3, seed + 1, "fine-tune",
                               show_progress)
    model.save_pretrained(str(paths["fine-tuned"]))
    tokenizer.save_pretrained(str(paths["fine-tuned"]))
    log.info("demo models trained in %.0f s (final losses: base %.3f, fine-tuned %.3f)",
             time.perf_counter() - started, base_loss, ft_loss)
    atomic_write_text(record, json.dumps({"key": key, "base_loss": base_loss, "finetune_loss": ft_loss}, indent=2))
    return {"paths": paths, "data": data, "base_loss": base_loss, "finetune_loss": ft_loss, "reused": False}
