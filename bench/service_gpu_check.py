"""GPU check of the worker: jobs run on CUDA inside the forked pool process, while the Celery
parent never loads torch or the CUDA driver (so the fork is safe), one fresh process per job.

No Redis or API needed: the embedded broker (kombu over SQLite), the SQLite job store and a real
`celery -A worker.app worker` subprocess, driven through infra.store / service.broker.

    python bench/service_gpu_check.py --device cuda --out results.json

Prints one JSON object: job outcomes, the device the engine reported, and whether the worker's
parent process had libtorch / libcuda mapped after the jobs (both must be false).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _words(n: int, seed: int = 0) -> str:
    # Random words: no repeated windows, so calibration and evaluation stay disjoint.
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(3000)
    ]
    return " ".join(rng.choice(vocab) for _ in range(n))


def _mapped(pid: int, needle: str) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="linearize-gpu-check-"))
    os.environ.update(
        LINEARIZE_DATA_DIR=str(work / "data"),
        LINEARIZE_MODEL_ROOTS=str(work / "models"),
        LINEARIZE_WORKER_HEARTBEAT_S="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from tiny_models import save_tiny_model

    save_tiny_model("llama", work / "models" / "tiny-llama")

    from api_schemas import CompressSpec, DataSpec
    from infra.artifacts import datasets_dir
    from infra.db import DatasetRow, init_schema, make_engine, utcnow
    from infra.settings import get_settings
    from infra.store import Store
    from service.broker import Broker

    settings = get_settings()
    engine = make_engine(settings.resolved_database_url)
    init_schema(engine)
    store = Store(engine)
    broker = Broker(settings)
    directory = datasets_dir(settings.resolved_artifact_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ds_gpu.txt").write_text(_words(60_000))
    store.add_dataset(
        DatasetRow(
            id="ds_gpu",
            tenant="gpu",
            bytes=0,
            sha256="-",
            filename=None,
            path="ds_gpu.txt",
            created_at=utcnow(),
        )
    )

    log_path = work / "worker.log"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.app",
            "worker",
            "-c",
            "1",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
        ],
        cwd=REPO,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    result: dict = {"device_requested": args.device}
    try:
        deadline = time.monotonic() + 120
        while " ready." not in log_path.read_text(errors="ignore"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker did not start:\n" + log_path.read_text()[-3000:])
            time.sleep(0.5)
        ids = []
        for i in range(args.jobs):
            spec = CompressSpec(
                model="tiny-llama",
                layers=2,
                data=DataSpec(dataset_id="ds_gpu"),
                calib_tokens=4096,
                eval_tokens=4096,
                seq_len=128,
                device=args.device,
                heal_steps=20,
                seed=i,
            )
            row, _ = store.create_job("gpu", spec, idempotency_key=None, max_queued=10)
            assert broker.publish_job(row.id)
            ids.append(row.id)
        start = time.monotonic()
        jobs = []
        while time.monotonic() - start < 300:
            jobs = [store.get_job(i) for i in ids]
            if all(j.status in ("succeeded", "failed", "cancelled") for j in jobs):
                break
            time.sleep(0.5)
        result["wall_s"] = round(time.monotonic() - start, 1)
        result["jobs"] = []
        for job in jobs:
            report = json.loads(job.report_json) if job.report_json else {}
            result["jobs"].append(
                {
                    "status": job.status,
                    "attempts": job.attempts,
                    "error": [job.error_code, job.error_message] if job.error_code else None,
                    "duration_s": job.duration_s,
                    "engine_device": (report.get("throughput") or {}).get("device"),
                    "layers": [
                        (report.get("model") or {}).get("layers_before"),
                        (report.get("model") or {}).get("layers_after"),
                    ],
                }
            )
        # The parent after the jobs: CUDA and torch must never have been loaded there.
        result["parent_has_libtorch"] = _mapped(worker.pid, "libtorch")
        result["parent_has_libcuda"] = _mapped(worker.pid, "libcuda")
        log = log_path.read_text(errors="ignore")
        result["pool_processes"] = sorted(
            set(part.split("]")[0] for part in log.split("[") if part.startswith("ForkPoolWorker"))
            | {
                line.split("/")[1].split("]")[0]
                for line in log.splitlines()
                if "/ForkPoolWorker-" in line
            }
        )
        result["cuda_fork_errors"] = log.count("Cannot re-initialize CUDA")
        result["ok"] = (
            all(j["status"] == "succeeded" for j in result["jobs"])
            and not result["parent_has_libtorch"]
            and not result["parent_has_libcuda"]
            and result["cuda_fork_errors"] == 0
        )
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        (args.out.parent / "worker.log").write_text(log_path.read_text(errors="ignore")[-200_000:])
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
