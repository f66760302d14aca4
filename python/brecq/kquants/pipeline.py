"""BRECQ rounding inside llama.cpp's own block types: quantize a Hugging Face model straight to a
GGUF file whose tensors have the types, scales and mins ``llama-quantize`` would give them, and
whose codes are learned block by block against the full-precision block output.

Per decoder block: each linear gets its preset's block type; the search (llama.cpp's own by
default, with an importance matrix if asked) fixes its scales and mins; BRECQ learns the codes
(``Method.BRECQ``) or the search's codes are kept (``Method.RTN``: with the llama.cpp search
that is, byte for byte, the tensor ``llama-quantize`` writes). The token embeddings and output
matrix keep the search's codes, as in llama.cpp. The model is held in memory (float32).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..quantization.blocks import capture_block_inputs, decoder_blocks, linear_layers, run_block
from ..quantization.recipe import Method
from ..quantization.reconstruct import ReconstructionConfig, reconstruct_block
from .layouts import BlockType, dequantize, read_grid, write_codes
from .presets import BLOCK_ROLES, KQuantPreset, get_preset
from .rounding import GridAdaRoundLinear
from .search import Search, quantize_blocks

log = logging.getLogger("brecq")


@dataclass
class KQuantReport:
    preset: str
    method: str
    search: str
    importance: bool
    tensors: list[dict] = field(default_factory=list)  # name, role, layer, type, weights, bytes
    blocks: list[dict] = field(default_factory=list)  # index, loss_searched, loss_learned, seconds
    seconds: float = 0.0
    path: str = ""

    def bits_per_weight(self) -> float:
        """GGUF bytes of the quantized matrices over their weights (scales and mins counted)."""
        return 8.0 * sum(t["bytes"] for t in self.tensors) / max(1, sum(t["weights"] for t in self.tensors))

    def to_dict(self) -> dict:
        return {**asdict(self), "bits_per_weight": self.bits_per_weight()}


@torch.no_grad()
def importance_matrix(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> dict[str, np.ndarray]:
    """llama.cpp's importance matrix: per linear layer, the mean square of each input column over
    the calibration tokens ``ids`` [N, T], from the full-precision model."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(module, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                sums[name] = sums.get(name, 0) + x.square().sum(0)
                counts[name] = counts.get(name, 0) + x.shape[0]
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        for start in range(0, ids.shape[0], batch_size):
            model(ids[start:start + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}


def _blocks_prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    """The name under which the decoder blocks hang, with its dot: ``model.layers.``."""
    return next(name for name, module in model.named_modules() if module is blocks) + "."


def _role_map(model: nn.Module, preset: KQuantPreset) -> dict[str, tuple[str, int | None, BlockType | None]]:
    """Hugging Face weight name -> (role, layer, block type or None for F16)."""
    blocks = decoder_blocks(model)
    n = len(blocks)
    prefix = _blocks_prefix(model, blocks)
    out = {}
    for i, block in enumerate(blocks):
        for rel, linear in linear_layers(block).items():
            role = BLOCK_ROLES.get(rel)
            if role is None:
                raise ValueError(f"quantize_gguf: block layer {rel!r} has no llama.cpp role (supported: "
                                 f"{sorted(BLOCK_ROLES)})")
            out[f"{prefix}{i}.{rel}.weight"] = (role, i, preset.block_type(role, i, n, linear.in_features))
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_name = next(name for name, p in model.named_parameters() if p is embed.weight)  # first name if tied
    tied = head is not None and head.weight is embed.weight
    out[embed_name] = ("output" if tied else "token_embd", None,
                       preset.block_type("output" if tied else "token_embd", None, n, embed.weight.shape[1]))
    if head is not None and not tied:
        head_name = next(name for name, p in model.named_parameters() if p is head.weight)
        out[head_name] = ("output", None, preset.block_type("output", None, n, head.weight.shape[1]))
    return out


def _quantize_tensor(weight: torch.Tensor, block_type: BlockType | None, search: Search,
                     importance: np.ndarray | None):
    """(blocks or F16 array, the grid or None)."""
    w = weight.detach().float().cpu().numpy()
    if block_type is None:
        return w.astype(np.float16), None
    data = quantize_blocks(block_type, w, search, importance)
    return data, read_grid(block_type, data, w.shape[1])


def quantize_gguf(model_dir, out_path, *, preset: str = "Q4_K_M", method: Method | str = Method.BRECQ,
                  calibration=None, reconstruction: ReconstructionConfig | None = None,
                  search: Search | str = Search.LLAMA_CPP, importance: bool = False, device: str = "cpu",
                  forward_batch_size: int = 8, show_progress: bool = True):
    """Quantize the Hugging Face model at ``model_dir`` to the GGUF file ``out_path`` with the
    block types of ``preset`` (``Q4_K_M``, ``Q5_K_M``, ``Q6_K``, ``Q8_0``). Returns ``(model,
    report)``: ``model`` holds the dequantized values of every quantized tensor (what llama.cpp
    computes from the file), for evaluation in PyTorch.

    ``calibration`` (a ``CalibrationSpec``) is needed by BRECQ and by ``importance``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..quantization.calibration import CalibrationSpec, build_calibration
    from ..export.source import read_full_precision
    from ..export.to_gguf import write_gguf
    from ..io import check_model_path

    started = time.perf_counter()
    reconstruction = reconstruction or ReconstructionConfig()
    method, search, chosen = Method(method), Search(search), get_preset(preset)
    if method not in (Method.BRECQ, Method.RTN):
        raise ValueError(f"quantize_gguf: method must be brecq or rtn (the search's own codes), got {method.value}")
    if (method is Method.BRECQ or importance) and not isinstance(calibration, CalibrationSpec):
        raise ValueError("quantize_gguf: BRECQ and the importance matrix need calibration (a CalibrationSpec)")
    check_model_path(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = build_calibration(AutoTokenizer.from_pretrained(model_dir), calibration) if calibration is not None else None
    roles = _role_map(model, chosen)
    imatrix = importance_matrix(model, ids) if importance else {}
    report = KQuantReport(chosen.name, method.value, search.value, importance, path=str(out_path))
    packed: dict[str, tuple] = {}
    params = dict(model.named_parameters(remove_duplicate=False))

    def record(name: str, data: np.ndarray, block_type: BlockType | None, grid) -> None:
        role, layer, _ = roles[name]
        weight = params[name]
        values = (dequantize(block_type, data, weight.shape[1]) if grid is not None
                  else data.astype(np.float32))
        weight.data.copy_(torch.from_numpy(values))  # what llama.cpp will compute from the file
        ggml_type = block_type.value if block_type is not None else "F16"
        bits = block_type.bits if block_type is not None else 16
        packed[name] = (data, ggml_type, {
            "bits": bits, "group_size": block_type.group if block_type is not None else None,
            "weights": weight.numel(), "source_dtype": "float32",
            "bits_per_weight": block_type.bits_per_weight if block_type is not None else 16.0,
            "max_error_steps": 0.0, "note": "" if block_type is not None else "no block type divides its rows"})
        report.tensors.append({"name": name, "role": role, "layer": layer, "type": ggml_type,
                               "weights": weight.numel(), "bytes": int(data.nbytes)})

    blocks = decoder_blocks(model)
    prefix = _blocks_prefix(model, blocks)
    hidden = call = None
    if method is Method.BRECQ:
        hidden, call = capture_block_inputs(model, ids)
    fp_in = q_in = hidden
    for i, block in enumerate(tqdm(blocks, desc=f"{method.value} {chosen.name}", disable=not show_progress)):
        layers = linear_layers(block)
        targets = run_block(block, fp_in, call, device, forward_batch_size) if hidden is not None else None
        grids, datas = {}, {}
        for rel, linear in layers.items():
            name = f"{prefix}{i}.{rel}.weight"
            datas[rel], grids[rel] = _quantize_tensor(linear.weight, roles[name][2], search,
                                                      imatrix.get(f"{prefix}{i}.{rel}"))
        codes = {rel: torch.from_numpy(g.codes) for rel, g in grids.items() if g is not None}
        entry = {"index": i}
        if method is Method.BRECQ:
            soft = {rel: GridAdaRoundLinear(layers[rel], g, device) for rel, g in grids.items() if g is not None}
            result = reconstruct_block(block, {}, q_in, targets, call, reconstruction, None, device,
                                       block_index=i, show_progress=show_progress, layers=soft)
            codes.update(result.layers)
            entry.update(loss_searched=result.loss_nearest, loss_learned=result.loss_final, seconds=result.seconds)
        for rel, g in grids.items():
            data = datas[rel] if g is None else write_codes(g.block_type, datas[rel], g, codes[rel].numpy())
            record(f"{prefix}{i}.{rel}.weight", data, g.block_type if g is not None else None, g)
        report.blocks.append(entry)
        if hidden is not None:
            q_in, fp_in = run_block(block, q_in, call, device, forward_batch_size), targets
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    for name, (role, _, block_type) in roles.items():
        if role in ("token_embd", "output"):  # the output matrix's importance is the head's inputs'
            data, grid = _quantize_tensor(params[name], block_type, search,
                                          imatrix.get(head_name) if role == "output" else None)
            record(name, data, block_type, grid)
    write_gguf(read_full_precision(model_dir), out_path, packed=packed, file_type=chosen.llama_ftype)
    report.seconds = time.perf_counter() - started
    log.info("wrote %s: %s, %s rounding on %s grids, %.3f bits per weight", out_path, chosen.name, method.value,
             search.value, report.bits_per_weight())
    return model, report


def load_gguf_weights(model: nn.Module, path) -> dict[str, str]:
    """Put the dequantized tensors of a GGUF file (any type the ``gguf`` package reads) into
    ``model``, a Hugging Face model of the same architecture, undoing the q/k row order of
    interleaved-rotary architectures; returns Hugging Face name -> GGUF type. This is how a file
    made by ``llama-quantize`` is evaluated with the same code as brecq's."""
    import gguf

    from ..export.to_gguf import ARCHITECTURES, INTERLEAVED_ROPE, _rope_permutation

    config = model.config
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ValueError(f"load_gguf_weights: model_type {config.model_type!r} has no GGUF mapping")
    n_layers = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_layers)
    by_gguf = {}
    for hf_name in dict(model.named_parameters(remove_duplicate=False)):
        g = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if g is not None:
            by_gguf.setdefault(g, []).append(hf_name)
    params = dict(model.named_parameters(remove_duplicate=False))
    types = {}
    reader = gguf.GGUFReader(str(path))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for tensor in reader.tensors:
        if tensor.name not in by_gguf:
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        for hf_name in by_gguf[tensor.name]:
            param = params[hf_name]
            v = torch.from_numpy(values.reshape(param.shape).copy())
            row_heads = None
            if arch in INTERLEAVED_ROPE and hf_name.endswith("self_attn.q_proj.weight"):
                row_heads = heads
            elif arch in INTERLEAVED_ROPE and hf_name.endswith("self_attn.k_proj.weight"):
                row_heads = kv_heads
            if row_heads:
                v = v[torch.argsort(_rope_permutation(v.shape[0], row_heads))]
            param.data.copy_(v)
            types[hf_name] = tensor.tensor_type.name
    filled = {id(params[n]) for n in types}
    missing = [n for n, p in params.items() if id(p) not in filled]  # a tied head is filled with its embeddings
    if missing:
        raise ValueError(f"load_gguf_weights: {path} has no tensor for {missing[:5]}")
    return types
