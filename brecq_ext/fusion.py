"""One packed matmul for projections that read the same input (q/k/v, gate/up).

A decode step calls each linear layer on one token, so a call moves little data and its fixed
cost counts: a Python call and an OpenMP fork on the CPU, a kernel launch (a node of a CUDA graph)
on the GPU. Attention's q, k and v projections read the same hidden states, and so do an MLP's
gate and up projections. :func:`fuse_projections_` stacks such siblings' rows into one
:class:`FusedQuantLinear` and puts a :class:`FusedProjection` in each sibling's place. The model's
own forward is untouched: it still calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)``; the first
call computes all three outputs in one matmul and the others take their share of it.

The fused layer holds the separate layers' rows, codes, scales and zeros unchanged. The CPU GEMV
(up to 8 rows) accumulates each output row as before, so decode results are equal bit for bit;
larger inputs go through a dense matmul, whose blocking may depend on the layer's width (the
tests find them equal on this project's CPU). The CUDA GEMV picks its kernel and tuning by the
layer's shape, so there results can differ in the last bits.

It is an inference-time rearrangement. The fused model's ``state_dict`` names the fused layer
(``self_attn.qkv_proj.packed`` ...), so fuse after loading a checkpoint, not before
(``brecq.save_quantized`` refuses a fused model). The hand-over between members is state of the
fused layer, so one fused model must not run forwards from two threads at once.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import ops
from .arena import gather_quantized_weights, is_view_of_larger_storage
from .layout import Layout
from .quant_linear import QuantLinear

log = logging.getLogger("brecq_ext")

#: The sibling groups of Llama-family decoder layers (Qwen2/3, Llama, Mistral): member names in
#: their parent module, and the name the fused layer takes there.
DEFAULT_GROUPS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    (("gate_proj", "up_proj"), "gate_up_proj"),
)


class FusedQuantLinear(QuantLinear):
    """A :class:`QuantLinear` whose rows are the rows of several projections of one input, stacked
    in order; ``split_sizes`` are their out_features. ``forward(x)`` returns all outputs side by
    side, ``[..., sum(split_sizes)]``; :meth:`member_output` returns one member's, computing the
    fused product once for the members' consecutive calls on the same input."""

    def __init__(self, in_features: int, split_sizes: Sequence[int], bits: int, group_size: int, **kwargs):
        split_sizes = tuple(int(s) for s in split_sizes)
        if len(split_sizes) < 2 or min(split_sizes) <= 0:
            raise ValueError(f"FusedQuantLinear: split_sizes must be two or more positive out_features, "
                             f"got {split_sizes}")
        super().__init__(in_features, sum(split_sizes), bits, group_size, **kwargs)
        self.split_sizes = split_sizes
        self._pending_input = None   # the input of the last fused product still being handed out
        self._pending_outputs = None  # its per-member views, [..., split_sizes[i]] each

    @classmethod
    def from_codes(cls, *args, **kwargs):
        raise TypeError("FusedQuantLinear: build it from QuantLinear layers with from_members")

    @classmethod
    def from_linear(cls, *args, **kwargs):
        raise TypeError("FusedQuantLinear: build it from QuantLinear layers with from_members")

    @classmethod
    @torch.no_grad()
    def from_members(cls, members: Sequence[QuantLinear]) -> FusedQuantLinear:
        """Stack ``members`` (QuantLinear layers of equal in_features, bits and group_size) into
        one layer. Their codes, scales and zeros are copied unchanged; a member without bias adds
        zeros where the others have one. The layout is the members' common explicit layout, or
        chosen by device if any member chooses by device."""
        first = members[0]
        for member in members[1:]:
            reason = _mismatch(first, member)
            if reason:
                raise ValueError(f"FusedQuantLinear.from_members: members differ in {reason}")
        any_bias = any(m.bias is not None for m in members)
        bias = None
        if any_bias:
            bias_dtype = next(m.bias.dtype for m in members if m.bias is not None)
            bias = torch.cat([m.bias.to(bias_dtype) if m.bias is not None else
                              torch.zeros(m.out_features, dtype=bias_dtype, device=m.packed.device)
                              for m in members])
        rows = [m.row_major_weights() for m in members]  # once each: a TILE16 layer rearranges to give them
        codes = torch.cat([ops.unpack(packed, first.bits, first.group_size, first.in_features) for packed, _, _ in rows])
        scale = torch.cat([s for _, s, _ in rows])
        zero = torch.cat([z for _, _, z in rows])
        layout = None if any(m._auto_layout for m in members) else first.layout
        fused = cls(first.in_features, [m.out_features for m in members], first.bits, first.group_size,
                    bias=any_bias, device=codes.device, bias_dtype=bias.dtype if any_bias else torch.float32,
                    layout=Layout.ROWS)
        fused._fill_row_major(codes, scale, zero, bias)
        return fused.use_layout(layout)

    def member_output(self, x: Tensor, index: int) -> Tensor:
        """Member ``index``'s output for ``x`` ``[..., in_features]``: a view ``[...,
        split_sizes[index]]`` of the fused product. The product is computed when member 0 asks
        or when ``x`` is not the tensor of the pending product, and released once the last
        member has taken its share."""
        if index == 0 or self._pending_input is not x:
            self._pending_outputs = self.forward(x).split(self.split_sizes, dim=-1)
            self._pending_input = x
        out = self._pending_outputs[index]
        if index == len(self.split_sizes) - 1:
            self._pending_input = self._pending_outputs = None
        return out

    def _apply(self, fn, recurse=True):
        self._pending_input = self._pending_outputs = None  # never hold tensors of the old device
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state["_pending_input"] = state["_pending_outputs"] = None
        return state

    def extra_repr(self) -> str:
        return f"split_sizes={self.split_sizes}, " + super().extra_repr()


class FusedProjection(nn.Module):
    """Stands where one member of a fused group was; ``forward(x)`` returns that member's output,
    ``[..., out_features]``, from the group's :class:`FusedQuantLinear`. Holds no buffers: the
    fused layer, registered once in the same parent, owns them."""

    def __init__(self, fused: FusedQuantLinear, index: int, fused_name: str):
        super().__init__()
        # A plain attribute, not a submodule: the weights must appear once in state_dict() and
        # parameters(), under the fused layer's own name.
        object.__setattr__(self, "fused", fused)
        self.index = index
        self.fused_name = fused_name
        self.in_features = fused.in_features
        self.out_features = fused.split_sizes[index]

    def forward(self, x: Tensor) -> Tensor:
        return self.fused.member_output(x, self.index)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"part {self.index} of {self.fused_name}")


def fuse_projections_(model: nn.Module, groups: Sequence[tuple[Sequence[str], str]] = DEFAULT_GROUPS,
                      regather: bool = True) -> list[str]:
    """Fuse, in place, each set of sibling :class:`QuantLinear` layers named in ``groups``.

    ``groups``: ``(member names, fused name)`` pairs; a module whose children include all the
    members, each a QuantLinear with the same in_features, bits, group size, layout choice and
    device, gets one :class:`FusedQuantLinear` under the fused name, and a
    :class:`FusedProjection` replaces each member. Sets that do not qualify (a member missing or
    dense, mixed bit widths) are left as they are and logged. Returns the qualified names of the
    fused layers. The parent's forward must call the members on the same input tensor to gain
    anything; if it does not, each call still returns the right output, from a fused product of
    its own.

    ``regather``: when a fused member's buffers were in a shared region (``quantize`` and
    ``load_quantized`` leave CPU models so; brecq_ext.arena), gather all CPU layers into a new one,
    so that the fused layers are read from it too."""
    fused_names, was_gathered = [], False
    for parent_name, parent in list(model.named_modules()):
        for member_names, fused_name in groups:
            members = [getattr(parent, name, None) for name in member_names]
            if not all(isinstance(m, QuantLinear) and not isinstance(m, FusedQuantLinear) for m in members):
                if any(isinstance(m, QuantLinear) for m in members):
                    log.info("fuse_projections_: %s: %s are not all QuantLinear; left unfused",
                             parent_name or "<model>", "/".join(member_names))
                continue
            reasons = [r for r in (_mismatch(members[0], m) for m in members[1:]) if r]
            if reasons:
                log.info("fuse_projections_: %s: %s differ in %s; left unfused", parent_name or "<model>",
                         "/".join(member_names), reasons[0])
                continue
            if hasattr(parent, fused_name):
                raise ValueError(f"fuse_projections_: {parent_name or '<model>'} already has an attribute "
                                 f"{fused_name!r}; pass another fused name in groups")
            was_gathered = was_gathered or any(m.packed.device.type == "cpu" and is_view_of_larger_storage(m.packed)
                                               for m in members)
            fused = FusedQuantLinear.from_members(members)
            for index, name in enumerate(member_names):
                setattr(parent, name, FusedProjection(fused, index, fused_name))
            _insert_module_before(parent, fused_name, fused, member_names[0])
            fused_names.append(f"{parent_name}.{fused_name}" if parent_name else fused_name)
    log.info("fuse_projections_: fused %d groups", len(fused_names))
    if regather and was_gathered:
        gather_quantized_weights(model)
    return fused_names


def _insert_module_before(parent: nn.Module, name: str, module: nn.Module, before: str) -> None:
    # Module order is the order in which gather_quantized_weights lays layers out, and decode reads
    # them in execution order: the fused layer takes its first member's place, not the end.
    children = list(parent._modules.items())
    parent._modules.clear()
    for key, child in children:
        if key == before:
            parent._modules[name] = module
        parent._modules[key] = child


def _mismatch(a: QuantLinear, b: QuantLinear) -> str | None:
    """What keeps two layers from sharing one fused layer, or None."""
    for what in ("in_features", "bits", "group_size", "_auto_layout", "layout"):
        if getattr(a, what) != getattr(b, what):
            return f"{what.strip('_')} ({getattr(a, what)} and {getattr(b, what)})"
    if a.packed.device != b.packed.device:
        return f"device ({a.packed.device} and {b.packed.device})"
    if a.bias is not None and b.bias is not None and a.bias.dtype != b.bias.dtype:
        return f"bias dtype ({a.bias.dtype} and {b.bias.dtype})"
    return None
