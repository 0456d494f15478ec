"""How a compressed model behaves, end to end on a tiny model: agreement with the original
(recomputed independently from the saved checkpoint), generation, a local lm-eval task run
offline, the gates on them, and the errors for bad task input."""

import json

import pytest
import torch
from pydantic import ValidationError
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from api_schemas import CompressSpec, DataSpec, EvalSpec
from linearize import pipeline
from linearize.agreement import AgreementMeter, Reference
from linearize.data import build_windows, find_wikitext, load_source
from linearize.errors import InputError

SMALL = dict(calib_tokens=2048, seq_len=128, eval_tokens=1024, heal_steps=0)
TASK = "linearize_test_next"
EVAL_WINDOWS = dict(calib_tokens=2048, seq_len=128, eval_tokens=1024)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_model(
        "llama", tmp_path_factory.mktemp("models") / "llama", initializer_range=0.3
    )


@pytest.fixture(scope="module")
def data():
    return DataSpec(path=str(find_wikitext()))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A local multiple-choice task: which of two words follows a context (JSONL + YAML)."""
    directory = tmp_path_factory.mktemp("tasks")
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "as",
        "with",
        "by",
        "he",
        "at",
        "from",
        "his",
        "an",
        "were",
        "are",
        "which",
    ]
    rows = [
        {
            "context": " ".join(words[i : i + 4]),
            "choices": [" " + words[(i + 4) % len(words)], " " + words[(i + 9) % len(words)]],
            "label": 0,
        }
        for i in range(len(words))
    ]
    (directory / "next.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (directory / "next.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {directory / 'next.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return directory


def spec(model, data, **kw):
    return CompressSpec(model=str(model), data=data, **{**SMALL, **kw})


def independent_agreement(original_dir, compressed_dir, data):
    """The agreement measured again from the two models on disk, outside the pipeline."""
    tokenizer = AutoTokenizer.from_pretrained(original_dir)
    windows = build_windows(
        tokenizer, load_source(data), calib_tokens=2048, eval_tokens=1024, seq_len=128
    )
    reference = Reference()
    meter = None
    for path in (original_dir, compressed_dir):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            logits = model(input_ids=windows.eval).logits[:, :-1]
        chunk = logits.reshape(-1, logits.shape[-1])
        if meter is None:
            reference.update(chunk)
            meter = AgreementMeter(reference)
        else:
            meter.update(chunk)
    return meter.result()


def test_compress_reports_agreement_generation_and_a_local_task(
    tiny_llama, data, task_dir, tmp_path
):
    out = tmp_path / "out"
    report = pipeline.run(
        spec(
            tiny_llama,
            data,
            layers=2,
            tasks=[TASK],
            task_dir=str(task_dir),
            gate_kl=100.0,
            gate_task_retained={"*": 0.0},
        ),
        output_dir=out,
    )
    a = report.agreement
    assert a.positions == 8 * 127
    expected = independent_agreement(tiny_llama, out, data)
    assert a.kl == pytest.approx(expected.kl, rel=1e-4)
    assert a.top1_agreement == expected.top1_agreement
    assert a.top5_contains_top1 == expected.top5_contains_top1
    assert a.kl > 0 and a.top1_agreement < 1

    g = report.generation
    assert g.prompts == 16 and g.new_tokens == 64 and len(g.pairs) == 3
    assert 0 <= g.mean_common_prefix <= 64

    (task,) = report.tasks
    assert task.task == TASK and task.original["samples"] == 20
    assert task.retained_pct == pytest.approx(100 * task.compressed["acc"] / task.original["acc"])
    assert [r.name for r in report.gate.rules] == ["kl", f"task_retained_pct:{TASK}"]
    assert report.gate.passed

    markdown = (out / "report.md").read_text()
    assert "## How it behaves" in markdown and TASK in markdown
    assert f"**Prompt 1** (common prefix {g.pairs[0].common_prefix} tokens)" in markdown
    saved = json.loads((out / "report.json").read_text())
    assert saved["tasks"][0]["compressed"]["acc"] == task.compressed["acc"]
    assert saved["agreement"]["kl"] == a.kl

    # `linearize eval --reference` measures the same agreement on the same windows.
    again = pipeline.run(
        EvalSpec(model=str(out), reference=str(tiny_llama), data=data, **EVAL_WINDOWS)
    )
    assert again.agreement.kl == pytest.approx(a.kl, rel=1e-4)
    assert again.agreement.top1_agreement == a.top1_agreement
    assert again.perplexity.baseline == pytest.approx(report.perplexity.compressed, rel=1e-5)


def test_eval_of_a_model_against_itself_gives_zero_kl_and_full_agreement(tiny_llama, data):
    report = pipeline.run(
        EvalSpec(model=str(tiny_llama), reference=str(tiny_llama), data=data, **EVAL_WINDOWS)
    )
    assert report.agreement.kl == 0.0
    assert report.agreement.top1_agreement == 1.0
    assert report.agreement.top5_contains_top1 == 1.0


def test_gates_on_agreement_and_kl_fail_naming_the_rule_and_still_write(tiny_llama, data, tmp_path):
    out = tmp_path / "out"
    report = pipeline.run(
        spec(tiny_llama, data, layers=3, gate_kl=0.0, gate_agreement=100.0, generation_prompts=0),
        output_dir=out,
    )
    assert report.generation is None
    assert not report.gate.passed
    rules = {r.name: r for r in report.gate.rules}
    assert not rules["kl"].passed and rules["kl"].comparison == "<="
    assert not rules["top1_agreement_pct"].passed
    assert rules["top1_agreement_pct"].value == pytest.approx(100 * report.agreement.top1_agreement)
    assert (out / "report.json").is_file() and (out / "config.json").is_file()
    passing = pipeline.run(
        spec(tiny_llama, data, layers=3, gate_agreement=0.0, generation_prompts=0),
        output_dir=tmp_path / "pass",
    )
    assert passing.gate.passed


def test_unknown_task_is_refused_before_the_model_loads(data, task_dir, tmp_path):
    missing_model = tmp_path / "no-such-model"  # loading it would be a different error
    with pytest.raises(InputError, match=r"unknown lm-eval task\(s\) \['nope_task'\]"):
        pipeline.run(
            spec(missing_model, data, layers=2, tasks=["nope_task"], task_dir=str(task_dir)),
            output_dir=tmp_path / "o",
        )
    with pytest.raises(InputError, match="no-such-dir: no such directory"):
        pipeline.run(
            spec(
                missing_model, data, layers=2, tasks=[TASK], task_dir=str(tmp_path / "no-such-dir")
            ),
            output_dir=tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()


def test_a_task_gate_naming_a_task_that_does_not_run_is_refused(data):
    with pytest.raises(ValidationError, match="names task 'arc_easy', which is not among"):
        CompressSpec(data=data, layers=2, tasks=["hellaswag"], gate_task_retained={"arc_easy": 90})
    with pytest.raises(ValidationError, match="gate_task_retained needs tasks"):
        CompressSpec(data=data, layers=2, gate_task_retained={"*": 90})


def test_the_agreement_reference_is_cached_with_the_baseline(tiny_llama, data, tmp_path):
    import linearize.cache

    runs = [
        pipeline.run(
            spec(tiny_llama, data, layers=2, generation_prompts=0), output_dir=tmp_path / name
        )
        for name in ("a", "b")
    ]
    assert runs[1].agreement == runs[0].agreement
    assert "agreement_reference" not in runs[1].timings  # neither a pass nor the baseline's
    files = list(linearize.cache.cache_dir().glob("*/reference-top64.safetensors"))
    assert files
    for file in files:
        file.unlink()  # a cache entry without its reference: one pass of the original
    again = pipeline.run(
        spec(tiny_llama, data, layers=2, generation_prompts=0), output_dir=tmp_path / "c"
    )
    assert again.timings["agreement_reference"] > 0
    assert again.agreement == runs[0].agreement
