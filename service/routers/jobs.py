"""Jobs: submit, list, inspect, cancel, follow events, fetch the report and the checkpoint."""

from __future__ import annotations

import asyncio
import json
import time
from functools import partial
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse

from api_schemas.jobs import (
    TERMINAL_STATUSES,
    ArtifactList,
    Checkpoint,
    CheckpointFile,
    EventList,
    Job,
    JobList,
    JobStatus,
)
from api_schemas.jobs import Artifact as ArtifactModel
from api_schemas.report import Report
from api_schemas.specs import AnalyzeSpec, CompareSpec, CompressSpec, EvalSpec
from infra.artifacts import iter_tar
from infra.capacity import model_facts, needs_for, refusal
from infra.db import JobRow
from infra.modelcheck import ModelRejected, budget_problem, resolve_model
from infra.objectstore import ArtifactStoreError
from infra.store import (
    IdempotencyConflict,
    TenantLimitExceeded,
    event_to_schema,
    job_to_schema,
)
from service.deps import AppState, StateDep, TenantDep, unprocessable

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# The same discriminated union the CLI builds; FastAPI validates the body with it (422 on error).
JobSpecBody = Annotated[
    AnalyzeSpec | CompressSpec | EvalSpec | CompareSpec, Body(discriminator="kind")
]
_NOT_FOUND = {404: {"description": "No such job for this tenant."}}
SSE_POLL_S = 0.25
SSE_KEEPALIVE_S = 15.0


def _load(state: AppState, tenant: str, job_id: str) -> JobRow:
    row = state.store.get_job(job_id, tenant)
    if row is None:
        # Another tenant's job is indistinguishable from a missing one.
        raise HTTPException(status.HTTP_404_NOT_FOUND, "job not found")
    return row


def _check_spec(spec: object, tenant: str, state: AppState) -> None:
    """What pydantic cannot know: models on this host, datasets of this tenant, webhooks."""
    data = spec.data  # type: ignore[attr-defined]
    if data.path is not None:
        raise unprocessable(
            ["data", "path"],
            "data.path is not accepted over REST (it would read the server's disk); "
            "upload the text with POST /v1/datasets and pass data.dataset_id",
        )
    if getattr(spec, "task_dir", None) is not None:
        raise unprocessable(
            "task_dir",
            "task_dir is not accepted over REST (it would read the server's disk, and lm-eval "
            "task YAMLs can run code); use lm-eval's built-in tasks",
        )
    if data.dataset_id is not None:
        key = ("dataset", tenant, data.dataset_id)
        if state.recent(key, lambda: state.store.get_dataset(tenant, data.dataset_id)) is None:
            raise unprocessable(["data", "dataset_id"], f"unknown dataset {data.dataset_id!r}")
    models = spec.models if isinstance(spec, CompareSpec) else [spec.model]  # type: ignore[attr-defined]
    if getattr(spec, "reference", None) is not None:  # eval --reference: a model like any other
        models = [*models, spec.reference]  # type: ignore[attr-defined]
    for name in models:
        try:
            source = state.recent(("model", name), partial(resolve_model, name, state.settings))
        except ModelRejected as exc:
            raise unprocessable("model", str(exc)) from None
        problem = budget_problem(spec, source.num_layers, name)
        if problem is not None:
            raise unprocessable(problem[0], problem[1])
        _check_capacity(spec, source, state)
    url = getattr(spec, "webhook_url", None)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise unprocessable("webhook_url", "webhook_url must be an http(s) URL")
        if parts.hostname.lower() not in {h.lower() for h in state.settings.webhook_allowed_hosts}:
            raise unprocessable(
                "webhook_url",
                f"webhook host {parts.hostname!r} is not in LINEARIZE_WEBHOOK_ALLOWED_HOSTS",
            )


def _check_capacity(spec: object, source, state: AppState) -> None:
    """Refuse what no registered worker can hold (memory, scratch disk), with the numbers."""
    if source.path is None:
        return  # alias, hub or bucket model: its files are not here to be measured
    facts = state.recent(("facts", source.path), lambda: model_facts(source.path))
    if facts is None:
        return  # not a local safetensors directory with a readable config: nothing to estimate
    needs = needs_for(spec, facts)
    alive_s = 3 * state.settings.worker_heartbeat_s
    workers = state.recent(("workers",), lambda: state.store.alive_workers(alive_s))
    problem = refusal(needs, workers)
    if problem is not None:
        raise unprocessable(problem[0], problem[1])


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Job,
    responses={
        409: {"description": "Idempotency-Key reused with a different body."},
        422: {"description": "Invalid spec, model, dataset, budget or webhook."},
        429: {"description": "Too many queued jobs for this tenant."},
    },
)
def submit_job(
    spec: JobSpecBody,
    tenant: TenantDep,
    state: StateDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Job:
    """Queue a job. It is stored first, so a submit succeeds even while the broker is down."""
    _check_spec(spec, tenant, state)
    try:
        row, created = state.store.create_job(
            tenant,
            spec,
            idempotency_key=idempotency_key,
            max_queued=state.settings.tenant_max_queued,
        )
    except IdempotencyConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except TenantLimitExceeded as exc:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS, str(exc), headers={"Retry-After": "10"}
        ) from None
    if created and not state.broker.publish_job(row.id):
        state.store.clear_enqueued(row.id)
    job = job_to_schema(row, state.settings.public_base_url)
    response.headers["Location"] = job.urls.self
    return job


@router.get("", response_model=JobList)
def list_jobs(
    tenant: TenantDep,
    state: StateDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    after: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> JobList:
    """This tenant's jobs, newest first."""
    rows = state.store.list_jobs(tenant, status=status_, after=after, limit=limit)
    base = state.settings.public_base_url
    return JobList(
        items=[job_to_schema(r, base) for r in rows],
        next_cursor=rows[-1].id if len(rows) == limit else None,
    )


@router.get("/{job_id}", response_model=Job, responses=_NOT_FOUND)
def get_job(job_id: str, tenant: TenantDep, state: StateDep) -> Job:
    return job_to_schema(_load(state, tenant, job_id), state.settings.public_base_url)


@router.post("/{job_id}/cancel", response_model=Job, responses=_NOT_FOUND)
def cancel_job(job_id: str, tenant: TenantDep, state: StateDep) -> Job:
    """Idempotent. A queued job is cancelled at once; a running one becomes `cancelling` and
    stops at the pipeline's next step or batch (never a killed process)."""
    _load(state, tenant, job_id)
    state.store.request_cancel(job_id)
    return job_to_schema(_load(state, tenant, job_id), state.settings.public_base_url)


def _sse(event) -> str:
    return f"id: {event.id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={
        **_NOT_FOUND,
        200: {
            "description": "A page of events, or with stream=true a text/event-stream that "
            "ends after the terminal status event.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
)
async def job_events(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    state: StateDep,
    after: Annotated[int | None, Query(description="last seen event id")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    stream: bool = False,
    last_event_id: Annotated[str | None, Header()] = None,
):
    row = await run_in_threadpool(_load, state, tenant, job_id)
    if not stream:
        rows = await run_in_threadpool(state.store.list_events, job_id, after=after, limit=limit)
        items = [event_to_schema(r) for r in rows]
        return EventList(
            items=items,
            next_cursor=items[-1].id if items else after,
            terminal=row.status in TERMINAL_STATUSES,
        )
    cursor = after
    if last_event_id and last_event_id.isdigit():
        cursor = int(last_event_id)  # a reconnecting EventSource resumes where it stopped

    async def events():
        nonlocal cursor
        last_sent = time.monotonic()
        while True:
            rows = await run_in_threadpool(state.store.list_events, job_id, after=cursor, limit=500)
            for r in rows:
                event = event_to_schema(r)
                cursor = event.id
                yield _sse(event)
                last_sent = time.monotonic()
                if event.terminal:
                    return
            if not rows:
                job = await run_in_threadpool(state.store.get_job, job_id)
                if job is None or job.status in TERMINAL_STATUSES:
                    # Terminal before our cursor (a late reconnect): nothing more will come.
                    final = await run_in_threadpool(
                        state.store.list_events, job_id, after=cursor, limit=500
                    )
                    for r in final:
                        yield _sse(event_to_schema(r))
                    return
                if await request.is_disconnected():
                    return
                if time.monotonic() - last_sent > SSE_KEEPALIVE_S:
                    yield ": keep-alive\n\n"
                    last_sent = time.monotonic()
                await asyncio.sleep(SSE_POLL_S)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _finished(row: JobRow, what: str) -> None:
    if row.status not in TERMINAL_STATUSES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job is {row.status}; no {what} yet")


@router.get(
    "/{job_id}/report",
    responses={
        200: {"model": Report, "description": "The engine's report.json."},
        **_NOT_FOUND,
        409: {"description": "Not finished yet."},
    },
)
def job_report(job_id: str, tenant: TenantDep, state: StateDep) -> JSONResponse:
    row = _load(state, tenant, job_id)
    _finished(row, "report")
    if not row.report_json:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {row.status} without a report")
    return JSONResponse(json.loads(row.report_json))


def _manifest(row: JobRow) -> list[ArtifactModel]:
    _finished(row, "artifacts")
    if row.artifacts_expired:
        raise HTTPException(status.HTTP_410_GONE, "artifacts expired (retention)")
    if row.status != "succeeded" or not row.artifacts_json:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {row.status} has no artifacts")
    return [ArtifactModel.model_validate(a) for a in json.loads(row.artifacts_json)]


_ARTIFACT_ERRORS = {
    **_NOT_FOUND,
    409: {"description": "Not finished."},
    410: {"description": "Expired."},
}


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=_ARTIFACT_ERRORS)
def list_artifacts(job_id: str, tenant: TenantDep, state: StateDep) -> ArtifactList:
    items = _manifest(_load(state, tenant, job_id))
    return ArtifactList(items=items, total_bytes=sum(a.size for a in items))


@router.get(
    "/{job_id}/artifacts/{path:path}",
    response_class=FileResponse,
    responses={
        **_ARTIFACT_ERRORS,
        200: {"content": {"application/octet-stream": {}}, "description": "Local store."},
        307: {"description": "Object storage: a short-lived pre-signed link to the file."},
    },
)
def get_artifact(job_id: str, path: str, tenant: TenantDep, state: StateDep) -> Response:
    manifest = _manifest(_load(state, tenant, job_id))
    if path not in {a.path for a in manifest}:  # only listed files (no traversal)
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such artifact")
    if state.artifacts.presigned:
        url = _store_call(state.artifacts.download_url, job_id, path)
        if url is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such artifact")
        return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    file = state.artifacts.local_file(job_id, path)
    if file is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such artifact")
    return FileResponse(file, filename=file.name)


def _store_call(action, *args):
    """An artifact store call; an unusable store is 503 with its reason, not a 500."""
    try:
        return action(*args)
    except ArtifactStoreError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None


@router.get("/{job_id}/checkpoint", response_model=Checkpoint, responses=_ARTIFACT_ERRORS)
def get_checkpoint_manifest(job_id: str, tenant: TenantDep, state: StateDep) -> Checkpoint:
    """Every file with size, sha256 and a download link, to fetch shards in parallel."""
    manifest = _manifest(_load(state, tenant, job_id))
    base = state.settings.public_base_url.rstrip("/")
    files = []
    for item in manifest:
        url = None
        if state.artifacts.presigned:
            url = _store_call(state.artifacts.download_url, job_id, item.path)
        if url is None:
            url = f"{base}/v1/jobs/{job_id}/artifacts/{item.path}"
        files.append(CheckpointFile(**item.model_dump(), url=url))
    return Checkpoint(
        job_id=job_id,
        files=files,
        total_bytes=sum(f.size for f in files),
        expires_in_s=state.settings.presigned_url_ttl_s if state.artifacts.presigned else None,
    )


@router.get(
    "/{job_id}/checkpoint.tar",
    response_class=StreamingResponse,
    responses={**_ARTIFACT_ERRORS, 200: {"content": {"application/x-tar": {}}}},
)
def get_checkpoint(job_id: str, tenant: TenantDep, state: StateDep) -> StreamingResponse:
    """The whole checkpoint as a tar stream (members under `checkpoint/`), read through the API
    from either store; on object storage the manifest's links avoid this hop."""
    manifest = _manifest(_load(state, tenant, job_id))

    def open_file(path: str):
        handle = state.artifacts.open_file(job_id, path)
        if handle is None:  # listed in the DB but gone from the store: end the stream broken
            raise RuntimeError(f"artifact {path} of {job_id} is missing from the store")
        return handle

    return StreamingResponse(
        iter_tar(manifest, open_file),
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.tar"'},
    )
