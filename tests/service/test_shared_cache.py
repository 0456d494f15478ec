"""The engine's cache shared through the bucket (infra.objectstore.BucketCache installed as the
linearize.cache remote) against moto's real server, and the scratch eviction (infra.scratch)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from s3_helpers import CREDENTIALS, S3Server, bucket_keys

from linearize import cache

PREFIX = "artifacts"
KEY = "0123456789abcdef0123456789abcdef"
ENTRY = {
    "baseline": 12.5,
    "baseline_validation": 13.0,
    "baseline_eval_seconds": 0.5,
    "layers": [],
    "reservoir_size": 4,
}


@pytest.fixture
def bucket_cache(tmp_path, s3_server, monkeypatch) -> Iterator[tuple[str, object]]:
    """A fresh bucket as the remote of linearize.cache, the local cache in a temp dir."""
    from infra.objectstore import artifact_store
    from infra.settings import Settings

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.new_bucket()
    settings = Settings(
        artifact_url=f"s3://{bucket}/{PREFIX}",
        s3_endpoint_url=s3_server.url,
        s3_max_attempts=1,
        scratch_dir=tmp_path / "scratch",
    )
    remote = artifact_store(settings).shared_cache()
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "host-a"))
    cache.set_remote(remote)
    yield bucket, remote
    cache.set_remote(None)
    cache.release_held()


def _as_other_host(tmp_path: Path, monkeypatch, name: str) -> Path:
    """An empty local cache, as on another machine."""
    cache.release_held()
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / name))
    return tmp_path / name


def test_an_entry_published_by_one_host_is_fetched_by_another(
    tmp_path, s3_server, bucket_cache, monkeypatch, caplog
):
    bucket, _remote = bucket_cache
    residuals = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    cache.save_entry(KEY, ENTRY, residuals)
    cache.save_reference(KEY, 5, {"top": torch.ones(2, 5)})
    base = f"{PREFIX}/cache"
    assert bucket_keys(s3_server, bucket, f"{base}/") == [
        f"{base}/analysis/{KEY}/files/entry.json",
        f"{base}/analysis/{KEY}/files/residuals.safetensors",
        f"{base}/analysis/{KEY}/manifest.json",
        f"{base}/reference/{KEY}-top5/files/reference-top5.safetensors",
        f"{base}/reference/{KEY}-top5/manifest.json",
    ]

    other = _as_other_host(tmp_path, monkeypatch, "host-b")
    with caplog.at_level(logging.INFO, logger="linearize.cache"):
        entry = cache.load_entry(KEY)
        reference = cache.load_reference(KEY, 5)
    assert entry is not None and entry["baseline"] == 12.5
    assert torch.equal(entry["residuals"], residuals)
    assert reference is not None and torch.equal(reference["top"], torch.ones(2, 5))
    assert sorted(p.name for p in (other / KEY).iterdir()) == [
        "entry.json",
        "reference-top5.safetensors",
        "residuals.safetensors",
    ]
    fetched = [r.getMessage() for r in caplog.records if "fetched cache entry" in r.getMessage()]
    assert [m.split()[3] for m in fetched] == [f"analysis/{KEY}", f"reference/{KEY}-top5"]
    # Nothing staged is left beside the entries.
    assert [p.name for p in other.iterdir()] == [KEY]


def test_a_converted_gguf_model_is_shared_and_held_while_in_use(
    tmp_path, s3_server, bucket_cache, monkeypatch
):
    from tiny_models import build_tiny_model, build_tiny_tokenizer

    from infra.scratch import evict, scratch_entries

    bucket, _remote = bucket_cache
    model = build_tiny_model("llama")
    cache.save_converted_gguf(KEY, model, build_tiny_tokenizer())
    assert f"{PREFIX}/cache/gguf/{KEY}/manifest.json" in bucket_keys(s3_server, bucket)

    other = _as_other_host(tmp_path, monkeypatch, "scratch-b/cache")  # as a worker places it
    loaded = cache.load_converted_gguf(KEY, torch.float32)
    assert loaded is not None
    weights = loaded[0].state_dict()["lm_head.weight"]
    assert torch.equal(weights, model.state_dict()["lm_head.weight"])
    # Held by this process (a running job streams from it): an eviction leaves it.
    converted = other / "gguf" / KEY
    assert cache.converted_gguf_dir(KEY) == converted
    assert [e.path for e in scratch_entries(other.parent)] == [converted]
    assert evict(other.parent, 1) == []
    cache.release_held()
    assert evict(other.parent, 1) == [converted]


@pytest.mark.parametrize("damage", ["no_manifest", "corrupt_file", "missing_file"])
def test_a_partial_or_corrupt_remote_entry_is_ignored_and_replaced(
    damage, tmp_path, s3_server, bucket_cache, monkeypatch, caplog
):
    bucket, _remote = bucket_cache
    residuals = torch.zeros(2, 2)
    cache.save_entry(KEY, ENTRY, residuals)
    client, base = s3_server.client(), f"{PREFIX}/cache/analysis/{KEY}"
    if damage == "no_manifest":  # a host that died before its last write
        client.delete_object(Bucket=bucket, Key=f"{base}/manifest.json")
    elif damage == "corrupt_file":
        client.put_object(Bucket=bucket, Key=f"{base}/files/entry.json", Body=b'{"key": "x"}')
    else:
        client.delete_object(Bucket=bucket, Key=f"{base}/files/residuals.safetensors")

    other = _as_other_host(tmp_path, monkeypatch, "host-b")
    with caplog.at_level(logging.WARNING):
        assert cache.load_entry(KEY) is None
    assert not other.exists() or not any(other.iterdir())  # nothing half-fetched was kept
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if damage == "no_manifest":
        assert warnings == []  # simply not there (yet)
    elif damage == "corrupt_file":
        assert warnings == [
            f"cache entry analysis/{KEY} in s3://{bucket}/{PREFIX} ignored: "
            "entry.json does not match its manifest"
        ]
    else:
        assert len(warnings) == 1 and "could not fetch cache entry" in warnings[0]
        assert f"s3://{bucket}/{PREFIX}" in warnings[0]

    # The recomputed entry takes its place, here and in the bucket.
    cache.save_entry(KEY, ENTRY, residuals + 1)
    _as_other_host(tmp_path, monkeypatch, "host-c")
    entry = cache.load_entry(KEY)
    assert entry is not None and torch.equal(entry["residuals"], residuals + 1)


def test_an_unreachable_bucket_is_a_logged_miss_not_a_failure(tmp_path, monkeypatch, caplog):
    from infra.objectstore import artifact_store
    from infra.settings import Settings

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    server = S3Server(tmp_path / "gone.log")  # never started: nothing listens on its port
    settings = Settings(artifact_url="s3://b/p", s3_endpoint_url=server.url, s3_max_attempts=1)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "local"))
    cache.set_remote(artifact_store(settings).shared_cache())
    try:
        with caplog.at_level(logging.WARNING, logger="linearize.cache"):
            cache.save_entry(KEY, ENTRY, torch.zeros(1))
            assert cache.load_entry(KEY) is not None  # the local copy is written regardless
            cache.release_held()
            monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "empty"))
            assert cache.load_entry(KEY) is None
    finally:
        cache.set_remote(None)
    messages = [r.getMessage() for r in caplog.records if r.name == "linearize.cache"]
    assert len(messages) == 2
    assert messages[0].startswith(f"could not publish cache entry analysis/{KEY}")
    assert messages[1].startswith(f"could not fetch cache entry analysis/{KEY}")
    assert all("s3://b/p" in m and "failed" in m for m in messages)


# --- eviction -----------------------------------------------------------------------------------


def _plant(path: Path, size: int, used_at: float) -> Path:
    """A scratch entry of `size` bytes last used at `used_at` (a directory unless it is a
    dataset file)."""
    if path.parent.name == "datasets":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"d" * size)
    else:
        path.mkdir(parents=True)
        if path.parent.name == "models":  # downloaded whole; the marker counts in the size
            size -= (path / ".complete").write_text("s3://b/models/m")
        (path / "weights.bin").write_bytes(b"w" * size)
    os.utime(path, (used_at, used_at))
    return path


def test_eviction_removes_least_recently_used_entries_until_under_the_limit(tmp_path):
    from infra.scratch import evict, scratch_entries

    scratch = tmp_path / "scratch"
    held = _plant(scratch / "cache" / ("a" * 32), 100, 1_000)
    converted = _plant(scratch / "cache" / "gguf" / ("b" * 32), 300, 2_000)
    model = _plant(scratch / "models" / "m1", 200, 3_000)
    dataset = _plant(scratch / "datasets" / "d.txt", 50, 4_000)
    recent = _plant(scratch / "cache" / ("e" * 32), 100, 5_000)
    # Never entries: writes in progress, spill files, job staging, an unfinished download.
    (scratch / "cache" / f".{'f' * 32}.fetch-1234").mkdir(parents=True)
    (scratch / "cache" / f".{'f' * 32}.fetch-1234" / "x").write_bytes(b"x" * 999)
    (scratch / "cache" / "spill").mkdir()
    (scratch / "cache" / "spill" / "s").write_bytes(b"s" * 999)
    (scratch / "jobs" / "job_1").mkdir(parents=True)
    (scratch / "models" / "downloading").mkdir()
    (scratch / "models" / "downloading" / "part").write_bytes(b"p" * 999)
    assert sum(e.size for e in scratch_entries(scratch)) == 750

    assert cache.hold(held)  # a running job reads it
    os.utime(held, (1_000, 1_000))  # still the oldest: only the hold keeps it
    try:
        assert evict(scratch, 400) == [converted, model]
    finally:
        cache.release_held()
    left = scratch_entries(scratch)
    assert sorted(e.path for e in left) == sorted([held, dataset, recent])
    assert sum(e.size for e in left) == 250
    assert (scratch / "models" / "downloading" / "part").is_file()
    assert (scratch / "cache" / "spill" / "s").is_file()
    assert not list(scratch.rglob(".evicted-*"))

    # Released, it is the first to go; then nothing more needs to.
    assert evict(scratch, 150) == [held]
    assert sorted(e.path for e in scratch_entries(scratch)) == sorted([dataset, recent])
    assert evict(scratch, 150) == []


def test_a_hold_after_the_entry_was_evicted_reports_it_missing(tmp_path):
    from infra.scratch import evict

    scratch = tmp_path / "scratch"
    entry = _plant(scratch / "cache" / ("c" * 32), 10, 1_000)
    assert evict(scratch, 1) == [entry]
    assert not cache.hold(entry)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1000", 1000), ("50GB", 50 * 10**9), ("1.5GiB", 3 * 2**29), (" 512 MiB ", 512 * 2**20)],
)
def test_scratch_max_size_reads_sizes(text, size):
    from infra.settings import Settings

    assert Settings(scratch_max_size=text).scratch_max_size == size
    assert Settings(scratch_max_size="").scratch_max_size is None


@pytest.mark.parametrize("text", ["12x", "-5GB", "0", "GB", "1e9"])
def test_a_malformed_scratch_max_size_is_refused_clearly(text):
    from pydantic import ValidationError

    from infra.settings import Settings

    with pytest.raises(ValidationError) as info:
        Settings(scratch_max_size=text)
    assert "scratch_max_size" in str(info.value)
    assert f"cannot read the size {text!r}" in str(info.value)
