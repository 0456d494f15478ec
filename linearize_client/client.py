"""A small typed client for the linearize service (what `linearize submit` uses).

    with LinearizeClient("http://127.0.0.1:8000", token="...") as client:
        dataset = client.upload_dataset(Path("train.txt"))
        job = client.submit({"kind": "compress", "layers": 2, "data": {"dataset_id": dataset.id}})
        for event in client.stream_events(job.id):
            ...
        client.download_checkpoint(job.id, Path("out"))

Only httpx and the api_schemas models: no torch, no service imports.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
from pydantic import BaseModel

from api_schemas.jobs import (
    TERMINAL_STATUSES,
    ArtifactList,
    Dataset,
    EventList,
    Job,
    JobEvent,
    JobList,
)


class ApiError(Exception):
    """The service answered with an error status."""

    def __init__(self, status_code: int, detail: Any):
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"HTTP {status_code}: {format_detail(detail)}")


class IntegrityError(Exception):
    """A downloaded file does not match the sha256 the service listed."""


def format_detail(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI validation errors
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                msg = str(item.get("msg", "")).removeprefix("Value error, ")
                parts.append(f"{loc}: {msg}" if loc else msg)
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


class LinearizeClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> LinearizeClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, url, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except (ValueError, AttributeError):
                detail = response.text
            raise ApiError(response.status_code, detail)
        return response

    # Datasets ----------------------------------------------------------------------------

    def upload_dataset(self, source: Path | bytes | str) -> Dataset:
        """Upload a UTF-8 text (a file path, or the bytes/str themselves) as text/plain."""
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if isinstance(source, Path):
            with source.open("rb") as fh:
                response = self._request("POST", "/v1/datasets", content=fh, headers=headers)
        else:
            body = source.encode("utf-8") if isinstance(source, str) else source
            response = self._request("POST", "/v1/datasets", content=body, headers=headers)
        return Dataset.model_validate(response.json())

    # Jobs -----------------------------------------------------------------------------------

    def submit(
        self, spec: BaseModel | Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> Job:
        body = spec.model_dump(mode="json") if isinstance(spec, BaseModel) else dict(spec)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job.model_validate(
            self._request("POST", "/v1/jobs", json=body, headers=headers).json()
        )

    def get_job(self, job_id: str) -> Job:
        return Job.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def list_jobs(
        self, *, status: str | None = None, after: str | None = None, limit: int = 50
    ) -> JobList:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if after:
            params["after"] = after
        return JobList.model_validate(self._request("GET", "/v1/jobs", params=params).json())

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def events(self, job_id: str, *, after: int | None = None, limit: int = 200) -> EventList:
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return EventList.model_validate(
            self._request("GET", f"/v1/jobs/{job_id}/events", params=params).json()
        )

    def stream_events(
        self, job_id: str, *, after: int | None = None, reconnects: int = 5
    ) -> Iterator[JobEvent]:
        """Server-Sent Events until the terminal status event; resumes after a dropped stream."""
        cursor = after
        failures = 0
        while True:
            params: dict[str, Any] = {"stream": "true"}
            if cursor is not None:
                params["after"] = cursor
            try:
                with self._http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events",
                    params=params,
                    timeout=httpx.Timeout(30.0, read=60.0),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise ApiError(response.status_code, response.json().get("detail"))
                    for event in _parse_sse(response.iter_lines()):
                        cursor = event.id
                        failures = 0
                        yield event
                        if event.terminal:
                            return
                # The server ends the stream only after a terminal event; if it closed early
                # (a restart), check and resume from the cursor.
                if self.get_job(job_id).status in TERMINAL_STATUSES:
                    yield from self.events(job_id, after=cursor).items
                    return
            except (httpx.TransportError, httpx.RemoteProtocolError):
                failures += 1
                if failures > reconnects:
                    raise
                time.sleep(min(2.0**failures, 10.0))

    def wait(self, job_id: str, *, timeout: float = 3600.0, poll_s: float = 1.0) -> Job:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job.status in TERMINAL_STATUSES:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            time.sleep(poll_s)

    def report(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}/report").json()

    def artifacts(self, job_id: str) -> ArtifactList:
        return ArtifactList.model_validate(
            self._request("GET", f"/v1/jobs/{job_id}/artifacts").json()
        )

    def download_artifact(self, job_id: str, path: str) -> bytes:
        return self._request("GET", f"/v1/jobs/{job_id}/artifacts/{path}").content

    def download_checkpoint(self, job_id: str, dest: Path) -> ArtifactList:
        """Download every listed file into `dest` and verify its sha256 against the artifact
        list. Each file comes from /artifacts/{path}: streamed by the API, or a redirect to a
        pre-signed object-storage link (followed without the API key, which httpx drops on a
        cross-origin redirect). `dest` is replaced only after everything checks out."""
        manifest = self.artifacts(job_id)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
            root = Path(tmp) / "checkpoint"
            for item in manifest.items:
                path = root / PurePosixPath(item.path)
                if not path.resolve().is_relative_to(root.resolve()):
                    raise IntegrityError(f"{item.path}: path outside the checkpoint")
                path.parent.mkdir(parents=True, exist_ok=True)
                self._download(f"/v1/jobs/{job_id}/artifacts/{item.path}", path)
                if _sha256(path) != item.sha256:
                    raise IntegrityError(f"{item.path}: sha256 mismatch")
            if dest.exists():
                shutil.rmtree(dest)
            root.mkdir(exist_ok=True)
            root.rename(dest)
        return manifest

    def _download(self, url: str, path: Path) -> None:
        with self._http.stream("GET", url, follow_redirects=True) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response.status_code, response.text)
            with path.open("wb") as fh:
                for chunk in response.iter_bytes(1024 * 1024):
                    fh.write(chunk)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_sse(lines: Iterator[str]) -> Iterator[JobEvent]:
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield JobEvent.model_validate(json.loads("\n".join(data)))
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        # `id:`, `event:` and `:` comments carry nothing the JSON body lacks.
    if data:
        yield JobEvent.model_validate(json.loads("\n".join(data)))
