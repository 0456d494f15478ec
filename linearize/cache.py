"""A cache of what repeats between runs on the same model and data.

Baseline perplexities and the analysis (per-layer scores, held-out per-token residuals) depend
only on the model weights, the windows and the settings below, so a second `compress` with
another budget or format skips them. Entries are keyed by a fingerprint of all of these and
written atomically; a corrupt or foreign entry is ignored, never trusted.

GGUF files are also cached in converted form (safetensors + tokenizer, keyed by the file's
sha256 and the transformers version): dequantizing and rebuilding the tokenizer costs ~30 s on
2 cores for the bundled 135M model, reading the converted copy under 1 s.

Location: $LINEARIZE_CACHE_DIR, else ~/.cache/linearize. `--no-cache` / `use_cache=False` skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CACHE_ENV = "LINEARIZE_CACHE_DIR"
FORMAT_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "linearize")


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
    try:
        entry = json.loads((directory / "entry.json").read_text())
        if entry.get("key") != key:
            return None
        entry["residuals"] = load_file(directory / "residuals.safetensors")["residuals"]
        return entry
    except (OSError, ValueError, KeyError) as exc:
        if directory.exists():
            log.warning("ignoring unreadable cache entry %s: %s", directory, exc)
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
    finally:
        if staging.exists():
            import shutil

            shutil.rmtree(staging, ignore_errors=True)


def _reference_file(key: str, top_k: int) -> Path:
    return cache_dir() / key / f"reference-top{top_k}.safetensors"


def load_reference(key: str, top_k: int) -> dict[str, torch.Tensor] | None:
    """The original's top-k reference on the evaluation windows (linearize.agreement), if kept."""
    from safetensors.torch import load_file

    path = _reference_file(key, top_k)
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
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, staging)
        os.replace(staging, path)
    except OSError as exc:
        log.warning("could not write the agreement reference %s: %s", path, exc)
    finally:
        staging.unlink(missing_ok=True)


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

    directory = cache_dir() / "gguf" / key
    if not (directory / "complete").is_file():
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


def save_converted_gguf(key: str, model, tokenizer) -> None:
    """Write the converted model atomically (staging dir + rename); never fails the job."""
    import shutil

    from linearize.checkpoint import serializable_model

    root = cache_dir() / "gguf"
    staging = root / f".{key}.{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
        serializable_model(model).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "complete").write_text(key)
        if not (root / key).exists():
            os.replace(staging, root / key)
    except OSError as exc:
        log.warning("could not cache the converted GGUF model %s: %s", key, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _discard(directory: Path) -> None:
    """Move a damaged entry aside first (atomic), so a concurrent reader never sees half of it."""
    import shutil

    trash = directory.with_name(f".discarded-{directory.name}.{uuid.uuid4().hex[:8]}")
    try:
        os.replace(directory, trash)
    except OSError:
        return  # already gone (another process discarded it)
    shutil.rmtree(trash, ignore_errors=True)
