"""Which models a job may name, and what budget they allow: decided without torch.

Local models must lie under LINEARIZE_MODEL_ROOTS (after resolving links), ship safetensors or
GGUF weights (never pickle), and their layer count comes from config.json when present. Models in
a bucket (`s3://bucket/models/x`) must lie under LINEARIZE_MODEL_URLS and ship safetensors; the
worker downloads them into its scratch directory (pickle files are never fetched).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from api_schemas.specs import BUNDLED_MODEL_ALIAS
from infra.settings import Settings

BUNDLED_LAYERS = {BUNDLED_MODEL_ALIAS: 30}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


class ModelRejected(ValueError):
    """The model cannot be accepted by this service."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # what the user wrote
    kind: str  # alias | local | hub
    path: Path | None
    num_layers: int | None

    @property
    def engine_name(self) -> str:
        """What the worker passes to the pipeline: the resolved path for local models."""
        return str(self.path) if self.path is not None else self.name


def _roots(settings: Settings) -> list[Path]:
    return [Path(r).expanduser().resolve() for r in settings.model_roots]


def resolve_model(name: str, settings: Settings) -> ModelSource:
    if name in BUNDLED_LAYERS:
        return ModelSource(name, "alias", None, BUNDLED_LAYERS[name])
    if name.startswith("s3://"):
        return _resolve_s3_model(name, settings)
    roots = _roots(settings)
    candidate = Path(name).expanduser()
    looks_local = candidate.is_absolute() or name.startswith((".", "~"))
    candidates = [candidate] if looks_local else [root / name for root in roots]
    for path in candidates:
        if not path.exists():
            continue
        real = path.resolve()
        if not any(real.is_relative_to(root) for root in roots):
            raise ModelRejected(
                f"model path {name!r} is outside the configured model roots (LINEARIZE_MODEL_ROOTS)"
            )
        return ModelSource(name, "local", real, _check_local(real, name))
    if looks_local:
        if not any(candidate.resolve().is_relative_to(root) for root in roots):
            raise ModelRejected(
                f"model path {name!r} is outside the configured model roots (LINEARIZE_MODEL_ROOTS)"
            )
        raise ModelRejected(f"model path {name!r} does not exist")
    if settings.allow_hub_models and "/" in name and ".." not in name:
        return ModelSource(name, "hub", None, None)
    raise ModelRejected(
        f"unknown model {name!r}: use {BUNDLED_MODEL_ALIAS!r} or a directory under the model "
        "roots (hub downloads are disabled on this service)"
    )


def _check_local(path: Path, name: str) -> int | None:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelRejected(
                f"model file {name!r} is not GGUF; give a directory with safetensors weights"
            )
        return None  # the engine reads the GGUF header and fails the job if the budget is off
    files = [p for p in path.iterdir() if p.is_file()]
    if not any(p.suffix == ".safetensors" for p in files):
        if any(p.suffix.lower() in PICKLE_SUFFIXES for p in files):
            raise ModelRejected(
                f"model {name!r} has only pickle weights, which are never loaded here "
                "(they can run code); convert it to safetensors"
            )
        raise ModelRejected(f"model {name!r} has no safetensors weights")
    return layers_from_config(path / "config.json")


def layers_from_config(config_path: Path) -> int | None:
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return _layers_of(config)


def _layers_of(config: dict) -> int | None:
    for section in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            value = section.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def budget_problem(spec: object, num_layers: int | None, model: str) -> tuple[str, str] | None:
    """(field, message) when a compress budget cannot fit this model, else None."""
    if num_layers is None or getattr(spec, "kind", None) != "compress":
        return None
    limit = num_layers - 2
    layers = getattr(spec, "layers", None)
    indices = getattr(spec, "indices", None)
    where = f"{model} has L = {num_layers} layers; at most L - 2 = {limit} layers can be replaced"
    if isinstance(layers, int) and (layers > limit or layers <= 0):  # max: a search
        return "layers", f"layers = {layers} is out of range: {where}"
    if indices is not None:
        if len(indices) > limit:
            return "indices", f"{len(indices)} indices is too many: {where}"
        bad = [i for i in indices if i < 0 or i >= num_layers]
        if bad:
            return "indices", f"indices {bad} do not exist: {model} has layers 0..{num_layers - 1}"
    return None


# Models in a bucket -------------------------------------------------------------------------


def _resolve_s3_model(name: str, settings: Settings) -> ModelSource:
    url = name.rstrip("/")
    if ".." in url.split("/") or not any((url + "/").startswith(p) for p in settings.model_urls):
        raise ModelRejected(
            f"model {name!r} is outside the configured model locations (LINEARIZE_MODEL_URLS)"
        )
    files = _s3_model_files(url, settings)
    if not files:
        raise ModelRejected(f"model {name!r} does not exist (no objects under it)")
    suffixes = {Path(f).suffix.lower() for f in files}
    if ".safetensors" not in suffixes:
        if suffixes & PICKLE_SUFFIXES:
            raise ModelRejected(
                f"model {name!r} has only pickle weights, which are never loaded here "
                "(they can run code); convert it to safetensors"
            )
        raise ModelRejected(f"model {name!r} has no safetensors weights")
    layers = None
    if "config.json" in files:
        try:
            layers = _layers_of(json.loads(_s3_read(url, "config.json", settings)))
        except Exception:  # unreadable or not JSON: the engine decides when it loads the model
            layers = None
    return ModelSource(name, "s3", None, layers)


def _split_url(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key.strip("/")


def _s3_model_files(url: str, settings: Settings) -> list[str]:
    """Relative names of the objects under the model's prefix (one level of folders kept)."""
    from infra.objectstore import s3_client

    bucket, prefix = _split_url(url)
    client = s3_client(settings)
    names = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix + "/"
        ):
            names += [obj["Key"][len(prefix) + 1 :] for obj in page.get("Contents", [])]
    except Exception as exc:  # botocore's errors: no bucket, credentials, unreachable
        raise ModelRejected(f"model {url!r} cannot be listed: {exc}") from None
    return names


def _s3_read(url: str, name: str, settings: Settings) -> bytes:
    from infra.objectstore import s3_client

    bucket, prefix = _split_url(url)
    return s3_client(settings).get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()


def fetch_s3_model(source: ModelSource, settings: Settings, cache_root: Path) -> Path:
    """Download the model's non-pickle files once per worker; a `.complete` marker makes a
    half-finished download (a killed worker) start over."""
    import hashlib
    import shutil

    from infra.objectstore import s3_client

    url = source.name.rstrip("/")
    target = cache_root / hashlib.sha256(url.encode()).hexdigest()[:16]
    if (target / ".complete").is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    bucket, prefix = _split_url(url)
    client = s3_client(settings)
    for name in _s3_model_files(url, settings):
        if Path(name).suffix.lower() in PICKLE_SUFFIXES or ".." in name.split("/"):
            continue
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, f"{prefix}/{name}", str(path))
    (target / ".complete").write_text(url, encoding="utf-8")
    return target
