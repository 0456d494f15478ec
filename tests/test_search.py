"""`--layers max`: the search on planted quality curves, then end to end on a tiny model."""

import json

import pytest
from tiny_models import save_tiny_model

from api_schemas import CompressSpec, DataSpec
from linearize import cli, pipeline
from linearize.data import find_wikitext
from linearize.search import SearchBudget, search_largest_passing

# --- the search on planted curves ---------------------------------------------------------------


class Planted:
    """Fake measures: k passes unhealed iff k in `unhealed`, healed iff k in `healed`."""

    def __init__(self, unhealed, healed):
        self.passing = {False: set(unhealed), True: set(healed)}
        self.calls = []

    def probe(self, k):
        self.calls.append((k, False))
        return k in self.passing[False]

    def confirm(self, k):
        self.calls.append((k, True))
        return k in self.passing[True]


@pytest.mark.parametrize(
    ("unhealed", "healed", "largest", "monotone"),
    [
        ({1, 2}, {1, 2, 3, 4, 5}, 5, True),  # healing recovers three more layers
        ({1, 2, 3}, {1, 2, 3}, 3, True),  # healing recovers nothing
        ({1, 3}, {1, 2, 3, 4}, 4, False),  # a noisy probe at k = 2
        ({1, 2}, {1}, 1, False),  # healing fails at the bracket's own k: walk down
        ({1, 2, 3, 4, 5, 6, 7, 8}, set(range(1, 9)), 8, True),  # the whole range passes
    ],
)
def test_search_finds_the_largest_passing_k_on_planted_curves(unhealed, healed, largest, monotone):
    planted = Planted(unhealed, healed)
    outcome = search_largest_passing(8, planted.probe, planted.confirm)
    assert outcome.chosen == largest
    assert (not outcome.violations) == monotone
    assert outcome.stopped_by is None
    assert [(s.k, s.healed) for s in outcome.steps] == planted.calls
    assert (largest, True) in planted.calls, "the chosen k was measured healed"
    healed_ks = [k for k, healed in planted.calls if healed]
    top = max(outcome.lower, largest) + 1
    assert all(min(outcome.lower, largest) <= k <= top for k in healed_ks), "only at the boundary"


def test_search_without_healing_answers_from_the_probes():
    planted = Planted({1, 2, 3}, set())
    outcome = search_largest_passing(8, planted.probe, None)
    assert outcome.chosen == 3
    assert planted.calls == [(1, False), (2, False), (3, False), (4, False), (5, False)]


def test_search_reports_no_k_when_k_one_fails_healed():
    planted = Planted(set(), set())
    outcome = search_largest_passing(8, planted.probe, planted.confirm)
    assert outcome.chosen is None
    assert planted.calls == [(1, False), (2, False), (1, True)]


@pytest.mark.parametrize("trials", [1, 2, 3, 4])
def test_search_stays_inside_its_trial_budget_and_says_so(trials):
    planted = Planted({1, 2, 3, 4}, set(range(1, 9)))
    outcome = search_largest_passing(8, planted.probe, planted.confirm, SearchBudget(trials=trials))
    assert outcome.trials == len(planted.calls) == trials
    assert outcome.stopped_by == f"trial budget ({trials} trials)"
    assert any(healed for _, healed in planted.calls), "the last trial is a healed one"
    assert outcome.chosen == max(k for k, healed in planted.calls if healed)


def test_search_time_budget_still_heals_the_bracket_once():
    planted = Planted({1, 2, 3}, {1, 2, 3, 4})
    now = iter(range(100))  # each trial looks at the clock once; 3 s pass per look
    outcome = search_largest_passing(
        8, planted.probe, planted.confirm, SearchBudget(seconds=5), clock=lambda: 3 * next(now)
    )
    assert outcome.stopped_by == "time budget (5 s)"
    assert planted.calls[-1][1], "one healed trial, over the time budget, for the checkpoint"


@pytest.mark.parametrize(
    ("text", "budget"),
    [(None, SearchBudget()), ("8", SearchBudget(trials=8)), ("90s", SearchBudget(seconds=90))]
    + [("20m", SearchBudget(seconds=1200)), ("1.5h", SearchBudget(seconds=5400))],
)
def test_parse_search_budget_reads_trials_and_times(text, budget):
    assert SearchBudget.parse(text) == budget


# --- the spec -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return DataSpec(path=str(find_wikitext()))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layers": "max"}, "at least one of gate_ppl_increase"),
        ({"layers": 2, "dry_run": True}, "dry_run belongs to the search"),
        ({"layers": 2, "search_budget": "4"}, "search_budget belongs to the search"),
        ({"layers": "max", "gate_kl": 0.1, "search_budget": "4 trials"}, "search_budget"),
        ({"layers": "max", "gate_kl": 0.1, "search_budget": "0"}, "search_budget"),
        ({"layers": "most", "gate_kl": 0.1}, "layers"),
    ],
)
def test_max_layers_spec_refuses_what_the_search_cannot_do(data, fields, message):
    with pytest.raises(ValueError, match=message):
        CompressSpec(data=data, **fields)


def test_max_layers_without_a_gate_is_a_usage_error(tmp_path, capsys):
    code = cli.main(
        ["compress", "--model", "m", "--data", "d.txt", "--layers", "max", "--output", "o"]
    )
    assert code == cli.EXIT_INPUT
    assert "at least one of gate_ppl_increase" in capsys.readouterr().err


# --- end to end on a tiny model -----------------------------------------------------------------

SMALL = dict(calib_tokens=2048, seq_len=128, eval_tokens=1024, heal_steps=10, generation_prompts=0)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_model(
        "llama", tmp_path_factory.mktemp("models") / "llama", initializer_range=0.3
    )


def count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counted(*args, **kw):
        calls.append(name)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_max_layers_publishes_the_largest_passing_healed_k_with_its_curve(
    tiny_llama, data, tmp_path, monkeypatch
):
    import linearize.analysis
    import linearize.fitting
    import linearize.search

    analyses = count_calls(monkeypatch, linearize.analysis, "measure_layers")
    references = count_calls(monkeypatch, linearize.search, "validation_reference")
    fitted_spans = []
    real_fit_pass = linearize.fitting.fit_pass

    def fit_pass(stack, planner, spans, *args, **kw):
        fitted_spans.append(list(spans))  # [] for a teacher-only pass
        return real_fit_pass(stack, planner, spans, *args, **kw)

    monkeypatch.setattr(linearize.fitting, "fit_pass", fit_pass)
    spec = CompressSpec(
        model=str(tiny_llama),
        data=data,
        layers="max",
        gate_kl=0.6,  # on this model k = 1, 2 pass unhealed, k = 3, 4 fail
        use_cache=False,
        **SMALL,
    )
    out = tmp_path / "o"
    report = pipeline.run(spec, output_dir=out)
    assert analyses == ["measure_layers"], "one baseline and analysis pass for every trial"
    assert references == ["validation_reference"], "one reference pass for every trial"
    curve = report.curve
    # Every trial's k lies in 1..4 (FIT_BATCH): one fit pass fitted them all, probes and
    # healed trials alike (the healed trials' own passes collect only the teacher).
    assert max(p.k for p in curve) <= linearize.search.FIT_BATCH
    assert len([spans for spans in fitted_spans if spans]) == 1
    assert len(curve) == report.selection["trials"] >= 2
    chosen = [p for p in curve if p.chosen]
    assert len(chosen) == 1 and chosen[0].healed and chosen[0].passed
    assert chosen[0].k == report.selection["chosen_k"] == len(report.replaced_layers)
    assert chosen[0].layers == report.replaced_layers
    healed_passing = [p.k for p in curve if p.healed and p.passed]
    assert chosen[0].k == max(healed_passing)
    for point in curve:
        assert point.params_removed > 0 and point.params + point.params_removed > point.params
        assert point.passed == (point.kl <= 0.6)
    # method auto: a healed removal at the chosen k beside the fit; the better one is published.
    removal = [p for p in curve if p.method == "remove"]
    assert [(p.k, p.healed) for p in removal] == [(chosen[0].k, True)]
    assert report.method.startswith("remove" if chosen[0].method == "remove" else "fold")
    # The published checkpoint is the chosen trial's: its reload matches its trial figure.
    assert report.perplexity.validation_reloaded == pytest.approx(chosen[0].perplexity, rel=1e-4)
    assert report.model.params_after == chosen[0].params
    saved = json.loads((out / "report.json").read_text())
    assert len(saved["curve"]) == len(curve)
    assert (out / "perplexity_vs_layers.png").is_file()
    assert "## Size against quality" in (out / "report.md").read_text()


def test_max_layers_gate_failing_at_k_one_exits_one_with_the_curve(tiny_llama, tmp_path):
    out = tmp_path / "o"
    argv = ["compress", "--model", str(tiny_llama), "--data", str(find_wikitext())]
    argv += ["--calib-tokens", "2048", "--seq-len", "128", "--eval-tokens", "1024"]
    argv += ["--heal-steps", "5", "--generation-prompts", "0", "--quiet"]
    argv += ["--layers", "max", "--gate-kl", "0"]  # any change has a KL above 0
    assert cli.main([*argv, "--output", str(out)]) == cli.EXIT_GATE
    saved = json.loads((out / "report.json").read_text())
    assert saved["gate"]["passed"] is False
    assert saved["selection"]["chosen_k"] is None
    assert [(p["k"], p["healed"], p["passed"]) for p in saved["curve"]] == [
        (1, False, False),
        (2, False, False),
        (1, True, False),
    ]
    assert saved["replaced_layers"] == saved["curve"][-1]["layers"]
    markdown = (out / "report.md").read_text()
    assert "| 1 | healed | fit |" in markdown and "search     no k passes the gates" in markdown


def test_max_layers_dry_run_writes_the_predicted_curve_and_no_checkpoint(
    tiny_llama, data, tmp_path
):
    spec = CompressSpec(
        model=str(tiny_llama),
        data=data,
        layers="max",
        gate_agreement=50.0,
        dry_run=True,
        search_budget="3",
        **SMALL,
    )
    out = tmp_path / "o"
    report = pipeline.run(spec, output_dir=out)
    assert report.curve and not any(p.healed for p in report.curve)
    assert len(report.curve) <= 3
    assert report.selection["dry_run"] is True
    assert report.perplexity.compressed is None
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    assert not list(out.glob("*.safetensors")) and not (out / "config.json").exists()


def test_step_summary_shows_the_search_curve_as_a_table():
    from types import SimpleNamespace

    from linearize_client.commands import summary_markdown

    point = dict(params_removed=1000, kl=0.1, top1_agreement_pct=90.0, method="fit")
    report = {
        "model": {},
        "selection": {"chosen_k": 2},
        "curve": [
            dict(point, k=1, healed=False, ppl_increase_pct=5.0, passed=True, chosen=False),
            dict(point, k=2, healed=True, ppl_increase_pct=9.0, passed=True, chosen=True),
            dict(point, k=3, healed=True, ppl_increase_pct=21.5, passed=False, chosen=False),
        ],
    }
    job = SimpleNamespace(
        status="succeeded", kind="compress", id="job_1", attempts=1, spec=None, error=None
    )
    text = summary_markdown(job, report)
    assert "chosen k = 2" in text
    assert "| **2** | healed fit | 1,000 | +9.0 % | 0.1000 | 90.0 % | pass |" in text
    assert "| 3 | healed fit | 1,000 | +21.5 % | 0.1000 | 90.0 % | fail |" in text
