"""Progress: a stage that stops early (the healing time budget) shows the steps it did."""

import json

from tiny_models import save_tiny_model

from api_schemas import CompressSpec, DataSpec
from linearize import pipeline
from linearize.data import find_wikitext
from linearize.progress import Progress


def test_a_stopped_stage_keeps_its_count_and_says_why():
    events = []
    with Progress(events.append).stage("heal", total=400) as st:
        st.advance(57)
        st.stop("stopped after 57 of 400 steps: 60 s time budget")
    last = events[-1]
    assert (last.current, last.total) == (57, 400)
    assert last.message == "stopped after 57 of 400 steps: 60 s time budget"
    with Progress(events.append).stage("fit", total=10) as st:
        st.advance(3)
    assert (events[-1].current, events[-1].total) == (10, 10)  # a finished stage still fills


def test_healing_stopped_by_its_time_budget_reports_the_steps_done(tmp_path):
    model = save_tiny_model("llama", tmp_path / "m", initializer_range=0.3)
    events = []
    spec = CompressSpec(
        model=str(model),
        data=DataSpec(path=str(find_wikitext())),
        calib_tokens=2048,
        eval_tokens=1024,
        seq_len=128,
        layers=2,
        heal_steps=100000,
        heal_seconds=0.5,
        generation_prompts=0,
    )
    report = pipeline.run(spec, output_dir=tmp_path / "o", progress=events.append)
    healing = report.selection["healing"]
    assert healing["stopped_by"] == "0.5 s time budget"
    written = json.loads((tmp_path / "o" / "report.json").read_text())["selection"]["healing"]
    assert written["curve"][-1][0] == healing["steps"] and len(written["curve"]) <= 200
    steps = [e for e in events if e.stage == "heal" and e.total == 100000]
    assert steps[-1].current == healing["steps"] < 100000
    assert steps[-1].message == (
        f"stopped after {healing['steps']} of 100000 steps: 0.5 s time budget"
    )
