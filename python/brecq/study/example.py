"""A complete, commented study config: what ``brecq study --example`` prints (docs/STUDY.md explains
every entry). A test keeps it loadable."""

EXAMPLE = '''\
# A brecq study: each model unquantized and quantized, evaluated, measured and reported.
# Relative paths are relative to this file. Unknown keys are errors.

[study]
name = "qwen3-0.6b-brecq"
output = "study_out"            # report.md, results.json, plots/, quantized/, runs/
device = "cpu"                  # "cpu", "cuda" or "cuda:N"
dtype = "float32"               # "float32" or "bfloat16": evaluation and measurement
attention = "brecq_sdpa"        # or "sdpa" (transformers' own); brecq_sdpa runs CPU decode steps
                                # through brecq_ext's decode-attention kernel
fused_norms = true              # Llama/Qwen RMSNorm as one brecq_ext call each
seed = 0

[[models]]                      # one entry per model
label = "base"
path = "models/Qwen3-0.6B"      # a Hugging Face model folder (or a hub id "org/name")
role = "base"                   # "base" (ARC by log-likelihood) or "fine-tuned" (generative)
chat_template = false           # wrap prompts in the tokenizer's chat template
[models.calibration]            # needed by brecq and gptq variants
path = "data/train-squad_v2.parquet"   # parquet (columns joined per row) or a text file
columns = ["context", "question"]      # default: every string column
samples = 128                   # windows
seq_len = 512                   # tokens per window

[[variants]]                    # the unquantized model is always compared too
label = "BRECQ W4/W6"
recipe = "w4g64_mix_attn6"      # a preset: w3g64, w4g64, w4g64_mix_attn6, w4g64_mix_attn6_head8, w6g64, w8g64
method = "brecq"                # "brecq", "gptq" or "rtn"
iters = 800                     # optional BRECQ settings: iters, batch_size, lr

[[datasets]]
path = "data/test-ai2_arc.parquet"
task = "arc"                    # "arc" (log-likelihood for base models, generative for fine-tuned),
                                # "arc_loglik", "arc_gen" or "squad"
limit = 200                     # optional: a seeded sample of this many examples

[measure]
prompt_tokens = 128             # prefill length of the latency measurement
decode_tokens = 32              # decode steps per repeat
repeats = 3                     # at least; then more while the decode-ratio interval is wider than
target_interval = 0.05          # +-5 % of the ratio, until
max_seconds = 60                # this much time has gone (0: exactly `repeats`)
memory_subprocess = true        # CPU peak memory measured in a fresh process
'''
