"""Scoring of ARC (log-likelihood and generative) and SQuAD v2 (generative) with any causal LM.

Prompt formats (fixed, so that runs compare):
* ARC log-likelihood, as lm-evaluation-harness's ``arc_challenge``: context
  ``"Question: {question}\\nAnswer:"``, continuation ``" {option text}"``. ``acc`` picks the
  largest summed log-probability, ``acc_norm`` the largest divided by the continuation's length in
  characters.
* ARC generative: ``"Question: {question}\\n{label}. {option}\\n...\\nAnswer with the letter of the
  correct option.\\nAnswer:"`` (as the user turn when a chat template is used), greedy decoding of
  up to ``max_new_tokens``; the letter is read by :func:`metrics.extract_choice`.
* SQuAD v2: ``"Context: {context}\\nQuestion: {question}\\nAnswer with a short span from the context,
  or with \\"unanswerable\\" if the context does not contain the answer.\\nAnswer:"``; greedy
  decoding; the answer is the first line of the output; "unanswerable" (or nothing) means no answer.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import ArcItem, SquadItem
from .metrics import extract_choice, squad_scores

log = logging.getLogger("brecq")

NO_ANSWER = "unanswerable"


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


@dataclass
class Record:
    """One example's outcome, written as one JSONL line."""

    id: str
    prompt_sha: str
    prediction: str
    gold: object
    correct: float  # 1/0 (accuracy, EM) for ARC; EM for SQuAD
    score: dict  # task-specific: log-likelihoods, acc_norm correctness, F1, parse status


def _device(model):
    return next(model.parameters()).device


def apply_chat(tokenizer, prompt: str, chat: bool) -> str:
    if not chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


# --- log-likelihood ------------------------------------------------------------------------------
def _encode_pair(tokenizer, context: str, continuation: str):
    # As lm-evaluation-harness: trailing spaces of the context belong to the continuation; the
    # continuation's tokens are those the whole string has beyond the context's.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return whole[:len(ctx)], whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs, batch_size: int = 8, show_progress: bool = False) -> list[float]:
    """Summed log-probability of each continuation given its context; right-padded batches."""
    device = _device(model)
    encoded = [_encode_pair(tokenizer, c, x) for c, x in pairs]
    results = [0.0] * len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    for start in tqdm(range(0, len(order), batch_size), desc="loglikelihood", disable=not show_progress):
        idx = order[start:start + batch_size]
        seqs = [encoded[i][0] + encoded[i][1] for i in idx]
        length = max(len(s) for s in seqs)
        ids = torch.full((len(idx), length), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        logits = model(ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logp = F.log_softmax(logits, dim=-1)
        for row, i in enumerate(idx):
            ctx_len, cont = len(encoded[i][0]), encoded[i][1]
            positions = torch.arange(ctx_len - 1, ctx_len - 1 + len(cont), device=logp.device)
            results[i] = logp[row, positions, torch.tensor(cont, device=logp.device)].sum().item()
    return results


def arc_context(item: ArcItem) -> str:
    return f"Question: {item.question}\nAnswer:"


def score_arc_loglikelihood(model, tokenizer, items, batch_size: int = 8, show_progress: bool = False):
    pairs, owners = [], []
    for n, item in enumerate(items):
        for option in item.options:
            pairs.append((arc_context(item), f" {option}"))
            owners.append(n)
    lls = loglikelihoods(model, tokenizer, pairs, batch_size, show_progress)
    records, cursor = [], 0
    for item in items:
        k = len(item.options)
        ll = lls[cursor:cursor + k]
        cursor += k
        norm = [v / len(f" {o}") for v, o in zip(ll, item.options)]
        pred = max(range(k), key=lambda j: ll[j])
        pred_norm = max(range(k), key=lambda j: norm[j])
        records.append(Record(item.id, prompt_hash(arc_context(item)), item.labels[pred], item.labels[item.answer_index],
                              float(pred == item.answer_index),
                              {"loglikelihoods": ll, "acc_norm": float(pred_norm == item.answer_index),
                               "prediction_norm": item.labels[pred_norm]}))
    return records


# --- generation ----------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens: int, batch_size: int = 8,
             show_progress: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches, KV cache on)."""
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = [""] * len(prompts)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not show_progress):
        idx = order[start:start + batch_size]
        length = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), length), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, length - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, length - len(encoded[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, use_cache=True)
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[row, length:], skip_special_tokens=True)
    return outputs


def arc_generative_prompt(item: ArcItem) -> str:
    options = "\n".join(f"{label}. {text}" for label, text in zip(item.labels, item.options))
    return f"Question: {item.question}\n{options}\nAnswer with the letter of the correct option.\nAnswer:"


def score_arc_generative(model, tokenizer, items, chat: bool = False, max_new_tokens: int = 16,
                         batch_size: int = 8, show_progress: bool = False):
    prompts = [apply_chat(tokenizer, arc_generative_prompt(item), chat) for item in items]
    texts = generate(model, tokenizer, prompts, max_new_tokens, batch_size, show_progress)
    records = []
    for item, prompt, text in zip(items, prompts, texts):
        choice = extract_choice(text, item.labels)
        gold = item.labels[item.answer_index]
        records.append(Record(item.id, prompt_hash(prompt), choice if choice is not None else "", gold,
                              float(choice == gold), {"output": text, "parsed": choice is not None}))
    return records


def squad_prompt(item: SquadItem) -> str:
    return (f"Context: {item.context}\nQuestion: {item.question}\nAnswer with a short span from the context, "
            f"or with \"{NO_ANSWER}\" if the context does not contain the answer.\nAnswer:")


def parse_squad_answer(text: str) -> str:
    """First non-empty line, stripped; the no-answer word (alone, any case, with punctuation) or
    nothing at all means the empty (no) answer."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    answer = lines[0] if lines else ""
    if answer.strip(" .!\"'").lower() == NO_ANSWER:
        return ""
    return answer


def score_squad(model, tokenizer, items, chat: bool = False, max_new_tokens: int = 32, batch_size: int = 8,
                show_progress: bool = False):
    prompts = [apply_chat(tokenizer, squad_prompt(item), chat) for item in items]
    texts = generate(model, tokenizer, prompts, max_new_tokens, batch_size, show_progress)
    records = []
    for item, prompt, text in zip(items, prompts, texts):
        answer = parse_squad_answer(text)
        em, f1 = squad_scores(answer, item.answers)
        records.append(Record(item.id, prompt_hash(prompt), answer, list(item.answers), em,
                              {"f1": f1, "output": text, "has_answer": item.answerable}))
    return records
