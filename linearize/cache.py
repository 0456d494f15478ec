"""A cache of what repeats between runs on the same model and data.

Baseline perplexities and the analysis (per-layer scores, held-out per-token residuals) depend
only on the model weights, the windows and the settings below, so a second `compress` with
another budget or format skips them. Entries are keyed by a fingerprint of all of these and
written atomically; a corrupt or foreign entry is ignored, never trusted.

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
    """sha256 of the config and of every parameter's bytes (exact; ~0.3 s per 100M params)."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, param in model.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def entry_key(model, windows, spec) -> str:
    from linearize import __version__

    parts = {
        "format": FORMAT_VERSION,
        "linearize": __version__,
        "torch": torch.__version__,
        "model": model_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype),
        "device": next(model.parameters()).device.type,
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
