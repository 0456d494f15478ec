"""End to end on real processes (uvicorn + Celery worker, PostgreSQL, Redis, the tiny model):
upload -> submit -> events -> succeeded -> download -> plain transformers loads the checkpoint."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from stack_helpers import (
    KEYS,
    REPO,
    TINY_LAYERS,
    WEBHOOK_SECRET,
    free_port,
    tiny_spec,
    wait_until,
)


def test_full_flow_upload_submit_events_download_load(shared_stack, text_file, tmp_path):
    with shared_stack.http() as http:
        upload = http.post("/v1/datasets", files={"file": ("wiki.txt", text_file.read_bytes())})
        assert upload.status_code == 201
        dataset = upload.json()
        assert dataset["sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()

        response = http.post("/v1/jobs", json=tiny_spec(dataset["id"], heal_steps=20))
        assert response.status_code == 202
        job_id = response.json()["id"]

    with shared_stack.client() as client:
        events = list(client.stream_events(job_id))  # SSE until the terminal event
        statuses = [e.status for e in events if e.type == "status"]
        assert statuses[0] == "queued" and statuses[-1] == "succeeded", shared_stack.tail()
        assert "running" in statuses
        stages = {e.stage for e in events if e.type == "progress"}
        assert {"load", "fit", "save"} <= stages
        assert events[-1].terminal

        job = client.get_job(job_id)
        assert job.status == "succeeded" and job.attempts == 1
        assert job.progress.percent == 100.0 and job.started_at and job.finished_at

        report = client.report(job_id)
        assert report["model"]["layers_before"] == TINY_LAYERS
        assert report["model"]["layers_after"] == TINY_LAYERS - 2
        assert len(report["replaced_layers"]) == 2

        artifacts = {a.path: a for a in client.artifacts(job_id).items}
        assert {"config.json", "model.safetensors", "report.json"} <= set(artifacts)
        config = client.download_artifact(job_id, "config.json")
        assert hashlib.sha256(config).hexdigest() == artifacts["config.json"].sha256

    with shared_stack.http() as http:
        tar_bytes = http.get(f"/v1/jobs/{job_id}/checkpoint.tar").content
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        archive.extractall(tmp_path, filter="data")
    checkpoint = tmp_path / "checkpoint"
    for path, artifact in artifacts.items():
        assert hashlib.sha256((checkpoint / path).read_bytes()).hexdigest() == artifact.sha256

    # Plain transformers, no linearize code: the standard format is an ordinary checkpoint.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert model.config.num_hidden_layers == TINY_LAYERS - 2
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()

    # Another tenant sees nothing of it.
    with shared_stack.http("beta") as http:
        assert http.get(f"/v1/jobs/{job_id}").status_code == 404
        assert http.get(f"/v1/jobs/{job_id}/checkpoint.tar").status_code == 404
    with shared_stack.http(None) as http:
        assert http.get(f"/v1/jobs/{job_id}").status_code == 401


def _submit_cli(stack, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "linearize", "submit", "--remote", stack.url, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_linearize_submit_wait_downloads_verifies_and_summarises(shared_stack, text_file, tmp_path):
    summary = tmp_path / "summary.md"
    result = _submit_cli(
        shared_stack,
        "--token",
        KEYS["alpha"],
        "--model",
        "tiny-llama",
        "--layers",
        "2",
        "--data",
        str(text_file),
        "--calib-tokens",
        "256",
        "--eval-tokens",
        "256",
        "--seq-len",
        "64",
        "--heal-steps",
        "5",
        "--gate-kl",
        "100",
        "--gate-agreement",
        "0",
        "--wait",
        "--output",
        str(tmp_path / "out"),
        "--report",
        str(tmp_path / "report.json"),
        "--quiet",
        env={"GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert result.returncode == 0, result.stderr + shared_stack.tail()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == TINY_LAYERS - 2
    assert "sha256 verified" in result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"]["layers_after"] == TINY_LAYERS - 2
    text = summary.read_text()
    assert "succeeded" in text and f"{TINY_LAYERS} → {TINY_LAYERS - 2}" in text
    # The job options of `compress` reach the service: healing cap, gates, agreement.
    assert report["selection"]["healing"]["steps"] <= 5
    assert [r["name"] for r in report["gate"]["rules"]] == ["kl", "top1_agreement_pct"]
    assert "| gate `top1_agreement_pct` |" in text and ">= 0.0: passed" in text
    assert "| agreement | KL" in text and "| generation | exact match" in text


def test_linearize_submit_exit_codes_for_bad_input(shared_stack, text_file, tmp_path):
    too_many = _submit_cli(
        shared_stack,
        "--token",
        KEYS["alpha"],
        "--model",
        "tiny-llama",
        "--layers",
        "5",
        "--data",
        str(text_file),
        "--wait",
    )
    assert too_many.returncode == 2 and "at most L - 2 = 4 layers" in too_many.stderr
    bad_token = _submit_cli(
        shared_stack,
        "--token",
        "nope",
        "--layers",
        "2",
        "--data",
        str(text_file),
    )
    assert bad_token.returncode == 2 and "401" in bad_token.stderr
    no_budget = _submit_cli(shared_stack, "--token", "ka", "--data", str(text_file))
    assert no_budget.returncode == 2 and "budget" in no_budget.stderr


class _Receiver(BaseHTTPRequestHandler):
    calls: list[dict] = []
    fail_first = 1

    def do_POST(self):  # noqa: N802 (http.server naming)
        body = self.rfile.read(int(self.headers["content-length"]))
        call = {"body": body, "headers": {k.lower(): v for k, v in self.headers.items()}}
        type(self).calls.append(call)
        failing = len(type(self).calls) <= type(self).fail_first
        self.send_response(500 if failing else 204)
        self.end_headers()

    def log_message(self, *_args):
        pass


def _verify_standard_webhook(secret: str, headers: dict, body: bytes) -> bool:
    """Standard Webhooks verification, written from the spec (not the worker's code)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [s.partition(",")[2] for s in headers["webhook-signature"].split()]
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
    return fresh and any(hmac.compare_digest(expected, sig) for sig in offered)


def test_webhook_is_signed_and_retried_until_delivered(shared_stack, shared_dataset):
    _Receiver.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        with shared_stack.client() as client:
            job = client.submit(tiny_spec(shared_dataset, webhook_url=url))
            assert shared_stack.wait_terminal(job.id).status == "succeeded"
            wait_until(lambda: len(_Receiver.calls) >= 2, 60, what="the webhook retry")
        first, second = _Receiver.calls[:2]
        for call in (first, second):
            assert _verify_standard_webhook(WEBHOOK_SECRET, call["headers"], call["body"])
            payload = json.loads(call["body"])
            assert payload["id"] == job.id and payload["status"] == "succeeded"
        assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]  # one message
        tampered = second["body"].replace(b"succeeded", b"failed")
        assert not _verify_standard_webhook(WEBHOOK_SECRET, second["headers"], tampered)
        time.sleep(1.5)
        assert len(_Receiver.calls) == 2  # no further deliveries once one succeeded
    finally:
        server.shutdown()


def test_cancel_while_running_stops_within_a_step_and_the_worker_moves_on(
    shared_stack, shared_dataset
):
    heavy = tiny_spec(shared_dataset, calib_tokens=32768, eval_tokens=32768, seq_len=64)
    with shared_stack.client() as client:
        slow = client.submit(heavy)
        nxt = client.submit(tiny_spec(shared_dataset))

        def progressing():
            events = client.events(slow.id).items
            return any(e.type == "progress" and e.stage not in ("load", "data") for e in events)

        wait_until(progressing, 120, what="the slow job to make progress")
        cancelled_at = time.monotonic()
        assert client.cancel(slow.id).status == "cancelling"
        done = shared_stack.wait_terminal(slow.id, timeout=60)
        assert done.status == "cancelled"
        assert time.monotonic() - cancelled_at < 30
        events = client.events(slow.id, limit=1000).items
        cut = next(i for i, e in enumerate(events) if e.status == "cancelling")
        stages_after = [e.stage for e in events[cut:] if e.type == "progress"]
        assert len(set(stages_after)) <= 1, stages_after  # stopped at the next check
        assert client.cancel(slow.id).status == "cancelled"  # idempotent
        assert shared_stack.wait_terminal(nxt.id).status == "succeeded"
        with pytest.raises(Exception, match="409|404"):
            client.artifacts(slow.id)


def test_load_30_submissions_from_10_clients_all_terminal(shared_stack, shared_dataset, text_file):
    def one_client(i: int) -> list[str]:
        tenant = "alpha" if i % 2 else "beta"
        ids = []
        with shared_stack.client(tenant) as client:
            dataset = shared_dataset if tenant == "alpha" else beta_dataset
            for _ in range(3):
                ids.append((tenant, client.submit(tiny_spec(dataset)).id))
        return ids

    with shared_stack.client("beta") as beta:
        beta_dataset = beta.upload_dataset(text_file).id
    with ThreadPoolExecutor(10) as pool:
        submitted = [job for ids in pool.map(one_client, range(10)) for job in ids]
    assert len(submitted) == 30 and len({j for _, j in submitted}) == 30
    finals = [shared_stack.wait_terminal(job_id, timeout=300, tenant=t) for t, job_id in submitted]
    assert [j.status for j in finals].count("succeeded") == 30, [
        (j.id, j.status, j.error) for j in finals if j.status != "succeeded"
    ]
