"""Submit-time refusals: the torch-free estimate on a planted config, and 422s from the API when
no registered worker has the memory or the scratch disk."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from stack_helpers import tiny_spec
from test_api import AUTH, api, messages  # noqa: F401 (api: the app fixture)

from api_schemas import AnalyzeSpec, CompressSpec, DataSpec
from infra.capacity import Capacity, JobNeeds, estimate_needs, measure_capacity
from service.deps import LOOKUP_TTL_S

DATA = DataSpec(dataset_id="ds_x")


def _planted(tmp_path: Path) -> Path:
    """hidden 64, vocab 1000, two shards of 3000 and 5000 bytes."""
    model = tmp_path / "planted"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "vocab_size": 1000}))
    (model / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 3000)
    (model / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 5000)
    return model


def test_estimate_needs_counts_weights_activations_grams_and_logits(tmp_path):
    model = _planted(tmp_path)
    spec = CompressSpec(model="m", layers=2, data=DATA, calib_tokens=256, seq_len=32)
    needs = estimate_needs(spec, model)
    # 8000 B weights + 256 x 64 x 4 activations + 2 x 64^2 x 4 Grams + 32 x 1000 x 4 logits
    assert needs == JobNeeds(
        memory_bytes=8000 + 65536 + 32768 + 128000, scratch_bytes=8000, output_bytes=8000
    )


def test_estimate_needs_under_budgets_and_without_a_checkpoint(tmp_path):
    model = _planted(tmp_path)
    streamed = CompressSpec(model="m", layers=2, data=DATA, calib_tokens=256, seq_len=32,
                            memory_budget="1000B", host_budget="4096B")  # fmt: skip
    assert estimate_needs(streamed, model).memory_bytes == 1000 + 4096 + 32768 + 128000
    analysis = AnalyzeSpec(model="m", data=DATA, calib_tokens=256, seq_len=32)
    assert estimate_needs(analysis, model).scratch_bytes == 0
    assert estimate_needs(analysis, tmp_path / "missing") is None


def test_measure_capacity_reports_this_host(tmp_path):
    capacity = measure_capacity(tmp_path / "scratch")
    assert capacity.memory_bytes > 2**28 and capacity.scratch_free_bytes > 0
    assert capacity.device in ("cpu", "cuda")


def _tiny_weights(model_root: Path) -> int:
    return sum(p.stat().st_size for p in (model_root / "tiny-llama").glob("*.safetensors"))


def _register(client, *, memory: int, disk: int) -> None:
    store = client.app.state.linearize.store
    store.heartbeat_worker("w@h", "q", "h", 1, Capacity(memory, disk, "cpu", None))


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB ({n} bytes)"


@pytest.mark.parametrize("resource", ["memory", "disk"])
def test_submit_is_refused_when_no_worker_can_hold_the_job(api, model_root, resource):  # noqa: F811
    dataset = api.post("/v1/datasets", content=b"text " * 200, headers=AUTH["alpha"]).json()["id"]
    body = tiny_spec(dataset)
    needs = estimate_needs(CompressSpec.model_validate(body), model_root / "tiny-llama")
    weights = _tiny_weights(model_root)
    assert needs.scratch_bytes == weights and needs.memory_bytes > weights
    if resource == "memory":
        _register(api, memory=needs.memory_bytes - 1, disk=10**12)
        expected = (
            f"the job needs at least {_gb(needs.memory_bytes)} of memory",
            f"the largest registered worker has {_gb(needs.memory_bytes - 1)}",
        )
    else:
        _register(api, memory=10**12, disk=weights - 1)
        expected = (
            f"the job needs at least {_gb(weights)} of scratch disk",
            f"the most any registered worker has free is {_gb(weights - 1)}",
        )
    response = api.post("/v1/jobs", json=body, headers=AUTH["alpha"])
    assert response.status_code == 422, response.text
    for part in expected:
        assert part in messages(response)

    _register(api, memory=needs.memory_bytes, disk=weights)  # exactly enough: accepted
    time.sleep(LOOKUP_TTL_S)  # the API reads the live workers at most once per LOOKUP_TTL_S
    assert api.post("/v1/jobs", json=body, headers=AUTH["alpha"]).status_code == 202
