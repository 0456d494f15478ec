"""A cache of what repeats between runs on the same model and data.

Baseline perplexities and the analysis (per-layer scores, held-out per-token residuals) depend
only on the model weights, the windows and the settings below, so a second `compress` with
another budget or format skips them. Entries are keyed by a fingerprint of all of these and
written atomically; a corrupt or foreign entry is ignored, never trusted.

GGUF files are also cached in converted form (safetensors + tokenizer, keyed by the file's
sha256 and the transformers version): dequantizing and rebuilding the tokenizer costs ~30 s on
2 cores for the bundled 135M model, reading the converted copy under 1 s.

Location: $LINEARIZE_CACHE_DIR, else ~/.cache/linearize. `--no-cache` / `use_cache=False` skips it.

Beyond one machine: whoever runs the engine may install a `Remote` (set_remote), a store shared
by several machines; the service's workers install one backed by their bucket. A local miss is
then first fetched from it, and what this process computes is published to it. A remote entry
is checked like a local one and a failing remote is a miss, never a failed run.

In use: a process reading an entry holds a shared flock on it (`hold`) until `release_held`, and
touches it, so a cleaner (the worker's scratch eviction) can skip what a run still reads and
evict the least recently used rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Protocol

import torch

log = logging.getLogger(__name__)

CACHE_ENV = "LINEARIZE_CACHE_DIR"
FORMAT_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "linearize")


# --- a store shared between machines, and what this process holds ------------------------------


class Remote(Protocol):
    """Cache entries shared between machines. An entry is a directory of files, named like
    `analysis/<key>`; publishing must make it visible only once it is whole."""

    def fetch(self, name: str, target: Path) -> bool:
        """Write entry `name` into the new directory `target`; False when there is no whole,
        intact entry of that name."""
        ...

    def publish(self, name: str, source: Path) -> None:
        """Make the files under `source` the entry `name`."""
        ...

    # Optional: `discard(prefix)` removes the entries named `prefix/...` (discard_shared).


_remote: Remote | None = None
_held: dict[Path, int] = {}


def set_remote(remote: Remote | None) -> None:
    """Install (or with None remove) the shared store for this process."""
    global _remote
    _remote = remote


def _fetch(name: str, directory: Path) -> bool:
    """A missing entry from the remote, renamed into place whole; any failure is a miss."""
    if _remote is None or directory.exists():
        return False
    staging = directory.with_name(f".{directory.name}.fetch-{uuid.uuid4().hex[:8]}")
    try:
        if not _remote.fetch(name, staging):
            return False
        os.replace(staging, directory)
        log.info("fetched cache entry %s from the shared cache into %s", name, directory)
        return True
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: warn, recompute
        log.warning("could not fetch cache entry %s from the shared cache: %s", name, exc)
        return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(name: str, directory: Path) -> None:
    if _remote is None:
        return
    try:
        _remote.publish(name, directory)
    except Exception as exc:  # noqa: BLE001 - the job's result does not depend on it
        log.warning("could not publish cache entry %s to the shared cache: %s", name, exc)


def hold(path: Path) -> bool:
    """Mark a file or directory in use by this process until release_held(), and record the use
    (its modification time) for least-recently-used eviction. False when it does not exist (or
    was evicted meanwhile): the caller treats it as missing."""
    path = Path(path)
    if path in _held:
        return True
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    # Blocks only while an evictor moves it aside; it then no longer is what `path` names.
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino
        if same:
            os.utime(path)
    except OSError:
        same = False
    if not same:
        os.close(fd)
        return False
    _held[path] = fd
    return True


def release_held() -> None:
    """Release every hold of this process (the end of a job in a process that runs several)."""
    for path in list(_held):
        _release(path)


def release(path: Path) -> None:
    """End this process's hold on one path (before it removes it)."""
    _release(Path(path))


def _release(path: Path) -> None:
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


@torch.no_grad()
def model_fingerprint(model) -> str:
    """sha256 of the config and of every parameter's bytes (exact; ~0.3 s per 100M params).

    Where the model was loaded from (`_name_or_path`, a GGUF `quantization_config`) is not part
    of it: the same weights read from a GGUF file or from its converted copy share entries.
    """
    config = model.config.to_dict()
    for key in ("_name_or_path", "quantization_config", "architectures"):
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in model.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shards_fingerprint(model, weights) -> str:
    """sha256 of the config and of each shard file's name, size and modification time.

    A streamed model is never whole in memory, and hashing 140 GB of shards would cost a pass
    of its own; a shard rewritten in place with the same size and time is not noticed."""
    config = model.config.to_dict()
    for key in ("_name_or_path", "quantization_config", "architectures"):
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for file in sorted({entry.file for entry in weights.entries.values()}):
        stat = file.stat()
        digest.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def entry_key(stack, windows, spec) -> str:
    from linearize import __version__

    model = stack.model
    if stack.streamed:
        fingerprint = "shards:" + shards_fingerprint(model, stack.weights)
    else:
        fingerprint = model_fingerprint(model)
    parts = {
        "format": FORMAT_VERSION,
        "linearize": __version__,
        "torch": torch.__version__,
        "model": fingerprint,
        "dtype": str(stack.dtype),
        "device": stack.device.type,
        "calib": windows.calib_sha256,
        "eval": windows.eval_sha256,
        "validation_windows": len(windows.validation),
        "seed": spec.seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def load_entry(key: str) -> dict | None:
    from safetensors.torch import load_file

    directory = cache_dir() / key
    fetched = _fetch(f"analysis/{key}", directory)
    if not hold(directory):
        return None
    try:
        entry = json.loads((directory / "entry.json").read_text())
        if entry.get("key") != key:
            raise ValueError(f"it belongs to the key {entry.get('key')!r}")
        entry["residuals"] = load_file(directory / "residuals.safetensors")["residuals"]
        entry["fetched"] = fetched  # from the shared cache, just now
        return entry
    except (OSError, ValueError, KeyError) as exc:
        log.warning("discarding unreadable cache entry %s: %s", directory, exc)
        _discard(directory)  # so that the recomputed entry can take its place
        return None


def save_entry(key: str, entry: dict, residuals: torch.Tensor) -> None:
    from safetensors.torch import save_file

    root = cache_dir()
    staging = root / f".{key}.{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
        save_file({"residuals": residuals.contiguous()}, staging / "residuals.safetensors")
        (staging / "entry.json").write_text(json.dumps({**entry, "key": key}))
        target = root / key
        if target.exists():
            return  # another run wrote it first; entries for one key are identical
        os.replace(staging, target)
    except OSError as exc:  # a cache that cannot be written must not fail the job
        log.warning("could not write cache entry %s: %s", key, exc)
        return
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _publish(f"analysis/{key}", target)


def _reference_file(key: str, top_k: int) -> Path:
    return cache_dir() / key / f"reference-top{top_k}.safetensors"


def _reference_name(key: str, top_k: int) -> str:
    """Its own remote entry: it may be computed later than the entry it sits in."""
    return f"reference/{key}-top{top_k}"


def load_reference(key: str, top_k: int) -> dict[str, torch.Tensor] | None:
    """The original's top-k reference on the evaluation windows (linearize.agreement), if kept."""
    from safetensors.torch import load_file

    path = _reference_file(key, top_k)
    if not path.exists() and path.parent.is_dir():
        _fetch_file(_reference_name(key, top_k), path)
    try:
        return load_file(path)
    except (OSError, ValueError) as exc:
        if path.exists():
            log.warning("ignoring unreadable agreement reference %s: %s", path, exc)
        return None


def save_reference(key: str, top_k: int, tensors: dict[str, torch.Tensor]) -> None:
    """Beside the entry it belongs to, written atomically; never fails the job."""
    from safetensors.torch import save_file

    path = _reference_file(key, top_k)
    if not path.parent.is_dir():
        return  # the entry itself could not be written
    # A directory of its own, so that it can be published as an entry of its own.
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        staging.mkdir()
        save_file({k: v.contiguous() for k, v in tensors.items()}, staging / path.name)
        _publish(_reference_name(key, top_k), staging)
        os.replace(staging / path.name, path)
    except OSError as exc:
        log.warning("could not write the agreement reference %s: %s", path, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fetch_file(name: str, path: Path) -> None:
    """A one-file remote entry into place at `path`."""
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        if _fetch(name, staging):
            os.replace(staging / path.name, path)
    except OSError as exc:
        log.warning("could not place the fetched cache file %s: %s", path, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch_shared_file(name: str, path: Path) -> None:
    """The one-file shared entry `name` into place at `path`, if the shared store has it."""
    _fetch_file(name, path)


def discard_shared(prefix: str) -> None:
    """Remove the shared entries under `prefix/`, where the shared store can; never fails."""
    discard = getattr(_remote, "discard", None)
    if discard is None:
        return
    try:
        discard(prefix)
    except Exception as exc:  # noqa: BLE001 - leftovers cost space, not correctness
        log.warning("could not discard the shared cache entries %s/: %s", prefix, exc)


def publish_shared_file(name: str, path: Path) -> None:
    """Publish the file at `path` as the one-file shared entry `name`; never fails the job."""
    if _remote is None:
        return
    staging = path.with_name(f".{path.name}.publish-{uuid.uuid4().hex[:8]}")
    try:
        staging.mkdir()
        shutil.copyfile(path, staging / path.name)
        _publish(name, staging)
    except OSError as exc:
        log.warning("could not publish %s to the shared cache: %s", path, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- converted GGUF models ----------------------------------------------------------------------


def gguf_key(path: Path) -> str:
    import transformers

    digest = hashlib.sha256(f"gguf:{FORMAT_VERSION}:{transformers.__version__}:".encode())
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def load_converted_gguf(key: str, dtype):
    """(model, tokenizer) from a converted copy, or None when there is none or it is unreadable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = converted_gguf_dir(key)
    if directory is None:
        return None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype or "float32", use_safetensors=True, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any damage (e.g. SafetensorError) means: convert again
        log.warning("discarding unreadable converted GGUF %s: %s", directory, exc)
        _discard(directory)
        return None
    return model, tokenizer


def converted_gguf_dir(key: str) -> Path | None:
    """The whole converted copy of a GGUF file (fetched from the remote when only there, and
    held), or None."""
    directory = cache_dir() / "gguf" / key
    _fetch(f"gguf/{key}", directory)
    if (directory / "complete").is_file() and hold(directory):
        return directory
    return None


def save_converted_gguf(key: str, model, tokenizer) -> None:
    """Write the converted model atomically (staging dir + rename); never fails the job."""
    from linearize.checkpoint import serializable_model

    root = cache_dir() / "gguf"
    staging = root / f".{key}.{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
        serializable_model(model).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "complete").write_text(key)
        if (root / key).exists():
            return  # another run converted it first
        os.replace(staging, root / key)
    except OSError as exc:
        log.warning("could not cache the converted GGUF model %s: %s", key, exc)
        return
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _publish(f"gguf/{key}", root / key)


def _discard(directory: Path) -> None:
    """Move a damaged entry aside first (atomic), so a concurrent reader never sees half of it."""
    trash = directory.with_name(f".discarded-{directory.name}.{uuid.uuid4().hex[:8]}")
    _release(directory)  # the name will belong to the entry that replaces it
    try:
        os.replace(directory, trash)
    except OSError:
        return  # already gone (another process discarded it)
    shutil.rmtree(trash, ignore_errors=True)
