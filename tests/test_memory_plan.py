"""The memory plan: what a budget buys, in the order the plan grows it, and what it refuses."""

import pytest

from linearize.errors import BudgetError
from linearize.memory_plan import (
    ModelShape,
    Workload,
    forward_bytes,
    least_plan,
    logits_bytes,
    plan_memory,
)

LAYER = 1_000_000
SHAPE = ModelShape(
    hidden=64, ffn=128, heads=4, vocab=1000, itemsize=4, weight_bytes=20 * LAYER,
    largest_layer_bytes=LAYER, trunk_bytes=500_000, head_bytes=256_000, carrier_bytes=300_000,
)  # fmt: skip
WORK = Workload(seq_len=128, activation_tokens=10_000, heal=True)


def least() -> int:
    return least_plan(SHAPE, WORK, 0, streamed=True).total


def test_a_budget_one_byte_under_the_least_is_refused_with_every_item():
    with pytest.raises(BudgetError) as caught:
        plan_memory(SHAPE, WORK, least() - 1, streamed=True)
    message = str(caught.value)
    for item in ("embeddings and final norm", "LM head 250.00 KiB", "decoder layers (2 held)",
                 "healing state", "logits (one head step)", "process reserve"):  # fmt: skip
        assert item in message


def test_the_least_budget_runs_one_window_per_batch_and_keeps_every_cache_on_disk():
    plan = plan_memory(SHAPE, WORK, least(), streamed=True)
    assert (plan.batch_size, plan.head_rows, plan.neighbours) == (1, 16, 0)
    assert plan.cache_bytes == 0 and plan.total == least()
    assert plan.items["healing state"] == 4 * 300_000  # gradient, two moments, snapshot


def test_a_budget_for_one_trained_layer_gets_one_and_the_caches_get_the_rest():
    full = least() - forward_bytes(SHAPE, 128, 1) - logits_bytes(SHAPE, 16)
    full += forward_bytes(SHAPE, 128, 4) + logits_bytes(SHAPE, 128)
    one_layer = 4 * LAYER + LAYER  # its training copies, and the layer itself held
    plan = plan_memory(SHAPE, WORK, full + one_layer + 777, streamed=True)
    assert (plan.batch_size, plan.head_rows, plan.neighbours) == (4, 128, 1)
    assert plan.items["healed layers (held)"] == LAYER
    assert plan.cache_bytes == 777 and plan.total == full + one_layer + 777


def test_a_large_budget_plans_what_the_job_needs_not_the_budget():
    plan = plan_memory(SHAPE, WORK, 10**12, streamed=True)
    assert (plan.batch_size, plan.head_rows, plan.neighbours) == (4, 128, 4)
    assert plan.cache_bytes == 10_000 * 64 * 4
    assert plan.total < 10**9


def test_a_resident_plan_is_reported_even_over_its_budget():
    plan = plan_memory(SHAPE, WORK, 1000, streamed=False)
    assert plan.items["weights (all resident)"] == 20 * LAYER and plan.total > 1000
    assert plan.neighbours == 4 and plan.cache_bytes == 0
    assert plan.items["healing loss (one step)"] == 64 * 64 * 4  # the centred-logit metric


def test_a_resident_kl_heal_counts_two_windows_of_logits_and_their_gradients():
    kl = Workload(seq_len=128, activation_tokens=0, heal=True, heal_loss="kl")
    plan = plan_memory(SHAPE, kl, 1000, streamed=False)
    assert plan.items["healing loss (one step)"] == 4 * 128 * 1000 * 4
    assert "healing loss (one step)" not in plan_memory(SHAPE, kl, 10**12, streamed=True).items


STAGES_SCRIPT = """
import json, torch
from linearize.job import Job
from linearize.progress import Progress
job = Job(spec=None, progress=Progress())
with job.timed("small"):
    torch.ones(1024)
with job.timed("large"):
    block = torch.ones(64, 2**20)  # 256 MiB of float32, every page written
    del block
with job.timed("small again"):
    pass
print(json.dumps({"rises": job.peak_rises, "stage": job.peak_stage}))
"""


def test_each_stage_is_credited_with_what_it_added_to_the_peak_and_the_report_names_the_last():
    """A planted stage that holds 256 MiB at once, in a fresh process (a test process's own
    high-water mark is whatever earlier tests left): that stage is credited with the rise, and
    the report says the peak was reached there."""
    import json
    import subprocess
    import sys

    from api_schemas.report import Execution
    from linearize.report import _size, memory_text, render_memory_plan

    run = subprocess.run(
        [sys.executable, "-c", STAGES_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    marked = json.loads(run.stdout.strip().splitlines()[-1])
    rises = marked["rises"]
    assert 250 * 2**20 <= rises["large"] <= 300 * 2**20  # the block, less pages already held
    assert "small again" not in rises  # the peak does not go down, and it added nothing
    assert rises.get("small", 0) < 16 * 2**20
    assert marked["stage"] == "large"
    execution = Execution(
        mode="resident", device="cpu", memory_budget_bytes=0, weight_bytes=0,
        largest_layer_bytes=0, peak_memory_bytes=2**30, planned_peak_bytes=1,
        memory_plan={"weights (all resident)": 1}, peak_rises=rises, peak_stage="large",
    )  # fmt: skip
    assert memory_text(execution).endswith(", reached in large")
    table = "\n".join(render_memory_plan(execution))
    assert "| **stage that reached the peak** | large |" in table
    rose = next(line for line in table.splitlines() if "where the peak rose" in line)
    assert rose.endswith(f"large +{_size(rises['large'])} |")
