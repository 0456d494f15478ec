"""Settings from the environment (prefix LINEARIZE_), read once at each process edge."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from api_schemas.sizes import parse_size


def split_list(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(v) for v in value]  # type: ignore[union-attr]


class Settings(BaseSettings):
    """Every field is LINEARIZE_<NAME>; docs/SERVICE.md lists them with their defaults."""

    model_config = SettingsConfigDict(env_prefix="LINEARIZE_", extra="ignore")

    data_dir: Path = Field(
        Path("linearize-data"), description="Base for the embedded defaults below."
    )
    database_url: str = Field(
        "", description="SQLAlchemy URL; empty: SQLite at DATA_DIR/jobs.sqlite."
    )
    broker_url: str = Field(
        "", description="redis://...; empty: embedded broker sqla+sqlite:///DATA_DIR/broker.sqlite."
    )
    artifact_dir: Path | None = Field(
        None, description="Checkpoints and uploads; DATA_DIR/artifacts."
    )
    artifact_url: str = Field(
        "", description="s3://bucket/prefix for object storage; empty: the ARTIFACT_DIR directory."
    )
    s3_endpoint_url: str = Field("", description="S3-compatible endpoint; empty: AWS S3.")
    s3_public_endpoint_url: str = Field(
        "", description="Endpoint clients reach for pre-signed links; empty: s3_endpoint_url."
    )
    s3_part_size_mb: int = Field(64, ge=5, description="Multipart upload part size (S3 min 5).")
    s3_max_attempts: int = Field(5, ge=1, description="boto3 attempts per request (backoff).")
    s3_max_bandwidth_mb_s: float = Field(0.0, ge=0, description="Per-transfer cap; 0: none.")
    presigned_url_ttl_s: int = Field(900, ge=1, le=7 * 24 * 3600)
    s3_stale_upload_hours: float = Field(
        24.0, gt=0, description="Unfinished multipart uploads older than this are aborted."
    )
    scratch_dir: Path | None = Field(
        None, description="Worker-local scratch (downloads, staging); DATA_DIR/scratch."
    )
    scratch_max_size: int | None = Field(
        None,
        description="Evict least recently used scratch entries above this (e.g. 200GB); none.",
    )
    model_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated s3://bucket/prefix models may lie in."
    )
    model_roots: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated dirs; local models must lie inside."
    )
    allow_hub_models: bool = Field(False, description="Accept hub ids (the worker downloads).")
    max_upload_mb: int = Field(200, ge=1)
    api_keys: str = Field("", description="Development keys: comma-separated tenant:key pairs.")
    api_keys_file: Path | None = Field(
        None, description="Production keys: lines `tenant:sha256hex(key)`."
    )

    job_queue: str = "linearize"
    webhook_queue: str = "linearize.webhooks"
    tenant_max_queued: int = Field(50, ge=1, description="Queued jobs per tenant before 429.")
    tenant_max_running: int = Field(2, ge=1, description="Running jobs per tenant.")
    max_attempts: int = Field(3, ge=1, description="Worker starts before a job fails as lost.")

    lease_ttl_s: float = Field(60.0, gt=0, description="A running job's lease; renewed at 1/3.")
    task_soft_time_limit_s: int = Field(6 * 3600, ge=1)
    task_time_limit_s: int = Field(6 * 3600 + 300, ge=1)
    visibility_timeout_s: int = Field(
        7 * 3600, ge=1, description="Redis redelivery delay; must exceed the hard time limit."
    )
    worker_max_tasks_per_child: int = Field(1, ge=0, description="1 frees GPU memory per job.")
    worker_heartbeat_s: float = Field(10.0, gt=0)
    reconcile_interval_s: float = Field(15.0, gt=0)
    requeue_grace_s: float = Field(
        30.0, ge=0, description="A queued job missing from the broker this long is re-sent."
    )
    broker_retry_after_s: float = Field(
        2.0, ge=0, description="After a failed publish, skip publishing this long (fast 202s)."
    )
    progress_interval_s: float = Field(0.5, ge=0, description="Minimum gap between progress rows.")

    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_secret: str = Field("", description="Standard Webhooks secret (whsec_<base64>).")
    webhook_retry_delays_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [1.0, 5.0, 30.0, 120.0, 600.0]
    )
    webhook_timeout_s: float = 10.0

    artifact_retention_days: float = Field(7.0, gt=0)
    dataset_retention_days: float = Field(30.0, gt=0)
    public_base_url: str = Field("", description="Prefix for job urls; empty: relative urls.")
    metrics_key: str = Field(
        "", description="Bearer key Prometheus scrapes /metrics with; empty: /metrics answers 401."
    )
    webhook_dispatch_interval_s: float = Field(
        1.0, gt=0, description="How often the outbox dispatcher looks for webhooks to deliver."
    )

    @field_validator("model_roots", "webhook_allowed_hosts", "model_urls", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> list[str]:
        return split_list(value)

    @field_validator("webhook_retry_delays_s", mode="before")
    @classmethod
    def _comma_floats(cls, value: object) -> list[float]:
        return [float(v) for v in split_list(value)]

    @field_validator("scratch_max_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> int | None:
        return None if value is None or value == "" else parse_size(value)

    @field_validator("artifact_url")
    @classmethod
    def _artifact_url_scheme(cls, value: str) -> str:
        if value and not (value.startswith("s3://") and len(value) > len("s3://")):
            raise ValueError("artifact_url must be s3://bucket[/prefix] (or empty: a directory)")
        return value

    @field_validator("model_urls")
    @classmethod
    def _model_urls_scheme(cls, value: list[str]) -> list[str]:
        bad = [url for url in value if not url.startswith("s3://")]
        if bad:
            raise ValueError(f"model_urls must be s3://bucket/prefix entries, got {bad}")
        return [url.rstrip("/") + "/" for url in value]

    @model_validator(mode="after")
    def _limits_are_ordered(self) -> Settings:
        # The Redis redelivery trap: an unacked message comes back after visibility_timeout even
        # while its task still runs, so the timeout must outlast the longest possible task.
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ValueError("task_soft_time_limit_s must be below task_time_limit_s")
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError("visibility_timeout_s must exceed task_time_limit_s")
        return self

    # Derived locations -------------------------------------------------------------------

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'jobs.sqlite').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()

    @property
    def resolved_scratch_dir(self) -> Path:
        return (self.scratch_dir or self.data_dir / "scratch").resolve()

    @property
    def broker_is_redis(self) -> bool:
        return self.resolved_broker_url.startswith(("redis://", "rediss://", "redis+socket://"))

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
