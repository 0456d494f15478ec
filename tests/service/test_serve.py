"""`linearize serve`: API and worker as child processes, embedded broker when none is set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
from stack_helpers import KEYS, REPO, WIKITEXT, free_port, tiny_spec, wait_until


def _serve(tmp_path, port: int, **env) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LINEARIZE_")}
    environment.update(
        LINEARIZE_API_KEYS=",".join(f"{t}:{k}" for t, k in KEYS.items()),
        LINEARIZE_WORKER_HEARTBEAT_S="1",
        OMP_NUM_THREADS="1",
        **env,
    )
    log = (tmp_path / "serve.log").open("ab")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "linearize",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        cwd=REPO,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_with_the_embedded_broker_runs_a_job(tmp_path, model_root, text_file):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(tmp_path, port, LINEARIZE_MODEL_ROOTS=str(model_root))
    try:
        wait_until(lambda: _ready(url), 90, what="serve to be ready")
        from linearize_client import LinearizeClient

        with LinearizeClient(url, KEYS["alpha"]) as client:
            dataset = client.upload_dataset(text_file)
            job = client.submit(tiny_spec(dataset.id))
            done = client.wait(job.id, timeout=180, poll_s=0.5)
        assert done.status == "succeeded", (done.error, (tmp_path / "serve.log").read_text())
        assert (tmp_path / "data" / "broker.sqlite").exists()  # no Redis involved
    finally:
        code = _stop(proc)
    assert code == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=2)


@pytest.mark.slow
@pytest.mark.skipif(not WIKITEXT.is_file(), reason="needs the shared wikitext file")
def test_serve_compresses_the_bundled_model_on_redis(tmp_path, shared_redis):
    """The acceptance run: smollm2-135m, 2 layers, wikitext -> 28 layers with transformers."""
    import tarfile

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(
        tmp_path,
        port,
        LINEARIZE_BROKER_URL=shared_redis,
        LINEARIZE_JOB_QUEUE=f"slow-{port}",
        LINEARIZE_WEBHOOK_QUEUE=f"slow-{port}.w",
    )
    try:
        wait_until(lambda: _ready(url), 90, what="serve to be ready")
        auth = {"Authorization": f"Bearer {KEYS['alpha']}"}
        with httpx.Client(base_url=url, timeout=60) as http:
            ds = http.post(
                "/v1/datasets",
                content=WIKITEXT.read_bytes(),
                headers={**auth, "Content-Type": "text/plain"},
            ).json()["id"]
            body = {
                "kind": "compress",
                "model": "smollm2-135m",
                "layers": 2,
                "data": {"dataset_id": ds},
                "calib_tokens": 2048,
                "eval_tokens": 2048,
                "seq_len": 512,
                "format": "standard",
                "heal_tokens": 1536,  # the fit windows: no minute-long teacher pass over 64k
                # The service path is under test here, not the quality: one method (auto would
                # try both), 5 healing steps instead of the 60 s default, no generation check.
                "method": "fit",
                "heal_steps": 5,
                "generation_prompts": 0,
            }
            too_many = http.post("/v1/jobs", json={**body, "layers": 40}, headers=auth)
            assert too_many.status_code == 422 and "at most L - 2 = 28" in too_many.text
            job_id = http.post("/v1/jobs", json=body, headers=auth).json()["id"]

            def finished():
                job = http.get(f"/v1/jobs/{job_id}", headers=auth).json()
                return job if job["status"] in ("succeeded", "failed", "cancelled") else None

            job = wait_until(finished, 1200, interval=2, what="the bundled compression")
            assert job["status"] == "succeeded", job["error"]
            assert (
                http.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer kb"}).status_code
                == 404
            )
            assert http.get(f"/v1/jobs/{job_id}").status_code == 401
            tar_path = tmp_path / "ckpt.tar"
            with (
                http.stream("GET", f"/v1/jobs/{job_id}/checkpoint.tar", headers=auth) as r,
                tar_path.open("wb") as fh,
            ):
                for chunk in r.iter_bytes():
                    fh.write(chunk)
        with tarfile.open(tmp_path / "ckpt.tar") as archive:
            archive.extractall(tmp_path / "x", filter="data")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tmp_path / "x" / "checkpoint")
        assert model.config.num_hidden_layers == 28
    finally:
        _stop(proc)
