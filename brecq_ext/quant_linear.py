"""``QuantLinear``: a drop-in replacement of ``nn.Linear`` holding packed low-bit weights."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import ops
from ._checks import check_bits, check_group_size
from .format import FORMAT_VERSION, LayerStorage, layer_storage, num_groups, packed_row_bytes

log = logging.getLogger("brecq_ext")


class QuantLinear(nn.Module):
    """y = x . dequant(W)^T + bias with W stored packed (docs/FORMAT.md); dense weights are never
    kept. Buffers: ``packed`` uint8 ``[out_features, packed_row_bytes]``, ``scale`` float16 and
    ``zero`` uint8 ``[out_features, groups]``, optional ``bias`` ``[out_features]``."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, device=None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        check_bits("QuantLinear", bits)
        check_group_size("QuantLinear", group_size, packed=True)
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"QuantLinear: in_features and out_features must be positive, got "
                             f"{in_features} and {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = num_groups(in_features, group_size)
        self._expected_shapes = (torch.Size((out_features, packed_row_bytes(in_features, group_size, bits))),
                                 torch.Size((out_features, groups)), torch.Size((out_features,)))
        self.register_buffer("packed", torch.zeros(out_features, packed_row_bytes(in_features, group_size, bits),
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        self._checked_buffers = None  # the buffer objects forward last validated

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                   bias: Tensor | None = None) -> "QuantLinear":
        """From integer codes uint8 ``[out, in]`` and their per-group scale/zero."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None,
                    device=codes.device, bias_dtype=bias.dtype if bias is not None else torch.float32)
        layer.packed.copy_(ops.pack(codes, bits, group_size))
        layer.scale.copy_(scale)
        layer.zero.copy_(zero)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int,
                    clipping: ops.Clipping = ops.Clipping.MSE) -> "QuantLinear":
        """Round-to-nearest quantization of a dense layer with per-group parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float()
        scale, zero = ops.quant_params(w, bits, group_size, clipping.search_steps)
        codes = ops.quantize(w, scale, zero, bits, group_size)
        return cls.from_codes(codes, scale, zero, bits, group_size,
                              linear.bias.detach() if linear.bias is not None else None)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16), .half() and the like must move these buffers but never change
        # their dtypes: the format fixes float16 scales and uint8 codes (docs/FORMAT.md), and a
        # float32 bias is what the kernels add. Device moves pass through unchanged.
        def keep_dtype(t):
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)
        self._checked_buffers = None  # never keep the buffers of the old device alive
        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._checked_buffers = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state["_checked_buffers"] = None  # a cache, not state: keep pickles free of second references
        return state

    # -- use -----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        buffers = self._buffers  # direct dict access: nn.Module attribute lookup costs ~1 us each
        packed, scale, zero, bias = buffers["packed"], buffers["scale"], buffers["zero"], buffers.get("bias")
        # The validation is cached on the buffer objects: in-place updates (load_state_dict) keep
        # shapes and dtypes, and anything that swaps a buffer (.to(), assignment) is checked again.
        checked = self._checked_buffers
        valid = (checked is not None and checked[0] is packed and checked[1] is scale and checked[2] is zero
                 and checked[3] is bias)
        if not valid and self._buffers_valid(packed, scale, zero, bias):
            self._checked_buffers, valid = (packed, scale, zero, bias), True
        return ops.linear(x, packed, scale, zero, bias, self.bits, self.group_size, self.in_features,
                          weights_checked=valid)

    def _buffers_valid(self, packed, scale, zero, bias) -> bool:
        """Buffers have the documented dtypes, shapes and layout. Plain attribute and tuple
        checks (a few microseconds), so that decode-sized forwards can skip the op's validation."""
        expected = self._expected_shapes
        return (packed.dtype == torch.uint8 and scale.dtype == torch.float16 and zero.dtype == torch.uint8
                and packed.shape == expected[0] and scale.shape == expected[1] and zero.shape == expected[1]
                and packed.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()
                and (bias is None or (bias.shape == expected[2] and bias.is_contiguous()))
                and packed.device == scale.device == zero.device)

    def codes(self) -> Tensor:
        return ops.unpack(self.packed, self.bits, self.group_size, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense ``[out, in]`` weight (materialised on request only, e.g. for checks)."""
        return ops.dequantize_packed(self.packed, self.scale, self.zero, self.bits, self.group_size,
                                     self.in_features, dtype)

    def storage(self) -> LayerStorage:
        bias_bytes = self.bias.element_size() if self.bias is not None else 4
        return layer_storage(self.out_features, self.in_features, self.bits, self.group_size,
                             bias=self.bias is not None, bias_bytes_per_element=bias_bytes)

    def memory_bytes(self) -> int:
        """Real bytes of this layer's buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        st = self.storage()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, "
                f"bits_per_weight={st.bits_per_weight:.3f}, format_version={FORMAT_VERSION}")


@dataclass(frozen=True)
class LayerRule:
    """Linear layers whose qualified name matches ``pattern`` (a regular expression searched in
    the name, e.g. ``r"self_attn\\.[qkvo]_proj$"``) are quantized to ``bits`` with ``group_size``."""

    pattern: str
    bits: int
    group_size: int

    def __post_init__(self):
        check_bits(f"LayerRule({self.pattern!r})", self.bits)
        check_group_size(f"LayerRule({self.pattern!r})", self.group_size, packed=True)
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"LayerRule: pattern {self.pattern!r} is not a valid regular expression: {exc}") from None


def _as_rules(rules: Sequence[LayerRule] | Mapping[str, tuple[int, int]]) -> list[LayerRule]:
    if isinstance(rules, Mapping):
        return [LayerRule(pattern, bits, group) for pattern, (bits, group) in rules.items()]
    return list(rules)


def match_linear_layers(model: nn.Module, rules: Sequence[LayerRule] | Mapping[str, tuple[int, int]],
                        strict: bool = True) -> dict[str, LayerRule]:
    """Which rule applies to each nn.Linear of ``model``. Refuses a layer matched by two rules
    that disagree, and (``strict``) a rule that matches no layer."""
    rules = _as_rules(rules)
    chosen: dict[str, LayerRule] = {}
    used = {rule.pattern: False for rule in rules}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        matches = [rule for rule in rules if re.search(rule.pattern, name)]
        for rule in matches:
            used[rule.pattern] = True
        specs = {(rule.bits, rule.group_size) for rule in matches}
        if len(specs) > 1:
            listing = ", ".join(f"{r.pattern!r} -> W{r.bits} g{r.group_size}" for r in matches)
            raise ValueError(f"layer {name!r} is matched by rules that disagree: {listing}")
        if matches:
            chosen[name] = matches[0]
    unused = [pattern for pattern, hit in used.items() if not hit]
    if strict and unused:
        raise ValueError(f"rules match no nn.Linear layer of the model: {unused}")
    return chosen


def replace_linear_layers(model: nn.Module, rules: Sequence[LayerRule] | Mapping[str, tuple[int, int]],
                          clipping: ops.Clipping = ops.Clipping.MSE, strict: bool = True) -> list[str]:
    """Replace, in place, every nn.Linear matched by a rule with a round-to-nearest QuantLinear.
    Returns the qualified names replaced."""
    chosen = match_linear_layers(model, rules, strict=strict)
    for name, rule in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(getattr(parent, child), rule.bits,
                                                       rule.group_size, clipping))
        log.debug("quantized %s to W%d g%d", name, rule.bits, rule.group_size)
    return list(chosen)


def quant_linear_layers(model: nn.Module) -> Iterable[tuple[str, QuantLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear))
