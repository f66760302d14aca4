"""The names of the recipe presets (``brecq.quantization.recipe.PRESETS``), importable without torch so that the
command line's help lists them at once; a test keeps the two in step."""

PRESET_NAMES = ("w3g64", "w4g64", "w4g64_mix_attn6", "w4g64_mix_attn6_head8", "w6g64", "w8g64")
