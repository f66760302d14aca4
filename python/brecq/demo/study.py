"""The offline demo study (the README's main command): two small Qwen3-architecture models trained
here on synthetic tasks (a base model and a fine-tuned one), each unquantized and BRECQ-quantized
(W6 attention, W4 MLP, group 64), evaluated on synthetic ARC-style and SQuAD-style items, measured,
and reported. No network, no GPU; a few minutes on 2 CPU cores."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..study import run_study
from ..study.config import parse_study_config
from .synthetic import build_demo_models

log = logging.getLogger("brecq")

STUDY = """
[study]
name = "brecq offline demo (synthetic tasks, small trained models)"
output = "{out}"
seed = {seed}

[[models]]
label = "demo-base"
path = "{base}"
role = "base"
[models.calibration]
path = "{data}/calibration-base.txt"
samples = 32
seq_len = 128

[[models]]
label = "demo-fine-tuned"
path = "{finetuned}"
role = "fine-tuned"
[models.calibration]
path = "{data}/calibration-finetuned.txt"
samples = 32
seq_len = 128

[[variants]]
label = "BRECQ W4/W6"
recipe = "w4g64_mix_attn6"
method = "brecq"
iters = {iters}

# Three bits everywhere by round to nearest: a cheaper, lossier setting beside the study's recipe.
[[variants]]
label = "RTN W3"
recipe = "w3g64"
method = "rtn"

[[datasets]]
path = "{data}/synthetic-arc.parquet"
task = "arc_loglik"   # both models by log-likelihood: the fine-tuned one learnt facts, not the letter format

[[datasets]]
path = "{data}/synthetic-squad.parquet"
task = "squad"

[measure]
prompt_tokens = 64
decode_tokens = 16
repeats = 3
max_seconds = 20
"""

NOTE = """> **What this is.** The models are two 4-layer Qwen3-architecture models (hidden size 128,
> ~0.8 M parameters, a byte-level BPE tokenizer) trained on this machine on synthetic text: colours
> of made-up facts and short "who has what" sentences (800 steps), the fine-tuned one then trained on
> SQuAD-style prompts (600 steps). Trained models are reused by a rerun. ARC-style items ask the
> colour of a fact, scored by log-likelihood for both models. SQuAD-style items give one or two
> sentences about one person and ask what they have; a third of them say only where the person went
> and are unanswerable. (Stories of several people, where the model must pick the one asked about,
> were tried and not learnt at this size and training time: exact match 4-10 %.) Accuracies are real
> measurements of these models, not of any public model. Both tasks are learnt to 100 %, and the
> quantized variants keep every answer, so the accuracy comparisons are at their ceiling: at these
> settings quantization costs these models no accuracy that 150-200 items can show.

"""


def run_demo_study(out: str | Path = "brecq-demo", seed: int = 0, iters: int = 200, base_steps: int = 800,
                   finetune_steps: int = 600, show_progress: bool = True) -> dict:
    started = time.perf_counter()
    out = Path(out).resolve()
    built = build_demo_models(out / "work", seed=seed, base_steps=base_steps, finetune_steps=finetune_steps,
                              show_progress=show_progress)
    text = STUDY.format(out=out, seed=seed, base=built["paths"]["base"], finetuned=built["paths"]["fine-tuned"],
                        data=built["data"], iters=iters)
    (out / "study.toml").write_text(text)
    import tomllib

    config = parse_study_config(tomllib.loads(text), base=out, source=str(out / "study.toml"))
    results = run_study(config, show_progress=show_progress)
    report = out / "report.md"
    report.write_text(report.read_text().replace("## Executive summary", NOTE + "## Executive summary", 1))
    results["wall_seconds"] = time.perf_counter() - started
    return results
