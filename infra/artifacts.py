"""The artifact store: one directory per job under LINEARIZE_ARTIFACT_DIR (a shared volume).

A job's files become visible in one rename of a finished directory, so a reader (the API, a
download) never sees a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from api_schemas.jobs import Artifact

CHUNK = 1024 * 1024


def jobs_root(artifact_dir: Path) -> Path:
    return artifact_dir / "jobs"


def job_dir(artifact_dir: Path, job_id: str) -> Path:
    return jobs_root(artifact_dir) / job_id


def checkpoint_dir(artifact_dir: Path, job_id: str) -> Path:
    return job_dir(artifact_dir, job_id) / "checkpoint"


def datasets_dir(artifact_dir: Path) -> Path:
    return artifact_dir / "datasets"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(directory: Path) -> list[Artifact]:
    """Every regular file under `directory` with size and sha256; links are not followed."""
    items: list[Artifact] = []
    for path in sorted(directory.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        items.append(
            Artifact(
                path=path.relative_to(directory).as_posix(),
                size=path.stat().st_size,
                sha256=sha256_file(path),
            )
        )
    return items


def publish_dir(staged: Path, final: Path) -> None:
    """Make `staged` appear as `final` in one rename (same filesystem), replacing a leftover."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # A previous attempt published and then lost its lease before writing the DB row.
        trash = final.with_name(f".trash-{final.name}-{time.time_ns()}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(staged, final)


def resolve_artifact(directory: Path, manifest: list[Artifact], rel: str) -> Path | None:
    """The file for a manifest path, or None: only listed files are served (no traversal)."""
    if rel not in {a.path for a in manifest}:
        return None
    root = directory.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def iter_tar(
    directory: Path, manifest: list[Artifact], prefix: str = "checkpoint"
) -> Iterator[bytes]:
    """Stream a ustar/pax archive of the manifest's files in bounded memory (no temp file)."""
    for item in manifest:
        path = directory / item.path
        info = tarfile.TarInfo(f"{prefix}/{item.path}")
        info.size = item.size
        info.mtime = int(path.stat().st_mtime)
        info.mode = 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        if item.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - item.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end-of-archive marker
