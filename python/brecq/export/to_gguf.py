"""``brecq export --format gguf``: a brecq-quantized model as one GGUF file for llama.cpp and ollama.

Quantized layers become the block type that holds their codes (``gguf_blocks``; the map is in
docs/FORMAT.md); every other tensor is written exactly, in the narrowest of BF16, F16 and F32
that holds all its values (1-D tensors as F32, which llama.cpp wants for norms). Metadata and
tokenizer are written with the ``gguf`` package, the llama.cpp project's own writer, under
llama.cpp's names for the Llama, Mistral, Qwen2 and Qwen3 architectures.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io import _atomic_target, _commit
from .gguf_blocks import Fallback, PackedTensor, bits_per_weight, pack_layer
from .source import (
    QuantizedCheckpoint,
    read_checkpoint,
    read_full_precision,
    rope_settings,
)

log = logging.getLogger("brecq")

# transformers model_type -> llama.cpp architecture. Mistral is llama.cpp's "llama" (as llama.cpp's
# own converter writes it); its sliding window is not represented there.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Architectures whose rotary embedding llama.cpp applies to interleaved pairs (rope type NORM):
# Hugging Face stores q/k rows in rotate-half order, so their rows are permuted on the way out.
INTERLEAVED_ROPE = {"llama"}

# Pre-tokenizer regular expressions of byte-level BPE tokenizers, by llama.cpp's name for them.
# llama.cpp recognises a tokenizer by this name and splits text with its own copy of the regex.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_PRE_TOKENIZERS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


class UnsupportedModel(ValueError):
    """The model or tokenizer has something the GGUF writer does not map."""


@dataclass
class GGUFExportReport:
    """What went where: one row per tensor, with its type, bytes and error."""

    path: Path
    rows: list[dict] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(row["bytes"] for row in self.rows)

    def quantized_rows(self) -> list[dict]:
        return [row for row in self.rows if row["bits"] is not None]

    def bits_per_weight(self) -> float:
        """Over the quantized layers: GGUF bytes of their tensors / their weights."""
        rows = self.quantized_rows()
        return 8.0 * sum(r["bytes"] for r in rows) / max(1, sum(r["weights"] for r in rows))

    def max_error_steps(self) -> float:
        return max((row["max_error_steps"] for row in self.quantized_rows()), default=0.0)

    def table(self) -> str:
        lines = ["| tensor | from | GGUF type | bits/weight | max error (steps) | note |", "|---|---|---|---:|---:|---|"]
        for r in self.rows:
            src = f"W{r['bits']} g{r['group_size']}" if r["bits"] is not None else r["source_dtype"]
            lines.append(f"| {r['gguf_name']} | {src} | {r['ggml_type']} | {r['bits_per_weight']:.3f} | "
                         f"{r['max_error_steps']:.4g} | {r['note']} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "bytes": self.total_bytes, "quantized_bits_per_weight": self.bits_per_weight(),
                "max_error_steps": self.max_error_steps(), "tensors": self.rows}


def _rope_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp's interleaved rotary wants: within each head, rotate-half pairs
    (i, i + d/2) become neighbours (2i, 2i + 1)."""
    head_dim = rows // heads
    return torch.arange(rows).view(heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def _dense_array(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A full-precision tensor in the narrowest float type that holds every value exactly: brecq
    saves float32, so a model that came as bfloat16 goes back to BF16, and a float32 one stays F32.
    1-D tensors (norms, biases) are F32, as llama.cpp wants them."""
    t = t.detach()
    if t.dim() >= 2 and t.is_floating_point():
        for dtype, ggml_type in ((torch.bfloat16, "BF16"), (torch.float16, "F16")):
            narrow = t.to(dtype)
            if torch.equal(narrow.float(), t.float()):
                array = narrow.contiguous().view(torch.uint8) if dtype == torch.bfloat16 else narrow.contiguous()
                return array.numpy(), ggml_type
    return t.float().contiguous().numpy(), "F32"


def _architecture(checkpoint: QuantizedCheckpoint) -> str:
    arch = ARCHITECTURES.get(checkpoint.model_type)
    if arch is None:
        raise UnsupportedModel(
            f"{checkpoint.path}: model_type {checkpoint.model_type!r} has no GGUF mapping here; "
            f"supported: {sorted(ARCHITECTURES)}")
    _, scaling = rope_settings(checkpoint.config)
    if scaling is not None:
        raise UnsupportedModel(f"{checkpoint.path}: rope scaling {scaling.get('rope_type')!r} is not written to "
                               "GGUF by this exporter (only unscaled rotary embeddings)")
    return arch


def export_gguf(quantized_dir, out_path, *, fallback: Fallback | str = Fallback.F32, exact_8bit: bool = False,
                verify: bool = True, name: str | None = None) -> GGUFExportReport:
    """Write ``quantized_dir`` (from ``brecq quantize``) as one GGUF file at ``out_path``, atomically.
    ``fallback`` is the type of layers no block type holds (F32 exact, or F16); ``exact_8bit`` sends
    8-bit layers that Q8_0 cannot hold exactly there too, instead of halving their odd blocks.
    Returns the per-tensor report; layers not held exactly are logged with their error."""
    checkpoint = read_checkpoint(quantized_dir, verify=verify)
    return write_gguf(checkpoint, out_path, fallback=fallback, exact_8bit=exact_8bit, name=name)


def export_gguf_full_precision(model_dir, out_path, *, name: str | None = None) -> GGUFExportReport:
    """Write an unquantized Hugging Face model folder as one GGUF file (every tensor in the narrowest of
    BF16, F16 and F32 that holds it exactly): the input llama.cpp's own quantizer
    (``llama-quantize``, ``llama_cpp.llama_model_quantize``) expects, so that its Q4_K_M and others
    can be compared with brecq's on the same weights."""
    return write_gguf(read_full_precision(model_dir), out_path, name=name)


def write_gguf(checkpoint: QuantizedCheckpoint, out_path, *, fallback: Fallback | str = Fallback.F32,
               exact_8bit: bool = False, name: str | None = None, packed: dict | None = None,
               file_type: int | None = None) -> GGUFExportReport:
    """The GGUF file of an opened checkpoint (see :func:`export_gguf`).

    ``packed``: tensors already in their GGUF form, by Hugging Face name: ``(array, ggml type
    name, report row)`` with the rows in Hugging Face order (q/k rows are permuted here like the
    others); they replace the checkpoint's tensor of that name. ``file_type``: the
    ``general.file_type`` to record (default: the type holding most quantized weights)."""
    import gguf

    fallback = Fallback(fallback)
    arch = _architecture(checkpoint)
    cfg = checkpoint.config
    n_layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    vocab_size = int(cfg["vocab_size"])
    name_map = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_layers)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_target(out_path)
    report = GGUFExportReport(out_path)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _write_metadata(writer, checkpoint, name, heads, kv_heads, head_dim, vocab_size)
        _write_tokenizer(writer, checkpoint.path, vocab_size)
        for hf_name, array, ggml_type, row in _tensors(checkpoint, arch, heads, kv_heads, fallback, exact_8bit,
                                                       packed or {}):
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UnsupportedModel(f"{checkpoint.path}: tensor {hf_name!r} has no GGUF name for {arch}")
            raw = getattr(gguf.GGMLQuantizationType, ggml_type)
            writer.add_tensor(gguf_name, array, raw_dtype=raw if array.dtype == np.uint8 else None)
            report.rows.append(dict(row, gguf_name=gguf_name, hf_name=hf_name, ggml_type=ggml_type,
                                    bytes=int(array.nbytes)))
        writer.add_file_type(_file_type(report) if file_type is None else file_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _commit(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    _log_inexact(report)
    log.info("wrote %s (%.1f MB, quantized layers %.3f bits/weight)", out_path, report.total_bytes / 1e6,
             report.bits_per_weight())
    return report


def _write_metadata(writer, checkpoint: QuantizedCheckpoint, name, heads, kv_heads, head_dim, vocab_size) -> None:
    cfg = checkpoint.config
    theta, _ = rope_settings(cfg)
    writer.add_name(name or checkpoint.path.name)
    if checkpoint.layers:
        writer.add_quantized_by("brecq")
    writer.add_context_length(int(cfg.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(vocab_size)
    writer.add_quantization_version(2)  # GGML_QNT_VERSION of the block layouts written here
    recipe = checkpoint.quantization.get("recipe") or {}
    writer.add_string("brecq.recipe", json.dumps(recipe, sort_keys=True))
    writer.add_string("brecq.weights_sha256", str(checkpoint.quantization.get("weights_sha256", "")))


def _tensors(checkpoint: QuantizedCheckpoint, arch: str, heads: int, kv_heads: int, fallback: Fallback,
             exact_8bit: bool, prepacked: dict):
    """(Hugging Face name, array, GGUF type, report row) for every tensor, in state-dict order."""
    permute = arch in INTERLEAVED_ROPE
    done = set()
    names = list(checkpoint.tensors) + [f"{n}.weight" for n in checkpoint.layers]
    for key in sorted(names, key=_tensor_order):
        if key in done:
            continue
        done.add(key)
        module = key.rsplit(".", 1)[0]
        row_heads = None
        if permute and module.endswith("self_attn.q_proj"):
            row_heads = heads
        elif permute and module.endswith("self_attn.k_proj"):
            row_heads = kv_heads
        if key in prepacked:
            array, ggml_type, row = prepacked[key]
            if row_heads:
                array = array[_rope_permutation(array.shape[0], row_heads).numpy()]
            yield key, array, ggml_type, row
            continue
        if module in checkpoint.layers and key.endswith(".weight"):
            layer = checkpoint.layers[module]
            codes, scale, zero = layer.codes, layer.scale, layer.zero
            if row_heads:
                order = _rope_permutation(layer.out_features, row_heads)
                codes, scale, zero = codes[order], scale[order], zero[order]
            packed: PackedTensor = pack_layer(codes, scale, zero, layer.bits, layer.group_size, fallback, exact_8bit)
            note = packed.reason
            if packed.requantized_blocks:
                note = f"{packed.requantized_blocks} blocks with q - z outside int8 stored at d = 2s"
            yield key, packed.data, packed.ggml_type, {
                "bits": layer.bits, "group_size": layer.group_size, "weights": layer.out_features * layer.in_features,
                "source_dtype": "packed", "bits_per_weight": bits_per_weight(packed.ggml_type),
                "max_error_steps": packed.max_error_steps, "note": note}
            if layer.bias is not None:
                bias = layer.bias[order] if row_heads else layer.bias
                done.add(f"{module}.bias")
                yield f"{module}.bias", bias.float().numpy(), "F32", _dense_row(bias)
            continue
        tensor = checkpoint.tensors[key]
        if row_heads and tensor.dim() >= 1:
            tensor = tensor[_rope_permutation(tensor.shape[0], row_heads)]
        array, ggml_type = _dense_array(tensor)
        yield key, array, ggml_type, _dense_row(tensor, ggml_type)


def _dense_row(tensor: torch.Tensor, ggml_type: str = "F32") -> dict:
    return {"bits": None, "group_size": None, "weights": tensor.numel(),
            "source_dtype": str(tensor.dtype).replace("torch.", ""), "bits_per_weight": bits_per_weight(ggml_type),
            "max_error_steps": 0.0, "note": ""}


def _tensor_order(name: str):
    """Embeddings, then the layers in numeric order, then the final norm and the head."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return (1, int(parts[i + 1]), name)
    return (0 if "embed" in name else 2, 0, name)


def _file_type(report: GGUFExportReport) -> int:
    """general.file_type: the type that holds most quantized weights (informational in llama.cpp)."""
    import gguf

    by_type: dict[str, int] = {}
    # A full-precision model (no quantized rows) is named by the type of most of its weights.
    for row in report.quantized_rows() or report.rows:
        by_type[row["ggml_type"]] = by_type.get(row["ggml_type"], 0) + row["weights"]
    if not by_type:
        return gguf.LlamaFileType.ALL_F32
    main = max(by_type, key=by_type.get)
    return {"Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
            "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "F16": gguf.LlamaFileType.MOSTLY_F16,
            "BF16": gguf.LlamaFileType.MOSTLY_BF16}.get(main, gguf.LlamaFileType.ALL_F32)


def _log_inexact(report: GGUFExportReport) -> None:
    for row in report.quantized_rows():
        if row["ggml_type"] in ("F32", "F16"):
            log.warning("gguf export: %s (W%d g%d) has no GGUF block type (%s); written as %s, max error %.3g "
                        "steps", row["hf_name"], row["bits"], row["group_size"], row["note"], row["ggml_type"],
                        row["max_error_steps"])
        elif row["ggml_type"] == "Q8_0" and row["max_error_steps"] > 0:
            log.warning("gguf export: %s (W8): %s; max error %.3g steps", row["hf_name"], row["note"],
                        row["max_error_steps"])


# -- tokenizer -------------------------------------------------------------------------------------

def _write_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    import gguf

    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.exists():
        raise UnsupportedModel(f"{model_dir}: no tokenizer.json (the GGUF export needs a fast tokenizer's file)")
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    decoder = data.get("decoder") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModel(f"{tokenizer_json}: tokenizer model {model.get('type')!r} is not supported "
                               "(BPE only: SentencePiece-style with byte fallback, or byte-level)")
    if model.get("byte_fallback"):
        tokens, scores, types = _spm_vocab(data)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        load_merges = False
    elif decoder.get("type") == "ByteLevel" or _has_byte_level(data.get("pre_tokenizer")):
        tokens, scores, types = _byte_level_vocab(data)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(data, tokenizer_json))
        load_merges = True
    else:
        raise UnsupportedModel(f"{tokenizer_json}: a BPE tokenizer without byte fallback or byte-level decoding "
                               "is not supported")
    if len(tokens) > vocab_size:
        raise UnsupportedModel(f"{tokenizer_json}: {len(tokens)} tokens but the model has {vocab_size} embeddings")
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer, as llama.cpp expects
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)


def _has_byte_level(pre) -> bool:
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in pre.get("pretokenizers", []))


def _id_tokens(data: dict) -> tuple[list[str], dict[int, dict]]:
    vocab = data["model"]["vocab"]
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    size = max([*vocab.values(), *added.keys()]) + 1
    tokens = [""] * size
    for text, i in vocab.items():
        tokens[i] = text
    for i, t in added.items():
        tokens[i] = t["content"]
    missing = [i for i, t in enumerate(tokens) if t == "" and i not in added]
    if missing:
        raise UnsupportedModel(f"tokenizer.json: token ids {missing[:5]} have no token")
    return tokens, added


def _spm_vocab(data: dict):
    """SentencePiece-style BPE (``▁`` for spaces, ``<0xNN>`` byte tokens). llama.cpp's SPM
    tokenizer merges the adjacent pair whose result has the highest score, so a token made by
    merge number ``r`` scores ``-r``: the same order as the Hugging Face merges."""
    import gguf

    tokens, added = _id_tokens(data)
    rank: dict[str, int] = {}
    for r, merge in enumerate(data["model"].get("merges", [])):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        rank.setdefault(left + right, r)
    unk = data["model"].get("unk_token")
    scores, types = [], []
    for i, text in enumerate(tokens):
        scores.append(-float(rank[text]) if text in rank else 0.0)
        if i in added and added[i].get("special"):
            types.append(gguf.TokenType.UNKNOWN if text == unk else gguf.TokenType.CONTROL)
        elif i in added:
            types.append(gguf.TokenType.USER_DEFINED)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        elif text == unk:
            types.append(gguf.TokenType.UNKNOWN)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def _byte_level_vocab(data: dict):
    import gguf

    tokens, added = _id_tokens(data)
    types = [gguf.TokenType.CONTROL if i in added and added[i].get("special")
             else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL
             for i in range(len(tokens))]
    return tokens, [0.0] * len(tokens), types


def _split_patterns(pre) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Split":
        pattern = pre.get("pattern") or {}
        return [pattern.get("Regex") or pattern.get("String") or ""]
    return [p for sub in pre.get("pretokenizers", []) for p in _split_patterns(sub)]


def _pre_tokenizer_name(data: dict, where: Path) -> str:
    pre = data.get("pre_tokenizer")
    patterns = _split_patterns(pre)
    if not patterns and pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    if len(patterns) == 1 and patterns[0] in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[patterns[0]]
    raise UnsupportedModel(f"{where}: pre-tokenizer {patterns or pre!r} is not one llama.cpp is known to "
                           f"reproduce here (known: gpt2, {', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))})")
