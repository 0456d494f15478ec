"""A worker's scratch disk, kept under LINEARIZE_SCRATCH_MAX_SIZE by evicting what was used least
recently.

Entries: the engine's cache (`cache/<key>`, `cache/gguf/<key>`), bucket models (`models/<id>`,
once downloaded whole) and datasets (`datasets/<name>`). Each can be fetched from the bucket or
computed again, so evicting one costs time, never a result. The last use is the modification
time, which `linearize.cache.hold` touches when a job uses an entry. A job holds a shared flock
on every entry it uses until it ends; eviction removes only what it can lock exclusively, so an
entry a running job uses stays. Names starting with a dot are writes in progress and are left
alone, as are the engine's spill files and job staging (removed by their jobs).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScratchEntry:
    path: Path
    size: int
    used_at: float


def scratch_entries(scratch: Path) -> list[ScratchEntry]:
    cache = scratch / "cache"
    paths = [
        *_children(cache, skip={"gguf", "spill", "resume"}),
        *_children(cache / "gguf"),
        *_children(cache / "resume"),  # one job's state each (linearize.resume), held while used
        *(p for p in _children(scratch / "models") if (p / ".complete").is_file()),
        *_children(scratch / "datasets"),
    ]
    entries = []
    for path in paths:
        try:
            entries.append(ScratchEntry(path, _size(path), path.stat().st_mtime))
        except OSError:
            continue  # removed meanwhile
    return entries


def evict(scratch: Path, max_bytes: int) -> list[Path]:
    """Remove the least recently used entries not in use until the entries total at most
    `max_bytes` (or nothing more can go); returns the removed paths, oldest first."""
    scratch.mkdir(parents=True, exist_ok=True)
    with _one_evictor(scratch / ".evict.lock"):
        entries = sorted(scratch_entries(scratch), key=lambda entry: entry.used_at)
        total = sum(entry.size for entry in entries)
        evicted = []
        for entry in entries:
            if total <= max_bytes:
                break
            if _remove_unless_held(entry.path):
                total -= entry.size
                evicted.append(entry.path)
    if evicted:
        log.info(
            "scratch %s over %d bytes: evicted %s (%d bytes left)",
            scratch,
            max_bytes,
            ", ".join(str(p.relative_to(scratch)) for p in evicted),
            total,
        )
    return evicted


def _children(directory: Path, skip: set[str] = frozenset()) -> list[Path]:  # type: ignore[assignment]
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if not p.name.startswith(".") and p.name not in skip]


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


@contextmanager
def _one_evictor(lock_path: Path) -> Iterator[None]:
    """Workers sharing a scratch disk evict one at a time."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_unless_held(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a running job holds it
        # Moved aside under the lock: a job that opens it from now on finds it missing.
        trash = path.with_name(f".evicted-{path.name}.{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
    finally:
        os.close(fd)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)
    return True
