"""The command line: exit codes, one-line errors, and a --help that does not import torch."""

import subprocess
import sys

import pytest

from linearize.cli import main

WIKITEXT_ARGS = ["--calib-tokens", "2048", "--seq-len", "128"]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "linearize", *args], capture_output=True, text=True, timeout=300
    )


def test_help_does_not_import_torch():
    code = (
        "import sys; from linearize.cli import build_parser; "
        "build_parser().format_help(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert run_cli("--help").returncode == 0


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--model", "m", "--data", "d"])  # no budget, no output
    assert exc.value.code == 2


def test_missing_data_file_is_one_line_exit_2(tmp_path):
    result = run_cli(
        "analyze", "--model", "smollm2-135m", "--data", str(tmp_path / "nope.txt"), "--quiet"
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith("linearize: error: data file not found")
    )
    assert "Traceback" not in result.stderr


def test_bad_indices_exit_2(tmp_path):
    code = main(
        [
            "compress",
            "--model",
            "m",
            "--data",
            "d",
            "--indices",
            "1,x",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2


def test_invalid_spec_values_exit_2(tmp_path, capsys):
    code = main(
        [
            "compress",
            "--model",
            "m",
            "--data",
            "d",
            "--layers",
            "0",
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "layers must be >= 1" in capsys.readouterr().err


def test_unknown_model_path_exit_2(tmp_path, capsys):
    code = main(
        [
            "eval",
            "--model",
            str(tmp_path / "missing-dir/"),
            "--data",
            "wikitext2",
            *WIKITEXT_ARGS,
            "--quiet",
        ]
    )
    assert code == 2
    assert "model path not found" in capsys.readouterr().err


def test_gate_failure_exits_1_and_keeps_artifacts(tmp_path):
    from tiny_models import save_tiny_model

    # Seeded: with this model and data, replacing 3 layers costs ~2% perplexity.
    model = save_tiny_model("llama", tmp_path / "m", initializer_range=0.3)
    out = tmp_path / "out"
    code = main(
        [
            "compress",
            "--model",
            str(model),
            "--data",
            "wikitext2",
            *WIKITEXT_ARGS,
            "--eval-tokens",
            "1024",
            "--layers",
            "3",
            "--gate-ppl-increase",
            "0",
            "--heal-steps",
            "0",
            "--output",
            str(out),
            "--report",
            str(tmp_path / "r.json"),
            "--quiet",
        ]
    )
    assert code == 1
    assert (out / "report.json").is_file() and (tmp_path / "r.json").is_file()
