"""Service load benchmark: lost jobs under concurrent submits, and API latency at 50 clients.

Phase 1 (throughput, 0 lost): JOBS tiny compress jobs submitted by CLIENTS concurrent clients
against a real API + Celery worker (Redis broker), then every job followed to a terminal state.
Phase 2 (latency): LATENCY_CLIENTS concurrent clients, each repeatedly submitting a job and
reading its status (`POST /v1/jobs` + `GET /v1/jobs/{id}`), measured client-side. The worker is
stopped first, as in production where GPU workers run on other machines than the API; the
phase-2 jobs are cancelled afterwards. Two pacings: `paced` (each client waits --think-ms
between requests, like a polling CI client) and `closed` (back to back: saturation).

    .venv/bin/python bench/load.py                       # SQLite job store, local Redis
    .venv/bin/python bench/load.py --database postgres   # PostgreSQL job store
    .venv/bin/python bench/load.py --s3 --database postgres --workers 2 --worker-concurrency 1 \
        --no-latency                                     # artifacts in a bucket, 2 workers

--s3 starts an S3-compatible server (moto's standalone server, as in the tests), puts the
artifacts in a bucket and runs --workers worker processes, each with its own scratch directory
and no shared artifact directory. After the jobs it times the download of a --download-mb
checkpoint through the pre-signed link against through the API (`checkpoint.tar`).

Needs Redis at --redis (default redis://127.0.0.1:6379/12) and, for --database postgres,
PostgreSQL at --postgres. Writes bench/results/service_load_<database>.json and prints a table.
Client, API and worker share the machine's cores: numbers are upper bounds on real latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"succeeded", "failed", "cancelled"}
KEY = "bench-key"
METRICS_KEY = "bench-metrics"
ROUTES = {"submit": ("POST", "/v1/jobs"), "status": ("GET", "/v1/jobs/{job_id}")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


class Service:
    def __init__(
        self,
        workdir: Path,
        database_url: str,
        redis_url: str,
        model_root: Path,
        extra_env: dict | None = None,
    ):
        queue = f"bench-{uuid.uuid4().hex[:6]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "LINEARIZE_DATA_DIR": str(workdir / "data"),
            "LINEARIZE_DATABASE_URL": database_url,
            "LINEARIZE_BROKER_URL": redis_url,
            "LINEARIZE_MODEL_ROOTS": str(model_root),
            "LINEARIZE_API_KEYS": f"bench:{KEY}",
            "LINEARIZE_METRICS_KEY": METRICS_KEY,
            "LINEARIZE_JOB_QUEUE": queue,
            "LINEARIZE_WEBHOOK_QUEUE": f"{queue}.webhooks",
            "LINEARIZE_TENANT_MAX_QUEUED": "100000",
            "LINEARIZE_TENANT_MAX_RUNNING": "8",
            "LINEARIZE_RECONCILE_INTERVAL_S": "5",
            # A warm pool process per CPU: the bench measures the service, not torch imports.
            "LINEARIZE_WORKER_MAX_TASKS_PER_CHILD": "0",
            "OMP_NUM_THREADS": "1",
            **(extra_env or {}),
        }
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            args,
            cwd=REPO,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self, concurrency: int, api_workers: int = 1, workers: int = 1) -> None:
        self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "service.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                "--no-access-log",
                "--workers",
                str(api_workers),
            ],
        )
        for index in range(workers):
            # Each worker as on its own host: its own data and scratch directories.
            own = self.workdir / f"host-{index}"
            self._spawn(
                f"worker-{index}",
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "worker.app",
                    "worker",
                    "-c",
                    str(concurrency),
                    "-n",
                    f"bench{index}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel",
                    "WARNING",
                ],
                {"LINEARIZE_SCRATCH_DIR": str(own / "scratch")} if workers > 1 else None,
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("service did not become ready; see logs in " + str(self.workdir))

    def stop(self, name: str | None = None) -> None:
        for key in [name] if name else list(self.procs):
            proc = self.procs.pop(key, None)
            if proc is None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def tiny_job(dataset_id: str) -> dict:
    return {
        "kind": "compress",
        "model": "tiny-llama",
        "layers": 2,
        "data": {"dataset_id": dataset_id},
        "calib_tokens": 256,
        "eval_tokens": 256,
        "seq_len": 64,
        "heal_steps": 0,
    }


def phase_throughput(url: str, dataset_id: str, jobs: int, clients: int, timeout: float) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    per_client = [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]

    def client(n: int) -> list[tuple[str | None, int]]:
        out = []
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            for _ in range(n):
                response = http.post("/v1/jobs", json=tiny_job(dataset_id))
                out.append(
                    (
                        response.json().get("id") if response.status_code == 202 else None,
                        response.status_code,
                    )
                )
        return out

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, per_client) for r in batch]
    submit_s = time.monotonic() - start
    ids = [job_id for job_id, _ in results if job_id]
    statuses: dict[str, str] = {}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        deadline = time.monotonic() + timeout
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                response = http.get(f"/v1/jobs/{job_id}")
                if response.status_code == 200 and response.json()["status"] in TERMINAL:
                    statuses[job_id] = response.json()["status"]
                    pending.discard(job_id)
            time.sleep(1)
    total_s = time.monotonic() - start
    return {
        "jobs": jobs,
        "clients": clients,
        "accepted": len(ids),
        "refused": sum(1 for job_id, _ in results if job_id is None),
        "terminal": len(statuses),
        "succeeded": sum(1 for s in statuses.values() if s == "succeeded"),
        "first_succeeded": next((j for j in ids if statuses.get(j) == "succeeded"), None),
        "lost": len(ids) - len(statuses),
        "submit_s": round(submit_s, 2),
        "all_terminal_s": round(total_s, 2),
        "jobs_per_s": round(len(statuses) / total_s, 2),
    }


def server_buckets(url: str) -> dict[str, dict[float, float]]:
    """The API's own latency histogram (/metrics): route -> {upper bound s: cumulative count}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(
        f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=30
    ).text
    buckets: dict[str, dict[float, float]] = {name: {} for name in ROUTES}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith("_bucket"):
                continue
            labels = sample.labels
            for name, (method, route) in ROUTES.items():
                if (labels.get("method"), labels.get("route")) == (method, route):
                    bound = float(labels["le"])
                    buckets[name][bound] = buckets[name].get(bound, 0.0) + sample.value
    return buckets


def server_p99_bound_ms(before: dict, after: dict) -> dict:
    """Per route, the histogram bucket that holds the server-side p99 of the phase (the time
    from the request reaching the app to its response): an upper bound, in ms."""
    bounds = {}
    for name in ROUTES:
        delta = {b: after[name].get(b, 0.0) - before[name].get(b, 0.0) for b in after[name]}
        total = delta.get(float("inf"), 0.0)
        if not total:
            continue
        bound = min(b for b, n in delta.items() if n >= 0.99 * total)
        bounds[f"server_{name}_p99_at_most_ms"] = bound * 1000 if bound != float("inf") else None
    return bounds


async def phase_latency(
    url: str, dataset_id: str, clients: int, rounds: int, think_s: float, warmup: int
) -> tuple[dict, list[str]]:
    headers = {"Authorization": f"Bearer {KEY}"}
    first_ms: list[float] = []  # each client's warm-up submits (new connection, cold paths)
    submit_ms: list[float] = []
    status_ms: list[float] = []
    errors = 0
    created: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as http:

        async def one_client(index: int) -> None:
            nonlocal errors
            await asyncio.sleep(think_s * index / clients)  # spread the first requests
            for round_ in range(-warmup, rounds):
                timed = round_ >= 0  # warm-up rounds open the connections and are not counted
                t0 = time.perf_counter()
                response = await http.post("/v1/jobs", json=tiny_job(dataset_id))
                if timed:
                    submit_ms.append(1000 * (time.perf_counter() - t0))
                else:
                    first_ms.append(1000 * (time.perf_counter() - t0))
                if response.status_code != 202:
                    errors += 1
                    continue
                job_id = response.json()["id"]
                created.append(job_id)
                await asyncio.sleep(think_s)
                t0 = time.perf_counter()
                response = await http.get(f"/v1/jobs/{job_id}")
                if timed:
                    status_ms.append(1000 * (time.perf_counter() - t0))
                errors += response.status_code != 200
                await asyncio.sleep(think_s)

        start = time.monotonic()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.monotonic() - start
    requests = len(submit_ms) + len(status_ms)
    return {
        "clients": clients,
        "think_ms": round(think_s * 1000),
        "requests": requests,
        "errors": errors,
        "req_per_s": round(requests / elapsed, 1),
        "warmup_rounds": warmup,
        "warmup_submit_max_ms": round(max(first_ms), 1) if first_ms else None,
        "submit_p50_ms": round(statistics.median(submit_ms), 1),
        "submit_p99_ms": round(percentile(submit_ms, 99), 1),
        "status_p50_ms": round(statistics.median(status_ms), 1),
        "status_p99_ms": round(percentile(status_ms, 99), 1),
    }, created


def phase_download(service: Service, job_id: str, megabytes: int, workdir: Path) -> dict:
    """Replace a finished job's checkpoint by one `megabytes` file (random bytes), published
    with the workers' own code (multipart upload, manifest last), then time its download via
    the pre-signed link and via the API's tar stream, each checked against its sha256."""
    import hashlib

    from sqlalchemy import update

    from api_schemas.jobs import Artifact
    from infra.db import JobRow, make_engine
    from infra.objectstore import artifact_store
    from infra.settings import Settings
    from infra.store import Store

    os.environ.update({k: v for k, v in service.env.items() if k.startswith("AWS_")})
    settings = Settings(
        **{
            k.removeprefix("LINEARIZE_").lower(): v
            for k, v in service.env.items()
            if k.startswith("LINEARIZE_")
        }
    )
    staged = workdir / "big" / "checkpoint"
    staged.mkdir(parents=True)
    digest = hashlib.sha256()
    with (staged / "model.safetensors").open("wb") as fh:
        for _ in range(megabytes):
            chunk = os.urandom(1024 * 1024)
            digest.update(chunk)
            fh.write(chunk)
    item = Artifact(
        path="model.safetensors", size=megabytes * 1024 * 1024, sha256=digest.hexdigest()
    )
    t0 = time.monotonic()
    artifact_store(settings).publish(job_id, "bench-big", staged, [item], lambda: None)
    upload_s = time.monotonic() - t0
    (staged / "model.safetensors").unlink()
    store = Store(make_engine(settings.resolved_database_url))
    with store.session() as s:
        s.execute(
            update(JobRow)
            .where(JobRow.id == job_id)
            .values(artifacts_json=json.dumps([item.model_dump()]))
        )
        s.commit()

    def timed_get(http: httpx.Client, url: str) -> tuple[float, str, int]:
        sha, size = hashlib.sha256(), 0
        t0 = time.monotonic()
        with http.stream("GET", url) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes(1024 * 1024):
                sha.update(chunk)
                size += len(chunk)
        return time.monotonic() - t0, sha.hexdigest(), size

    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=service.url, headers=headers, timeout=600) as api:
        t0 = time.monotonic()
        url = api.get(f"/v1/jobs/{job_id}/checkpoint").json()["files"][0]["url"]
        manifest_s = time.monotonic() - t0
        with httpx.Client(timeout=600) as plain:
            presigned_s, presigned_sha, _ = timed_get(plain, url)
        tar_s, _tar_sha, tar_bytes = timed_get(api, f"/v1/jobs/{job_id}/checkpoint.tar")
    assert presigned_sha == item.sha256, "pre-signed download does not match its sha256"
    mb = megabytes * 1024 * 1024 / 1e6
    return {
        "megabytes": megabytes,
        "publish_s": round(upload_s, 2),
        "manifest_request_s": round(manifest_s, 3),
        "presigned_s": round(presigned_s, 2),
        "presigned_mb_s": round(mb / presigned_s, 1),
        "api_tar_s": round(tar_s, 2),
        "api_tar_mb_s": round(tar_bytes / 1e6 / tar_s, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--latency-clients", type=int, default=50)
    parser.add_argument("--latency-rounds", type=int, default=20)
    parser.add_argument(
        "--warmup-rounds",
        type=int,
        default=1,
        help="untimed rounds per client first: the steady state of clients that keep their "
        "connection (the slowest warm-up submit is reported beside)",
    )
    parser.add_argument("--think-ms", type=float, default=500.0)
    parser.add_argument("--worker-concurrency", type=int, default=2)
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn processes")
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--s3", action="store_true", help="artifacts in a bucket (moto server)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency phase")
    parser.add_argument("--download-mb", type=int, default=500)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import save_tiny_model

    with tempfile.TemporaryDirectory(prefix="linearize-bench-") as tmp:
        workdir = Path(tmp)
        save_tiny_model("llama", workdir / "models" / "tiny-llama")
        schema = None
        if args.database == "postgres":
            from sqlalchemy import create_engine, text

            schema = f"bench_{uuid.uuid4().hex[:8]}"
            admin = create_engine(f"{args.postgres}/linearize_test", isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f"CREATE SCHEMA {schema}"))
            database_url = f"{args.postgres}/linearize_test?options=-csearch_path%3D{schema}"
        else:
            database_url = f"sqlite:///{workdir / 'jobs.sqlite'}"
        s3_server, extra_env = None, {}
        if args.s3:
            sys.path.insert(0, str(REPO / "tests" / "service"))
            from s3_helpers import S3Server, s3_env

            s3_server = S3Server(workdir / "moto.log").start()
            extra_env = s3_env(s3_server, s3_server.new_bucket())
        service = Service(workdir, database_url, args.redis, workdir / "models", extra_env)
        download = None
        latency = []
        try:
            service.start(args.worker_concurrency, args.api_workers, args.workers)
            text_path = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
            body = (
                text_path.read_bytes()[:200_000]
                if text_path.is_file()
                else (" ".join(f"word{i % 997}" for i in range(40_000)).encode())
            )
            dataset_id = httpx.post(
                f"{service.url}/v1/datasets",
                content=body,
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"},
            ).json()["id"]
            throughput = phase_throughput(
                service.url, dataset_id, args.jobs, args.clients, args.timeout
            )
            print(f"throughput: {throughput}", flush=True)
            if args.s3 and throughput["succeeded"]:
                download = phase_download(
                    service, throughput["first_succeeded"], args.download_mb, workdir
                )
                print(f"download: {download}", flush=True)
            for index in range(args.workers):  # API latency alone, as with workers on GPUs
                service.stop(f"worker-{index}")
            created: list[str] = []
            for think in () if args.no_latency else (args.think_ms / 1000, 0.0):
                before = server_buckets(service.url)
                result, ids = asyncio.run(
                    phase_latency(
                        service.url,
                        dataset_id,
                        args.latency_clients,
                        args.latency_rounds,
                        think,
                        args.warmup_rounds,
                    )
                )
                result.update(server_p99_bound_ms(before, server_buckets(service.url)))
                result["pacing"] = "paced" if think else "closed"
                latency.append(result)
                created += ids
                print(f"latency: {result}", flush=True)
            with httpx.Client(
                base_url=service.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}
            ) as http:
                for job_id in created:
                    http.post(f"/v1/jobs/{job_id}/cancel")
        finally:
            service.stop()
            if s3_server is not None:
                s3_server.kill()
            if schema is not None:
                with admin.connect() as conn:
                    conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
                admin.dispose()

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
        "database": args.database,
        "api_workers": args.api_workers,
        "broker": "redis",
        "artifacts": "s3 (moto server)" if args.s3 else "local directory",
        "workers": args.workers,
        "worker_concurrency": args.worker_concurrency,
        "throughput": throughput,
        "latency": latency,
        "download": download,
    }
    suffix = "_s3" if args.s3 else ""
    out = args.out or REPO / "bench" / "results" / f"service_load_{args.database}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print()
    print("| phase | clients | pacing | result |")
    print("|---|---|---|---|")
    t = throughput
    print(
        f"| submit + run | {t['clients']} | closed | {t['accepted']}/{t['jobs']} accepted, "
        f"{t['terminal']} terminal, {t['lost']} lost, {t['all_terminal_s']} s |"
    )
    if download is not None:
        d = download
        print(
            f"| download {d['megabytes']} MiB | 1 | - | pre-signed {d['presigned_s']} s "
            f"({d['presigned_mb_s']} MB/s); API tar stream {d['api_tar_s']} s "
            f"({d['api_tar_mb_s']} MB/s) |"
        )
    for row in latency:
        print(
            f"| submit / status | {row['clients']} | {row['pacing']} ({row['think_ms']} ms) | "
            f"submit p50 {row['submit_p50_ms']} / p99 {row['submit_p99_ms']} ms; status p50 "
            f"{row['status_p50_ms']} / p99 {row['status_p99_ms']} ms; {row['req_per_s']} req/s |"
        )
    return 0 if throughput["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
