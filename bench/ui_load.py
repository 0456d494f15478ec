"""Dashboard load time: how long the page of a finished job takes to show its whole report.

Starts `linearize serve` (embedded broker, SQLite) on loopback, runs one compress job, then opens
`/ui/jobs/<id>` in headless Chromium (Debian's, through Playwright) --loads times. Each load is a
fresh navigation in a signed-in tab, timed from navigation start to the artifact table being on
the page (the last section drawn: summary, linearity charts, perplexity, healing curve, trigger
tokens and gate are there before it), read from the page's own clock (performance.now()).

    .venv/bin/python bench/ui_load.py                        # bundled SmolLM2-135M, 30 layers
    .venv/bin/python bench/ui_load.py --model tiny-llama     # tiny random model, seconds

Client, server and browser share the machine's cores. Prints a table; writes
bench/results/ui_load_<model>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from load import free_port, percentile, tiny_job
from machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
KEY = "bench-ui-key"


def start_serve(workdir: Path, model_root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEARIZE_")}
    env.update(
        LINEARIZE_API_KEYS=f"bench:{KEY}",
        LINEARIZE_MODEL_ROOTS=str(model_root),
        LINEARIZE_CACHE_DIR=str(workdir / "cache"),
        OMP_NUM_THREADS=str(os.cpu_count() or 1),
    )
    serve = ["-m", "linearize", "serve", "--port", str(port), "--data-dir", str(workdir)]
    proc = subprocess.Popen(
        [sys.executable, *serve],
        cwd=REPO,
        env=env,
        stdout=(workdir / "serve.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"serve did not get ready:\n{(workdir / 'serve.log').read_text()[-3000:]}")


def run_job(url: str, model: str, timeout: float) -> str:
    auth = {"Authorization": f"Bearer {KEY}"}
    text = WIKITEXT.read_bytes() if WIKITEXT.is_file() else b"the linear maps " * 20_000
    with httpx.Client(base_url=url, headers=auth, timeout=60) as http:
        dataset = http.post("/v1/datasets", content=text, headers={"Content-Type": "text/plain"})
        spec = tiny_job(dataset.json()["id"])
        if model != "tiny-llama":
            spec.update(model=model, calib_tokens=2048, eval_tokens=2048, seq_len=512)
            spec.pop("heal_steps")  # the default healing budget: the report has a curve
        else:
            spec["heal_steps"] = 30
        spec["gate_ppl_increase"] = 25
        job_id = http.post("/v1/jobs", json=spec).json()["id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                if job["status"] != "succeeded":
                    raise SystemExit(f"job {job_id} {job['status']}: {job['error']}")
                return job_id
            time.sleep(2)
    raise SystemExit(f"job {job_id} did not finish in {timeout} s")


def measure(url: str, job_id: str, loads: int, shots: Path | None) -> list[float]:
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/ui/signin")
        page.fill("#api-key", KEY)
        page.click("#signin-form button[type=submit]")
        page.wait_for_url("**/ui/jobs")
        for _ in range(loads + 1):  # the first load warms the server's and browser's caches
            page.goto(f"{url}/ui/jobs/{job_id}")
            page.locator("#artifact-table").wait_for(timeout=30_000)
            times.append(page.evaluate("performance.now()"))
        if shots is not None:
            page.screenshot(path=shots, full_page=True)
        browser.close()
    return times[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--loads", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--screenshot", type=Path, help="save the last load's page here")
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        raise SystemExit("needs Debian's chromium (make setup installs it)")
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import save_tiny_model

    with tempfile.TemporaryDirectory(prefix="linearize-ui-bench-") as tmp:
        workdir = Path(tmp)
        save_tiny_model("llama", workdir / "models" / "tiny-llama")
        proc, url = start_serve(workdir, workdir / "models")
        try:
            started = time.monotonic()
            job_id = run_job(url, args.model, args.timeout)
            job_seconds = time.monotonic() - started
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as http:
                report_bytes = len(http.get(f"/v1/jobs/{job_id}/report").content)
            times = measure(url, job_id, args.loads, args.screenshot)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    result = {
        "model": args.model,
        "loads": len(times),
        "median_ms": statistics.median(times),
        "p90_ms": percentile(times, 90),
        "max_ms": max(times),
        "report_bytes": report_bytes,
        "job_seconds": round(job_seconds, 1),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
    }
    out = REPO / "bench" / "results" / f"ui_load_{args.model}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| model | loads | median | p90 | max | report.json |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {len(times)} | {result['median_ms']:.0f} ms | "
        f"{result['p90_ms']:.0f} ms | {result['max_ms']:.0f} ms | {report_bytes / 1024:.0f} KB |"
    )
    print(f"machine: {result['machine']}; job took {job_seconds:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
