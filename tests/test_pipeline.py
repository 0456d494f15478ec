"""The pipeline end to end on tiny random models: reports, checkpoints from disk, gates, errors."""

import copy
import json

import pytest
import torch
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from api_schemas import AnalyzeSpec, CompressSpec, DataSpec, EvalSpec
from linearize import pipeline
from linearize.data import find_wikitext
from linearize.errors import (
    BudgetError,
    Cancelled,
    InputError,
    OutputExistsError,
    VerificationError,
)
from linearize.selection import select_least_influential, select_window
from linearize.throughput import forward_flops_per_token

SMALL = dict(calib_tokens=2048, seq_len=128)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    # A wider init than HF's default makes the blocks matter, so removing them costs perplexity.
    return save_tiny_model(
        "llama", tmp_path_factory.mktemp("models") / "llama", initializer_range=0.3
    )


@pytest.fixture(scope="module")
def data():
    return DataSpec(path=str(find_wikitext()))


def compress_spec(model, data, **kw):
    # A short healing budget keeps the suite fast; the default budget is exercised end to end
    # on the bundled model (test_bundled_model.py).
    return CompressSpec(
        model=str(model), data=data, eval_tokens=1024, **{**SMALL, "heal_steps": 20, **kw}
    )


@pytest.mark.parametrize("fmt", ["standard", "linear"])
def test_compress_writes_a_checkpoint_that_reloads_to_the_same_perplexity(
    tiny_llama, data, tmp_path, fmt
):
    out = tmp_path / "out"
    report = pipeline.run(compress_spec(tiny_llama, data, layers=2, format=fmt), output_dir=out)
    ppl = report.perplexity
    assert ppl.validation_reloaded == pytest.approx(ppl.validation_compressed, rel=1e-5)
    assert ppl.increase_pct == pytest.approx(100 * (ppl.compressed / ppl.baseline - 1))
    # The reported figure is the published checkpoint's: an independent eval job agrees.
    again = pipeline.run(EvalSpec(model=str(out), data=data, eval_tokens=1024, seq_len=128))
    assert again.perplexity.baseline == pytest.approx(ppl.compressed, rel=1e-5)
    first, second = report.replaced_layers
    assert second == first + 1, "the default replaces one span of adjacent layers"
    assert 0 not in report.replaced_layers and 5 not in report.replaced_layers
    scores = [1 - row.validation_error for row in report.linearity]
    assert report.replaced_layers == select_window(scores, 2, 6)
    assert len(report.linearity) == 6
    saved = json.loads((out / "report.json").read_text())
    assert saved["schema_version"] == "1.0" and saved["format"] == fmt
    for name in ("README.md", "report.md", "linearize.json", "linearity_profile.png"):
        assert (out / name).is_file(), name
    if fmt == "standard":
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.config.num_hidden_layers == 4
        # Throughput: interleaved runs of both, next to the FLOPs ratio of the two checkpoints.
        t, original = report.throughput, AutoModelForCausalLM.from_pretrained(tiny_llama)
        assert t.repeats == len(t.runs_before) == len(t.runs_after) == 5
        assert t.expected_speedup == pytest.approx(
            forward_flops_per_token(original, 128) / forward_flops_per_token(model, 128)
        )
        assert report.model.layers_after == 4
        assert report.model.params_after < report.model.params_before
    else:
        assert report.model.extra_params > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging left behind"


def test_healing_is_reported_with_the_perplexity_before_it(tiny_llama, data, tmp_path):
    report = pipeline.run(compress_spec(tiny_llama, data, layers=2), output_dir=tmp_path / "o")
    healing = report.selection["healing"]
    assert healing["steps"] == 20
    assert report.perplexity.before_healing is not None
    assert report.method == "fold-lstsq+heal"
    if healing["kept"] == "healed":
        assert healing["validation_after"] < healing["validation_before"]
        assert report.perplexity.validation_compressed == healing["validation_after"]
    else:
        assert report.perplexity.validation_compressed == healing["validation_before"]
    off = pipeline.run(
        compress_spec(tiny_llama, data, layers=2, heal_steps=0), output_dir=tmp_path / "off"
    )
    assert "healing" not in off.selection and off.perplexity.before_healing is None
    assert off.perplexity.compressed == pytest.approx(report.perplexity.before_healing)


def _layer_weights(model, position: int) -> dict:
    return {n: t.detach().clone() for n, t in model.model.layers[position].state_dict().items()}


def test_remove_drops_the_span_and_heals_the_layer_before_it(tiny_llama, data, tmp_path):
    from linearize.surgery import remove_layers

    off = pipeline.run(
        compress_spec(tiny_llama, data, layers=2, method="remove", heal_steps=0),
        output_dir=tmp_path / "off",
    )
    assert off.method == "remove"
    # A fit takes the window its maps fit best; a removal the layers that change least.
    cosines = [row.cosine_in_out for row in off.linearity]
    assert off.replaced_layers == select_least_influential(cosines, 2, 6)
    assert off.selection["ranking"][:2] == sorted(off.replaced_layers, key=lambda i: -cosines[i])
    # Unhealed, the checkpoint is exactly the original model without the span's layers.
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    reference = remove_layers(copy.deepcopy(original), off.replaced_layers)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "off")
    assert reloaded.config.linearize["removed"] == off.replaced_layers
    assert reloaded.config.linearize["folds"] == []
    card = (tmp_path / "off" / "README.md").read_text()
    assert "layers removed" in card and "healed" not in card.split("| metric")[0]
    ids = torch.randint(0, reloaded.config.vocab_size, (2, 32), generator=torch.Generator())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits)

    # 80 steps: on this random model 20 do not improve the validation slice yet.
    healed = pipeline.run(
        compress_spec(tiny_llama, data, layers=2, method="remove", heal_steps=80),
        output_dir=tmp_path / "h",
    )
    assert healed.method == "remove+heal"
    assert healed.perplexity.before_healing == pytest.approx(off.perplexity.compressed, rel=1e-5)
    healing = healed.selection["healing"]
    before = min(healed.replaced_layers) - 1
    assert healing["segment"] == [before, 3] and healing["kept"] == "healed"
    assert healing["steps"] == 80
    card = (tmp_path / "h" / "README.md").read_text()
    assert "layers removed" in card and "replaced by fitted linear maps" not in card
    assert healing["validation_after"] < healing["validation_before"]
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    # The layer before the span healed (its MLP output projection among them); the layers
    # before it did not move.
    trained = _layer_weights(after, before)
    untouched = _layer_weights(original, before)
    assert not torch.equal(trained["mlp.down_proj.weight"], untouched["mlp.down_proj.weight"])
    for position in range(before):
        for name, tensor in _layer_weights(after, position).items():
            assert torch.equal(tensor, _layer_weights(original, position)[name]), name


def test_remove_is_refused_with_the_linear_format_and_at_layer_zero(tiny_llama, data, tmp_path):
    with pytest.raises(ValueError, match="method=remove drops the span"):
        compress_spec(tiny_llama, data, layers=2, method="remove", format="linear")
    with pytest.raises(ValueError, match="method"):
        compress_spec(tiny_llama, data, layers=2, method="prune")
    with pytest.raises(InputError, match="starts at layer 0"):
        pipeline.run(
            compress_spec(tiny_llama, data, indices=[0, 1], method="remove"),
            output_dir=tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()


def test_explicit_indices_are_replaced_in_both_formats(tiny_llama, data, tmp_path):
    report = pipeline.run(
        compress_spec(tiny_llama, data, indices=[2, 3], format="linear"), output_dir=tmp_path / "o"
    )
    assert report.replaced_layers == [2, 3]


def test_target_ppl_increase_searches_and_reports_its_trace(tiny_llama, data, tmp_path):
    report = pipeline.run(
        compress_spec(tiny_llama, data, target_ppl_increase=5.0), output_dir=tmp_path / "o"
    )
    trace = report.selection["trace"]
    assert report.selection["mode"] == "target_ppl_increase"
    chosen = [t for t in trace if t["indices"] == report.replaced_layers]
    assert chosen and chosen[0]["validation_increase_pct"] <= 5.0
    failing = [t for t in trace if not t["passed"]]
    assert all(t["k"] > len(report.replaced_layers) for t in failing)


def test_a_checkpoint_that_does_not_reload_to_the_same_model_is_not_published(
    tiny_llama, data, tmp_path, monkeypatch
):
    import linearize.checkpoint

    real_load = linearize.checkpoint.load

    def corrupted_load(path, **kw):
        model = real_load(path, **kw)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(1.5)  # what a bad save would do
        return model

    monkeypatch.setattr(linearize.checkpoint, "load", corrupted_load)
    out = tmp_path / "out"
    with pytest.raises(VerificationError, match="validation perplexity"):
        pipeline.run(compress_spec(tiny_llama, data, layers=2), output_dir=out)
    assert not out.exists() or not any(out.iterdir()), "a failed check must publish nothing"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging left behind"


def test_gate_failure_still_writes_artifacts(tiny_llama, data, tmp_path):
    report = pipeline.run(
        compress_spec(tiny_llama, data, layers=3, gate_ppl_increase=0.0), output_dir=tmp_path / "o"
    )
    assert report.perplexity.increase_pct > 0
    assert report.gate is not None and report.gate.passed is False
    assert (tmp_path / "o" / "report.json").is_file()


def test_non_empty_output_is_refused_before_any_work(tiny_llama, data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--force"):
        pipeline.run(compress_spec(tiny_llama, data, layers=1), output_dir=out)
    assert (out / "keep.txt").read_text() == "user data"


def test_budget_above_layers_minus_two_names_the_limit(tiny_llama, data, tmp_path):
    with pytest.raises(BudgetError, match="at most L - 2 = 4"):
        pipeline.run(compress_spec(tiny_llama, data, layers=5), output_dir=tmp_path / "o")


def test_cancellation_stops_the_run_and_leaves_nothing(tiny_llama, data, tmp_path):
    def sink(event):
        if event.stage == "save":
            raise Cancelled("cancelled by test")

    with pytest.raises(Cancelled):
        pipeline.run(
            compress_spec(tiny_llama, data, layers=1), output_dir=tmp_path / "o", progress=sink
        )
    assert list(tmp_path.iterdir()) == []


def test_analyze_reports_every_layer_with_its_scores(tiny_llama, data, tmp_path):
    report = pipeline.run(
        AnalyzeSpec(model=str(tiny_llama), data=data, **SMALL),
        output_dir=tmp_path / "a",
        report_path=tmp_path / "r.json",
    )
    assert [row.index for row in report.linearity] == list(range(6))
    for row in report.linearity:
        assert 0 < row.score <= 1 and 0 < row.anisotropy <= 1
        assert row.intrinsic_dimension is not None and row.intrinsic_dimension > 0
    assert report.data.n_over_d == pytest.approx(1536 / 32)
    assert (tmp_path / "a" / "report.md").is_file() and (tmp_path / "r.json").is_file()


def test_planted_outlier_tokens_are_the_listed_trigger_tokens(tiny_llama, data):
    from linearize.activations import CachePlanner, Spill
    from linearize.analysis import analyze
    from linearize.data import build_windows, read_text
    from linearize.loading import load_model
    from linearize.stack import LayerStack

    loaded = load_model(str(tiny_llama))
    windows = build_windows(
        loaded.tokenizer, read_text(data.path), calib_tokens=8192, eval_tokens=None, seq_len=128
    )
    counts = torch.bincount(windows.validation.reshape(-1), minlength=260)
    n = windows.validation.numel()
    planted = int(torch.nonzero((counts >= 5) & (counts <= 0.008 * n))[0])
    model = loaded.model
    stack = LayerStack(model=model, device=torch.device("cpu"))
    sets = {"fit": windows.fit, "validation": windows.validation}

    def nonlinear_on_planted(_module, _args, output):
        name, rows = stack.current  # the layer-by-layer pass says which windows are running
        mask = (sets[name][rows] == planted).unsqueeze(-1).to(output.dtype)
        return output + 25.0 * mask * torch.sign(output)

    model.model.layers[2].register_forward_hook(nonlinear_on_planted)
    with Spill() as spill:
        planner = CachePlanner(stack.device, 1 << 40, spill)
        analysis, _, _ = analyze(stack, planner, windows, loaded.tokenizer)
    layer = analysis.layers[2]
    token = loaded.tokenizer.decode([planted])
    assert [t["token"] for t in layer["trigger_tokens"]] == [token] * 5
    others = [row["top1pct_residual_share"] for row in analysis.layers if row["index"] != 2]
    assert layer["top1pct_residual_share"] > 4 * max(others)


def test_second_run_reuses_baseline_and_analysis_from_the_cache(
    tiny_llama, data, tmp_path, monkeypatch
):
    monkeypatch.setenv("LINEARIZE_CACHE_DIR", str(tmp_path / "cache"))
    first = pipeline.run(
        compress_spec(tiny_llama, data, layers=1, heal_steps=0), output_dir=tmp_path / "a"
    )
    second = pipeline.run(
        compress_spec(tiny_llama, data, layers=2, heal_steps=0), output_dir=tmp_path / "b"
    )
    assert any("cache" in note for note in second.notes)
    assert "analyze" not in second.timings and "analyze" in first.timings
    assert second.perplexity.baseline == first.perplexity.baseline
    assert [r.score for r in second.linearity] == [r.score for r in first.linearity]
    fresh = pipeline.run(
        compress_spec(tiny_llama, data, layers=2, heal_steps=0, use_cache=False),
        output_dir=tmp_path / "c",
    )
    assert "analyze" in fresh.timings
    assert fresh.perplexity.compressed == pytest.approx(second.perplexity.compressed, rel=1e-6)


def test_heal_tokens_beyond_the_fit_windows_heal_on_more_windows_and_the_report_says_so(
    tiny_llama, data, tmp_path
):
    report = pipeline.run(
        compress_spec(tiny_llama, data, layers=2, heal_tokens=4096), output_dir=tmp_path / "o"
    )
    healing = report.selection["healing"]
    fit_windows = report.data.calib_windows - report.data.validation_windows
    assert fit_windows == 12
    assert healing["heal_windows"] == 32 and healing["heal_tokens"] == 32 * 128
    assert healing["heal_text"].endswith("after the calibration windows")
    assert "teacher" in report.timings  # the teacher's own pass over the healing windows
    assert report.data.calib_tokens == 2048  # the analysis and the fit saw calibration only


def test_default_healing_text_is_what_the_step_cap_can_draw(tiny_llama, data, tmp_path):
    report = pipeline.run(compress_spec(tiny_llama, data, layers=2), output_dir=tmp_path / "o")
    healing = report.selection["healing"]
    assert healing["steps"] == 20
    assert healing["heal_windows"] == 20 and healing["heal_tokens"] == 20 * 128
    assert healing["teacher_cache"] == "device"


def resident_budget_without_caches(model_dir) -> str:
    """The memory plan of the model resident with no room for an activation cache, plus 64 KB
    (less than any healing text's caches): every cache beyond it spills."""
    from linearize.memory_plan import Workload, plan_memory
    from linearize.placement import checkpoint_sizes, model_shape

    shape = model_shape(checkpoint_sizes(model_dir, "model", "auto"))
    plan = plan_memory(shape, Workload(seq_len=128, activation_tokens=0, heal=True), 0,
                       streamed=False)  # fmt: skip
    return str(plan.total + 64 * 1024)


def test_healing_text_over_the_memory_budget_spills_and_is_removed(tiny_llama, data, tmp_path):
    from linearize import cache

    spill = cache.cache_dir() / "spill"
    budget = resident_budget_without_caches(tiny_llama)
    report = pipeline.run(
        compress_spec(tiny_llama, data, layers=2, heal_tokens=8192, memory_budget=budget),
        output_dir=tmp_path / "o",
    )
    healing = report.selection["healing"]
    assert healing["heal_windows"] == 64 and healing["teacher_cache"] == "disk"
    assert report.execution.spilled_caches >= 2
    assert not spill.exists() or not any(spill.rglob("*.bin")), "spill files left behind"
    # The default under the same budget keeps the teacher off the disk: the fit windows.
    default = pipeline.run(
        compress_spec(tiny_llama, data, layers=2, memory_budget=budget), output_dir=tmp_path / "d"
    )
    assert default.selection["healing"]["heal_windows"] == 12
    assert any("would not fit the memory budget" in note for note in default.notes)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(heal_tokens=0), "greater than or equal to 1"),
        (dict(heal_tokens=100), "less than one window of seq_len=128"),
        (dict(heal_tokens=4096, heal_steps=0), "heal_steps=0 turns healing off"),
    ],
)
def test_bad_heal_tokens_are_refused_by_the_spec(data, settings, message):
    with pytest.raises(ValueError, match=message):
        CompressSpec(model="m", data=data, layers=2, seq_len=128, **settings)


def test_default_healing_text_is_bounded_by_steps_a_token_cap_and_memory(data):
    from types import SimpleNamespace

    stack = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(hidden_size=32)))
    stack.dtype = torch.float32
    per_token = 3 * 32 * 4  # the teacher pass's three caches, float32

    def text(steps, free=1 << 40):
        spec = compress_spec("m", data, layers=2, heal_steps=steps)
        planner = SimpleNamespace(device_free=free)
        job = SimpleNamespace(spec=spec, notes=[], planner=lambda _stack: planner)
        return pipeline.healing_text(job, stack), job.notes

    assert text(100)[0] == {"heal_tokens": 100 * 128, "heal_at_most": True}  # the step cap
    cap = pipeline.DEFAULT_HEAL_TOKENS
    assert text(10_000)[0] == {"heal_tokens": cap, "heal_at_most": True}
    assert text(100, free=2 * per_token * 4000)[0]["heal_tokens"] == 4000  # half the room
    fit_only, notes = text(100, free=2 * per_token * 1000)  # less than the 12 fit windows
    assert fit_only == {} and "would not fit the memory budget" in notes[0]
    assert text(10) == ({}, [])  # 10 steps draw fewer windows than the fit windows: no note
    explicit = compress_spec("m", data, layers=2, heal_tokens=8192)
    job = SimpleNamespace(spec=explicit, notes=[])
    assert pipeline.healing_text(job, stack) == {"heal_tokens": 8192}
