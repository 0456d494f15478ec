"""Checkpoint files on disk: the local layout under LINEARIZE_ARTIFACT_DIR, manifests (path,
size, sha256), the one-rename publish, and the tar stream. `infra.objectstore` builds the two
artifact store backends on these.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import IO

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


def iter_tar(
    manifest: list[Artifact], open_file: Callable[[str], IO[bytes]], prefix: str = "checkpoint"
) -> Iterator[bytes]:
    """Stream a ustar/pax archive of the manifest's files in bounded memory (no temp file);
    `open_file(path)` reads one file from wherever the artifact store keeps it."""
    mtime = int(time.time())
    for item in manifest:
        info = tarfile.TarInfo(f"{prefix}/{item.path}")
        info.size = item.size
        info.mtime = mtime
        info.mode = 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with closing(open_file(item.path)) as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        if item.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - item.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end-of-archive marker
