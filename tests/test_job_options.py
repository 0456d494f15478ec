"""One definition of the compress job's options: `compress` and `submit` parse them alike."""

import pytest

from linearize.cli import build_parser, main, spec_from_args
from linearize_client.commands import _build_spec
from linearize_client.options import compress_fields, parse_task_gates

OPTIONS = [
    "--layers", "3", "--eval-tokens", "1024", "--format", "linear", "--method", "fit",
    "--heal-steps", "7",
    "--heal-seconds", "9", "--heal-tokens", "65536", "--tasks", "arc_easy,hellaswag", "--generation-prompts", "4",
    "--gate-ppl-increase", "30", "--gate-kl", "0.5", "--gate-agreement", "70",
    "--gate-task-retained", "90", "--gate-task-retained", "hellaswag:95",
    "--heal-mix", "0.25", "--heal-loss", "kl", "--heal-text", "generated:1024", "--map-shrink", "0.5",
    "--eval-data", "code=c.txt", "--gate-ppl-increase", "code=40",
]  # fmt: skip


def test_compress_and_submit_build_the_same_compress_spec():
    parser = build_parser()
    local = parser.parse_args(
        ["compress", "--model", "m", "--data", "d.txt", "--output", "o", *OPTIONS]
    )
    remote = parser.parse_args(["submit", "--model", "m", "--data", "wikitext2", *OPTIONS])
    assert compress_fields(local) == compress_fields(remote)
    local_spec = spec_from_args(local)
    remote_spec = _build_spec(remote, {"builtin": "wikitext2"})
    ignore = {"data", "calib_tokens", "seq_len", "dtype", "device", "seed"}
    assert local_spec.model_dump(exclude=ignore) == remote_spec.model_dump(exclude=ignore)
    assert remote_spec.heal_steps == 7 and remote_spec.heal_seconds == 9
    assert local_spec.heal_tokens == remote_spec.heal_tokens == 65536
    assert local_spec.method == remote_spec.method == "fit"
    assert remote_spec.gate_task_retained == {"*": 90.0, "hellaswag": 95.0}
    assert remote_spec.heal_mix == 0.25 and remote_spec.heal_loss == "kl"
    assert remote_spec.map_shrink == 0.5
    assert remote_spec.heal_text == "generated:1024"
    assert remote_spec.eval_data == {"code": "c.txt"}
    assert remote_spec.gate_ppl_increase == 30.0
    assert remote_spec.gate_text_ppl_increase == {"code": 40.0}


def test_parse_task_gates_reads_all_and_per_task_limits():
    assert parse_task_gates(["90", "arc_easy:80,hellaswag:85"]) == {
        "*": 90.0,
        "arc_easy": 80.0,
        "hellaswag": 85.0,
    }
    with pytest.raises(ValueError, match="wants P or TASK:P"):
        parse_task_gates(["arc_easy:lots"])


def test_malformed_or_unrunnable_gates_exit_2(tmp_path, capsys):
    base = ["compress", "--model", "m", "--data", "d", "--layers", "2", "--output", str(tmp_path)]
    assert main([*base, "--gate-task-retained", "x:y"]) == 2
    assert "wants P or TASK:P" in capsys.readouterr().err
    assert main([*base, "--tasks", "a", "--gate-task-retained", "b:90"]) == 2
    assert "names task 'b', which is not among the tasks that run" in capsys.readouterr().err
    assert main([*base, "--method", "remove", "--format", "linear"]) == 2
    assert "method=remove drops the span" in capsys.readouterr().err


def test_submit_refuses_compress_options_for_another_kind(capsys):
    args = build_parser().parse_args(
        ["submit", "--remote", "http://127.0.0.1:9", "--kind", "analyze", "--data", "wikitext2",
         "--heal-steps", "3"]
    )  # fmt: skip
    from linearize_client.commands import submit_main

    assert submit_main(args) == 2
    assert "--heal-steps need --kind compress" in capsys.readouterr().err


def test_cli_gate_on_agreement_exits_1_naming_the_rule(tmp_path, capsys):
    from tiny_models import save_tiny_model

    model = save_tiny_model("llama", tmp_path / "m", initializer_range=0.3)
    out = tmp_path / "out"
    code = main(
        ["compress", "--model", str(model), "--data", "wikitext2", "--calib-tokens", "2048",
         "--seq-len", "128", "--eval-tokens", "1024", "--layers", "3", "--heal-steps", "0",
         "--gate-agreement", "100", "--gate-kl", "1000", "--output", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 1
    stdout = capsys.readouterr().out
    assert "gate       FAILED" in stdout
    assert "kl " in stdout and "<= 1000.0" in stdout
    assert "top1_agreement_pct" in stdout and ">= 100.0 (failed)" in stdout
    assert "agreement  KL" in stdout and "generation exact match" in stdout
    assert (out / "report.json").is_file()
