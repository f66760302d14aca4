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


def test_quantize_honours_the_umask_and_removes_its_work_folder(tmp_path):
    import os

    model = require_shared(STORIES260K)
    text = require_shared(DATA / "tinystories_val_head.txt")
    args = ["quantize", model, "--recipe", "w4g64", "--method", "gptq", "--calib", text, "--samples", 4,
            "--seq-len", 32, "--quiet"]
    for keep, out in ((False, tmp_path / "q"), (True, tmp_path / "kept")):
        done = subprocess.run([sys.executable, "-m", "brecq.cli", *map(str, args + ["--out", out]),
                               *(["--keep-work"] if keep else [])], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path, check=False, preexec_fn=lambda: os.umask(0o022))
        assert done.returncode == 0, done.stderr[-2000:]
        assert (out / ".brecq_work").exists() == keep
    for name in ("config.json", "model.safetensors", "summary.md", "tokenizer.json"):
        assert (tmp_path / "q" / name).stat().st_mode & 0o777 == 0o644, name


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "brecq.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd, check=False)


def test_user_errors_are_one_line_with_exit_2(tmp_path):
    missing = run_cli("eval", "/missing/dir", "--task", "arc", "--data", "x.parquet", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "brecq: error: /missing/dir: no such model folder (-v for the traceback)"]
    (tmp_path / "bad.toml").write_text("[measure]\nrepets = 3\n")
    bad = run_cli("study", tmp_path / "bad.toml", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "brecq: error: [measure]: unknown key 'repets'; did you mean 'repeats'?" in bad.stderr
    nothing = run_cli("study", tmp_path / "none.toml", cwd=tmp_path)
    assert nothing.returncode == 2 and "no such study config" in nothing.stderr


def test_verbose_after_the_command_shows_the_traceback(tmp_path):
    (tmp_path / "bad.toml").write_text("[measure]\nrepets = 3\n")
    done = run_cli("study", tmp_path / "bad.toml", "-v", cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" in done.stderr and "StudyConfigError" in done.stderr


def test_interrupt_says_what_is_kept(monkeypatch, capsys):
    from brecq import cli

    parser = cli.build_parser()
    args = parser.parse_args(["study", "x.toml", "--output", "out"])

    def interrupted(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(args, "run", interrupted, raising=False)
    monkeypatch.setattr(parser, "parse_args", lambda argv=None: args)
    assert cli.main([]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["brecq: interrupted; finished work is kept in out and running the same command again resumes it"]


def test_help_imports_nothing_heavy_and_lists_the_presets(tmp_path):
    """What keeps --help fast (timed in bench/cli_startup.py): the parser imports neither torch nor
    transformers."""
    from brecq.quantization.preset_names import PRESET_NAMES
    from brecq.quantization.recipe import PRESETS

    assert PRESET_NAMES == tuple(sorted(PRESETS))
    done = run_cli("--help", cwd=tmp_path)
    assert done.returncode == 0 and "export" in done.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, brecq.cli; brecq.cli.build_parser(); "
                            "print('torch' in sys.modules, 'transformers' in sys.modules)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True)
    assert probe.stdout.split() == ["False", "False"], "the parser must not import torch or transformers"


def test_every_option_has_help_and_says_its_default_once():
    import argparse

    from brecq.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help or action.dest == "help", (name, action.option_strings)
        for line in sub.format_help().splitlines():
            assert line.count("default") <= 1 and "default: None" not in line, (name, line)


def test_study_example_prints_a_config_that_loads(tmp_path):
    import shutil

    from brecq.study import load_study_config

    done = run_cli("study", "--example", cwd=tmp_path)
    assert done.returncode == 0 and "[[variants]]" in done.stdout
    (tmp_path / "models" / "Qwen3-0.6B").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    for name in ("train-squad_v2.parquet", "test-ai2_arc.parquet"):
        shutil.copy(require_shared(DATA / name), tmp_path / "data" / name)
    (tmp_path / "study.toml").write_text(done.stdout)
    config = load_study_config(tmp_path / "study.toml")
    assert config.variants[0].iters == 800 and config.measure.memory_subprocess
    assert config.models[0].path == str(tmp_path / "models" / "Qwen3-0.6B"), "relative to the config's folder"
