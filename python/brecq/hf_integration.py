"""``AutoModelForCausalLM.from_pretrained(path)`` for models saved by brecq, through transformers'
public registration of external quantization methods (``register_quantization_config`` and
``register_quantizer``). Registered on ``import brecq`` when the installed transformers offers it.

Like ``brecq.load_quantized``, this path verifies the weights against the checksum recorded at
save time and refuses a file that differs (a flipped byte once loaded silently, with logits off by
up to 1.87); set ``BRECQ_VERIFY_CHECKSUM=0`` to skip the check.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("brecq")

_registered = False


def register() -> bool:
    """Register the ``brecq`` quantization method with transformers; returns whether it could."""
    global _registered
    if _registered:
        return True
    try:
        from transformers.quantizers.auto import register_quantization_config, register_quantizer
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError as exc:  # older or newer transformers without the public hooks
        log.info("transformers offers no quantizer registration (%s); use brecq.load_quantized", exc)
        return False

    from brecq_ext import Layout, QuantLinear, quant_linear_layers
    from brecq_ext.arena import gather_quantized_weights

    from .quantization.blocks import set_submodule

    @register_quantization_config("brecq")
    class BrecqConfig(QuantizationConfigMixin):
        def __init__(self, modules=None, format_version=1, **kwargs):
            self.quant_method = "brecq"
            self.modules = modules or {}
            self.format_version = format_version
            for key, value in kwargs.items():
                setattr(self, key, value)

        def to_dict(self):
            return dict(self.__dict__)

    @register_quantizer("brecq")
    class BrecqQuantizer(HfQuantizer):
        requires_calibration = True

        def _process_model_before_weight_loading(self, model, **kwargs):
            verify_checkpoint(kwargs.get("checkpoint_files") or [],
                              getattr(self.quantization_config, "weights_sha256", None))
            # Row-major while transformers assigns the saved (row-major) tensors to the buffers.
            for name, spec in self.quantization_config.modules.items():
                set_submodule(model, name, QuantLinear(spec["in_features"], spec["out_features"], spec["bits"],
                                                       spec["group_size"], bias=spec["bias"], layout=Layout.ROWS))

        def _process_model_after_weight_loading(self, model, **kwargs):
            for _, layer in quant_linear_layers(model):
                layer.use_layout(None)  # the faster layout for where the weights now are
            gather_quantized_weights(model)  # CPU layers into one huge-page region, as load_quantized
            return model

        def param_needs_quantization(self, model, param_name, **kwargs):
            return False

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

    _registered = True
    return True


def verify_checkpoint(files, recorded: str | None) -> None:
    """Refuse a brecq checkpoint whose model.safetensors differs from the checksum recorded at save
    time (unless ``BRECQ_VERIFY_CHECKSUM=0``)."""
    from .io import verify_weights

    if os.environ.get("BRECQ_VERIFY_CHECKSUM", "1") == "0" or not recorded:
        return
    weights = [Path(f) for f in files if Path(f).name == "model.safetensors"]
    if weights:
        verify_weights(weights[0], recorded, " (BRECQ_VERIFY_CHECKSUM=0 skips this check)")
