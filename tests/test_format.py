import pytest
import torch

from brecq_ext import Layout, QuantLinear, format as fmt


@pytest.mark.parametrize("bits,group_size,expected_bpw", [(4, 64, 4.375), (6, 64, 6.375), (4, 32, 4.75),
                                                         (4, 128, 4.1875), (8, 64, 8.375), (3, 64, 3.375)])
def test_bits_per_weight_of_whole_groups(bits, group_size, expected_bpw):
    st = fmt.layer_storage(1024, 3072, bits, group_size)
    assert st.bits_per_weight == pytest.approx(expected_bpw, rel=0, abs=1e-12)
    assert st.code_bytes == 1024 * 3072 * bits // 8
    assert st.scale_bytes == 2 * 1024 * 3072 // group_size
    assert st.zero_bytes == 1024 * 3072 // group_size


def test_padding_rule_for_in_features_not_multiple_of_group():
    # 172 inputs at g64: 3 groups, the last covering 44 real inputs; codes padded to 192.
    assert fmt.num_groups(172, 64) == 3
    assert fmt.padded_in_features(172, 64) == 192
    assert fmt.packed_row_bytes(172, 64, 4) == 96
    assert fmt.packed_row_bytes(172, 64, 6) == 144
    assert fmt.packed_row_bytes(1000, 32, 6) == 768
    st = fmt.layer_storage(64, 172, 4, 64, bias=True)
    assert st.total_bytes == 64 * 96 + 64 * 3 * 2 + 64 * 3 + 64 * 4
    # Padding costs bits: 96 bytes hold 172 weights, so more than 4 + 24/64 bits per weight.
    assert st.bits_per_weight == pytest.approx(8 * (96 + 3 * 3) / 172)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_quant_linear_buffers_are_exactly_the_documented_bytes(bias):
    layer = QuantLinear(172, 17, bits=6, group_size=64, bias=bias, layout=Layout.ROWS)
    assert layer.memory_bytes() == layer.storage().total_bytes
    assert layer.packed.shape == (17, fmt.packed_row_bytes(172, 64, 6))
    assert layer.scale.dtype == torch.float16 and layer.scale.shape == (17, 3)
    assert layer.zero.dtype == torch.uint8 and layer.zero.shape == (17, 3)
