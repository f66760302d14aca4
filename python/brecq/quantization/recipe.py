"""Quantization recipes: which layers get which bit width and group size, and by which method.

A recipe is a small frozen dataclass, validated when built, named, and serialised into every
output (``to_dict`` / ``from_dict``). Rules are regular expressions searched in a module's
qualified name; layers no rule matches stay in full precision (embeddings and lm_head by default).
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from torch import nn

from brecq_ext import Clipping, LayerRule, match_linear_layers


class Method(enum.Enum):
    BRECQ = "brecq"  # block reconstruction with learned (AdaRound) rounding
    RTN = "rtn"  # round to nearest
    GPTQ = "gptq"  # Hessian-based error compensation


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[LayerRule, ...]
    method: Method = Method.BRECQ
    clipping: Clipping = Clipping.MSE

    def __post_init__(self):
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            raise ValueError(f"Recipe: name must be letters, digits, '_', '.', '-', got {self.name!r}")
        if not self.rules:
            raise ValueError(f"Recipe {self.name!r}: at least one rule is needed")
        object.__setattr__(self, "rules", tuple(self.rules))
        for rule in self.rules:
            if not isinstance(rule, LayerRule):
                raise TypeError(f"Recipe {self.name!r}: rules must be LayerRule, got {type(rule).__name__}")
        if not isinstance(self.method, Method):
            raise TypeError(f"Recipe {self.name!r}: method must be a Method, got {self.method!r}")
        if not isinstance(self.clipping, Clipping):
            raise TypeError(f"Recipe {self.name!r}: clipping must be a Clipping, got {self.clipping!r}")

    def with_method(self, method: Method) -> "Recipe":
        return Recipe(self.name, self.rules, method, self.clipping)

    def assign(self, model: nn.Module) -> dict[str, LayerRule]:
        """Rule of every linear layer this recipe quantizes. Refuses a rule that matches nothing and a
        layer matched by rules that disagree."""
        try:
            return match_linear_layers(model, self.rules, strict=True)
        except ValueError as exc:
            raise ValueError(f"recipe {self.name!r}: {exc}") from None

    def to_dict(self) -> dict:
        return {"name": self.name, "method": self.method.value, "clipping": self.clipping.value,
                "rules": [{"pattern": r.pattern, "bits": r.bits, "group_size": r.group_size} for r in self.rules]}

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        try:
            rules = tuple(LayerRule(r["pattern"], r["bits"], r["group_size"]) for r in data["rules"])
            return cls(data["name"], rules, Method(data.get("method", "brecq")),
                       Clipping(data.get("clipping", "mse")))
        except KeyError as exc:
            raise ValueError(f"recipe: missing field {exc}") from None


ATTENTION = r"self_attn\.(q|k|v|o)_proj$"
MLP = r"mlp\.(gate|up|down)_proj$"


def _uniform(name: str, bits: int, group_size: int = 64) -> Recipe:
    return Recipe(name, (LayerRule(ATTENTION, bits, group_size), LayerRule(MLP, bits, group_size)))


PRESETS: dict[str, Recipe] = {
    # The study's recipe: W6 attention, W4 MLP, group size 64.
    "w4g64_mix_attn6": Recipe("w4g64_mix_attn6", (LayerRule(ATTENTION, 6, 64), LayerRule(MLP, 4, 64))),
    "w4g64": _uniform("w4g64", 4),
    "w3g64": _uniform("w3g64", 3),
    "w6g64": _uniform("w6g64", 6),
    "w8g64": _uniform("w8g64", 8),
    "w4g64_mix_attn6_head8": Recipe("w4g64_mix_attn6_head8", (LayerRule(ATTENTION, 6, 64), LayerRule(MLP, 4, 64),
                                                              LayerRule(r"^lm_head$", 8, 64))),
}


def get_recipe(name: str, method: Method | None = None) -> Recipe:
    if name not in PRESETS:
        raise ValueError(f"unknown recipe {name!r}; presets: {sorted(PRESETS)}")
    recipe = PRESETS[name]
    return recipe.with_method(method) if method is not None else recipe
