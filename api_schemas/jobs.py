"""The service's resources: jobs, datasets, events, artifacts, and the names that cross the queue.

The REST API returns these, the Python client parses them, the worker builds webhook bodies from
them. Only the service owns their meaning; the engine never sees them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api_schemas.specs import JobSpec

# Celery task names: the API publishes by name, so it never imports the worker package.
TASK_RUN_JOB = "linearize.run_job"
TASK_SEND_WEBHOOK = "linearize.send_webhook"

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_STATUSES: frozenset[str] = frozenset({"queued", "running", "cancelling"})

EventType = Literal["status", "progress", "log"]


class _Resource(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobProgress(_Resource):
    """Progress inside the current pipeline stage (the engine's ProgressEvent plus a percent)."""

    stage: str | None = None
    current: int = 0
    total: int = 0
    percent: float = 0.0


class JobError(_Resource):
    code: str = Field(..., description="Stable machine code, e.g. bad_budget, worker_lost.")
    message: str
    exit_code: int = Field(
        3, description="What `linearize submit` exits with: 2 bad input, 3 runtime failure."
    )


class JobUrls(_Resource):
    self: str
    events: str
    cancel: str
    report: str
    artifacts: str
    checkpoint: str


class Job(_Resource):
    id: str
    kind: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    attempts: int = Field(0, description="Times a worker started this job (retries included).")
    error: JobError | None = None
    spec: JobSpec
    metadata: dict[str, str] = Field(default_factory=dict)
    urls: JobUrls


class JobList(_Resource):
    items: list[Job]
    next_cursor: str | None = Field(None, description="Pass as `after` to get the next page.")


class Dataset(_Resource):
    id: str
    bytes: int
    sha256: str
    filename: str | None = None
    created_at: datetime | None = None


class JobEvent(_Resource):
    id: int = Field(..., description="Cursor: pass the last seen id as `after`.")
    job_id: str
    ts: datetime
    type: EventType
    status: JobStatus | None = None
    stage: str | None = None
    current: int = 0
    total: int = 0
    message: str = ""
    data: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.type == "status" and self.status in TERMINAL_STATUSES


class EventList(_Resource):
    items: list[JobEvent]
    next_cursor: int | None = None
    terminal: bool = Field(False, description="The job has reached a terminal status.")


class Artifact(_Resource):
    path: str = Field(..., description="Relative to the checkpoint directory, '/' separated.")
    size: int
    sha256: str


class ArtifactList(_Resource):
    items: list[Artifact]
    total_bytes: int


class CheckpointFile(Artifact):
    url: str = Field(
        ...,
        description="Where to GET the file: a short-lived pre-signed link on object storage, "
        "else the API's artifact route (send the API key).",
    )


class Checkpoint(_Resource):
    """A published checkpoint: every file with size, sha256 and a download link."""

    job_id: str
    files: list[CheckpointFile]
    total_bytes: int
    expires_in_s: int | None = Field(
        None, description="Lifetime of pre-signed links; null when links go through the API."
    )
