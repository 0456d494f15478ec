"""Fixtures for the dashboard tests: `linearize serve` (embedded broker, SQLite) on a free
loopback port with the tiny test model, and Debian's Chromium driven by Playwright.

Playwright cannot download its own browsers here; it runs the system `chromium`, which
`make test`, `make test-ui` and `.ci/run` install when it is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from ui_helpers import KEYS, REPO, WIKITEXT, free_port, wait_until


@dataclass
class Server:
    url: str
    log: Path
    proc: subprocess.Popen

    def http(self, tenant: str = "alpha") -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=30
        )

    def wait_terminal(self, job_id: str, timeout: float = 180) -> dict:
        with self.http() as http:

            def finished():
                job = http.get(f"/v1/jobs/{job_id}").json()
                return job if job["status"] in ("succeeded", "failed", "cancelled") else None

            try:
                return wait_until(finished, timeout, what=f"job {job_id}")
            except AssertionError:
                raise AssertionError(self.log.read_text(errors="ignore")[-4000:]) from None


@pytest.fixture(scope="session")
def ui_model_root(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("ui-models")
    save_tiny_model("llama", root / "tiny-llama")
    save_tiny_model("llama", root / "tiny-llama-b", seed=1)  # for a compare job
    return root


@pytest.fixture(scope="session")
def ui_text() -> bytes:
    """~120 KB of English (the shared wikitext file when present)."""
    if WIKITEXT.is_file():
        with WIKITEXT.open("rb") as fh:
            return fh.read(120_000).decode("utf-8", errors="ignore").encode()
    return (
        "the model replaces nearly linear blocks by fitted maps and measures the cost " * 1600
    ).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory, ui_model_root) -> Iterator[Server]:
    """`linearize serve` as a user starts it: API and worker children, embedded broker."""
    root = tmp_path_factory.mktemp("ui-serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEARIZE_")}
    env.update(
        LINEARIZE_API_KEYS=",".join(f"{t}:{k}" for t, k in KEYS.items()),
        LINEARIZE_MODEL_ROOTS=str(ui_model_root),
        LINEARIZE_WORKER_HEARTBEAT_S="1",
        LINEARIZE_PROGRESS_INTERVAL_S="0",
        LINEARIZE_CACHE_DIR=str(root / "cache"),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    log = root / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "linearize", "serve", "--port", str(port), "--data-dir", str(root)],
        cwd=REPO,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    served = Server(f"http://127.0.0.1:{port}", log, proc)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited:\n{log.read_text(errors='ignore')}")
        try:
            return httpx.get(f"{served.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 120, what="linearize serve")
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(
            "chromium is not installed (make test-ui and .ci/run install Debian's chromium)"
        )
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium refuses its sandbox.
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@dataclass
class Tab:
    """One browser page plus what it reported: console errors, dialogs, screenshots."""

    page: object
    base: str
    shots: Path
    console_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def goto(self, path: str) -> None:
        self.page.goto(self.base + path)

    def sign_in(self, tenant: str = "alpha") -> None:
        self.goto("/ui/signin")
        self.page.fill("#api-key", KEYS[tenant])
        self.page.click("#signin-form button[type=submit]")
        self.page.wait_for_url("**/ui/jobs")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=path, full_page=True)
        return path


@pytest.fixture
def tab(browser, server, tmp_path) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    opened = Tab(page, server.url, tmp_path)
    page.on(
        "console", lambda m: opened.console_errors.append(m.text) if m.type == "error" else None
    )
    page.on("pageerror", lambda e: opened.console_errors.append(f"uncaught: {e}"))

    def on_dialog(dialog) -> None:
        opened.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    yield opened
    context.close()
