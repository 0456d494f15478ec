"""A mixture-of-experts model through the service: submit, succeed, download, plain transformers
rebuilds the kept layers' dense/sparse pattern."""

from __future__ import annotations

import io
import tarfile

from stack_helpers import TINY_LAYERS, tiny_spec


def test_submit_a_moe_model_and_load_its_checkpoint(shared_stack, shared_dataset, tmp_path):
    spec = tiny_spec(shared_dataset, model="tiny-qwen3-moe", heal_steps=5, generation_prompts=0)
    with shared_stack.http() as http:
        response = http.post("/v1/jobs", json=spec)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
    with shared_stack.client() as client:
        statuses = [e.status for e in client.stream_events(job_id) if e.type == "status"]
        assert statuses[-1] == "succeeded", shared_stack.tail()
        report = client.report(job_id)
    assert report["model"]["layers_after"] == TINY_LAYERS - 2
    trained = report["selection"]["healing"]["trained_names"]
    assert any(name.endswith("mlp.experts.down_proj") for name in trained)
    with shared_stack.http() as http:
        tar_bytes = http.get(f"/v1/jobs/{job_id}/checkpoint.tar").content
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        archive.extractall(tmp_path, filter="data")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    sparse_before = [i not in (1, 4) for i in range(TINY_LAYERS)]  # tiny qwen3_moe: mlp_only 1, 4
    kept = [s for i, s in enumerate(sparse_before) if i not in report["replaced_layers"]]
    assert [hasattr(layer.mlp, "experts") for layer in model.model.layers] == kept
