"""The C++ decode runtime (csrc/cpu/decoder.cpp) built from a transformers model.

:class:`CpuDecoder` walks a Llama-family model (Llama, Mistral, Qwen2, Qwen3) once, hands the C++
runtime the addresses of its weights (packed ``QuantLinear`` buffers where the model is quantized,
dense weights elsewhere; nothing is copied except small float32 copies of norm weights and biases),
and then runs a whole decoder step per call: one call from Python per generated token, or per
prompt. The runtime keeps its own KV cache (float32, or bfloat16 for a bfloat16 model).

:func:`unsupported_reason` says why a model cannot run here; :func:`cpu_decoder_or_none` logs that
reason and returns None, so callers fall back to the transformers path.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

log = logging.getLogger("brecq")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# WeightKind in brecq/decoder.h
_PACKED_ROWS, _TILE16, _DENSE_F32, _DENSE_BF16 = 0, 1, 2, 3
_LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
            ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


class UnsupportedModel(ValueError):
    """The model has something the C++ decoder does not implement; the message says what."""


def _kernels():
    from brecq_ext._extension import cpu_kernels

    return cpu_kernels()


def _config_reason(config) -> str | None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (only silu)"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type in ("dynamic", "longrope"):
        return f"rope type {rope_type!r} (its frequencies change with the sequence length)"
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return "partial rotary embeddings"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim > 1024 or head_dim % 2:
        return f"head_dim {head_dim} (even and at most 1024)"
    if config.num_attention_heads % config.num_key_value_heads:
        return "num_attention_heads not a multiple of num_key_value_heads"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        return f"layer types {sorted(set(layer_types))}"
    return None


def unsupported_reason(model: nn.Module) -> str | None:
    """None if :class:`CpuDecoder` can run ``model``, else why not (one phrase)."""
    from brecq_ext.quant_linear import QuantLinear

    if _kernels() is None:
        return "the compiled CPU kernels are not available"
    config = getattr(model, "config", None)
    if config is None:
        return "not a transformers model (no config)"
    reason = _config_reason(config)
    if reason:
        return reason
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "no model.layers / lm_head"
    if any(p.device.type != "cpu" for p in model.parameters()) or any(b.device.type != "cpu" for b in model.buffers()):
        return "the model is not on the CPU"
    dtype = inner.embed_tokens.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return f"activation dtype {dtype} (float32 or bfloat16)"
    for i, layer in enumerate(inner.layers):
        for parent, name in _LINEARS:
            module = getattr(getattr(layer, parent, None), name, None)
            if type(module).__name__ in ("FusedProjection", "FusedQuantLinear"):
                return (f"layer {i} {parent}.{name} is fused (brecq_ext.fuse_projections_); the C++ decoder reads "
                        "the unfused layers: load the model again without fusing")
            if isinstance(module, QuantLinear):
                if type(module) is not QuantLinear:
                    return f"layer {i} {parent}.{name} is a {type(module).__name__}"
            elif not isinstance(module, nn.Linear):
                return f"layer {i} {parent}.{name} is a {type(module).__name__}"
    head = model.lm_head
    if not isinstance(head, (QuantLinear, nn.Linear)) or (isinstance(head, QuantLinear) and type(head) is not QuantLinear):
        return f"lm_head is a {type(head).__name__}"
    return None


class CpuDecoder:
    """A whole-model decode step in C++ over ``model``'s own weights (batch of one sequence).

    ``forward(token_ids)`` appends tokens to the runtime's KV cache and returns float32 logits of
    the last one (``all_logits=True``: of each). :meth:`prefill_from` takes over the cache of a
    transformers forward instead. The model must stay alive and unchanged while this object is used:
    the runtime reads its tensors in place."""

    def __init__(self, model: nn.Module, threads: int | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise UnsupportedModel(f"CpuDecoder: cannot run this model: {reason}")
        self.model = model
        self.config = model.config
        self._keep: list[Tensor] = []  # tensors the C++ side points into
        kernels = _kernels()
        inner = model.model
        config = model.config
        self.dtype = inner.embed_tokens.weight.dtype
        self.bf16 = self.dtype is torch.bfloat16
        self.hidden = config.hidden_size
        self.q_heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.vocab = inner.embed_tokens.weight.shape[0]
        first_attention = inner.layers[0].self_attn
        scale = float(getattr(first_attention, "scaling", self.head_dim ** -0.5))
        rotary = inner.rotary_emb
        inv_freq = rotary.inv_freq.detach().float().cpu()
        if inv_freq.numel() != self.head_dim // 2:
            raise UnsupportedModel(f"CpuDecoder: rotary frequencies cover {2 * inv_freq.numel()} of {self.head_dim} "
                                   "head dimensions")
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * len(inner.layers)
        window = int(getattr(config, "sliding_window", None) or 0)
        if config.model_type == "mistral":  # Mistral applies its window to every layer
            layer_types = ["sliding_attention" if window else "full_attention"] * len(inner.layers)
        layers = []
        for layer, layer_type in zip(inner.layers, layer_types):
            attention = layer.self_attn
            q_norm = getattr(attention, "q_norm", None)
            k_norm = getattr(attention, "k_norm", None)
            linears = [self._linear(getattr(getattr(layer, parent), name)) for parent, name in _LINEARS]
            layers.append(kernels.DecoderLayerWeights(
                self._norm(layer.input_layernorm), self._norm(layer.post_attention_layernorm),
                self._norm(q_norm) if q_norm is not None else 0, self._norm(k_norm) if k_norm is not None else 0,
                *linears, window if layer_type == "sliding_attention" else 0))
        embedding = inner.embed_tokens.weight.detach()
        self._keep.append(embedding)
        self._eps = float(getattr(inner.norm, "variance_epsilon", getattr(inner.norm, "eps", 1e-6)))
        threads = threads or torch.get_num_threads()
        self._runtime = kernels.Decoder(
            self.hidden, config.intermediate_size, self.q_heads, self.kv_heads, self.head_dim, self.vocab, self._eps,
            self.bf16, scale, float(getattr(rotary, "attention_scaling", 1.0)), inv_freq.tolist(),
            embedding.data_ptr(), embedding.dtype is torch.bfloat16, self._norm(inner.norm),
            self._linear(model.lm_head), layers, int(threads))
        self._logits = torch.empty(self.vocab, dtype=torch.float32)

    # -- weights ---------------------------------------------------------------------------------
    def _hold(self, tensor: Tensor) -> int:
        tensor = tensor.detach().contiguous()
        self._keep.append(tensor)
        return tensor.data_ptr()

    def _norm(self, module: nn.Module) -> int:
        return self._hold(module.weight.detach().float())

    def _linear(self, module: nn.Module):
        from brecq_ext.layout import Layout
        from brecq_ext.quant_linear import QuantLinear

        kernels = _kernels()
        bias = module.bias
        bias_address = self._hold(bias.detach().float()) if bias is not None else 0
        if isinstance(module, QuantLinear):
            kind = _TILE16 if module.layout is Layout.TILE16 else _PACKED_ROWS
            packed, scale, zero = (self._hold(t) for t in (module.packed, module.scale, module.zero))
            return kernels.LinearWeights(kind, packed, scale, zero, 0, bias_address, module.out_features,
                                         module.in_features, module.bits, module.group_size)
        weight = module.weight.detach()
        if weight.dtype not in (torch.float32, torch.bfloat16):
            weight = weight.float()
        kind = _DENSE_BF16 if weight.dtype is torch.bfloat16 else _DENSE_F32
        return kernels.LinearWeights(kind, 0, 0, 0, self._hold(weight), bias_address, weight.shape[0],
                                     weight.shape[1], 0, 0)

    # -- running ---------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return self._runtime.length

    def reset(self) -> None:
        self._runtime.truncate(0)

    def truncate(self, length: int) -> None:
        self._runtime.truncate(int(length))

    @staticmethod
    def _tokens(token_ids, method: str) -> Tensor:
        tokens = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1).contiguous()
        if tokens.numel() == 0:
            raise ValueError(f"CpuDecoder.{method}: token_ids is empty (expected at least one token id)")
        return tokens

    def forward(self, token_ids, all_logits: bool = False) -> Tensor:
        """Runs ``token_ids`` (ints, 1-D, or a ``[1, n]`` tensor) after the cached ones; returns
        float32 logits ``[vocab]`` of the last token, or ``[n, vocab]`` with ``all_logits``. The
        returned tensor of the last-token form is reused by the next call: clone it to keep it."""
        tokens = self._tokens(token_ids, "forward")
        if all_logits:
            out = torch.empty(tokens.numel(), self.vocab, dtype=torch.float32)
        else:
            out = self._logits
        self._runtime.forward(tokens.data_ptr(), tokens.numel(), out.data_ptr(), all_logits)
        return out

    def forward_greedy(self, token_ids) -> int:
        """Runs ``token_ids`` like :meth:`forward` and returns the index of the largest of the last
        token's logits, as ``int(forward(token_ids).argmax())`` would (NaN counts as the largest,
        the first of equal values wins), found by the step's threads as they finish the logits.
        The logits themselves are then in :attr:`last_logits`."""
        tokens = self._tokens(token_ids, "forward_greedy")
        return int(self._runtime.forward_greedy(tokens.data_ptr(), tokens.numel(), self._logits.data_ptr()))

    @property
    def last_logits(self) -> Tensor:
        """The last-token logits of the latest :meth:`forward` or :meth:`forward_greedy` call that
        returned no others (the same buffer: clone it to keep it)."""
        return self._logits

    def prefill_from(self, past_key_values) -> None:
        """Replaces the runtime's cache with a transformers cache (``DynamicCache`` of one
        sequence) computed by the model on the same weights: a batched prefill handed over."""
        layers = getattr(past_key_values, "layers", None)
        if layers is None or len(layers) != self._runtime.num_layers:
            raise ValueError("CpuDecoder.prefill_from: expected a transformers DynamicCache with one entry per layer")
        length = None
        for index, entry in enumerate(layers):
            keys, values = entry.keys, entry.values
            if keys.dim() != 4 or keys.shape[0] != 1 or keys.shape[1] != self.kv_heads or keys.shape[3] != self.head_dim:
                raise ValueError(f"CpuDecoder.prefill_from: layer {index} keys have shape {tuple(keys.shape)}, expected "
                                 f"[1, {self.kv_heads}, length, {self.head_dim}]")
            keys = keys.to(self.dtype).contiguous()
            values = values.to(self.dtype).contiguous()
            length = keys.shape[2]
            self._runtime.set_cache(index, keys.data_ptr(), values.data_ptr(), length, keys.stride(1), keys.stride(2))
        self._runtime.set_length(int(length))


def cpu_decoder_or_none(model: nn.Module, threads: int | None = None) -> CpuDecoder | None:
    """A :class:`CpuDecoder` for ``model``, or None with the reason logged (callers then use the
    transformers path)."""
    reason = unsupported_reason(model)
    if reason:
        log.info("C++ decoder not used: %s; decoding through transformers", reason)
        return None
    return CpuDecoder(model, threads)
