"""``quantize(model, recipe, calibration)``: the one entry point that turns a causal LM into a
packed low-bit model, block by block, resumable, with progress and a per-block summary."""
from __future__ import annotations

import enum
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from brecq_ext import QuantLinear, gather_quantized_weights

from .baselines import GPTQConfig, gptq_block, rtn_layer
from .blocks import (
    ActivationStore,
    BlockCall,
    capture_block_inputs,
    decoder_blocks,
    linear_layers,
    run_block,
    set_submodule,
)
from ..distributed import agree, world
from ..io import atomic_save_tensors, atomic_write_text
from ..measurement.measure import peak_rss_mib
from .recipe import Method, Recipe
from .reconstruct import (
    InputSource,
    LayerCodes,
    LossKind,
    ReconstructionConfig,
    _reconstruction_loss,
    reconstruct_block,
)
from ..streaming.safetensors_io import ShardedCheckpoint
from ..streaming.skeleton import StreamedWeights, bound_heap_retention, skeleton_from_folder, streamed_entries

log = logging.getLogger("brecq")


@dataclass
class BlockRecord:
    index: int
    layers: int
    loss_nearest: float | None  # block output error with round-to-nearest codes (BRECQ only)
    loss_final: float  # block output error of the stored codes
    seconds: float
    resumed: bool = False


@dataclass
class QuantizationReport:
    method: str
    recipe: dict
    blocks: list = field(default_factory=list)
    outside_blocks: list = field(default_factory=list)  # names quantized by RTN outside decoder blocks
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    peak_cuda_mib: float | None = None

    def table(self) -> str:
        lines = ["| block | layers | loss RTN (same scales) | loss final | change | seconds | resumed |",
                 "|---:|---:|---:|---:|---:|---:|---|"]
        for b in self.blocks:
            nearest = f"{b.loss_nearest:.4g}" if b.loss_nearest is not None else "-"
            change = (f"{100 * (b.loss_final - b.loss_nearest) / b.loss_nearest:+.1f} %"
                      if b.loss_nearest else "-")
            lines.append(f"| {b.index} | {b.layers} | {nearest} | {b.loss_final:.4g} | {change} | "
                         f"{b.seconds:.2f} | {'yes' if b.resumed else ''} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def plain_dict(config) -> dict:
    """A settings dataclass as JSON-friendly values (enums by their value)."""
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in asdict(config).items()}


def _block_prefix(model: nn.Module, block: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is block:
            return name + "."
    raise ValueError("block is not part of the model")


def _fingerprint(contents, recipe: Recipe, ids: torch.Tensor | None, settings: dict) -> str:
    """What a run's checkpoints depend on: the recipe and settings, every tensor of the model
    (``contents``: name and its contents as chunks, in state-dict order) and the calibration ids.
    Hashes bytes, so a model in memory and the same model streamed from its checkpoint agree."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": recipe.to_dict(), "settings": settings}, sort_keys=True,
                             default=str).encode())
    for name, chunks in contents:
        digest.update(name.encode())
        for chunk in chunks:
            data = chunk.detach().reshape(-1).cpu().contiguous()
            digest.update(str(data.dtype).encode())
            if data.numel():
                digest.update(memoryview(data.view(torch.uint8).numpy()))
    if ids is not None:
        digest.update(ids.numpy().tobytes())
    return digest.hexdigest()


def block_checkpoint(work: Path, index: int) -> Path:
    return work / f"block_{index:03d}.safetensors"


def outside_checkpoint(work: Path, name: str) -> Path:
    return work / f"outside_{name}.safetensors"


def _to_quant_linear(linear: nn.Linear, result: LayerCodes) -> QuantLinear:
    bias = linear.bias.detach() if linear.bias is not None else None
    layer = QuantLinear.from_codes(result.codes, result.scale, result.zero, result.bits, result.group_size, bias)
    return layer.to(linear.weight.device)  # where the layer it replaces lives, wherever it was computed


def _save_block(path: Path, block: nn.Module, names, record: BlockRecord) -> None:
    tensors = {}
    for name in names:
        layer = block.get_submodule(name)
        for key, value in layer.state_dict().items():
            tensors[f"{name}.{key}"] = value
    atomic_save_tensors(tensors, path, metadata={"record": json.dumps(asdict(record))})


def _load_block(path: Path, block: nn.Module, rules) -> BlockRecord:
    with safe_open(str(path), framework="pt") as f:
        record = BlockRecord(**json.loads(f.metadata()["record"]))
        for name, rule in rules.items():
            linear = block.get_submodule(name)
            layer = QuantLinear(linear.in_features, linear.out_features, rule.bits, rule.group_size,
                                bias=linear.bias is not None)
            layer.load_state_dict({key: f.get_tensor(f"{name}.{key}") for key in layer.state_dict()})
            set_submodule(block, name, layer)
    record.resumed = True
    return record


@torch.no_grad()
def collect_fisher(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Squared gradients of the language-model loss with respect to each block's output, from the
    full-precision model, normalised to mean 1 per block (so the regulariser weight keeps its
    meaning); bfloat16 [N, T, D] per block on CPU."""
    blocks = decoder_blocks(model)
    outputs: dict[int, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(blocks):
        def keep(module, args, out, i=i):
            tensor = out[0] if isinstance(out, tuple) else out
            tensor.retain_grad()
            outputs[i] = tensor
        hooks.append(block.register_forward_hook(keep))
    embed = model.get_input_embeddings()
    hooks.append(embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    grads: list[list[torch.Tensor]] = [[] for _ in blocks]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    device = next(model.parameters()).device
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size].to(device)
            with torch.enable_grad():
                loss = model(batch, labels=batch, use_cache=False).loss
                loss.backward()
            for i in range(len(blocks)):
                grads[i].append(outputs[i].grad.detach().float().square().cpu())
            outputs.clear()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    fisher = []
    for per_block in grads:
        f = torch.cat(per_block)
        fisher.append((f / f.mean().clamp_min(1e-30)).to(torch.bfloat16))
    return fisher


def quantize(model: nn.Module, recipe: Recipe, calibration: torch.Tensor | None = None, *,
             reconstruction: ReconstructionConfig = ReconstructionConfig(), gptq: GPTQConfig = GPTQConfig(),
             device: str | torch.device = "cpu", work_dir: str | Path | None = None,
             activation_dir: str | Path | None = None, forward_batch_size: int = 8,
             show_progress: bool = True, source: ShardedCheckpoint | None = None) -> QuantizationReport:
    """Quantize ``model`` in place: every linear layer the recipe assigns becomes a QuantLinear.

    ``calibration``: token ids int64 [N, T] (needed by BRECQ and GPTQ). Only the block being
    optimised moves to ``device``; cached block inputs and targets stay on the CPU. With
    ``work_dir``, each finished block is written there atomically and a rerun with the same model,
    recipe, calibration and settings resumes after the last finished block, ending with the same
    weights as an uninterrupted run. With ``activation_dir``, the cached block inputs and targets
    are memory-mapped files there instead of CPU memory. At the end, the packed weights of the
    model's CPU layers are gathered into one huge-page region in module order
    (``brecq_ext.gather_quantized_weights``), where decode reads them fastest.

    Streamed (``source`` given): ``model`` is a skeleton on the meta device
    (``brecq.streaming.skeleton_from_folder``) and ``source`` the checkpoint it was built from.
    Each block's weights are read when its turn comes and given back once its packed layers are
    in ``work_dir`` (required); the embeddings are read a slab at a time for the calibration
    tokens, and layers outside the blocks one at a time. Memory is about one block's, not the
    model's; the model stays a skeleton (its quantized layers on the meta device), and
    ``streamed_entries`` gives what ``save_quantized`` writes, the same file as in memory.
    """
    started = time.perf_counter()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    assignment = recipe.assign(model)
    report = QuantizationReport(method=recipe.method.value, recipe=recipe.to_dict())
    model.eval()
    weights = None
    if source is not None:
        if work_dir is None:
            raise ValueError("quantize: streamed quantization (source given) needs work_dir, where each block's "
                             "packed layers are kept until the model is saved")
        if recipe.method is Method.BRECQ and reconstruction.loss is LossKind.FISHER:
            raise ValueError("quantize: the Fisher loss needs gradients through the whole model at once; use "
                             "loss mse for streamed quantization, or load the model in memory")
        bound_heap_retention()  # freed blocks go back to the system, not into a growing heap
        weights = StreamedWeights(model, source)

    if recipe.method is Method.RTN and weights is None:
        for name, rule in assignment.items():
            linear = model.get_submodule(name)
            set_submodule(model, name, _to_quant_linear(linear, rtn_layer(linear, rule, recipe.clipping)))
        report.outside_blocks = list(assignment)
        gather_quantized_weights(model)
        report.seconds = time.perf_counter() - started
        report.peak_rss_mib = peak_rss_mib()
        return report

    if recipe.method is not Method.RTN:
        if calibration is None:
            raise ValueError(f"quantize: method {recipe.method.value} needs calibration token ids [N, T]")
        if calibration.dtype != torch.long or calibration.dim() != 2:
            raise ValueError(f"quantize: calibration must be int64 token ids [N, T], got {calibration.dtype} "
                             f"{tuple(calibration.shape)}")
    else:
        calibration = None  # RTN reads no activations
    blocks = decoder_blocks(model)
    prefixes = [_block_prefix(model, block) for block in blocks]
    per_block = [{name[len(prefix):]: rule for name, rule in assignment.items() if name.startswith(prefix)}
                 for prefix in prefixes]
    outside = [name for name in assignment if not any(name.startswith(p) for p in prefixes)]

    w = world()
    # Under torchrun: blocks that do not depend on each other (RTN; inputs from the full-precision
    # model) are shared out, block i to rank i % N, and met again through the work folder; with
    # inputs from the quantized blocks, every rank works on every block, each on its share of the
    # batch (reconstruct_block's data_parallel).
    independent = recipe.method is Method.RTN or reconstruction.input_source is InputSource.FULL_PRECISION
    share_blocks = w.distributed and independent and work_dir is not None
    work = None
    if work_dir is not None:
        work = Path(work_dir)
        settings = {"reconstruction": plain_dict(reconstruction), "gptq": plain_dict(gptq), "device": device.type,
                    "forward_batch_size": forward_batch_size}
        contents = (weights.named_contents() if weights is not None
                    else ((name, [t]) for name, t in model.state_dict().items()))
        error = None
        if w.is_main:  # one rank checks the folder; the others take its word
            try:
                _claim_work_dir(work, _fingerprint(contents, recipe, calibration, settings))
            except Exception as exc:
                error = exc
        agree(error, f"checking the work folder {work}")

    hidden = call = fisher = store = None
    if calibration is not None:
        log.info("capturing block inputs for %d calibration samples", calibration.shape[0])
        captured, call = capture_block_inputs(
            model, calibration, inputs_embeds=weights.embeddings(calibration) if weights is not None else None)
        store = ActivationStore(activation_dir if w.size == 1 or activation_dir is None
                                else Path(activation_dir) / f"rank{w.rank}")
        hidden = store.empty(captured)
        hidden.copy_(captured)
        del captured
        if recipe.method is Method.BRECQ and reconstruction.loss is LossKind.FISHER:
            log.info("collecting Fisher weights (squared LM-loss gradients of each block output)")
            fisher = collect_fisher(model, calibration)
    fp_in, q_in = hidden, hidden

    records: dict[int, BlockRecord] = {}
    elsewhere: list[int] = []  # blocks another rank quantizes (share_blocks)
    bar = tqdm(list(enumerate(blocks)), desc=f"{recipe.method.value} blocks", disable=not show_progress)
    error = None
    try:
        for i, block in bar:
            rules = per_block[i]
            checkpoint = block_checkpoint(work, i) if work is not None else None
            resuming = checkpoint is not None and checkpoint.exists()
            writer = (i % w.size if share_blocks else 0) == w.rank  # the rank that computes and writes it
            if share_blocks and not writer and not resuming and rules:
                elsewhere.append(i)
            if weights is not None:
                if (resuming or i in elsewhere) and calibration is None:  # nothing to run here
                    _release_quantized(weights, block, prefixes[i], rules)
                    continue
                weights.load(prefixes[i][:-1])
            targets = (run_block(block, fp_in, call, device, forward_batch_size, out=store.empty(fp_in))
                       if calibration is not None else None)
            if resuming:
                records[i] = _load_block(checkpoint, block, rules)
            elif i in elsewhere:
                pass
            elif rules:
                inputs = q_in if reconstruction.input_source is InputSource.QUANTIZED else fp_in
                records[i] = _quantize_block(block, i, rules, inputs, targets, call, recipe, reconstruction, gptq,
                                             device, fisher[i] if fisher is not None else None, forward_batch_size,
                                             show_progress, data_parallel=w.distributed and not share_blocks)
                if checkpoint is not None and writer:
                    _save_block(checkpoint, block, rules, records[i])
            else:
                records[i] = BlockRecord(i, 0, None, 0.0, 0.0)
            if i in records and recipe.method is not Method.RTN:
                bar.set_postfix(loss=f"{records[i].loss_final:.4g}")
            if calibration is not None:
                # With independent blocks the next block's inputs come from the full-precision chain only.
                q_next = (targets if share_blocks else
                          run_block(block, q_in, call, device, forward_batch_size, out=store.empty(q_in)))
                for used in {id(fp_in): fp_in, id(q_in): q_in}.values():
                    if used is not q_next:
                        store.release(used)
                q_in, fp_in = q_next, targets
            if weights is not None:
                _release_quantized(weights, block, prefixes[i], rules)
    except Exception as exc:  # the other ranks stop at the meeting point below, naming this one
        error = exc
    if store is not None:
        store.close()
    if share_blocks:  # no collective ran in the loop: the ranks can meet and stop together
        agree(error, "quantizing the decoder blocks")
    elif error is not None:
        # Ranks that split batches are inside an all-reduce: no meeting is possible, so this rank
        # exits with its error and the others fail on the broken collective (torchrun stops them).
        raise error
    for i in elsewhere:  # written by the rank that quantized it
        records[i] = _adopt_block(block_checkpoint(work, i), blocks[i], per_block[i], weights is not None)
    if recipe.method is not Method.RTN:
        report.blocks = [records[i] for i in sorted(records)]
    for name in outside:
        if weights is None:
            linear = model.get_submodule(name)
            set_submodule(model, name, _to_quant_linear(linear, rtn_layer(linear, assignment[name], recipe.clipping)))
            continue
        checkpoint = outside_checkpoint(work, name)
        error = None
        if w.is_main and not checkpoint.exists():  # one layer in memory at a time, written before the next
            try:
                linear = weights.load(name)
                layer = _to_quant_linear(linear, rtn_layer(linear, assignment[name], recipe.clipping))
                atomic_save_tensors({f"{name}.{k}": v for k, v in layer.state_dict().items()}, checkpoint)
                del layer
            except Exception as exc:
                error = exc
        agree(error, f"quantizing {name}")
        _release_quantized(weights, model, "", {name: assignment[name]})
    report.outside_blocks = list(assignment) if recipe.method is Method.RTN else outside
    if weights is None:
        gather_quantized_weights(model)
    report.seconds = time.perf_counter() - started
    report.peak_rss_mib = peak_rss_mib()
    if device.type == "cuda":
        report.peak_cuda_mib = torch.cuda.max_memory_allocated(device) / 2**20
    log.info("quantized %d blocks in %.1f s (peak RSS %.0f MiB)\n%s", len(blocks), report.seconds,
             report.peak_rss_mib, report.table())
    return report


def _claim_work_dir(work: Path, fingerprint: str) -> None:
    """Make ``work`` this run's folder, or refuse it if it holds another run's blocks."""
    work.mkdir(parents=True, exist_ok=True)
    run_file = work / "run.json"
    if run_file.exists():
        if json.loads(run_file.read_text()).get("fingerprint") != fingerprint:
            raise ValueError(f"{work}: holds blocks of a different run (model, recipe, calibration or "
                             "settings differ); use another work_dir or delete this one")
    else:
        atomic_write_text(run_file, json.dumps({"fingerprint": fingerprint}, indent=2))


def _adopt_block(checkpoint: Path, block: nn.Module, rules, streamed: bool) -> BlockRecord:
    """A block another rank quantized in this run: its record, and (in memory) its packed layers."""
    if not streamed:
        record = _load_block(checkpoint, block, rules)
    else:  # the block is already a skeleton of packed placeholders; the file is what gets saved
        with safe_open(str(checkpoint), framework="pt") as f:
            record = BlockRecord(**json.loads(f.metadata()["record"]))
    record.resumed = False
    return record


def _release_quantized(weights: StreamedWeights, parent: nn.Module, prefix: str, rules) -> None:
    """Streamed runs: give ``parent``'s memory back, its assigned layers now packed placeholders on
    the meta device (their contents are in the work folder)."""
    for name, rule in rules.items():
        linear = parent.get_submodule(name)
        bias = getattr(linear, "bias", None)
        set_submodule(parent, name, QuantLinear(linear.in_features, linear.out_features, rule.bits, rule.group_size,
                                                bias=bias is not None, device="meta",
                                                bias_dtype=bias.dtype if bias is not None else torch.float32))
    if prefix:
        weights.release(prefix[:-1])


def saved_layer_location(model: nn.Module, work: Path) -> Callable[[str], tuple[Path, str]]:
    """Where a streamed run keeps each packed layer: the block checkpoint and the layer's name
    inside it, or the layer's own file for layers outside the blocks."""
    prefixes = [_block_prefix(model, block) for block in decoder_blocks(model)]

    def locate(name: str) -> tuple[Path, str]:
        for i, prefix in enumerate(prefixes):
            if name.startswith(prefix):
                return block_checkpoint(work, i), name[len(prefix):]
        return outside_checkpoint(work, name), name
    return locate


def _quantize_block(block, index, rules, inputs, targets, call: BlockCall, recipe: Recipe,
                    reconstruction: ReconstructionConfig, gptq: GPTQConfig, device, fisher, batch_size,
                    show_progress, data_parallel: bool = False) -> BlockRecord:
    layers = linear_layers(block)
    if recipe.method is Method.RTN:  # streamed runs only: in memory, RTN needs no block loop
        started = time.perf_counter()
        for name, rule in rules.items():
            set_submodule(block, name, _to_quant_linear(layers[name], rtn_layer(layers[name], rule, recipe.clipping)))
        return BlockRecord(index, len(rules), None, float("nan"), time.perf_counter() - started)
    if recipe.method is Method.BRECQ:
        result = reconstruct_block(block, rules, inputs, targets, call, reconstruction, recipe.clipping, device,
                                   fisher=fisher, block_index=index, show_progress=show_progress,
                                   data_parallel=data_parallel)
        for name, codes in result.layers.items():
            set_submodule(block, name, _to_quant_linear(layers[name], codes))
        return BlockRecord(index, len(rules), result.loss_nearest, result.loss_final, result.seconds)
    started = time.perf_counter()
    codes, _ = gptq_block(block, rules, inputs, call, recipe.clipping, gptq, device, batch_size)
    for name, result in codes.items():
        set_submodule(block, name, _to_quant_linear(layers[name], result))
    outputs = run_block(block, inputs, call, device, batch_size)
    loss = _reconstruction_loss(outputs, targets, None).item()
    return BlockRecord(index, len(rules), None, loss, time.perf_counter() - started)


def summary_markdown(report: QuantizationReport, source: str, calibration: dict | None) -> str:
    rules = ", ".join(f"{r['pattern']} -> W{r['bits']} g{r['group_size']}" for r in report.recipe["rules"])
    lines = [f"# Quantized with brecq ({report.method})", "",
             f"- source model: `{source}`",
             f"- recipe: `{report.recipe['name']}` ({rules}), clipping {report.recipe['clipping']}",
             f"- calibration: {json.dumps(calibration) if calibration else 'none'}",
             *([f"- calibration tokens: {calibration['num_samples']} windows x {calibration['seq_len']} = "
                f"{calibration['requested_tokens']} asked for, {calibration['distinct_tokens']} distinct (from a "
                f"{calibration['stream_tokens']}-token stream)"] if calibration and "distinct_tokens" in calibration
               else []),
             f"- time {report.seconds:.1f} s, peak resident memory {report.peak_rss_mib:.0f} MiB"
             + (f", peak CUDA memory {report.peak_cuda_mib:.0f} MiB" if report.peak_cuda_mib else ""),
             f"- quantized outside decoder blocks (round to nearest): {report.outside_blocks or 'none'}", "",
             "Block reconstruction error (squared error of the block output, summed over features, mean over tokens):",
             "", report.table(), ""]
    return "\n".join(lines)


def quantize_pretrained(model_path: str, out_dir: str, recipe: Recipe, calibration=None, *,
                        reconstruction: ReconstructionConfig = ReconstructionConfig(),
                        gptq: GPTQConfig = GPTQConfig(), device: str = "cpu", work_dir: str | None = None,
                        keep_work_dir: bool = False, activation_dir: str | None = None,
                        show_progress: bool = True, streamed: bool | None = None):
    """Quantize a Hugging Face causal LM (weights in float32) and save it to ``out_dir``. Returns
    ``(model, report)``; ``model`` is None when the run was streamed (load the result with
    ``brecq.load_quantized(out_dir)``).

    ``streamed`` (default: whenever the model is a local folder of safetensors weights and the loss
    is not Fisher) reads one block's weights at a time instead of the whole model, and writes the
    same file. ``work_dir`` defaults to ``out_dir/.brecq_work`` so that an interrupted run resumes;
    once the model is saved its checkpoints are removed (``keep_work_dir`` keeps them). Streamed
    runs keep cached block inputs and targets in memory-mapped files under the work folder when
    they would take more than a quarter of the available memory (``activation_dir`` chooses the
    folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .calibration import CalibrationSpec, build_calibration
    from ..io import check_model_path, save_quantized

    check_model_path(model_path)
    fisher = recipe.method is Method.BRECQ and reconstruction.loss is LossKind.FISHER
    if streamed is None:
        folder = Path(model_path)
        streamed = not fisher and folder.is_dir() and any(
            (folder / name).exists() for name in ("model.safetensors", "model.safetensors.index.json"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = None
    if calibration is not None:
        if not isinstance(calibration, CalibrationSpec):
            raise TypeError("quantize_pretrained: calibration must be a CalibrationSpec")
        coverage: dict = {}
        ids = build_calibration(tokenizer, calibration, coverage)
    work = Path(work_dir) if work_dir else Path(out_dir) / ".brecq_work"
    tensors = None
    if streamed:
        source = ShardedCheckpoint(model_path)
        model = skeleton_from_folder(model_path)
        if ids is not None and activation_dir is None:
            need = 4 * ids.numel() * model.config.hidden_size * 4  # inputs, targets and the next pair, float32
            if need > available_memory() / 4:
                activation_dir = str(work / "activations")
                log.info("cached block activations (%.0f MiB) go to memory-mapped files in %s", need / 2**20,
                         activation_dir)
        report = quantize(model, recipe, ids, reconstruction=reconstruction, gptq=gptq, device=device,
                          work_dir=work, activation_dir=activation_dir, show_progress=show_progress, source=source)
        tensors = streamed_entries(model, StreamedWeights(model, source), saved_layer_location(model, work))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        report = quantize(model, recipe, ids, reconstruction=reconstruction, gptq=gptq, device=device,
                          work_dir=work if ids is not None else None, activation_dir=activation_dir,
                          show_progress=show_progress)
    calib = {**calibration.describe(), **coverage} if calibration is not None else None
    extra = {"report": report.to_dict(),
             "reconstruction": plain_dict(reconstruction) if recipe.method is Method.BRECQ else None,
             "gptq": plain_dict(gptq) if recipe.method is Method.GPTQ else None}
    error = None
    if world().is_main:  # under torchrun every rank quantized; one writes
        try:
            save_quantized(model, out_dir, recipe=recipe.to_dict(), calibration=calib,
                           summary=summary_markdown(report, model_path, calib), extra=extra, tokenizer=tokenizer,
                           tensors=tensors)
            if not keep_work_dir:
                remove_work_dir(work)
        except Exception as exc:
            error = exc
    agree(error, f"saving {out_dir}")
    return (None if streamed else model), report


def available_memory() -> int:
    """Bytes the kernel reports as available (MemAvailable), or 8 GiB where it does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def remove_work_dir(work: Path) -> None:
    """Delete the block checkpoints and run record ``quantize`` wrote into ``work``, then the folder
    if nothing else is in it (a user-given folder keeps anything that is not brecq's)."""
    work = Path(work)
    if not (work / "run.json").exists():
        return
    for file in [work / "run.json", *work.glob("block_[0-9][0-9][0-9].safetensors"),
                 *work.glob("outside_*.safetensors"), *work.glob(".*.tmp"), *work.glob("activations/activations_*.f32"),
                 *work.glob("activations/rank*/activations_*.f32")]:
        file.unlink(missing_ok=True)
    for folder in [*work.glob("activations/rank*"), work / "activations"]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    try:
        work.rmdir()
    except OSError:
        log.info("kept %s: it holds files that are not brecq's", work)
