"""The packed weight format (mirrors csrc/include/brecq/format.h; prose in docs/FORMAT.md).

A quantized linear layer ``W[out_features, in_features]`` is stored as

* ``packed``: uint8 ``[out_features, packed_row_bytes(in_features, group_size, bits)]``
* ``scale``:  float16 ``[out_features, num_groups(in_features, group_size)]``
* ``zero``:   uint8 ``[out_features, num_groups(in_features, group_size)]``

with ``w[o, k] ~= scale[o, k // group_size] * (code[o, k] - zero[o, k // group_size])``.
"""
from __future__ import annotations

from dataclasses import dataclass

FORMAT_VERSION = 1
MIN_BITS = 2
MAX_BITS = 8
GROUP_SIZE_MULTIPLE = 8
SCALE_BYTES = 2  # float16
ZERO_BYTES = 1  # uint8


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def padded_in_features(in_features: int, group_size: int) -> int:
    return num_groups(in_features, group_size) * group_size


def packed_row_bytes(in_features: int, group_size: int, bits: int) -> int:
    return padded_in_features(in_features, group_size) * bits // 8


def max_code(bits: int) -> int:
    return (1 << bits) - 1


@dataclass(frozen=True)
class LayerStorage:
    """Exact bytes a packed linear layer occupies, and what that means per weight."""

    weights: int
    code_bytes: int
    scale_bytes: int
    zero_bytes: int
    bias_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.scale_bytes + self.zero_bytes + self.bias_bytes

    @property
    def bits_per_weight(self) -> float:
        """Effective bits per weight: codes (padding included), scales and zeros; bias excluded."""
        return 8.0 * (self.code_bytes + self.scale_bytes + self.zero_bytes) / self.weights


def layer_storage(out_features: int, in_features: int, bits: int, group_size: int,
                  bias: bool = False, bias_bytes_per_element: int = 4) -> LayerStorage:
    groups = num_groups(in_features, group_size)
    return LayerStorage(
        weights=out_features * in_features,
        code_bytes=out_features * packed_row_bytes(in_features, group_size, bits),
        scale_bytes=out_features * groups * SCALE_BYTES,
        zero_bytes=out_features * groups * ZERO_BYTES,
        bias_bytes=out_features * bias_bytes_per_element if bias else 0,
    )
