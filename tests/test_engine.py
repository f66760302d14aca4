"""The quantization engine: BRECQ, RTN and GPTQ through one interface, resume, save and load."""
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from brecq_ext import LayerRule, QuantLinear, quant_linear_layers
from brecq_ext.layout import preferred_layout

from brecq.quantization.baselines import GPTQConfig
from brecq.quantization.blocks import UnsupportedArchitecture, decoder_blocks
from brecq.io import CorruptCheckpoint, load_quantized, save_quantized
from brecq.models import build_model, qwen3_config
from brecq.quantization.quantize import quantize
from brecq.quantization.recipe import Method, Recipe, get_recipe
from brecq.quantization.reconstruct import InputSource, LossKind, ReconstructionConfig

from conftest import STORIES260K, require_shared

FAST = ReconstructionConfig(iters=60, batch_size=4, lr=1e-2)


def tiny_qwen(seed=0):
    return build_model(qwen3_config("tiny"), seed=seed)


def calibration(vocab, n=12, t=48, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def stories():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(require_shared(STORIES260K))).eval()


def packed_state(model):
    return {f"{name}.{k}": v.clone() for name, layer in quant_linear_layers(model)
            for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("build,vocab", [(tiny_qwen, 512), (stories, 512)], ids=["qwen3-tiny", "stories260k"])
def test_brecq_beats_round_to_nearest_in_every_block(build, vocab):
    model = build()
    report = quantize(model, get_recipe("w4g64_mix_attn6"), calibration(vocab), reconstruction=FAST,
                      show_progress=False)
    assert len(report.blocks) == len(decoder_blocks(model))
    for block in report.blocks:
        assert block.loss_final < block.loss_nearest, block
    assert sum(1 for _ in quant_linear_layers(model)) == 7 * len(report.blocks)
    bits = {name.rsplit(".", 1)[-1]: layer.bits for name, layer in quant_linear_layers(model)}
    assert bits["q_proj"] == 6 and bits["down_proj"] == 4


def test_fisher_loss_and_full_precision_inputs_run():
    model = stories()
    config = ReconstructionConfig(iters=20, batch_size=4, loss=LossKind.FISHER, input_source=InputSource.FULL_PRECISION)
    report = quantize(model, get_recipe("w4g64"), calibration(512, n=8, t=32), reconstruction=config,
                      show_progress=False)
    assert all(b.loss_nearest > 0 and b.loss_final > 0 for b in report.blocks)


def _kl(model, reference, ids):
    with torch.no_grad():
        logits = model(ids).logits
    return torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1).mean().item()


@pytest.mark.parametrize("act_order", [False, True], ids=["gptq", "gptq-act-order"])
def test_gptq_is_closer_to_full_precision_than_rtn(act_order):
    ids = calibration(512, n=16, t=64, seed=1)
    held_out = calibration(512, n=4, t=64, seed=2)
    with torch.no_grad():
        reference = stories()(held_out).logits
    rtn = stories()
    quantize(rtn, get_recipe("w3g64", Method.RTN), show_progress=False)
    gptq = stories()
    quantize(gptq, get_recipe("w3g64", Method.GPTQ), ids, gptq=GPTQConfig(act_order=act_order), show_progress=False)
    assert _kl(gptq, reference, held_out) < _kl(rtn, reference, held_out)


def test_same_seed_same_data_gives_bit_identical_weights():
    ids = calibration(512, n=8, t=32)
    first, second = tiny_qwen(), tiny_qwen()
    quantize(first, get_recipe("w4g64"), ids, reconstruction=FAST, show_progress=False)
    quantize(second, get_recipe("w4g64"), ids, reconstruction=FAST, show_progress=False)
    a, b = packed_state(first), packed_state(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_and_reload_gives_the_same_logits(tmp_path):
    model = tiny_qwen()
    report = quantize(model, get_recipe("w4g64_mix_attn6"), calibration(512), reconstruction=FAST, show_progress=False)
    ids = calibration(512, n=2, t=20, seed=5)
    with torch.no_grad():
        before = model(ids).logits
    save_quantized(model, tmp_path / "out", recipe=get_recipe("w4g64_mix_attn6").to_dict(),
                   calibration={"test": True}, summary=report.table())
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "summary.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    loaded = load_quantized(tmp_path / "out")
    assert sum(1 for _ in quant_linear_layers(loaded)) == 14
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)


def test_truncated_or_edited_weights_are_refused(tmp_path):
    model = tiny_qwen()
    quantize(model, get_recipe("w4g64", Method.RTN), show_progress=False)
    out = save_quantized(model, tmp_path / "m", recipe=get_recipe("w4g64").to_dict(), calibration=None)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint, match="truncated or was edited"):
        load_quantized(out)
    edited = bytearray(data)
    edited[-10] ^= 0xFF
    weights.write_bytes(bytes(edited))
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        load_quantized(out)


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch
    from brecq.models import build_model, qwen3_config
    from brecq.quantization.quantize import quantize
    from brecq.quantization.recipe import get_recipe
    from brecq.quantization.reconstruct import ReconstructionConfig
    model = build_model(qwen3_config("tiny", num_hidden_layers=4), seed=0)
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    quantize(model, get_recipe("w4g64"), ids, reconstruction=ReconstructionConfig(iters=int(sys.argv[2]), batch_size=4),
             work_dir=sys.argv[1], show_progress=False)
""")


def test_resume_after_kill_is_bit_identical(tmp_path):
    work = tmp_path / "work"
    iters = 150
    # cwd outside the repository, so the child imports the installed (compiled) package.
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(work), str(iters)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (work / "block_001.safetensors").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run never finished its second block"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in work.glob("block_*.safetensors"))
    assert 2 <= len(finished) < 4, finished

    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    config = ReconstructionConfig(iters=iters, batch_size=4)
    resumed = build_model(qwen3_config("tiny", num_hidden_layers=4), seed=0)
    report = quantize(resumed, get_recipe("w4g64"), ids, reconstruction=config, work_dir=work, show_progress=False)
    assert [b.resumed for b in report.blocks][:2] == [True, True] and not report.blocks[-1].resumed
    straight = build_model(qwen3_config("tiny", num_hidden_layers=4), seed=0)
    quantize(straight, get_recipe("w4g64"), ids, reconstruction=config, show_progress=False)
    a, b = packed_state(resumed), packed_state(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_work_dir_of_another_run_is_refused(tmp_path):
    ids = calibration(512, n=4, t=16)
    quantize(tiny_qwen(), get_recipe("w4g64", Method.GPTQ), ids, work_dir=tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="holds blocks of a different run"):
        quantize(tiny_qwen(), get_recipe("w3g64", Method.GPTQ), ids, work_dir=tmp_path, show_progress=False)


def test_bad_recipes_are_refused():
    model = tiny_qwen()
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\], got 9"):
        Recipe("bad", (LayerRule("mlp", 9, 64),))
    with pytest.raises(ValueError, match="group_size must be a positive integer, got 0"):
        Recipe("bad", (LayerRule("mlp", 4, 0),))
    with pytest.raises(ValueError, match=r"rules match no nn.Linear layer of the model: \['conv'\]"):
        quantize(model, Recipe("nothing", (LayerRule("mlp", 4, 64), LayerRule("conv", 4, 64)), Method.RTN))
    with pytest.raises(ValueError, match="matched by rules that disagree"):
        quantize(model, Recipe("overlap", (LayerRule(r"mlp\.", 4, 64), LayerRule("down_proj", 6, 64)), Method.RTN))
    with pytest.raises(ValueError, match="needs calibration"):
        quantize(model, get_recipe("w4g64"), None)


def test_lm_head_can_be_quantized_to_eight_bits():
    model = tiny_qwen()
    report = quantize(model, get_recipe("w4g64_mix_attn6_head8"), calibration(512, n=4, t=16),
                      reconstruction=ReconstructionConfig(iters=5), show_progress=False)
    assert report.outside_blocks == ["lm_head"]
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 8


def test_unknown_architecture_gets_a_clear_error():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Linear(64, 64)

    with pytest.raises(UnsupportedArchitecture, match="no decoder layers at model.model.layers"):
        quantize(Tiny(), Recipe("mlp", (LayerRule("mlp", 4, 64),)), torch.zeros(2, 8, dtype=torch.long))


def test_transformers_from_pretrained_loads_a_brecq_model_after_import(tmp_path):
    transformers = pytest.importorskip("transformers")
    import brecq  # noqa: F401  (registers the quantization method)

    model = tiny_qwen()
    quantize(model, get_recipe("w4g64_mix_attn6", Method.RTN), show_progress=False)
    save_quantized(model, tmp_path / "m", recipe=get_recipe("w4g64_mix_attn6").to_dict(), calibration=None)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert isinstance(loaded.model.layers[1].mlp.up_proj, QuantLinear)
    assert loaded.model.layers[1].mlp.up_proj.scale.dtype == torch.float16
    assert loaded.model.layers[1].mlp.up_proj.layout is preferred_layout("cpu", 4, 64)  # chosen after loading
    ids = calibration(512, n=1, t=12, seed=9)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_from_pretrained_refuses_an_edited_checkpoint(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import brecq  # noqa: F401  (registers the quantization method)
    from brecq.io import CorruptCheckpoint

    model = tiny_qwen()
    quantize(model, get_recipe("w4g64", Method.RTN), show_progress=False)
    save_quantized(model, tmp_path / "m", recipe=get_recipe("w4g64").to_dict(), calibration=None)
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10  # one byte of weight data
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="checksum recorded at save time"):
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    monkeypatch.setenv("BRECQ_VERIFY_CHECKSUM", "0")  # the opt-out loads it as it is
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert isinstance(loaded.model.layers[0].mlp.up_proj, QuantLinear)


def _regions(model) -> set:
    """The storages the packed buffers of a model's QuantLinear layers live in."""
    return {t.untyped_storage().data_ptr() for _, layer in quant_linear_layers(model) for t in layer.buffers()}


@pytest.mark.parametrize("loader", ["quantize", "load_quantized", "from_pretrained"])
def test_quantized_and_loaded_models_hold_their_packed_weights_in_one_region(tmp_path, loader):
    model = tiny_qwen()
    quantize(model, get_recipe("w4g64_mix_attn6", Method.RTN), show_progress=False)
    if loader == "quantize":
        result = model
    else:
        save_quantized(model, tmp_path / "m", recipe=get_recipe("w4g64_mix_attn6").to_dict(), calibration=None)
        if loader == "load_quantized":
            result = load_quantized(tmp_path / "m")
        else:
            transformers = pytest.importorskip("transformers")
            import brecq  # noqa: F401  (registers the quantization method)
            result = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert len(list(quant_linear_layers(result))) == 14
    assert len(_regions(result)) == 1
    ids = calibration(512, n=1, t=12, seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, result(ids).logits)


def test_load_quantized_can_leave_layers_in_their_own_allocations(tmp_path):
    model = tiny_qwen()
    quantize(model, get_recipe("w4g64", Method.RTN), show_progress=False)
    save_quantized(model, tmp_path / "m", recipe=get_recipe("w4g64").to_dict(), calibration=None)
    loaded = load_quantized(tmp_path / "m", gather_weights=False)
    assert len(_regions(loaded)) == 3 * len(list(quant_linear_layers(loaded)))


def test_memory_mapped_activations_give_the_same_weights(tmp_path):
    ids = calibration(512, n=8, t=32)
    in_memory, on_disk = tiny_qwen(), tiny_qwen()
    quantize(in_memory, get_recipe("w4g64"), ids, reconstruction=FAST, show_progress=False)
    quantize(on_disk, get_recipe("w4g64"), ids, reconstruction=FAST, activation_dir=tmp_path / "acts",
             show_progress=False)
    a, b = packed_state(in_memory), packed_state(on_disk)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "acts").glob("*.f32"))  # removed when done


@pytest.mark.parametrize("method", [Method.BRECQ, Method.GPTQ, Method.RTN], ids=lambda m: m.value)
def test_quantized_layers_live_where_the_layers_they_replace_lived(method, device):
    # A CPU model quantized with device=...: blocks visit the device and come back, the quantized
    # layers stay on the CPU like the layers they replace, and the model still runs there.
    model = tiny_qwen()
    ids = calibration(model.config.vocab_size)
    quantize(model, get_recipe("w4g64_mix_attn6", method), ids, reconstruction=FAST, device=device,
             show_progress=False)
    layers = dict(quant_linear_layers(model))
    assert layers and all(layer.packed.device.type == "cpu" for layer in layers.values())
    assert all(p.device.type == "cpu" for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(ids[:2]).logits).all()
    # A model that lives on the device is quantized in place there.
    resident = tiny_qwen().to(device)
    quantize(resident, get_recipe("w4g64_mix_attn6", method), ids, reconstruction=FAST, device=device,
             show_progress=False)
    assert all(layer.packed.device.type == device for _, layer in quant_linear_layers(resident))
    with torch.no_grad():
        assert torch.isfinite(resident(ids[:2].to(device)).logits).all()
