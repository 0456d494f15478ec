"""Artifacts in an S3-compatible bucket: workers as if on separate hosts (own scratch, no shared
artifact directory; only Redis, PostgreSQL and the bucket in common), pre-signed downloads, and
the failures: a worker killed mid-upload, the S3 server restarted mid-job, wrong credentials, a
missing bucket. The bucket is moto's standalone server, a real process spoken to over HTTP.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from s3_helpers import CREDENTIALS, S3Server, bucket_keys, s3_env, upload_dir
from stack_helpers import (
    Stack,
    drop_pg_schema,
    lease_pid,
    pg_schema_url,
    stack_env,
    tiny_spec,
    wait_until,
)
from tiny_models import save_tiny_model

HEAVY = {"calib_tokens": 32768, "eval_tokens": 32768, "seq_len": 64}
PREFIX = "artifacts"


@pytest.fixture
def pg_url(pg_database) -> Iterator[str]:
    url, schema = pg_schema_url(pg_database)
    yield url
    drop_pg_schema(pg_database, schema)


def _bucket_stack(root: Path, server: S3Server, bucket: str, pg_url: str, redis: str, models, **kw):
    """An API whose artifacts live in the bucket; workers are added per 'host'."""
    env = stack_env(
        root,
        broker_url=redis,
        database_url=pg_url,
        model_root=models,
        LINEARIZE_DATA_DIR=root / "api",
        LINEARIZE_MODEL_URLS=f"s3://{bucket}/models/",
        **s3_env(server, bucket, PREFIX),
        **kw,
    )
    return Stack(root, env)


def _host(stack: Stack, name: str, **env: str) -> dict:
    """A worker's own disk: data and scratch directories nobody else sees."""
    base = stack.root / name
    return {"LINEARIZE_DATA_DIR": str(base), "LINEARIZE_SCRATCH_DIR": str(base / "scratch"), **env}


def _own_cache(host: dict) -> dict:
    """The engine cache where a worker with a bucket keeps it (scratch), not the directory the
    test session shares between all its processes (tests/conftest.py)."""
    return {**host, "LINEARIZE_CACHE_DIR": str(Path(host["LINEARIZE_SCRATCH_DIR"]) / "cache")}


def _files_under(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def test_two_workers_share_only_the_broker_db_and_bucket(
    tmp_path, s3_server, pg_url, shared_redis, model_root, text_file
):
    bucket = s3_server.new_bucket()
    upload_dir(s3_server, model_root / "tiny-llama", bucket, "models/tiny-llama")
    stack = _bucket_stack(
        tmp_path / "stack",
        s3_server,
        bucket,
        pg_url,
        shared_redis,
        model_root,
        LINEARIZE_WORKER_MAX_TASKS_PER_CHILD=0,
    )
    try:
        stack.start_api()
        hosts = [_host(stack, "host-a"), _host(stack, "host-b")]
        for env in hosts:
            stack.start_worker(env=env)
        with stack.client() as client:
            dataset = client.upload_dataset(text_file).id
        with stack.client("beta") as client:
            beta_dataset = client.upload_dataset(text_file).id
        # Uploads went to the bucket, not to a disk the workers would have to share.
        assert len(bucket_keys(s3_server, bucket, f"{PREFIX}/datasets/")) == 2

        # Several clients at once; some jobs read the model from the bucket.
        jobs: list[tuple[str, str]] = []
        lock = threading.Lock()

        def client_run(tenant: str, ds: str, models: list[str]) -> None:
            with stack.client(tenant) as client:
                for model in models:
                    job = client.submit(tiny_spec(ds, model=model))
                    with lock:
                        jobs.append((tenant, job.id))

        s3_model = f"s3://{bucket}/models/tiny-llama"
        threads = [
            threading.Thread(target=client_run, args=("alpha", dataset, ["tiny-llama", s3_model])),
            threading.Thread(target=client_run, args=("alpha", dataset, [s3_model, "tiny-llama"])),
            threading.Thread(target=client_run, args=("beta", beta_dataset, ["tiny-llama"] * 2)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(jobs) == 6

        pids = set()
        for tenant, job_id in jobs:
            done = stack.wait_terminal(job_id, tenant=tenant)
            assert done.status == "succeeded", (done.error, stack.tail())
            with stack.client(tenant) as client:
                pids.add(lease_pid(client.events(job_id, limit=1000).items))
        assert len(pids) == 2, "both workers should have taken jobs"

        tenant, job_id = jobs[-1]
        with stack.client(tenant) as client:
            listed = {a.path: a for a in client.artifacts(job_id).items}
        assert {"config.json", "model.safetensors", "report.json"} <= set(listed)
        with stack.http(tenant) as http:
            # The API answers with a redirect to the bucket, not with the bytes.
            redirect = http.get(f"/v1/jobs/{job_id}/artifacts/config.json")
            assert redirect.status_code == 307
            assert redirect.headers["location"].startswith(f"{s3_server.url}/{bucket}/{PREFIX}/")
            assert "X-Amz-Signature=" in redirect.headers["location"]
            assert http.get(f"/v1/jobs/{job_id}/artifacts/../x").status_code == 404
            manifest = http.get(f"/v1/jobs/{job_id}/checkpoint").json()
        assert manifest["expires_in_s"] == 900
        assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
            p: (a.size, a.sha256) for p, a in listed.items()
        }
        # Pre-signed links work for anyone holding them, with no API key.
        checkpoint = tmp_path / "presigned"
        with httpx.Client(timeout=30) as plain:
            for item in manifest["files"]:
                data = plain.get(item["url"]).raise_for_status().content
                assert hashlib.sha256(data).hexdigest() == item["sha256"]
                (checkpoint / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                (checkpoint / item["path"]).write_bytes(data)

        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        assert model.config.num_hidden_layers == 4
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()

        # The typed client (what `linearize submit --wait` uses) follows the redirects and
        # verifies every sha256.
        with stack.client(jobs[0][0]) as client:
            got = client.download_checkpoint(jobs[0][1], tmp_path / "via-client")
        assert {a.path for a in got.items} == set(_files_under_rel(tmp_path / "via-client"))

        # Every job's checkpoint sits under exactly one attempt, next to its manifest, and no
        # process kept artifacts on its own disk.
        for _tenant, job_id in jobs:
            keys = bucket_keys(s3_server, bucket, f"{PREFIX}/jobs/{job_id}/")
            attempts = {k.split("/")[4] for k in keys if "/attempts/" in k}
            assert len(attempts) == 1 and f"{PREFIX}/jobs/{job_id}/manifest.json" in keys
        assert _files_under(stack.root / "api" / "artifacts" / "jobs") == []
        for host in ("host-a", "host-b"):
            assert _files_under(stack.root / host / "scratch" / "jobs") == []

        # A bucket model outside LINEARIZE_MODEL_URLS, or without safetensors, is refused.
        s3_server.client().put_object(Bucket=bucket, Key="elsewhere/m/model.safetensors", Body=b"")
        s3_server.client().put_object(
            Bucket=bucket, Key="models/pickled/pytorch_model.bin", Body=b""
        )
        with stack.http() as http:
            for model, words in [
                (f"s3://{bucket}/elsewhere/m", "LINEARIZE_MODEL_URLS"),
                (f"s3://{bucket}/models/pickled", "pickle"),
                (f"s3://{bucket}/models/../elsewhere/m", "LINEARIZE_MODEL_URLS"),
            ]:
                response = http.post("/v1/jobs", json=tiny_spec(dataset, model=model))
                assert response.status_code == 422 and words in response.text, response.text
    finally:
        stack.stop()


def _files_under_rel(directory: Path) -> list[str]:
    return [p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()]


def test_worker_killed_during_upload_is_retried_elsewhere_and_nothing_partial_is_listed(
    tmp_path, s3_server, pg_url, shared_redis, model_root, text_file
):
    bucket = s3_server.new_bucket()
    stack = _bucket_stack(tmp_path / "stack", s3_server, bucket, pg_url, shared_redis, model_root)
    try:
        stack.start_api()
        # Host A uploads slowly (a capped link), so the kill lands mid-upload: once the small
        # files before it are up, the weights shard takes minutes at 10 kB/s. It must be well
        # over 256 kB, which s3transfer sends before its bandwidth limit starts: the tiny
        # model's ~200 kB went at full speed, and the test raced the upload (CI, stop 17).
        save_tiny_model("llama", model_root / "wide-llama", hidden_size=128, intermediate_size=512)
        slow = stack.start_worker(
            env={**_host(stack, "host-a"), "LINEARIZE_S3_MAX_BANDWIDTH_MB_S": "0.01"}
        )
        with stack.client() as client:
            spec = tiny_spec(client.upload_dataset(text_file).id, model="wide-llama")
            job = client.submit(spec)

            def uploading_weights():
                events = client.events(job.id, limit=1000).items
                return any(
                    e.stage == "publish" and e.current >= 1 and ".safetensors" in e.message
                    for e in events
                )

            wait_until(uploading_weights, 120, what="the upload of the weights to start")
        job_prefix = f"{PREFIX}/jobs/{job.id}/"
        partial = bucket_keys(s3_server, bucket, job_prefix)
        assert partial and all("/attempts/" in k for k in partial), partial  # no manifest yet
        with stack.http() as http:
            assert http.get(f"/v1/jobs/{job.id}/artifacts").status_code == 409
            assert http.get(f"/v1/jobs/{job.id}/checkpoint").status_code == 409
        stack.kill_worker(slow)

        stack.start_worker(env=_host(stack, "host-b"))
        done = stack.wait_terminal(job.id)
        assert done.status == "succeeded" and done.attempts == 2, (done.error, stack.tail())
        keys = bucket_keys(s3_server, bucket, job_prefix)
        attempts = {k.split("/")[4] for k in keys if "/attempts/" in k}
        assert len(attempts) == 1 and attempts.isdisjoint(k.split("/")[4] for k in partial)
        with stack.client() as client:
            listed = client.artifacts(job.id).items
            got = client.download_checkpoint(job.id, tmp_path / "out")
        assert {a.path for a in listed} == {a.path for a in got.items}
        assert sorted(k.split("/", 5)[5] for k in keys if "/attempts/" in k) == sorted(
            a.path for a in listed
        )
    finally:
        stack.stop()


def test_s3_server_restarted_mid_job_fails_the_job_clearly_and_publishes_nothing(
    tmp_path, pg_url, shared_redis, model_root, text_file
):
    server = S3Server(tmp_path / "moto.log").start()
    bucket = server.new_bucket()
    stack = _bucket_stack(tmp_path / "stack", server, bucket, pg_url, shared_redis, model_root)
    try:
        stack.start_api()
        stack.start_worker(env=_host(stack, "host-a"))
        with stack.client() as client:
            job = client.submit(tiny_spec(client.upload_dataset(text_file).id, **HEAVY))

            def computing():
                events = client.events(job.id, limit=1000).items
                return any(e.type == "progress" and e.stage not in ("load", "data") for e in events)

            wait_until(computing, 120, what="the job to compute")
        server.kill()  # in-memory server: it comes back empty, as a wiped store would
        done = stack.wait_terminal(job.id)
        assert done.status == "failed" and done.error.code == "artifact_store", done.error
        assert f"s3://{bucket}/{PREFIX}" in done.error.message and done.error.exit_code == 3
        with stack.http() as http:
            ready = http.get("/readyz").json()
            assert (
                ready["checks"]["artifacts"] is False
                and "unreachable" in ready["checks"]["artifacts_error"]
            ), ready
            assert http.get(f"/v1/jobs/{job.id}/artifacts").status_code == 404

        restarted = S3Server(tmp_path / "moto2.log")
        restarted.port = server.port
        restarted.start().client().create_bucket(Bucket=bucket)
        with stack.http() as http:
            wait_until(lambda: http.get("/readyz").status_code == 200, 30, what="/readyz")
        assert bucket_keys(restarted, bucket, f"{PREFIX}/jobs/{job.id}/") == []
        with stack.client() as client:
            again = client.submit(tiny_spec(client.upload_dataset(text_file).id))
        assert stack.wait_terminal(again.id).status == "succeeded", stack.tail()
        restarted.kill()
    finally:
        stack.stop()
        server.kill()


@pytest.mark.parametrize("problem", ["wrong_credentials", "missing_bucket"])
def test_unusable_bucket_is_reported_at_start_in_readyz_and_in_the_worker_log(
    problem, tmp_path, s3_server, shared_redis, model_root
):
    if problem == "wrong_credentials":
        server = S3Server(tmp_path / "strict.log", strict=True).start()
        bucket, expected = "any-bucket", "refused the credentials"
    else:
        server, bucket, expected = s3_server, "no-such-bucket-here", "does not exist"
    stack = _bucket_stack(
        tmp_path / "stack",
        server,
        bucket,
        f"sqlite:///{tmp_path / 'jobs.sqlite'}",
        shared_redis,
        model_root,
    )
    try:
        stack.start_api()
        api_log = stack.root / "api.log"
        wait_until(lambda: expected in api_log.read_text(errors="ignore"), 10, what="API log")
        with stack.http() as http:
            ready = http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["artifacts"] is False
        assert expected in ready.json()["checks"]["artifacts_error"] and bucket in ready.text
        worker = stack.start_worker(env=_host(stack, "host-a"), wait=False)
        assert worker.wait(timeout=60) != 0
        log = (stack.root / "worker-0.log").read_text(errors="ignore")
        assert "artifact store not usable, worker not started" in log and expected in log
    finally:
        stack.stop()
        if server is not s3_server:
            server.kill()


def test_retry_cleans_unlisted_objects_and_multipart_uploads_of_dead_attempts(
    tmp_path, s3_server, monkeypatch
):
    from infra.objectstore import artifact_store
    from infra.settings import Settings

    bucket = s3_server.new_bucket()
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    settings = Settings(
        artifact_url=f"s3://{bucket}/{PREFIX}",
        s3_endpoint_url=s3_server.url,
        scratch_dir=tmp_path / "scratch",
    )
    store = artifact_store(settings)
    store.check()
    client = s3_server.client()
    dead = f"{PREFIX}/jobs/job_x/attempts/1-dead"
    client.put_object(Bucket=bucket, Key=f"{dead}/config.json", Body=b"{}")
    upload = client.create_multipart_upload(Bucket=bucket, Key=f"{dead}/model.safetensors")
    client.upload_part(
        Bucket=bucket,
        Key=f"{dead}/model.safetensors",
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"x" * 1024,
    )
    assert store.open_file("job_x", "config.json") is None  # no manifest: nothing readable

    store.clean_attempts("job_x")
    assert bucket_keys(s3_server, bucket, f"{PREFIX}/jobs/") == []
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    # Old unfinished uploads anywhere under jobs/ are aborted by the retention pass. (moto
    # reports every upload as initiated in 2010, so only the "old" side is checkable here.)
    client.create_multipart_upload(Bucket=bucket, Key=f"{PREFIX}/jobs/job_y/attempts/a/f")
    client.create_multipart_upload(Bucket=bucket, Key="outside-the-prefix/f")
    assert store.abort_stale_uploads(3600) == 1
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket)["Uploads"]] == [
        "outside-the-prefix/f"
    ]


def test_a_baseline_computed_on_one_host_is_fetched_from_the_bucket_on_another(
    tmp_path, s3_server, pg_url, shared_redis, model_root, text_file
):
    bucket = s3_server.new_bucket()
    stack = _bucket_stack(tmp_path / "stack", s3_server, bucket, pg_url, shared_redis, model_root)
    cached_note = "baseline and analysis read from the cache"
    try:
        stack.start_api()
        host_a = stack.start_worker(env=_own_cache(_host(stack, "host-a")))
        with stack.client() as client:
            spec = tiny_spec(client.upload_dataset(text_file).id)
            first = client.submit(spec)
            assert stack.wait_terminal(first.id).status == "succeeded", stack.tail()
            assert not any(cached_note in n for n in client.report(first.id)["notes"])
        manifests = [
            k
            for k in bucket_keys(s3_server, bucket, f"{PREFIX}/cache/")
            if k.endswith("/manifest.json")
        ]
        # The analysis and, as its own entry, the agreement reference (top-64 logits).
        key = manifests[0].split("/")[3]
        assert manifests == [
            f"{PREFIX}/cache/analysis/{key}/manifest.json",
            f"{PREFIX}/cache/reference/{key}-top64/manifest.json",
        ]
        stack.kill_worker(host_a)

        # Host B has an empty scratch: it reads host A's entry from the bucket.
        stack.start_worker(env=_own_cache(_host(stack, "host-b", LINEARIZE_SCRATCH_MAX_SIZE="1GB")))
        with stack.client() as client:
            second = client.submit(spec)
            assert stack.wait_terminal(second.id).status == "succeeded", stack.tail()
            notes = client.report(second.id)["notes"]
        entry = stack.root / "host-b" / "scratch" / "cache" / key
        assert f"{cached_note} ({entry.parent}, fetched from the shared cache)" in notes, notes
        assert sorted(p.name for p in entry.iterdir()) == [
            "entry.json",
            "reference-top64.safetensors",
            "residuals.safetensors",
        ]
    finally:
        stack.stop()
