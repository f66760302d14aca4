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
from .arena import is_view_of_larger_storage
from .format import FORMAT_VERSION, LayerStorage, layer_storage, num_groups, packed_row_bytes
from .layout import Layout, from_tile16, preferred_layout, tile16_shapes, tile16_supports, to_tile16

log = logging.getLogger("brecq_ext")


class QuantLinear(nn.Module):
    """y = x . dequant(W)^T + bias with W stored packed (docs/FORMAT.md); dense weights are never
    kept. Buffers: ``packed`` uint8, ``scale`` float16, ``zero`` uint8 and optional ``bias``
    ``[out_features]``, held in one of two layouts (brecq_ext.layout):

    * ``Layout.ROWS``: ``packed`` ``[out_features, packed_row_bytes]``, ``scale`` and ``zero``
      ``[out_features, groups]``, the format's row-major form;
    * ``Layout.TILE16`` (4-, 6- and 8-bit, CPU): ``packed`` ``[tiles, row_bytes / 4, 64]`` (4 and 8
      bits) or ``[tiles, steps / 2, 192]`` (6 bits), ``scale`` and ``zero`` ``[tiles, groups, 16]``,
      for the AVX-512 kernels.

    ``layout=None`` (the default) picks the faster one for the device the buffers are on, and picks
    again whenever the module moves (``.to()``); an explicit layout is kept, except that TILE16
    becomes ROWS off the CPU. ``state_dict()`` is always row-major, so checkpoints do not depend
    on the layout, and ``load_state_dict`` takes row-major tensors into either layout."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, device=None, bias_dtype: torch.dtype = torch.float32,
                 layout: Layout | None = None):
        super().__init__()
        check_bits("QuantLinear", bits)
        check_group_size("QuantLinear", group_size, packed=True)
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"QuantLinear: in_features and out_features must be positive, got "
                             f"{in_features} and {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = num_groups(in_features, group_size)
        self._row_shapes = (torch.Size((out_features, packed_row_bytes(in_features, group_size, bits))),
                            torch.Size((out_features, groups)))
        self.register_buffer("packed", torch.zeros(self._row_shapes[0], dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(self._row_shapes[1], dtype=torch.float16, device=device))
        self.register_buffer("zero", torch.zeros(self._row_shapes[1], dtype=torch.uint8, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        self._checked_buffers = None  # the buffer objects forward last validated
        self.layout = Layout.ROWS
        self._auto_layout = layout is None
        self._set_layout(self._chosen_layout(layout))

    # -- layout --------------------------------------------------------------------------------
    def _chosen_layout(self, layout: Layout | None) -> Layout:
        if layout is None:
            return preferred_layout(self.packed.device, self.bits, self.group_size)
        if not isinstance(layout, Layout):
            raise TypeError(f"QuantLinear: layout must be a brecq_ext.layout.Layout or None, got {layout!r}")
        if layout is Layout.TILE16 and not tile16_supports(self.bits, self.group_size):
            raise ValueError(f"QuantLinear: Layout.TILE16 holds 4- and 8-bit weights, and 6-bit weights with group "
                             f"sizes a multiple of 16; this layer has bits={self.bits}, group_size={self.group_size}")
        return layout

    def _set_layout(self, layout: Layout) -> None:
        if layout is self.layout:
            return
        packed, scale, zero = self.row_major_weights()
        if layout is Layout.TILE16:
            packed, scale, zero = to_tile16(packed, scale, zero, self.bits, self.group_size, self.in_features)
        self._buffers["packed"], self._buffers["scale"], self._buffers["zero"] = packed, scale, zero
        self.layout = layout
        self._checked_buffers = None

    def use_layout(self, layout: Layout | None) -> "QuantLinear":
        """Rearrange the weights into ``layout`` (None: the faster one for their device, chosen
        again on every move). TILE16 is refused off the CPU: no other device has a kernel for it."""
        chosen = self._chosen_layout(layout)
        if chosen is Layout.TILE16 and self.packed.device.type != "cpu":
            raise ValueError(f"QuantLinear: Layout.TILE16 is a CPU layout; this layer is on {self.packed.device}")
        self._auto_layout = layout is None
        self._set_layout(chosen)
        return self

    def row_major_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """``packed``, ``scale`` and ``zero`` in the row-major form of docs/FORMAT.md (the
        buffers themselves in Layout.ROWS, a rearranged copy in Layout.TILE16)."""
        if self.layout is Layout.TILE16:
            return from_tile16(self.packed, self.scale, self.zero, self.bits, self.group_size, self.in_features,
                               self.out_features)
        return self.packed, self.scale, self.zero

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
                   bias: Tensor | None = None, layout: Layout | None = None) -> "QuantLinear":
        """From integer codes uint8 ``[out, in]`` and their per-group scale/zero."""
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None,
                    device=codes.device, bias_dtype=bias.dtype if bias is not None else torch.float32,
                    layout=Layout.ROWS)
        return layer._fill_row_major(codes, scale, zero, bias).use_layout(layout)

    @torch.no_grad()
    def _fill_row_major(self, codes: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None) -> QuantLinear:
        # Only for a layer just made in Layout.ROWS: packs codes uint8 [out, in] into its buffers.
        self.packed.copy_(ops.pack(codes, self.bits, self.group_size))
        self.scale.copy_(scale)
        self.zero.copy_(zero)
        if bias is not None:
            self.bias.copy_(bias.detach())
        return self

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int,
                    clipping: ops.Clipping = ops.Clipping.MSE, layout: Layout | None = None) -> "QuantLinear":
        """Round-to-nearest quantization of a dense layer with per-group parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float()
        scale, zero = ops.quant_params(w, bits, group_size, clipping.search_steps)
        codes = ops.quantize(w, scale, zero, bits, group_size)
        return cls.from_codes(codes, scale, zero, bits, group_size,
                              linear.bias.detach() if linear.bias is not None else None, layout)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16), .half() and the like must move these buffers but never change
        # their dtypes: the format fixes float16 scales and uint8 codes (docs/FORMAT.md), and a
        # float32 bias is what the kernels add. Device moves pass through unchanged.
        def keep_dtype(t):
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)
        self._checked_buffers = None  # never keep the buffers of the old device alive
        result = super()._apply(keep_dtype, recurse)
        if self._auto_layout:
            self._set_layout(preferred_layout(self.packed.device, self.bits, self.group_size))
        elif self.layout is Layout.TILE16 and self.packed.device.type != "cpu":
            self._set_layout(Layout.ROWS)  # no other device has a TILE16 kernel
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout is not Layout.ROWS:  # checkpoints hold the row-major format only
            for name, tensor in zip(("packed", "scale", "zero"), self.row_major_weights()):
                destination[prefix + name] = tensor if keep_vars else tensor.detach()
        if not keep_vars:
            # Buffers in a shared region (brecq_ext.arena) go out as tensors of their own: a view of
            # a model-sized region would carry all of it into torch.save, and safetensors refuses it.
            for name in ("packed", "scale", "zero", "bias"):
                tensor = destination.get(prefix + name)
                if tensor is not None and is_view_of_larger_storage(tensor):
                    destination[prefix + name] = tensor.clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._checked_buffers = None
        keys = [prefix + name for name in ("packed", "scale", "zero")]
        if self.layout is Layout.TILE16 and all(key in state_dict for key in keys):
            given = [state_dict[key] for key in keys]
            expected = (self._row_shapes[0], self._row_shapes[1], self._row_shapes[1])
            if all(tuple(t.shape) == tuple(shape) for t, shape in zip(given, expected)):
                tiled = to_tile16(*given, self.bits, self.group_size, self.in_features)
                state_dict = dict(state_dict)  # the caller's dict stays as it was
                state_dict.update(zip(keys, tiled))
            else:
                error_msgs.append(
                    f"size mismatch for {prefix}packed/scale/zero: expected the row-major shapes "
                    f"{[tuple(s) for s in expected]} (docs/FORMAT.md), got {[tuple(t.shape) for t in given]}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
        if self.layout is Layout.TILE16:
            return ops.tile16_linear(x, packed, scale, zero, bias, self.bits, self.group_size, self.in_features,
                                     self.out_features, weights_checked=valid)
        return ops.linear(x, packed, scale, zero, bias, self.bits, self.group_size, self.in_features,
                          weights_checked=valid)

    def _expected_shapes(self) -> tuple[torch.Size, torch.Size]:
        if self.layout is Layout.TILE16:
            codes, params = tile16_shapes(self.out_features, self.in_features, self.bits, self.group_size)
            return torch.Size(codes), torch.Size(params)
        return self._row_shapes

    def _buffers_valid(self, packed, scale, zero, bias) -> bool:
        """Buffers have the documented dtypes, shapes and layout. Plain attribute and tuple
        checks (a few microseconds), so that decode-sized forwards can skip the op's validation."""
        code_shape, param_shape = self._expected_shapes()
        return (packed.dtype == torch.uint8 and scale.dtype == torch.float16 and zero.dtype == torch.uint8
                and packed.shape == code_shape and scale.shape == param_shape and zero.shape == param_shape
                and packed.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()
                and (bias is None or (bias.shape == (self.out_features,) and bias.is_contiguous()))
                and packed.device == scale.device == zero.device)

    def codes(self) -> Tensor:
        return ops.unpack(self.row_major_weights()[0], self.bits, self.group_size, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense ``[out, in]`` weight (materialised on request only, e.g. for checks)."""
        packed, scale, zero = self.row_major_weights()
        return ops.dequantize_packed(packed, scale, zero, self.bits, self.group_size, self.in_features, dtype)

    def storage(self) -> LayerStorage:
        """The format's exact cost of this layer (row-major; TILE16 adds the zero rows that pad
        out_features to a multiple of 16, counted by memory_bytes)."""
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
                f"bits_per_weight={st.bits_per_weight:.3f}, layout={self.layout.value}, "
                f"format_version={FORMAT_VERSION}")


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
