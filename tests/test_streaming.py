"""Streamed execution: one decoder layer at a time from the shards gives the resident results,
under a memory budget, with activation caches that spill to disk and are always removed."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_CONFIGS, build_tiny_tokenizer, save_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from api_schemas import CompressSpec, DataSpec, EvalSpec
from linearize import pipeline
from linearize.activations import ActivationCache, Spill
from linearize.data import find_wikitext
from linearize.errors import BudgetError, Cancelled
from linearize.memory_plan import Workload, least_plan
from linearize.placement import checkpoint_sizes, model_shape
from linearize.weights import STANDARD_PREFIX, ShardedWeights

SMALL = dict(calib_tokens=2048, seq_len=128, eval_tokens=1024, heal_steps=10, use_cache=False)


@pytest.fixture(scope="module")
def data():
    return DataSpec(path=str(find_wikitext()))


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    """A tiny llama written in several shards, the way big checkpoints arrive."""
    directory = tmp_path_factory.mktemp("models") / "llama"
    save_tiny_model("llama", directory, initializer_range=0.3)
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(directory, max_shard_size="60KB")
    (directory / "model.safetensors").unlink(missing_ok=True)
    return directory


def compress(model, data, out, **kw):
    spec = CompressSpec(model=str(model), data=data, **{**SMALL, "layers": 2, **kw})
    return pipeline.run(spec, output_dir=out)


def test_the_tiny_model_is_sharded(sharded_llama):
    assert len(list(sharded_llama.glob("model-*.safetensors"))) > 3


@pytest.mark.parametrize("fmt", ["standard", "linear"])
def test_streamed_and_resident_runs_agree(sharded_llama, data, tmp_path, fmt):
    resident = compress(sharded_llama, data, tmp_path / "r", streaming="off", format=fmt)
    streamed = compress(
        sharded_llama, data, tmp_path / "s", streaming="on", format=fmt, heal_steps=40
    )
    assert resident.execution.mode == "resident" and streamed.execution.mode == "streamed"
    assert streamed.replaced_layers == resident.replaced_layers
    for a, b in zip(resident.linearity, streamed.linearity, strict=True):
        assert b.score == pytest.approx(a.score, rel=1e-6)
        assert b.validation_error == pytest.approx(a.validation_error, rel=1e-6)
    rp, sp = resident.perplexity, streamed.perplexity
    assert sp.baseline == pytest.approx(rp.baseline, rel=1e-3)
    assert sp.before_healing == pytest.approx(rp.before_healing, rel=1e-3)
    healing = streamed.selection["healing"]
    assert healing["loss"].startswith("MSE of the hidden states") and healing["steps"] == 40
    assert healing["trained_parameters"] == resident.selection["healing"]["trained_parameters"]
    assert resident.selection["healing"]["loss"].startswith("centred-logit MSE")
    # The streamed checkpoint is a real checkpoint: an independent eval reproduces its figure.
    again = pipeline.run(
        EvalSpec(model=str(tmp_path / "s"), data=data, eval_tokens=1024, seq_len=128)
    )
    assert again.perplexity.baseline == pytest.approx(sp.compressed, rel=1e-5)
    if fmt == "standard":
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
        assert model.config.num_hidden_layers == 4


def test_a_budget_that_trains_no_neighbour_heals_the_fold_target_against_the_span_output(
    sharded_llama, data, tmp_path
):
    sizes = checkpoint_sizes(sharded_llama, STANDARD_PREFIX, "auto")
    work = Workload(seq_len=128, activation_tokens=0, heal=True)
    least = least_plan(model_shape(sizes), work, 0, streamed=True).total
    budget = least + 2 * sizes["largest_layer"]  # a trained layer costs 5: no room for one
    report = compress(sharded_llama, data, tmp_path / "s", memory_budget=str(budget))
    healing = report.selection["healing"]
    assert report.execution.mode == "streamed" and healing["neighbour_layers"] == 0
    target = min(report.replaced_layers) - 1
    # The teacher's target is the hidden state after the span: what the fold target computes.
    assert healing["segment"] == [target, target]


def test_a_streamed_heal_on_more_than_the_fit_windows_runs_its_own_teacher_pass(
    sharded_llama, data, tmp_path
):
    streamed = compress(sharded_llama, data, tmp_path / "s", streaming="on", heal_tokens=4096)
    healing = streamed.selection["healing"]
    assert streamed.execution.mode == "streamed"
    assert healing["heal_tokens"] == 4096 and healing["heal_windows"] == 32
    assert healing["loss"].startswith("MSE of the hidden states") and healing["steps"] == 10
    assert "teacher" in streamed.timings


def test_a_streamed_removal_heals_from_the_layer_before_the_span_like_a_resident_one(
    sharded_llama, data, tmp_path
):
    resident = compress(
        sharded_llama, data, tmp_path / "r", streaming="off", method="remove", heal_steps=0
    )
    streamed = compress(sharded_llama, data, tmp_path / "s", streaming="on", method="remove")
    assert streamed.replaced_layers == resident.replaced_layers
    assert streamed.perplexity.before_healing == pytest.approx(
        resident.perplexity.compressed, rel=1e-3
    )
    healing = streamed.selection["healing"]
    first, last = min(streamed.replaced_layers), max(streamed.replaced_layers)
    # The teacher's target is the hidden state 4 layers from the cut (the layer before the
    # span standing for it), capped at the last layer: positions counted after the removal.
    end = min(last + 3, 5)
    assert healing["segment"] == [first - 1, end - len(streamed.replaced_layers)]
    assert healing["loss"].startswith("MSE of the hidden states") and healing["steps"] == 10
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert model.config.linearize["removed"] == streamed.replaced_layers


def test_a_changed_layer_is_kept_in_memory_and_written_not_reread(sharded_llama, tmp_path):
    from linearize.checkpoint import write_model
    from linearize.placement import open_stack

    loaded, placement = open_stack(str(sharded_llama), streaming="on", device="cpu")
    stack = loaded.stack
    assert placement.mode == "streamed" and stack.layers[3].mlp.down_proj.weight.is_meta
    layer = stack.prepare(3)
    stack.keep(layer)
    with torch.no_grad():
        layer.mlp.down_proj.weight.fill_(0.5)
    stack.release(3)
    stack.release(2)  # an untouched layer goes back to the shards
    assert stack.layers[2].mlp.down_proj.weight.is_meta
    assert torch.all(stack.prepare(3).mlp.down_proj.weight == 0.5)
    stack.release(3)
    (tmp_path / "w").mkdir()
    write_model(stack, tmp_path / "w", shard_size="50KB")
    written = ShardedWeights.open(tmp_path / "w")
    down = written.read(["model.layers.3.mlp.down_proj.weight"])
    assert torch.all(down["model.layers.3.mlp.down_proj.weight"] == 0.5)
    original = ShardedWeights.open(sharded_llama)
    key = "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(written.read([key])[key], original.read([key])[key])


def test_healing_refuses_parameters_that_are_not_loaded(sharded_llama):
    from linearize.healing import TeacherCache, heal
    from linearize.placement import open_stack

    loaded, _ = open_stack(str(sharded_llama), streaming="on", device="cpu")
    stale = [loaded.stack.layers[1].mlp.down_proj.weight]  # still in the shards
    teacher = TeacherCache(1, None, None, "hidden")
    with pytest.raises(ValueError, match="not loaded"):
        heal(loaded.stack, teacher, torch.zeros(2, 8), stale, last=1, max_steps=1, max_seconds=1)


def test_without_healing_streamed_and_resident_checkpoints_are_the_same_model(
    sharded_llama, data, tmp_path
):
    resident = compress(sharded_llama, data, tmp_path / "r", streaming="off", heal_steps=0)
    streamed = compress(sharded_llama, data, tmp_path / "s", streaming="on", heal_steps=0)
    assert streamed.perplexity.compressed == pytest.approx(resident.perplexity.compressed, rel=1e-3)
    # Only the resident run holds both models to time them; the streamed one says why it did not.
    assert resident.throughput.repeats == 5 and streamed.throughput is None
    assert "throughput not measured: the job streamed its layers" in streamed.notes
    a = ShardedWeights.open(tmp_path / "r")
    b = ShardedWeights.open(tmp_path / "s")
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.entries:
        torch.testing.assert_close(b.read([key])[key], a.read([key])[key], rtol=1e-5, atol=1e-6)


def test_a_budget_smaller_than_one_layer_is_refused_before_any_work(sharded_llama, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "linearize", "compress", "--model", str(sharded_llama),
         "--data", str(find_wikitext()), "--layers", "2", "--output", str(out),
         "--memory-budget", "10KB", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "smaller than the least this job needs" in result.stderr
    assert not out.exists()
    with pytest.raises(BudgetError, match="give at least"):
        compress(sharded_llama, DataSpec(path=str(find_wikitext())), out, memory_budget="1KB")


def test_a_bad_memory_size_is_rejected_by_the_spec(data):
    with pytest.raises(ValueError, match="memory_budget"):
        CompressSpec(model="m", data=data, layers=1, memory_budget="lots")


def spill_files(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "spill").rglob("*") if p.is_file()]


def test_activation_caches_spill_to_disk_when_told_and_are_removed(
    sharded_llama, data, tmp_path, monkeypatch
):
    monkeypatch.setenv("LINEARIZE_CACHE_DIR", str(tmp_path / "cache"))
    seen = []

    def watch(event):
        seen.append(len(spill_files(tmp_path / "cache")))

    spec = CompressSpec(
        model=str(sharded_llama), data=data, **{**SMALL, "layers": 2}, host_budget="0"
    )
    spilled = pipeline.run(spec, output_dir=tmp_path / "spilled", progress=watch)
    assert spilled.execution.spilled_caches >= 3
    assert max(seen) >= 3, "the caches were files on disk while the job ran"
    assert spill_files(tmp_path / "cache") == []
    plain = compress(sharded_llama, data, tmp_path / "plain")
    assert plain.execution.spilled_caches == 0
    assert spilled.perplexity.compressed == pytest.approx(plain.perplexity.compressed, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_spilled_cache_holds_what_a_host_cache_holds_and_maps_nothing(tmp_path, dtype):
    states = torch.randn(7, 5, 3).to(dtype)  # (n_windows, S, d)
    with Spill(parent=tmp_path, always=True) as spill:
        disk = ActivationCache(7, 5, 3, dtype=dtype, device="cpu", place="disk", spill=spill)
        host = ActivationCache(7, 5, 3, dtype=dtype, device="cpu", place="host")
        for start in range(0, 7, 3):  # batches of 3, the last one short, as a pass writes them
            disk[start : start + 3] = states[start : start + 3]
            host[start : start + 3] = states[start : start + 3]
        assert disk.path.stat().st_size == 7 * 5 * 3 * dtype.itemsize
        assert str(disk.path) not in Path("/proc/self/maps").read_text()  # read, not mapped
        assert torch.equal(disk[2:6], states[2:6]) and torch.equal(disk[:], host[:])
        pick = torch.tensor([6, 0, 6, 3])  # healing draws windows with repeats
        assert torch.equal(disk[pick], states[pick]) and torch.equal(host[pick], states[pick])
        with pytest.raises(ValueError, match="cannot write"):
            disk[0:2] = states[0:3]
        path = disk.path
        disk.close()
        assert not path.exists()


@pytest.mark.parametrize("failure", ["cancelled", "failed"])
def test_spilled_files_are_removed_when_the_job_stops_early(
    sharded_llama, data, tmp_path, monkeypatch, failure
):
    monkeypatch.setenv("LINEARIZE_CACHE_DIR", str(tmp_path / "cache"))
    seen = []

    def stop_in_the_fit_pass(event):
        seen.append(len(spill_files(tmp_path / "cache")))
        if event.stage == "fit" and event.current > 0:
            raise Cancelled("cancelled") if failure == "cancelled" else RuntimeError("boom")

    spec = CompressSpec(
        model=str(sharded_llama), data=data, **{**SMALL, "layers": 2}, host_budget="0"
    )
    with pytest.raises((Cancelled, RuntimeError)):
        pipeline.run(spec, output_dir=tmp_path / "out", progress=stop_in_the_fit_pass)
    assert max(seen) > 0
    assert spill_files(tmp_path / "cache") == []
    assert not (tmp_path / "out").exists()


# --- a model of a few hundred MB under a third of its size ------------------------------------

PEAK_SCRIPT = """
import json, sys
import torch  # noqa: F401  (the baseline: torch, the model's code and linearize, nothing run)
import transformers.models.llama.modeling_llama  # noqa: F401
import linearize  # noqa: F401
if len(sys.argv) > 1:
    from linearize.cli import main
    code = main(sys.argv[1:])
    assert code == 0, code
from linearize.memory import peak_rss_bytes  # VmHWM: this process's own peak, not its parent's
print(json.dumps({"peak": peak_rss_bytes()}))
"""


def write_big_llama(directory: Path, layers: int = 32) -> int:
    """A random-init Llama of ~420 MB (d = 512, vocabulary 4096, 32 layers) in shards of
    60 MB; weight bytes."""
    config = AutoConfig.for_model(
        "llama",
        **{**TINY_CONFIGS["llama"], "hidden_size": 512, "intermediate_size": 1376,
           "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8,
           "vocab_size": 4096},
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, max_shard_size="60MB")
    build_tiny_tokenizer().save_pretrained(directory)
    return ShardedWeights.open(directory).total_bytes


def peak_of(args: list[str], cwd: Path, env: dict | None = None) -> int:
    """The VmHWM of a child that imports what PEAK_SCRIPT imports and runs the CLI on args,
    with this checkout's linearize first on its path (the venv may point at another)."""
    root = str(Path(pipeline.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, *args], capture_output=True, text=True,
        timeout=1200, cwd=cwd, env={**os.environ, "PYTHONPATH": path, **(env or {})},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["peak"]


@pytest.fixture
def scratch(tmp_path):
    """Where the big model, its checkpoint and the spill go: memory-backed when the host has
    /dev/shm (writing 800 MB to a slow disk took minutes). Pages of a mapped tmpfs file count
    in the resident set like those of a disk file, and spill files are never mapped."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="linearize-test-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_a_streamed_compress_under_a_third_of_its_weights_peaks_within_the_budget(scratch):
    """Issue 23: the budget bounds the process. A streamed compress of a sharded 420 MB model
    under a budget of a third of its weights peaks within the budget plus an empty process that
    imported torch, transformers' Llama code and linearize. The plan fills the budget and the
    report states it beside the measured peak."""
    weights = write_big_llama(scratch / "big")
    assert len(list((scratch / "big").glob("model-*.safetensors"))) >= 6
    baseline = peak_of([], scratch)
    budget = weights // 3
    peak = peak_of(
        ["compress", "--model", str(scratch / "big"), "--data", str(find_wikitext()),
         "--layers", "2", "--calib-tokens", "1024", "--eval-tokens", "128", "--seq-len", "128",
         "--heal-steps", "0", "--generation-prompts", "0", "--no-cache", "--quiet",
         "--memory-budget", str(budget), "--output", "s", "--report", "s.json"],
        scratch, env={"LINEARIZE_CACHE_DIR": str(scratch / "cache")},
    )  # fmt: skip
    execution = json.loads((scratch / "s.json").read_text())["execution"]
    assert execution["mode"] == "streamed"
    assert peak <= budget + baseline, (peak, budget, baseline)
    plan = execution["memory_plan"]
    assert sum(plan.values()) == execution["planned_peak_bytes"] <= budget
    assert plan["LM head"] == plan["embeddings and final norm"] - 512 * 4  # the final norm
    assert execution["start_memory_bytes"] < execution["peak_memory_bytes"] <= peak
    # every stage's rise is in the peak, and the stage named as reaching it raised it
    assert 0 < sum(execution["peak_rises"].values()) <= execution["peak_memory_bytes"]
    assert execution["peak_rises"][execution["peak_stage"]] > 0
    summary = (scratch / "s" / "report.md").read_text()
    assert "planned peak (total)" in summary and "measured peak" in summary
    assert f"| **stage that reached the peak** | {execution['peak_stage']} |" in summary


def test_a_budget_under_the_plans_least_names_every_item(sharded_llama, data, tmp_path):
    sizes = checkpoint_sizes(sharded_llama, STANDARD_PREFIX, "auto")
    budget = sizes["trunk"] + sizes["head"] + 2 * sizes["largest_layer"] + 2**20
    with pytest.raises(BudgetError) as caught:
        compress(sharded_llama, data, tmp_path / "s", memory_budget=str(budget))
    message = str(caught.value)
    for item in ("embeddings and final norm", "LM head", "decoder layers (2 held)",
                 "statistics (d x d float64)", "logits (one head step)", "healing state",
                 "checkpoint writer (one shard)", "process reserve"):  # fmt: skip
        assert item in message
    assert not (tmp_path / "s").exists()
