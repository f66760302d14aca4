"""Command line: ``brecq <command>``. Each command is a small function; see ``brecq --help``."""
from __future__ import annotations

import argparse
import logging
import sys


def _speed(args) -> int:
    from brecq_ext import Clipping

    from .demo.quickstart import format_demo, run_demo

    result = run_demo(layers=args.layers, seed=args.seed,
                      clipping=Clipping.MINMAX if args.minmax else Clipping.MSE,
                      speed_repeats=args.repeats)
    print(format_demo(result))
    return 0


def _demo(args) -> int:
    from .demo.study import run_demo_study

    results = run_demo_study(args.output, seed=args.seed, iters=args.iters, show_progress=not args.quiet)
    for label, analysis in results["analysis"]["models"].items():
        print(f"{label}:")
        for line in analysis["conclusions"]["findings"]:
            print(f"  - {line}")
    print(f"report: {args.output}/report.md ({results['wall_seconds']:.0f} s)")
    return 0


def _quantize(args) -> int:
    from .quantization.baselines import GPTQConfig
    from .quantization.calibration import CalibrationSpec
    from .quantization.quantize import quantize_pretrained
    from .quantization.recipe import Method, get_recipe
    from .quantization.reconstruct import InputSource, LossKind, ReconstructionConfig

    method = Method(args.method)
    if args.gguf:
        return _quantize_gguf(args, method)
    recipe = get_recipe(args.recipe, method)
    calibration = None
    if method is not Method.RTN:
        if not args.calib:
            raise UserError(f"quantize: --calib is required for method {method.value}")
        calibration = CalibrationSpec(args.calib, num_samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                                      columns=tuple(args.calib_columns or ()), chat_template=args.chat_template)
    reconstruction = ReconstructionConfig(iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                                          reg_weight=args.reg_weight, loss=LossKind(args.loss),
                                          input_source=InputSource(args.input_source), seed=args.seed)
    gptq = GPTQConfig(damp=args.damp, act_order=args.act_order)
    from .distributed import init_from_environment, rank_device

    w = init_from_environment(args.device)  # under torchrun the ranks share the blocks' work
    _, report = quantize_pretrained(args.model, args.out, recipe, calibration, reconstruction=reconstruction,
                                    gptq=gptq, device=rank_device(args.device), work_dir=args.work_dir,
                                    activation_dir=args.activation_dir, keep_work_dir=args.keep_work,
                                    show_progress=not args.quiet, streamed=False if args.in_memory else None)
    if w.is_main:
        print(report.table())
        print(f"saved to {args.out} ({report.seconds:.1f} s, peak resident memory {report.peak_rss_mib:.0f} MiB)")
    return 0


def _quantize_gguf(args, method) -> int:
    import json

    from .quantization.calibration import CalibrationSpec
    from .kquants import quantize_gguf
    from .quantization.recipe import Method
    from .quantization.reconstruct import InputSource, LossKind, ReconstructionConfig

    if method is Method.GPTQ:
        raise UserError("quantize --gguf: method must be brecq or rtn (llama.cpp's grids with learned or searched "
                        "codes)")
    if (method is Method.BRECQ or args.imatrix) and not args.calib:
        raise UserError("quantize --gguf: --calib is required for brecq and --imatrix")
    if args.loss != "mse" or args.input_source != "quantized":
        raise UserError("quantize --gguf: only --loss mse and --input-source quantized")
    calibration = None
    if args.calib:
        calibration = CalibrationSpec(args.calib, num_samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                                      columns=tuple(args.calib_columns or ()), chat_template=args.chat_template)
    reconstruction = ReconstructionConfig(iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                                          reg_weight=args.reg_weight, loss=LossKind.MSE,
                                          input_source=InputSource.QUANTIZED, seed=args.seed)
    _, report = quantize_gguf(args.model, args.out, preset=args.gguf, method=method, calibration=calibration,
                              reconstruction=reconstruction, search=args.search, importance=args.imatrix,
                              device=args.device, show_progress=not args.quiet)
    for block in report.blocks:
        if "loss_learned" in block:
            print(f"block {block['index']}: error {block['loss_searched']:.4g} (searched codes) -> "
                  f"{block['loss_learned']:.4g} (learned)")
    print(json.dumps({"file": args.out, "preset": report.preset, "method": report.method, "search": report.search,
                      "importance": report.importance, "bits_per_weight": round(report.bits_per_weight(), 4),
                      "seconds": round(report.seconds, 1)}))
    return 0


def _evaluate(args) -> int:
    import json

    import torch

    from .quantization.calibration import load_documents
    from .distributed import init_from_environment, rank_device
    from .evaluation.fidelity import fidelity
    from .evaluation.perplexity import perplexity, token_stream
    from .evaluation.runner import Task, evaluate
    from .io import atomic_write_text, load_model_any

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    w = init_from_environment(args.device)
    if w.distributed and args.task in ("perplexity", "kl"):
        raise UserError(f"eval --task {args.task} runs in one process; torchrun shares out arc, arc_gen and squad")
    model, tokenizer = load_model_any(args.model, device=rank_device(args.device), dtype=dtype)
    if args.task in ("perplexity", "kl"):
        ids = token_stream(tokenizer, load_documents(args.data, tuple(args.columns or ())))
        if args.limit_tokens:
            ids = ids[: args.limit_tokens]
        if args.task == "perplexity":
            result = vars(perplexity(model, ids, window=args.window, stride=args.stride, batch_size=args.batch_size,
                                     show_progress=not args.quiet))
        else:
            if not args.reference:
                raise UserError("eval --task kl needs --reference (the full-precision model)")
            reference, _ = load_model_any(args.reference, device=args.device, dtype=dtype)
            result = vars(fidelity(model, reference, ids, window=args.window, batch_size=args.batch_size))
        result.update(task=args.task, model=args.model, data=args.data)
        if args.out:
            from pathlib import Path

            Path(args.out).mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(args.out) / "results.json", json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        return 0
    result = evaluate(model, tokenizer, Task(args.task), args.data, args.out, limit=args.limit, seed=args.seed,
                      chat=args.chat_template, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      show_progress=not args.quiet, label=args.model)
    if w.is_main:
        print(json.dumps({k: v for k, v in result.items() if k != "data"}, indent=2))
    return 0


def _study(args) -> int:
    if args.example:
        from .study.example import EXAMPLE

        print(EXAMPLE, end="")
        return 0
    if not args.config:
        raise UserError("study: give a config file (brecq study CONFIG.toml), or --example to print one")
    from .distributed import init_from_environment
    from .study import load_study_config, run_study

    config = load_study_config(args.config)
    if args.output:
        from dataclasses import replace

        config = replace(config, output=args.output)
    w = init_from_environment(config.device)
    results = run_study(config, show_progress=not args.quiet)
    if w.is_main:
        print(f"study '{config.name}' done in {results['seconds']:.1f} s: {config.output}/report.md")
    return 0


def _export(args) -> int:
    import json

    from .export import export

    options = {"verify": not args.no_verify}
    if args.format == "gguf":
        options["fallback"] = args.fallback
        options["exact_8bit"] = args.exact_8bit
    else:
        if args.dtype:
            options["dtype"] = args.dtype
        options["allow_inexact_scales"] = args.allow_inexact_scales
    report = export(args.model, args.out, args.format, **options)
    if args.format == "gguf":
        print(report.table())
        print(f"wrote {args.out}: {report.total_bytes / 1e6:.2f} MB, quantized layers "
              f"{report.bits_per_weight():.3f} bits/weight, largest error {report.max_error_steps():.4g} steps")
    else:
        print(json.dumps({k: v for k, v in report.to_dict().items() if k != "layers"}, indent=2))
        print(f"wrote {args.out}: quantized layers {report.bits_per_weight():.3f} bits/weight, "
              f"{'exact' if report.exact else 'not exact (see the log)'}")
    return 0


def _generate(args) -> int:
    import time

    import torch

    from .io import load_model_any
    from .runtime import cpu_decoder_or_none, generate

    if args.max_new_tokens < 0:
        raise UserError(f"generate: --max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"generate: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, tokenizer = load_model_any(args.model, dtype=dtype)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.chat_template:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    decoder = None if args.transformers else cpu_decoder_or_none(model)  # logs why not
    new: list[int] = []
    shown = ""

    def show(token: int) -> None:
        nonlocal shown
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if text.startswith(shown):  # print what the new token added (a token may end inside a character)
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    started = time.perf_counter()
    out = generate(model, ids, args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, decoder=decoder,
                   use_runtime=decoder is not None, on_token=show)
    seconds = time.perf_counter() - started
    sys.stdout.write("\n")
    generated = out.shape[1] - ids.shape[1]
    engine = "brecq C++ runtime" if decoder is not None else "transformers"
    print(f"[{generated} token{'s' if generated != 1 else ''} in {seconds:.2f} s, the {ids.shape[1]}-token prompt's prefill included "
          f"({generated / seconds if seconds else 0:.1f} tokens/s); {engine}, {torch.get_num_threads()} threads]",
          file=sys.stderr)
    return 0


def _compare(args) -> int:
    import json

    from .evaluation.runner import compare, read_records

    binary = args.field in ("correct", "acc_norm")
    result = compare(read_records(args.a), read_records(args.b), args.field, binary)
    print(json.dumps(result, indent=2))
    return 0


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" once: not for options without a default (None, flags) and not where
    the help text already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or "default" in text
                or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    # -v / --debug are accepted before and after the command (`brecq -v study x` and
    # `brecq study x -v`); SUPPRESS keeps a subcommand's default from overwriting the top-level value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log progress at INFO level and show tracebacks of errors")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="log at DEBUG level and show tracebacks of errors")
    parser = argparse.ArgumentParser(prog="brecq", description="BRECQ post-training quantization toolkit",
                                     parents=[common])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_parser = commands.add_parser

    def add_parser(name, **kwargs):
        return _add_parser(name, parents=[common], **kwargs)

    commands.add_parser = add_parser
    demo = commands.add_parser("demo", help="offline demo study: train two small models, quantize, evaluate, report")
    demo.add_argument("--output", default="brecq-demo", help="output folder (report.md, results.json, plots)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic data, training and sampling")
    demo.add_argument("--iters", type=int, default=200, help="BRECQ iterations per block")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

    speed = commands.add_parser("speed", help="quantize a Qwen3-0.6B-shaped model round-to-nearest, print sizes "
                                              "and a packed-vs-dense matmul speed table")
    speed.add_argument("--layers", type=int, default=2, help="decoder layers of the Qwen3-0.6B-shaped model")
    speed.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    speed.add_argument("--repeats", type=int, default=50, help="timed calls per matmul")
    speed.add_argument("--minmax", action="store_true", help="min-max ranges instead of the MSE clipping search")
    speed.set_defaults(run=_speed)

    from .quantization.preset_names import PRESET_NAMES
    q = commands.add_parser("quantize", help="quantize a Hugging Face causal LM and save it packed",
                            formatter_class=_DefaultsFormatter)
    q.add_argument("model", help="path of a Hugging Face causal LM (Qwen3, Llama, Qwen2, Mistral)")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--recipe", default="w4g64_mix_attn6", choices=PRESET_NAMES,
                   help="which layers get which bits and group size (w4g64_mix_attn6: W6 attention, W4 MLP)")
    q.add_argument("--method", default="brecq", choices=["brecq", "rtn", "gptq"],
                   help="brecq: learned rounding block by block; rtn: round to nearest; gptq: Hessian-based")
    q.add_argument("--calib", help="calibration data: .parquet or text file")
    q.add_argument("--calib-columns", nargs="*", help="parquet columns joined per row (default: all string columns)")
    q.add_argument("--samples", type=int, default=128, help="calibration windows")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    q.add_argument("--chat-template", action="store_true", help="format parquet rows with the tokenizer's chat template")
    q.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and the optimiser")
    q.add_argument("--iters", type=int, default=800, help="BRECQ iterations per block")
    q.add_argument("--batch-size", type=int, default=8, help="BRECQ samples per iteration")
    q.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate of the rounding variables")
    q.add_argument("--reg-weight", type=float, default=0.01, help="weight of the rounding regulariser")
    q.add_argument("--loss", default="mse", choices=["mse", "fisher"],
                   help="block reconstruction loss: plain or Fisher-weighted squared error")
    q.add_argument("--input-source", default="quantized", choices=["quantized", "full_precision"],
                   help="where a block's input comes from while it is reconstructed")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ Hessian dampening")
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    q.add_argument("--device", default="cpu", help="device of the block being optimised (cpu, cuda, cuda:1)")
    q.add_argument("--work-dir", help="checkpoint folder for resuming (default: OUT/.brecq_work)")
    q.add_argument("--keep-work", action="store_true", help="keep the block checkpoints once the model is saved")
    q.add_argument("--in-memory", action="store_true",
                   help="load the whole model instead of reading one block at a time from its safetensors shards "
                        "(the default for local safetensors folders unless --loss fisher; the same output either "
                        "way; docs/SCALE.md)")
    q.add_argument("--activation-dir", help="keep cached block inputs/targets in memory-mapped files here "
                                            "(calibration sets larger than memory)")
    q.add_argument("--gguf", choices=["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q4_1"],
                   help="write one GGUF file (--out) in llama.cpp's block types with this llama-quantize type map "
                        "instead of a brecq folder; --method brecq learns the codes on llama.cpp's grids, rtn keeps "
                        "the search's (--recipe is not used; docs/FORMAT.md)")
    q.add_argument("--search", default="llama.cpp", choices=["llama.cpp", "min_max"],
                   help="--gguf: who picks the scales and mins: llama.cpp's own quantizer (needs llama-cpp-python) "
                        "or brecq's min/max")
    q.add_argument("--imatrix", action="store_true",
                   help="--gguf: weight llama.cpp's scale search by an importance matrix from the calibration data")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(run=_quantize)

    e = commands.add_parser("eval", help="evaluate a model (full precision or brecq-quantized)",
                            formatter_class=_DefaultsFormatter)
    e.add_argument("model", help="model directory (Hugging Face or saved by brecq quantize)")
    e.add_argument("--task", required=True, choices=["arc", "arc_gen", "squad", "perplexity", "kl"],
                   help="arc: log-likelihood; arc_gen: generated letter; squad: generative EM/F1; perplexity; "
                        "kl: divergence from --reference")
    e.add_argument("--data", required=True, help="parquet file (arc, squad) or text/parquet file (perplexity, kl)")
    e.add_argument("--out", help="output folder for results.json and records.jsonl")
    e.add_argument("--limit", type=int, help="evaluate a seeded sample of this many examples")
    e.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    e.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    e.add_argument("--batch-size", type=int, default=8, help="examples (or windows) per forward pass")
    e.add_argument("--max-new-tokens", type=int, help="generation limit (default 16 for arc_gen, 32 for squad)")
    e.add_argument("--window", type=int, default=256, help="perplexity / kl window in tokens")
    e.add_argument("--stride", type=int, help="perplexity stride (default: the window)")
    e.add_argument("--columns", nargs="*", help="parquet text columns for perplexity / kl")
    e.add_argument("--limit-tokens", type=int, help="perplexity / kl on the first N tokens only")
    e.add_argument("--reference", help="full-precision parent model, for --task kl")
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="activation dtype")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(run=_evaluate)

    x = commands.add_parser("export", help="write a brecq-quantized model as GGUF (llama.cpp, ollama) or "
                                           "compressed-tensors (vLLM, transformers)")
    x.add_argument("model", help="folder written by brecq quantize")
    x.add_argument("--format", required=True, choices=["gguf", "compressed-tensors"],
                   help="gguf: one file for llama.cpp and ollama; compressed-tensors: a folder for vLLM and "
                        "transformers")
    x.add_argument("--out", required=True, help="output file (gguf) or folder (compressed-tensors)")
    x.add_argument("--fallback", default="f32", choices=["f32", "f16"],
                   help="gguf: type of layers no block type holds (f32 is exact; default f32)")
    x.add_argument("--exact-8bit", action="store_true",
                   help="gguf: 8-bit layers that Q8_0 cannot hold exactly go to the fallback type "
                        "(default: Q8_0, with blocks whose q - z exceeds int8 stored at half resolution)")
    x.add_argument("--dtype", choices=["float16", "float32", "bfloat16"],
                   help="compressed-tensors: model and scale dtype (default: float16 if it holds every "
                        "full-precision tensor exactly, else float32)")
    x.add_argument("--allow-inexact-scales", action="store_true",
                   help="compressed-tensors: accept --dtype bfloat16, which rounds the float16 scales")
    x.add_argument("--no-verify", action="store_true", help="skip the weights checksum check")
    x.set_defaults(run=_export)

    g = commands.add_parser("generate", help="generate text from a prompt, streamed (brecq's C++ decoder on the CPU)",
                            formatter_class=_DefaultsFormatter)
    g.add_argument("model", help="model directory (saved by brecq quantize, or a Hugging Face model)")
    g.add_argument("--prompt", help="prompt text (default: read from standard input)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of this probability")
    g.add_argument("--seed", type=int, help="sampling seed (default: not reproducible)")
    g.add_argument("--chat-template", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="activation dtype")
    g.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    g.add_argument("--transformers", action="store_true", help="decode through transformers instead (to compare)")
    g.set_defaults(run=_generate)

    c = commands.add_parser("compare", help="paired comparison of two evaluation runs on the same examples")
    c.add_argument("a", help="records.jsonl of the first run (e.g. unquantized)")
    c.add_argument("b", help="records.jsonl of the second run")
    c.add_argument("--field", default="correct", choices=["correct", "acc_norm", "f1"],
                   help="per-example outcome to compare")
    c.set_defaults(run=_compare)

    s = commands.add_parser("study", help="run a study from a TOML config: quantize, evaluate, measure, report")
    s.add_argument("config", nargs="?", help="study config (TOML; brecq study --example prints a commented one; "
                                             "docs/STUDY.md explains every entry)")
    s.add_argument("--example", action="store_true", help="print a complete commented config and exit")
    s.add_argument("--output", help="override the config's output folder")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(run=_study)
    return parser


def _hide_library_progress_bars() -> None:
    """--quiet covers the bars transformers and huggingface_hub draw themselves (saving and
    loading checkpoint shards), not only ours."""
    try:
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, no traceback."""


# Errors that come from the user's input (files, configs, data, checkpoints), not from a bug.
USER_ERRORS = (UserError, OSError, ValueError, ImportError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    verbose, debug = getattr(args, "verbose", False), getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if getattr(args, "quiet", False):
        _hide_library_progress_bars()
    finished = False
    try:
        code = args.run(args)
        finished = True
        return code
    except RuntimeError as exc:
        if type(exc).__name__ != "RankFailed":  # brecq.distributed's, without importing torch here
            raise
        print(f"brecq: error: {exc}", file=sys.stderr)  # the failing rank prints its own error
        return 1
    except KeyboardInterrupt:
        kept = getattr(args, "out", None) or getattr(args, "output", None)
        where = f" in {kept}" if kept else ""
        print(f"brecq: interrupted; finished work is kept{where} and running the same command again resumes it",
              file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if verbose or debug:
            raise
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
            message = f"{exc.filename}: {message}"
        print(f"brecq: error: {message.splitlines()[0]} (-v for the traceback)", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # never imported just for this
            from .distributed import shutdown

            shutdown(wait=finished)


if __name__ == "__main__":
    sys.exit(main())
