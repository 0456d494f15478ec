"""Text uploads: multipart (field `file`) or a raw text/plain body, size-limited, UTF-8 checked."""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool

from api_schemas.jobs import Dataset
from infra.db import DatasetRow, utcnow
from infra.objectstore import ArtifactStoreError
from infra.store import dataset_to_schema, new_id
from service.deps import StateDep, TenantDep

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "text/plain": {"schema": {"type": "string"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}
# Multipart framing around the file; a body larger than limit + this is refused unread.
_MULTIPART_SLACK = 64 * 1024


class _Sink:
    """Writes an upload to a temp file while hashing, counting and checking UTF-8."""

    def __init__(self, path: Path, limit: int):
        self.path = path
        self.limit = limit
        self.size = 0
        self.digest = hashlib.sha256()
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.fh = path.open("wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                f"upload exceeds the limit of {self.limit // (1024 * 1024)} MB "
                "(LINEARIZE_MAX_UPLOAD_MB)",
            )
        try:
            self.decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"upload is not valid UTF-8 (byte offset {self.size - len(chunk) + exc.start})",
            ) from None
        self.digest.update(chunk)
        self.fh.write(chunk)

    def finish(self) -> None:
        try:
            self.decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, "upload ends inside a UTF-8 sequence"
            ) from None
        if self.size == 0:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "upload is empty")
        self.fh.close()

    def discard(self) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)


async def _multipart_chunks(request: Request, meta: dict[str, str]) -> AsyncIterator[bytes]:
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, "multipart upload needs a `file` part"
            )
        if upload.filename:
            meta["filename"] = upload.filename
        while chunk := await upload.read(1024 * 1024):
            yield chunk
    finally:
        await form.close()


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Dataset,
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses={
        413: {"description": "Larger than LINEARIZE_MAX_UPLOAD_MB."},
        415: {"description": "Neither text/plain nor multipart/form-data."},
        422: {"description": "Not UTF-8, or empty."},
    },
)
async def upload_dataset(request: Request, tenant: TenantDep, state: StateDep) -> Dataset:
    """Store a UTF-8 text for jobs to use as `data: {dataset_id}`."""
    limit = state.settings.max_upload_bytes
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = content_type == "multipart/form-data"
    if not multipart and content_type not in ("text/plain", ""):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send text/plain or multipart/form-data"
        )
    declared = request.headers.get("content-length")
    if (
        declared
        and declared.isdigit()
        and int(declared) > limit + (_MULTIPART_SLACK if multipart else 0)
    ):
        # Refuse before reading: a client that sends Expect: 100-continue never uploads it.
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"upload exceeds the limit of {state.settings.max_upload_mb} MB "
            "(LINEARIZE_MAX_UPLOAD_MB)",
        )
    directory = state.artifacts.incoming_dir
    directory.mkdir(parents=True, exist_ok=True)
    dataset_id = new_id("ds")
    name = f"{dataset_id}.txt"
    sink = _Sink(directory / f".{name}.part", limit)
    meta: dict[str, str] = {}
    try:
        if multipart:
            async for chunk in _multipart_chunks(request, meta):
                sink.write(chunk)
        else:
            async for chunk in request.stream():
                sink.write(chunk)
        sink.finish()
    except BaseException:
        sink.discard()
        raise
    try:
        await run_in_threadpool(state.artifacts.save_dataset, sink.path, name)
    except ArtifactStoreError as exc:
        sink.discard()
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    row = DatasetRow(
        id=dataset_id,
        tenant=tenant,
        bytes=sink.size,
        sha256=sink.digest.hexdigest(),
        filename=Path(meta["filename"]).name[:255] if "filename" in meta else None,
        path=name,
        created_at=utcnow(),
    )
    await run_in_threadpool(state.store.add_dataset, row)
    return dataset_to_schema(row)


@router.get("/{dataset_id}", response_model=Dataset, responses={404: {"description": "Unknown."}})
def get_dataset(dataset_id: str, tenant: TenantDep, state: StateDep) -> Dataset:
    row = state.store.get_dataset(tenant, dataset_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "dataset not found")
    return dataset_to_schema(row)
