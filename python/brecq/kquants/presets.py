"""Which block type each tensor gets: llama.cpp's type maps for its K-quant file types (and Q4_0, Q4_1, Q8_0).

The rules are llama.cpp's (``llama_tensor_get_type`` in ``src/llama-quant.cpp``), for dense
Llama/Qwen-style models:

* the output matrix (``lm_head``, or the token embeddings when the model ties them) is Q6_K,
  except in Q8_0 files where it is Q8_0;
* in Q4_K_M and Q5_K_M, ``attn_v`` and ``ffn_down`` are Q6_K in "more bits" layers: the first and
  last eighth of the layers and every third layer in between, ``i < n/8 or i >= 7n/8 or
  (i - n/8) % 3 == 2``;
* everything else is the file type's own type;
* a tensor whose rows a 256-block does not divide falls back: Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0; one that a 32-block does not divide either is written F16.

``tests/test_kquants.py`` checks every preset against the types of the file
``llama_cpp.llama_model_quantize`` writes for the same model.
"""
from __future__ import annotations

from dataclasses import dataclass

from .layouts import QK_K, BlockType

ROLES = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
FALLBACK = {BlockType.Q4_K: BlockType.Q5_0, BlockType.Q5_K: BlockType.Q5_1, BlockType.Q6_K: BlockType.Q8_0}


def use_more_bits(layer: int, layers: int) -> bool:
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


@dataclass(frozen=True)
class KQuantPreset:
    name: str
    llama_ftype: int  # llama_ftype of the file (LLAMA_FTYPE_MOSTLY_*)
    default: BlockType
    more_bits: BlockType | None  # attn_v and ffn_down in use_more_bits layers
    output: BlockType

    def block_type(self, role: str, layer: int | None, layers: int, in_features: int) -> BlockType | None:
        """The type of a weight matrix; None means F16 (no block type holds its rows)."""
        if role not in ROLES:
            raise ValueError(f"KQuantPreset: role must be one of {ROLES}, got {role!r}")
        chosen = self.default
        if role == "output":
            chosen = self.output
        elif role in ("attn_v", "ffn_down") and self.more_bits is not None and use_more_bits(layer, layers):
            chosen = self.more_bits
        if in_features % chosen.block:
            chosen = FALLBACK.get(chosen, chosen)
            if in_features % chosen.block:
                return None
        return chosen


PRESETS = {p.name: p for p in (
    KQuantPreset("Q4_0", 2, BlockType.Q4_0, None, BlockType.Q6_K),
    KQuantPreset("Q4_1", 3, BlockType.Q4_1, None, BlockType.Q6_K),
    KQuantPreset("Q4_K_M", 15, BlockType.Q4_K, BlockType.Q6_K, BlockType.Q6_K),
    KQuantPreset("Q5_K_M", 17, BlockType.Q5_K, BlockType.Q6_K, BlockType.Q6_K),
    KQuantPreset("Q6_K", 18, BlockType.Q6_K, None, BlockType.Q6_K),
    KQuantPreset("Q8_0", 7, BlockType.Q8_0, None, BlockType.Q8_0),
)}
assert QK_K == 256


def get_preset(name: str) -> KQuantPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"k-quant preset must be one of {sorted(PRESETS)}, got {name!r}") from None


# Hugging Face linear names inside a decoder block -> llama.cpp's tensor roles.
BLOCK_ROLES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
