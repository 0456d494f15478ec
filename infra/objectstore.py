"""Where uploads and checkpoints live: a local directory or an S3-compatible bucket.

`LINEARIZE_ARTIFACT_URL` picks the backend. Both follow one rule: a job's checkpoint becomes
visible in a single last step (a directory rename on disk; the job's `manifest.json` object in the
bucket, written after every file it names), and readers trust only that step. On the bucket a
checkpoint's files sit under `jobs/<id>/attempts/<token>/`; an attempt that dies mid-upload leaves
objects no manifest names, which the next attempt deletes together with its unfinished multipart
uploads. The engine's cache entries (linearize.cache.Remote) follow the same rule under `cache/`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Protocol

from api_schemas.jobs import Artifact
from infra.artifacts import (
    build_manifest,
    checkpoint_dir,
    datasets_dir,
    job_dir,
    publish_dir,
    sha256_file,
)
from infra.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class ArtifactStoreError(RuntimeError):
    """The artifact store cannot be used (wrong credentials, missing bucket, unreachable)."""


class ArtifactStore(Protocol):
    location: str
    presigned: bool  # downloads are links to the store, not streams through the API

    @property
    def incoming_dir(self) -> Path: ...

    def check(self) -> None: ...
    def save_dataset(self, local: Path, name: str) -> None: ...
    def fetch_dataset(self, name: str, scratch: Path) -> Path: ...
    def delete_dataset(self, name: str) -> None: ...
    def staging_dir(self, job_id: str, token: str) -> Path: ...
    def clean_attempts(self, job_id: str) -> None: ...
    def publish(
        self,
        job_id: str,
        token: str,
        staged: Path,
        manifest: list[Artifact],
        commit_ok: Callable[[], None],
        progress: Callable[[int, int, str], None] | None = None,
    ) -> None: ...
    def open_file(self, job_id: str, path: str) -> IO[bytes] | None: ...
    def local_file(self, job_id: str, path: str) -> Path | None: ...
    def download_url(self, job_id: str, path: str) -> str | None: ...
    def delete_job(self, job_id: str) -> None: ...
    def abort_stale_uploads(self, older_than_s: float) -> int: ...
    def shared_cache(self) -> BucketCache | None: ...


class LocalArtifactStore:
    """One directory (a volume shared by API and workers); downloads go through the API."""

    presigned = False

    def __init__(self, root: Path):
        self.root = root
        self.location = str(root)

    @property
    def incoming_dir(self) -> Path:
        """Uploads are written here first; the same disk, so saving is a rename."""
        return datasets_dir(self.root)

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def save_dataset(self, local: Path, name: str) -> None:
        target = datasets_dir(self.root) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(local, target)  # a rename when the API's temp dir is on the same disk

    def fetch_dataset(self, name: str, scratch: Path) -> Path:
        return datasets_dir(self.root) / name  # already on the shared disk: no copy

    def delete_dataset(self, name: str) -> None:
        (datasets_dir(self.root) / name).unlink(missing_ok=True)

    def staging_dir(self, job_id: str, token: str) -> Path:
        # Next to the final place, on the same filesystem, so publishing is one rename.
        return job_dir(self.root, job_id) / f".attempt-{token}"

    def clean_attempts(self, job_id: str) -> None:
        base = job_dir(self.root, job_id)
        if base.is_dir():
            for stale in base.glob(".attempt-*"):
                shutil.rmtree(stale, ignore_errors=True)

    def publish(self, job_id, token, staged, manifest, commit_ok, progress=None) -> None:
        commit_ok()
        publish_dir(staged, checkpoint_dir(self.root, job_id))

    def local_file(self, job_id: str, path: str) -> Path | None:
        root = checkpoint_dir(self.root, job_id).resolve()
        file = (root / path).resolve()
        return file if file.is_relative_to(root) and file.is_file() else None

    def open_file(self, job_id: str, path: str) -> IO[bytes] | None:
        file = self.local_file(job_id, path)
        return file.open("rb") if file is not None else None

    def download_url(self, job_id: str, path: str) -> str | None:
        return None  # streamed by the API

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(job_dir(self.root, job_id), ignore_errors=True)

    def abort_stale_uploads(self, older_than_s: float) -> int:
        return 0

    def shared_cache(self) -> None:
        return None  # the engine's cache sits on the shared volume itself (ARTIFACT_DIR/cache)


class S3ArtifactStore:
    """An S3-compatible bucket through boto3 (standard AWS credentials chain)."""

    presigned = True

    def __init__(self, settings: Settings, bucket: str, prefix: str):
        self.settings = settings
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = s3_client(settings)
        # Pre-signing makes no request: a client for the endpoint that downloaders can reach
        # (the public name of MinIO when the workers talk to it on an internal network).
        public = settings.s3_public_endpoint_url
        self.signer = s3_client(settings, endpoint_url=public) if public else self.client
        from boto3.s3.transfer import TransferConfig

        mb = 1024 * 1024
        bandwidth = settings.s3_max_bandwidth_mb_s
        self.transfer = TransferConfig(
            multipart_threshold=settings.s3_part_size_mb * mb,
            multipart_chunksize=settings.s3_part_size_mb * mb,
            max_bandwidth=int(bandwidth * mb) if bandwidth > 0 else None,
        )

    @property
    def incoming_dir(self) -> Path:
        return self.settings.resolved_scratch_dir / "uploads"

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p)

    # Health ------------------------------------------------------------------------------

    def check(self) -> None:
        """HeadBucket: tells a missing bucket from refused credentials from no server."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise ArtifactStoreError(
                    f"artifact bucket {self.bucket!r} does not exist at {self._endpoint()} "
                    "(LINEARIZE_ARTIFACT_URL); create it first"
                ) from None
            if code in (
                "403",
                "401",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AccessDenied",
            ):
                raise ArtifactStoreError(
                    f"artifact bucket {self.bucket!r} at {self._endpoint()} refused the credentials "
                    f"(HTTP {code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the "
                    "AWS profile"
                ) from None
            raise ArtifactStoreError(f"artifact bucket {self.location}: {exc}") from None
        except BotoCoreError as exc:
            raise ArtifactStoreError(
                f"artifact store {self._endpoint()} is unreachable: {exc}"
            ) from None

    def _endpoint(self) -> str:
        return self.settings.s3_endpoint_url or "AWS S3"

    # Datasets ----------------------------------------------------------------------------

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """boto errors as ArtifactStoreError naming the bucket and the step."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError, OSError) as exc:
            raise ArtifactStoreError(f"{what} on {self.location} failed: {exc}") from exc

    def save_dataset(self, local: Path, name: str) -> None:
        try:
            with self._errors(f"upload of dataset {name}"):
                self.client.upload_file(
                    str(local), self.bucket, self.key("datasets", name), Config=self.transfer
                )
        finally:
            local.unlink(missing_ok=True)

    def fetch_dataset(self, name: str, scratch: Path) -> Path:
        target = scratch / "datasets" / name
        if not target.is_file():  # uploads are immutable: a copy in scratch stays valid
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(f".{name}.part")
            with self._errors(f"download of dataset {name}"):
                self.client.download_file(
                    self.bucket, self.key("datasets", name), str(part), Config=self.transfer
                )
            part.replace(target)
        return target

    def delete_dataset(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key("datasets", name))

    # Checkpoints -------------------------------------------------------------------------

    def staging_dir(self, job_id: str, token: str) -> Path:
        return self.settings.resolved_scratch_dir / "jobs" / job_id / token

    def _read_manifest(self, job_id: str) -> dict | None:
        return self._get_json(self.key("jobs", job_id, MANIFEST))

    def _get_json(self, key: str) -> dict | None:
        """The JSON object at `key`, or None when there is none."""
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return json.loads(body["Body"].read())

    def clean_attempts(self, job_id: str) -> None:
        """Delete objects and multipart uploads of attempts that no manifest names."""
        with self._errors(f"cleaning earlier attempts of {job_id}"):
            self._clean_attempts(job_id)

    def _clean_attempts(self, job_id: str) -> None:
        current = self._read_manifest(job_id)
        keep = self.key("jobs", job_id, "attempts", current["attempt"]) + "/" if current else None
        attempts = self.key("jobs", job_id, "attempts") + "/"
        self._abort_uploads(attempts, lambda upload: keep is None or not upload.startswith(keep))
        stale = [key for key in self._keys(attempts) if keep is None or not key.startswith(keep)]
        self._delete_keys(stale)
        shutil.rmtree(self.settings.resolved_scratch_dir / "jobs" / job_id, ignore_errors=True)

    def publish(self, job_id, token, staged, manifest, commit_ok, progress=None) -> None:
        """Upload every file (multipart above the part size), then the manifest, last."""
        with self._errors(f"publishing the checkpoint of {job_id}"):
            self._publish(job_id, token, staged, manifest, commit_ok, progress)

    def _publish(self, job_id, token, staged, manifest, commit_ok, progress) -> None:
        base = self.key("jobs", job_id, "attempts", token)
        for index, item in enumerate(manifest):
            if progress is not None:
                progress(index, len(manifest), item.path)
            self.client.upload_file(
                str(staged / item.path), self.bucket, f"{base}/{item.path}", Config=self.transfer
            )
        if progress is not None:
            progress(len(manifest), len(manifest), MANIFEST)
        commit_ok()  # still the lease holder: only then does the checkpoint become visible
        document = {
            "job_id": job_id,
            "attempt": token,
            "published_at": datetime.now(UTC).isoformat(),
            "files": [a.model_dump() for a in manifest],
        }
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.key("jobs", job_id, MANIFEST),
            Body=json.dumps(document).encode(),
            ContentType="application/json",
        )
        # A previous attempt that published and then lost its lease left another prefix.
        self._clean_attempts(job_id)

    def _object_key(self, job_id: str, path: str) -> str | None:
        manifest = self._read_manifest(job_id)
        if manifest is None or path not in {f["path"] for f in manifest["files"]}:
            return None
        return self.key("jobs", job_id, "attempts", manifest["attempt"], path)

    def local_file(self, job_id: str, path: str) -> Path | None:
        return None

    def open_file(self, job_id: str, path: str) -> IO[bytes] | None:
        key = self._object_key(job_id, path)
        if key is None:
            return None
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"]

    def download_url(self, job_id: str, path: str) -> str | None:
        key = self._object_key(job_id, path)
        if key is None:
            return None
        return self.signer.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "ResponseContentDisposition": f'attachment; filename="{Path(path).name}"',
            },
            ExpiresIn=self.settings.presigned_url_ttl_s,
        )

    def delete_job(self, job_id: str) -> None:
        prefix = self.key("jobs", job_id) + "/"
        self._abort_uploads(prefix, lambda _key: True)
        self._delete_keys(list(self._keys(prefix)))

    def abort_stale_uploads(self, older_than_s: float) -> int:
        """Multipart uploads of workers that died long ago (the bucket keeps their parts)."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        return self._abort_uploads(self.key("jobs") + "/", lambda _key: True, before=cutoff)

    def shared_cache(self) -> BucketCache:
        return BucketCache(self)

    # Listing helpers ---------------------------------------------------------------------

    def _keys(self, prefix: str) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def _abort_uploads(self, prefix: str, wanted, before: datetime | None = None) -> int:
        aborted = 0
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                if not wanted(upload["Key"]):
                    continue
                if before is not None and upload["Initiated"] > before:
                    continue
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                aborted += 1
        return aborted


class BucketCache:
    """The engine's cache entries shared through the bucket (a linearize.cache.Remote): an
    entry's files under `cache/<name>/files/`, then `cache/<name>/manifest.json` (path, size,
    sha256 of each), written last. A reader trusts only a file that matches the manifest."""

    def __init__(self, store: S3ArtifactStore):
        self.store = store

    def _key(self, name: str, *parts: str) -> str:
        return self.store.key("cache", name, *parts)

    def publish(self, name: str, source: Path) -> None:
        with self.store._errors(f"publishing cache entry {name}"):
            self._publish(name, source)

    def _publish(self, name: str, source: Path) -> None:
        store, manifest_key = self.store, self._key(name, MANIFEST)
        # Readers see no entry while its files are rewritten (another host published it too).
        store.client.delete_object(Bucket=store.bucket, Key=manifest_key)
        files = build_manifest(source)
        for item in files:
            store.client.upload_file(
                str(source / item.path),
                store.bucket,
                self._key(name, "files", item.path),
                Config=store.transfer,
            )
        document = {"name": name, "files": [a.model_dump() for a in files]}
        store.client.put_object(
            Bucket=store.bucket,
            Key=manifest_key,
            Body=json.dumps(document).encode(),
            ContentType="application/json",
        )

    def discard(self, prefix: str) -> None:
        """Remove every entry whose name starts with `prefix/` (a finished job's resume state)."""
        store = self.store
        with store._errors(f"discarding cache entries {prefix}/"):
            pages = store.client.get_paginator("list_objects_v2").paginate(
                Bucket=store.bucket, Prefix=self._key(prefix) + "/"
            )
            for page in pages:
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    store.client.delete_objects(Bucket=store.bucket, Delete={"Objects": keys})

    def fetch(self, name: str, target: Path) -> bool:
        with self.store._errors(f"fetching cache entry {name}"):
            return self._fetch(name, target)

    def _fetch(self, name: str, target: Path) -> bool:
        files = self._listed_files(name)
        if files is None:
            return False
        root = target.resolve()
        for item in files:
            path = (target / item.path).resolve()
            if not path.is_relative_to(root):
                return self._ignored(name, f"it names a file outside it ({item.path})")
            path.parent.mkdir(parents=True, exist_ok=True)
            key = self._key(name, "files", item.path)
            self.store.client.download_file(
                self.store.bucket, key, str(path), Config=self.store.transfer
            )
            if path.stat().st_size != item.size or sha256_file(path) != item.sha256:
                return self._ignored(name, f"{item.path} does not match its manifest")
        return True

    def _listed_files(self, name: str) -> list[Artifact] | None:
        """The files the entry's manifest names; None without a (readable) manifest."""
        try:
            manifest = self.store._get_json(self._key(name, MANIFEST))
            if manifest is None:
                return None
            return [Artifact.model_validate(item) for item in manifest["files"]]
        except (ValueError, KeyError, TypeError) as exc:
            self._ignored(name, f"unreadable manifest: {exc}")
            return None

    def _ignored(self, name: str, why: str) -> bool:
        log.warning("cache entry %s in %s ignored: %s", name, self.store.location, why)
        return False


def s3_client(settings: Settings, endpoint_url: str | None = None):
    """A boto3 S3 client: endpoint from LINEARIZE_S3_ENDPOINT_URL, credentials from the
    standard AWS chain (environment, shared files, instance roles)."""
    endpoint_url = endpoint_url or settings.s3_endpoint_url or None
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": settings.s3_max_attempts},
        connect_timeout=5,
        read_timeout=60,
        # Path-style addressing works with every S3-compatible server (MinIO, Ceph, moto).
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        signature_version="s3v4",
    )
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix)."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket: use s3://bucket/prefix")
    return bucket, prefix.strip("/")


def artifact_store(settings: Settings) -> LocalArtifactStore | S3ArtifactStore:
    url = settings.artifact_url
    if url.startswith("s3://"):
        return S3ArtifactStore(settings, *parse_s3_url(url))
    return LocalArtifactStore(settings.resolved_artifact_dir)
