"""Slow end to end on the real bundled SmolLM2-135M with the shared wikitext (minutes on 2 cores)."""

import math

import pytest

pytestmark = pytest.mark.slow


def bundled_spec(wikitext_path, **overrides):
    from api_schemas import CompressSpec, DataSpec

    return CompressSpec(
        model="smollm2-135m",
        data=DataSpec(path=str(wikitext_path)),
        layers=2,
        calib_tokens=2048,
        eval_tokens=2048,
        seq_len=512,
        # `auto` measures fit against remove only on a resident job (a streamed one is the fit),
        # so the resident and streamed runs compared below both name the method.
        method="fit",
        # Heal on the 3 fit windows for 8 steps (~2 s each here): these tests are about the
        # end-to-end run, and the default healing (up to 64k tokens, 60 s) adds a teacher pass
        # of a minute or more on 2 cores; a step cap also heals the resident and streamed runs
        # alike. 4 generation prompts: the check runs, in a quarter of the default's time.
        **{"heal_tokens": 1536, "heal_steps": 8, "generation_prompts": 4, **overrides},
    )


@pytest.fixture(scope="module")
def report_and_dir(tmp_path_factory, wikitext_path):
    from linearize import pipeline

    out = tmp_path_factory.mktemp("bundled") / "ckpt"
    return pipeline.run(bundled_spec(wikitext_path), output_dir=out), out


def test_bundled_model_report_numbers_are_sane(report_and_dir):
    report, _ = report_and_dir
    ppl = report.perplexity
    assert all(math.isfinite(v) for v in (ppl.baseline, ppl.compressed, ppl.reloaded))
    assert ppl.compressed >= ppl.baseline
    assert ppl.reloaded == ppl.compressed  # measured once, on the reloaded checkpoint
    assert ppl.validation_reloaded == pytest.approx(ppl.validation_compressed, rel=1e-4)
    assert report.model.layers_before == 30 and report.model.layers_after == 28
    assert 15 < ppl.baseline < 60  # SmolLM2-135M on wikitext: ~26 at 8k tokens
    scores = [row.score for row in report.linearity]
    assert len(scores) == 30 and max(scores[10:25]) > 0.99
    # Two of 30 layers replaced: the model still mostly predicts like the original.
    a = report.agreement
    assert a.positions == 4 * 511 and 0 < a.kl < 2
    assert 0.3 < a.top1_agreement <= a.top5_contains_top1 <= 1
    assert report.generation.prompts == 4 and len(report.generation.pairs) == 3
    # 30 -> 28 layers: the LM head and embedding stay, so the FLOPs allow less than 30/28.
    t = report.throughput
    assert t.repeats == 5 and 1.0 < t.expected_speedup < 30 / 28
    assert (t.flag is None) == (t.measured_speedup <= 1.1 * t.expected_speedup)


def test_bundled_checkpoint_loads_with_plain_transformers(report_and_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = report_and_dir
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 28
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5


def test_gguf_is_converted_once_and_read_back_identically(tmp_path, monkeypatch):
    import torch

    from linearize.loading import load_model

    monkeypatch.setenv("LINEARIZE_CACHE_DIR", str(tmp_path / "cache"))
    first = load_model("smollm2-135m")
    (converted,) = (tmp_path / "cache" / "gguf").iterdir()
    second = load_model("smollm2-135m")
    assert second.model.config._name_or_path == str(converted)
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    text = "Hello world,\n  the 1999 film — ünïcode\ttabs"
    assert first.tokenizer(text).input_ids == second.tokenizer(text).input_ids
    # A damaged copy is ignored (and the GGUF converted again), never trusted.
    for weights in converted.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    third = load_model("smollm2-135m")
    assert third.model.config._name_or_path != str(converted)
    assert torch.equal(third.model.state_dict()["lm_head.weight"], first_state["lm_head.weight"])
    fourth = load_model("smollm2-135m")  # ... and replaced by a good copy
    assert fourth.model.config._name_or_path == str(converted)
    assert torch.equal(fourth.model.state_dict()["lm_head.weight"], first_state["lm_head.weight"])


def test_bundled_model_streamed_gives_the_resident_result(report_and_dir, tmp_path, wikitext_path):
    """The same spec, one decoder layer at a time from the converted shards (the GGUF source
    is streamed through its cached safetensors copy)."""
    from linearize import pipeline

    resident, _ = report_and_dir
    # 500 MB, under the 538 MB of weights: the memory plan counts the 113 MB embeddings, the
    # statistics, the logits and the healing state too (its least for this model is 320 MiB),
    # and this budget leaves it the resident run's 4-window batches, so the two runs sum in the
    # same order (at 400 MB it picks smaller batches: the scores then differ by ~1e-6).
    spec = bundled_spec(wikitext_path, streaming="on", memory_budget="500MB")
    streamed = pipeline.run(spec, output_dir=tmp_path / "s")
    assert streamed.execution.mode == "streamed" and resident.execution.mode == "resident"
    batch = "forward (one batch)"  # the plan's bytes for one batch: the same batches as resident
    assert streamed.execution.memory_plan[batch] == resident.execution.memory_plan[batch]
    assert streamed.throughput is None  # two models are not timed on a streamed budget
    assert any(note.startswith("throughput not measured") for note in streamed.notes)
    assert streamed.replaced_layers == resident.replaced_layers
    for a, b in zip(resident.linearity, streamed.linearity, strict=True):
        assert b.score == pytest.approx(a.score, rel=1e-6)
    assert streamed.perplexity.baseline == pytest.approx(resident.perplexity.baseline, rel=1e-3)
    assert streamed.perplexity.before_healing == pytest.approx(
        resident.perplexity.before_healing, rel=1e-3
    )
