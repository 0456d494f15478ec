"""The REST contract in-process (no worker): auth, tenancy, validation, limits, idempotency,
uploads, artifact paths, OpenAPI, health and metrics."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from stack_helpers import KEYS, free_port, tiny_spec

from api_schemas.jobs import Artifact
from infra.artifacts import checkpoint_dir
from infra.settings import Settings
from infra.store import Store
from service.main import create_app

AUTH = {t: {"Authorization": f"Bearer {k}"} for t, k in KEYS.items()}
METRICS_KEY = "scrape-key"


def make_settings(tmp_path: Path, model_root: Path, broker_url: str, **extra) -> Settings:
    queue = f"api-{uuid.uuid4().hex[:8]}"
    values = dict(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}",
        broker_url=broker_url,
        model_roots=str(model_root),
        api_keys="alpha:ka,beta:kb",
        job_queue=queue,
        webhook_queue=f"{queue}.webhooks",
        webhook_allowed_hosts="hooks.example.com",
        max_upload_mb=1,
        metrics_key=METRICS_KEY,
    )
    values.update(extra)
    return Settings(**values)


@pytest.fixture
def api(tmp_path, model_root, shared_redis):
    with TestClient(
        create_app(make_settings(tmp_path, model_root, shared_redis), reconcile=False)
    ) as client:
        yield client


@pytest.fixture
def dataset(api) -> str:
    response = api.post("/v1/datasets", content=b"some text " * 200, headers=AUTH["alpha"])
    assert response.status_code == 201
    return response.json()["id"]


def submit(api, body, tenant="alpha", **headers):
    return api.post("/v1/jobs", json=body, headers={**AUTH[tenant], **headers})


def messages(response) -> str:
    detail = response.json()["detail"]
    return " ".join(d["msg"] for d in detail) if isinstance(detail, list) else detail


# Auth and tenancy ------------------------------------------------------------------------


def test_healthz_needs_no_key(api):
    assert api.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic a2E="}]
)
def test_requests_without_a_valid_key_get_401(api, headers):
    for method, url in [("get", "/v1/jobs"), ("post", "/v1/datasets"), ("get", "/v1/jobs/x")]:
        response = getattr(api, method)(url, headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"


def test_another_tenants_job_and_dataset_are_404(api, dataset):
    job = submit(api, tiny_spec(dataset)).json()
    for url in [
        f"/v1/jobs/{job['id']}",
        f"/v1/jobs/{job['id']}/events",
        f"/v1/jobs/{job['id']}/report",
        f"/v1/jobs/{job['id']}/artifacts",
        f"/v1/jobs/{job['id']}/checkpoint.tar",
        f"/v1/datasets/{dataset}",
    ]:
        assert api.get(url, headers=AUTH["beta"]).status_code == 404, url
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH["beta"]).status_code == 404
    assert api.get("/v1/jobs", headers=AUTH["beta"]).json()["items"] == []
    # Nor can beta run a job on alpha's upload.
    response = submit(api, tiny_spec(dataset), tenant="beta")
    assert response.status_code == 422 and "unknown dataset" in messages(response)


def test_keys_file_holds_hashed_keys(tmp_path, model_root, shared_redis):
    import hashlib

    keys = tmp_path / "keys"
    keys.write_text(f"# tenant:sha256\ngamma:{hashlib.sha256(b'kg').hexdigest()}\n")
    settings = make_settings(tmp_path, model_root, shared_redis, api_keys="", api_keys_file=keys)
    with TestClient(create_app(settings, reconcile=False)) as client:
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer kg"}).status_code == 200
        assert client.get("/v1/jobs", headers=AUTH["alpha"]).status_code == 401


# Submitting --------------------------------------------------------------------------------


def test_submit_returns_202_with_the_job_object(api, dataset):
    response = submit(api, tiny_spec(dataset, metadata={"ci": "1"}))
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempts"] == 0 and job["error"] is None
    assert job["metadata"] == {"ci": "1"}
    assert job["spec"]["format"] == "standard"  # the CLI's default
    assert set(job) >= {
        "id",
        "status",
        "created_at",
        "started_at",
        "finished_at",
        "progress",
        "attempts",
        "error",
        "spec",
        "metadata",
        "urls",
    }
    assert set(job["progress"]) == {"stage", "current", "total", "percent"}
    assert api.get(job["urls"]["self"], headers=AUTH["alpha"]).json()["id"] == job["id"]


def test_submit_takes_the_memory_budget_and_streaming_mode(api, dataset):
    response = submit(
        api, tiny_spec(dataset, memory_budget="12GB", streaming="on", host_budget="2GiB")
    )
    assert response.status_code == 202, response.text
    spec = response.json()["spec"]
    assert (spec["memory_budget"], spec["streaming"], spec["host_budget"]) == ("12GB", "on", "2GiB")
    default = submit(api, tiny_spec(dataset)).json()["spec"]
    assert (default["memory_budget"], default["streaming"]) == ("auto", "auto")


def test_budget_above_l_minus_2_names_the_limit(api, dataset):
    bundled = {
        "kind": "compress",
        "model": "smollm2-135m",
        "layers": 40,
        "data": {"dataset_id": dataset},
    }
    response = submit(api, bundled)
    assert response.status_code == 422
    assert "at most L - 2 = 28 layers" in messages(response)
    tiny = submit(api, tiny_spec(dataset, layers=5))
    assert tiny.status_code == 422 and "at most L - 2 = 4 layers" in messages(tiny)
    indices = submit(api, tiny_spec(dataset, layers=None, indices=[1, 2, 3, 4, 5]))
    assert indices.status_code == 422 and "at most L - 2 = 4" in messages(indices)
    assert submit(api, tiny_spec(dataset, layers=4)).status_code == 202


def test_max_layers_is_accepted_with_a_gate_and_refused_without(api, dataset):
    searched = submit(api, tiny_spec(dataset, layers="max", gate_kl=0.2, search_budget="20m"))
    assert searched.status_code == 202, searched.text
    spec = searched.json()["spec"]
    assert (spec["layers"], spec["gate_kl"], spec["search_budget"]) == ("max", 0.2, "20m")
    ungated = submit(api, tiny_spec(dataset, layers="max"))
    assert ungated.status_code == 422
    assert "at least one of gate_ppl_increase" in messages(ungated)


# An eval job's --reference is a model like any other: the same roots apply.
EVAL_WITH_REFERENCE = {
    "kind": "eval",
    "reference": "/etc",
    **dict.fromkeys(("layers", "format", "heal_steps"), None),
}


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"layers": 0}, "layers must be >= 1"),
        ({"layers": None}, "exactly one budget"),
        ({"layers": 2, "target_ppl_increase": 5}, "exactly one budget"),
        ({"kind": "quantize"}, "kind"),
        ({"trust_remote_code": True}, "Extra inputs are not permitted"),
        ({"format": "pickle"}, "format"),
        ({"seq_len": 2}, "seq_len"),
        ({"model": "/etc"}, "outside the configured model roots"),
        ({"model": "../../etc"}, "outside the configured model roots"),
        ({"model": "org/some-hub-model"}, "hub downloads are disabled"),
        ({"model": "missing-model"}, "unknown model"),
        ({"data": {"path": "/etc/passwd"}}, "data.path is not accepted"),
        ({"data": {"dataset_id": "ds_nope"}}, "unknown dataset"),
        ({"data": {}}, "exactly one of path, dataset_id, builtin"),
        ({"webhook_url": "http://evil.example.net/x"}, "not in LINEARIZE_WEBHOOK_ALLOWED_HOSTS"),
        ({"webhook_url": "ftp://hooks.example.com/x"}, "http(s)"),
        ({"memory_budget": "lots"}, "memory_budget"),
        ({"streaming": "sometimes"}, "streaming"),
        ({"host_budget": "-1GB"}, "host_budget"),
        ({"tasks": ["t"], "task_dir": "/etc"}, "task_dir is not accepted over REST"),
        (EVAL_WITH_REFERENCE, "outside the configured model"),
        ({"tasks": ["a"], "gate_task_retained": {"b": 90}}, "names task 'b'"),
    ],
)
def test_bad_submissions_are_422_with_a_reason(api, dataset, overrides, needle):
    body = tiny_spec(dataset, **overrides)
    body = {k: v for k, v in body.items() if v is not None}
    response = submit(api, body)
    assert response.status_code == 422, response.text
    assert needle in response.text


def test_models_escaping_the_root_or_pickled_are_refused(api, dataset, model_root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"x")
    link = model_root / f"link-{uuid.uuid4().hex[:6]}"
    os.symlink(outside, link)
    pickled = model_root / f"pickled-{uuid.uuid4().hex[:6]}"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    (pickled / "config.json").write_text('{"num_hidden_layers": 4}')
    try:
        response = submit(api, tiny_spec(dataset, model=link.name))
        assert response.status_code == 422 and "outside the configured model roots" in response.text
        response = submit(api, tiny_spec(dataset, model=pickled.name))
        assert response.status_code == 422 and "pickle" in response.text
    finally:
        link.unlink()
        (pickled / "pytorch_model.bin").unlink()
        (pickled / "config.json").unlink()
        pickled.rmdir()


def test_idempotency_key_replays_and_conflicts(api, dataset):
    first = submit(api, tiny_spec(dataset), **{"Idempotency-Key": "abc"})
    explicit_defaults = {**tiny_spec(dataset), "dtype": "auto", "seed": 0}
    again = submit(api, explicit_defaults, **{"Idempotency-Key": "abc"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    other = submit(api, tiny_spec(dataset, layers=3), **{"Idempotency-Key": "abc"})
    assert other.status_code == 409
    assert len(api.get("/v1/jobs", headers=AUTH["alpha"]).json()["items"]) == 1


def test_tenant_queue_limit_is_429(tmp_path, model_root, shared_redis):
    settings = make_settings(tmp_path, model_root, shared_redis, tenant_max_queued=2)
    with TestClient(create_app(settings, reconcile=False)) as api:
        ds = api.post("/v1/datasets", content=b"text " * 100, headers=AUTH["alpha"]).json()["id"]
        ds_b = api.post("/v1/datasets", content=b"text " * 100, headers=AUTH["beta"]).json()["id"]
        assert [submit(api, tiny_spec(ds)).status_code for _ in range(2)] == [202, 202]
        limited = submit(api, tiny_spec(ds))
        assert limited.status_code == 429 and limited.headers["retry-after"]
        assert submit(api, tiny_spec(ds_b), tenant="beta").status_code == 202


def test_submit_while_the_broker_is_down_is_still_accepted(tmp_path, model_root):
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(
        create_app(make_settings(tmp_path, model_root, dead_broker), reconcile=False)
    ) as api:
        ds = api.post("/v1/datasets", content=b"text " * 100, headers=AUTH["alpha"]).json()["id"]
        response = submit(api, tiny_spec(ds))
        assert response.status_code == 202 and response.json()["status"] == "queued"
        store: Store = api.app.state.linearize.store
        assert store.get_job(response.json()["id"]).enqueued_at is None  # for the reconciler
        ready = api.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["broker"] is False


# Listing, cancel, events ----------------------------------------------------------------------


def test_list_jobs_paginates_and_filters(api, dataset):
    ids = [submit(api, tiny_spec(dataset)).json()["id"] for _ in range(5)]
    api.post(f"/v1/jobs/{ids[1]}/cancel", headers=AUTH["alpha"])
    page = api.get("/v1/jobs?limit=3", headers=AUTH["alpha"]).json()
    rest = api.get(f"/v1/jobs?limit=3&after={page['next_cursor']}", headers=AUTH["alpha"]).json()
    assert [j["id"] for j in page["items"] + rest["items"]] == ids[::-1]
    assert rest["next_cursor"] is None
    cancelled = api.get("/v1/jobs?status=cancelled", headers=AUTH["alpha"]).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    assert api.get("/v1/jobs?status=bogus", headers=AUTH["alpha"]).status_code == 422


def test_cancel_a_queued_job_is_immediate_and_idempotent(api, dataset):
    job = submit(api, tiny_spec(dataset)).json()
    first = api.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH["alpha"])
    second = api.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH["alpha"])
    assert first.status_code == second.status_code == 200
    assert first.json()["status"] == second.json()["status"] == "cancelled"
    events = api.get(f"/v1/jobs/{job['id']}/events", headers=AUTH["alpha"]).json()
    assert [e["status"] for e in events["items"]] == ["queued", "cancelled"]
    assert events["terminal"] is True
    # The SSE stream of a finished job replays to the terminal event and ends.
    with api.stream(
        "GET", f"/v1/jobs/{job['id']}/events?stream=true", headers=AUTH["alpha"]
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        body = "".join(stream.iter_text())
    data = [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:")]
    assert [d["status"] for d in data] == ["queued", "cancelled"]
    resumed = api.get(
        f"/v1/jobs/{job['id']}/events?after={events['items'][0]['id']}", headers=AUTH["alpha"]
    ).json()
    assert [e["status"] for e in resumed["items"]] == ["cancelled"]


def test_report_and_artifacts_of_an_unfinished_job_are_409(api, dataset):
    job = submit(api, tiny_spec(dataset)).json()
    for suffix in ("report", "artifacts", "checkpoint", "checkpoint.tar", "artifacts/config.json"):
        assert api.get(f"/v1/jobs/{job['id']}/{suffix}", headers=AUTH["alpha"]).status_code == 409


def _finished_job(api, dataset) -> tuple[str, Path]:
    """A job marked succeeded through the store, with files on disk (no engine needed)."""
    state = api.app.state.linearize
    job_id = submit(api, tiny_spec(dataset)).json()["id"]
    directory = checkpoint_dir(state.settings.resolved_artifact_dir, job_id)
    (directory / "sub").mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "sub" / "a.txt").write_text("a")
    (directory.parent / "secret.txt").write_text("not an artifact")
    from infra.artifacts import build_manifest

    manifest: list[Artifact] = build_manifest(directory)
    state.store.claim(
        job_id,
        "h:1:x",
        lease_ttl_s=30,
        max_attempts=3,
        max_running=9,
        owner_is_dead=lambda _o: False,
    )
    state.store.finish(
        job_id, "h:1:x", "succeeded", report_json='{"kind": "compress"}', artifacts=manifest
    )
    return job_id, directory


def test_artifact_paths_cannot_escape_the_checkpoint(api, dataset):
    job_id, _ = _finished_job(api, dataset)
    ok = api.get(f"/v1/jobs/{job_id}/artifacts/sub/a.txt", headers=AUTH["alpha"])
    assert ok.status_code == 200 and ok.content == b"a"
    for path in [
        "../secret.txt",
        "..%2Fsecret.txt",
        "sub/../../secret.txt",
        "%2Fetc%2Fpasswd",
        "sub/%2E%2E/%2E%2E/secret.txt",
        "nope.txt",
    ]:
        response = api.get(f"/v1/jobs/{job_id}/artifacts/{path}", headers=AUTH["alpha"])
        assert response.status_code == 404, path
    listing = api.get(f"/v1/jobs/{job_id}/artifacts", headers=AUTH["alpha"]).json()
    assert [a["path"] for a in listing["items"]] == ["config.json", "sub/a.txt"]
    assert api.get(f"/v1/jobs/{job_id}/report", headers=AUTH["alpha"]).json() == {
        "kind": "compress"
    }


def test_checkpoint_tar_streams_the_listed_files(api, dataset, tmp_path):
    import io
    import tarfile

    job_id, _ = _finished_job(api, dataset)
    body = api.get(f"/v1/jobs/{job_id}/checkpoint.tar", headers=AUTH["alpha"]).content
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        assert sorted(archive.getnames()) == ["checkpoint/config.json", "checkpoint/sub/a.txt"]
        assert archive.extractfile("checkpoint/sub/a.txt").read() == b"a"


def test_checkpoint_manifest_on_the_local_store_points_at_the_api_routes(api, dataset):
    import hashlib

    job_id, _ = _finished_job(api, dataset)
    manifest = api.get(f"/v1/jobs/{job_id}/checkpoint", headers=AUTH["alpha"]).json()
    assert manifest["job_id"] == job_id and manifest["expires_in_s"] is None
    assert manifest["total_bytes"] == 3
    files = {f["path"]: f for f in manifest["files"]}
    assert files["sub/a.txt"]["url"] == f"/v1/jobs/{job_id}/artifacts/sub/a.txt"
    assert files["sub/a.txt"]["sha256"] == hashlib.sha256(b"a").hexdigest()
    body = api.get(files["config.json"]["url"], headers=AUTH["alpha"]).content
    assert hashlib.sha256(body).hexdigest() == files["config.json"]["sha256"]
    assert api.get(f"/v1/jobs/{job_id}/checkpoint", headers=AUTH["beta"]).status_code == 404


# Uploads --------------------------------------------------------------------------------------


def test_upload_raw_and_multipart_give_id_size_and_sha256(api):
    import hashlib

    text = "héllo wörld\n".encode() * 50
    raw = api.post(
        "/v1/datasets",
        content=text,
        headers={**AUTH["alpha"], "Content-Type": "text/plain; charset=utf-8"},
    )
    multi = api.post(
        "/v1/datasets", files={"file": ("train.txt", text, "text/plain")}, headers=AUTH["alpha"]
    )
    for response in (raw, multi):
        assert response.status_code == 201
        body = response.json()
        assert body["bytes"] == len(text) and body["sha256"] == hashlib.sha256(text).hexdigest()
    assert multi.json()["filename"] == "train.txt"
    got = api.get(f"/v1/datasets/{raw.json()['id']}", headers=AUTH["alpha"]).json()
    assert got["sha256"] == raw.json()["sha256"]


def test_uploads_over_the_limit_are_413(api):
    big = b"a" * (1024 * 1024 + 10)  # the fixture's limit is 1 MB
    raw = api.post(
        "/v1/datasets", content=big, headers={**AUTH["alpha"], "Content-Type": "text/plain"}
    )
    multi = api.post(
        "/v1/datasets", files={"file": ("big.txt", big, "text/plain")}, headers=AUTH["alpha"]
    )

    def chunks():
        for _ in range(11):
            yield b"a" * (100 * 1024)

    streamed = api.post(
        "/v1/datasets", content=chunks(), headers={**AUTH["alpha"], "Content-Type": "text/plain"}
    )
    assert raw.status_code == multi.status_code == streamed.status_code == 413
    datasets = api.app.state.linearize.settings.resolved_artifact_dir / "datasets"
    assert not list(datasets.glob("*")), "a refused upload must leave nothing behind"


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"\xff\xfe bad bytes", "text/plain", 422),
        (b"ok" + "é".encode()[:1], "text/plain", 422),
        (b"", "text/plain", 422),
        (b"{}", "application/json", 415),
    ],
)
def test_uploads_must_be_nonempty_utf8_text(api, body, content_type, status):
    response = api.post(
        "/v1/datasets", content=body, headers={**AUTH["alpha"], "Content-Type": content_type}
    )
    assert response.status_code == status


# OpenAPI, readiness, metrics ------------------------------------------------------------------


def test_openapi_documents_every_route_and_the_shared_specs(api):
    doc = api.get("/openapi.json").json()
    paths = doc["paths"]
    for path, method in [
        ("/v1/datasets", "post"),
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}/cancel", "post"),
        ("/v1/jobs/{job_id}/events", "get"),
        ("/v1/jobs/{job_id}/report", "get"),
        ("/v1/jobs/{job_id}/artifacts", "get"),
        ("/v1/jobs/{job_id}/artifacts/{path}", "get"),
        ("/v1/jobs/{job_id}/checkpoint.tar", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths[path], (path, method)
    submit_op = paths["/v1/jobs"]["post"]
    assert set(submit_op["responses"]) >= {"202", "409", "422", "429"}
    body = submit_op["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "kind"
    schemas = doc["components"]["schemas"]
    assert {"CompressSpec", "AnalyzeSpec", "DataSpec", "Job", "JobEvent", "Report"} <= set(schemas)
    assert schemas["CompressSpec"]["properties"]["format"]["default"] == "standard"
    upload = paths["/v1/datasets"]["post"]["requestBody"]["content"]
    assert {"text/plain", "multipart/form-data"} <= set(upload)
    assert "HTTPBearer" in doc["components"]["securitySchemes"]


def test_readyz_needs_a_worker_heartbeat(api):
    response = api.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {
        "broker": True,
        "database": True,
        "workers": 0,
        "artifacts": True,
    }
    store: Store = api.app.state.linearize.store
    store.heartbeat_worker("w@h", "q", "h", 1)
    assert api.get("/readyz").status_code == 200


def test_metrics_expose_jobs_by_status_queue_depth_and_durations(api, dataset):
    submit(api, tiny_spec(dataset))
    api.get("/healthz")
    text = api.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).text
    assert 'linearize_jobs{status="queued"} 1.0' in text
    assert 'linearize_queue_depth{source="store"} 1.0' in text
    assert "linearize_job_duration_seconds_bucket" in text
    assert 'linearize_http_request_duration_seconds_count{method="GET",route="/healthz"' in text


@pytest.mark.parametrize(
    "headers",
    [{}, AUTH["alpha"], {"Authorization": "Bearer wrong"}],
    ids=["no-key", "tenant-key", "wrong-key"],
)
def test_metrics_without_the_metrics_key_is_401(api, headers):
    response = api.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert "LINEARIZE_METRICS_KEY" in response.json()["detail"]
    assert "linearize_jobs" not in response.text


def test_metrics_is_closed_when_no_key_is_set(tmp_path, model_root, shared_redis):
    settings = make_settings(tmp_path, model_root, shared_redis, metrics_key="")
    with TestClient(create_app(settings, reconcile=False)) as client:
        response = client.get("/metrics", headers={"Authorization": "Bearer "})
        assert response.status_code == 401
        assert "not set on this server" in response.json()["detail"]
