"""The command line end to end on the real tiny model: quantize, then evaluate the result."""
import json
import subprocess
import sys


from conftest import DATA, STORIES260K, require_shared


def brecq(*args, cwd):
    return brecq_process(*args, cwd=cwd).stdout


def brecq_process(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "brecq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_help_lists_the_commands(tmp_path):
    out = brecq("--help", cwd=tmp_path)
    for command in ("demo", "quantize", "eval"):
        assert command in out
    assert "--recipe" in brecq("quantize", "--help", cwd=tmp_path)


def test_quantize_then_evaluate(tmp_path):
    model = require_shared(STORIES260K)
    text = require_shared(DATA / "tinystories_val_head.txt")
    out = tmp_path / "q"
    done = brecq_process("quantize", model, "--out", out, "--recipe", "w4g64_mix_attn6", "--calib", text,
                         "--samples", 8, "--seq-len", 64, "--iters", 20, "--quiet", cwd=tmp_path)
    printed = done.stdout
    assert "it/s" not in done.stderr, "--quiet must hide every progress bar, the libraries' too"
    assert "saved to" in printed and (out / "config.json").exists() and (out / "tokenizer.json").exists()
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["recipe"]["name"] == "w4g64_mix_attn6" and config["calibration"]["num_samples"] == 8
    assert config["modules"]["model.layers.0.self_attn.q_proj"]["bits"] == 6
    assert "Block reconstruction error" in (out / "summary.md").read_text()
    result = json.loads(brecq("eval", out, "--task", "kl", "--reference", model, "--data", text,
                              "--limit-tokens", 2048, "--quiet", cwd=tmp_path))
    assert 0 < result["mean_kl"] < 0.2 and result["top1_agreement"] > 0.7
    brecq("eval", out, "--task", "arc", "--data", DATA / "test-ai2_arc.parquet", "--limit", 10, "--out",
          tmp_path / "arc", "--quiet", cwd=tmp_path)
    assert json.loads((tmp_path / "arc" / "results.json").read_text())["n"] == 10
