"""Checkpoints: sharded safetensors + config + the source's other files + linearize.json.

Every non-weight file of the source (tokenizer files, chat template, generation config,
processor and preprocessor configs, special tokens map, ...) is copied byte for byte; the
source's model card is kept as `README.source.md` beside ours. config.json is the source's with
only the fields the surgery changed rewritten (`StagedCheckpoint.config_changes` lists them). A
GGUF source has no such files: its tokenizer and config are written by transformers.

Two formats:

- "standard": folded/removed layers only. A plain transformers checkpoint with fewer layers;
  the family's own auto class loads it (`AutoModelForCausalLM`, or
  `AutoModelForImageTextToText` for a multimodal wrapper, whose vision tower is kept).
- "linear": some decoder positions hold `LinearBlock`s. The layout lives in config.json under
  `linearize` (see linearize.surgery: `linear_blocks` gives each block's position and bias) and is
  repeated in linearize.json. The weights are written as `linearize.safetensors` (or
  `linearize-0000i-of-0000n.safetensors` + `linearize.safetensors.index.json`) rather than
  `model.safetensors`, so plain `from_pretrained` fails loudly ("no file named model.safetensors")
  instead of silently building random attention layers where the linear blocks are. Load it with
  `linearize.load(path)`.

Publishing is two-phase so that nothing half-written ever sits at the output path:

    staged = stage_checkpoint(model, tokenizer, out, resolved_spec=spec, force=force)
    with staged:                       # discards the staging dir unless published
        reloaded = load(staged.path)   # verify the files before publishing
        staged.publish({"report.json": report_json, "README.md": render_model_card(...)})

`save_checkpoint` does both phases at once. Loading never unpickles and never runs remote code.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from linearize.errors import InputError, ModelSourceError, OutputExistsError

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

MANIFEST_NAME = "linearize.json"
LINEAR_WEIGHTS_PREFIX = "linearize"
STANDARD_WEIGHTS_PREFIX = "model"
FORMATS = ("standard", "linear")
DEFAULT_TAGS = ("linearize", "pruned")
SOURCE_CARD_NAME = "README.source.md"
# What a linearize checkpoint holds of its own: not copied when such a checkpoint is the source.
OWN_FILES = (MANIFEST_NAME, "README.md", "report.json", "report.md", "*.png")


# --- publishing --------------------------------------------------------------------------------


class StagedCheckpoint:
    """A complete checkpoint in a hidden directory next to its target, not yet published.

    `publish` adds the extra files (report, model card) and moves the directory into place with
    one rename. Used as a context manager, it deletes the staging directory unless published.
    """

    def __init__(
        self, path: Path, output_dir: Path, *, force: bool, config_changes: list[str] | None = None
    ) -> None:
        self.path = path
        self.output_dir = output_dir
        self.force = force
        self.published = False
        self.config_changes = config_changes or []  # dotted config.json fields that changed

    def write_files(self, files: Mapping[str, str | bytes]) -> None:
        """Add or overwrite top-level files (e.g. report.json, README.md) in the staging dir."""
        for name, content in files.items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise InputError(f"extra checkpoint file name must be a plain file name: {name!r}")
            data = content.encode("utf-8") if isinstance(content, str) else content
            (self.path / name).write_bytes(data)

    def publish(self, extra_files: Mapping[str, str | bytes] | None = None) -> Path:
        """Write `extra_files`, then atomically move the checkpoint to the output dir."""
        if self.published:
            raise InputError(f"checkpoint already published to {self.output_dir}")
        self.write_files(extra_files or {})
        _publish_directory(self.path, self.output_dir, force=self.force)
        self.published = True
        logger.info("checkpoint published at %s", self.output_dir)
        return self.output_dir

    def discard(self) -> None:
        if not self.published:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedCheckpoint:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.discard()


def stage_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | os.PathLike,
    *,
    resolved_spec: dict,
    force: bool = False,
    shard_size: str | int = "200MB",
    files_dir: str | os.PathLike | None = None,
    source_config: Any = None,
) -> StagedCheckpoint:
    """Write the whole checkpoint into a staging dir next to `output_dir` and return it.

    With `files_dir` (the source directory), its non-weight files are copied byte for byte and
    its config.json is patched where the model's config differs from `source_config` (the
    config as loaded; read from `files_dir` when not given). Without it (a GGUF source) the
    tokenizer, config and generation config are written by transformers.

    Refuses a non-empty `output_dir` unless `force` (checked now, to fail before the slow write,
    and again at publish). A failure while writing removes the staging dir.
    """
    output_dir = Path(output_dir).absolute()
    _check_output_dir(output_dir, force=force)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    from linearize.stack import as_stack

    stack = as_stack(model)
    files_dir = Path(files_dir) if files_dir is not None else None
    try:
        fmt = write_model(stack, staging, shard_size=shard_size, config=files_dir is None)
        if files_dir is None:
            changes = _changed_fields(source_config, stack.model.config)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        else:
            copy_source_files(files_dir, staging)
            changes = write_patched_config(stack.model, files_dir, staging, source_config)
        _write_manifest(staging, stack.model, fmt, resolved_spec)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("checkpoint (%s format) staged at %s", fmt, staging)
    return StagedCheckpoint(staging, output_dir, force=force, config_changes=changes)


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    output_dir: str | os.PathLike,
    *,
    resolved_spec: dict,
    force: bool = False,
    shard_size: str | int = "200MB",
    extra_files: Mapping[str, str | bytes] | None = None,
    files_dir: str | os.PathLike | None = None,
    source_config: Any = None,
) -> Path:
    """Stage and publish in one go (no verification in between); returns the output dir."""
    staged = stage_checkpoint(
        model,
        tokenizer,
        output_dir,
        resolved_spec=resolved_spec,
        force=force,
        shard_size=shard_size,
        files_dir=files_dir,
        source_config=source_config,
    )
    with staged:
        return staged.publish(extra_files)


def render_model_card(
    body: str,
    *,
    base_model: str | None,
    tags: tuple[str, ...] = DEFAULT_TAGS,
    library_name: str | None = None,
) -> str:
    """README.md text: YAML front matter (base_model, tags) followed by the given Markdown body."""
    import yaml

    front: dict[str, Any] = {}
    if base_model:
        front["base_model"] = base_model
    if library_name:
        front["library_name"] = library_name
    front["tags"] = list(tags)
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
    return f"---\n{header}---\n\n{body.strip()}\n"


def _check_output_dir(output_dir: Path, *, force: bool) -> None:
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise InputError(f"output path {output_dir} exists and is not a directory")
    if any(output_dir.iterdir()) and not force:
        raise OutputExistsError(f"output directory {output_dir} is not empty (use --force)")


def _publish_directory(staging: Path, output_dir: Path, *, force: bool) -> None:
    """Move staging -> output_dir with os.replace; with force, the old dir goes aside first."""
    _check_output_dir(output_dir, force=force)
    aside = None
    if output_dir.exists():
        if any(output_dir.iterdir()):
            aside = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(output_dir, aside)
        else:
            output_dir.rmdir()
    try:
        os.replace(staging, output_dir)
    except BaseException:
        if aside is not None:
            os.replace(aside, output_dir)  # put the previous checkpoint back
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# --- writing -----------------------------------------------------------------------------------


def checkpoint_format_of(model: nn.Module) -> str:
    """'linear' when any decoder position holds a LinearBlock, else 'standard'."""
    from linearize.architectures import decoder_layers
    from linearize.surgery import LinearBlock

    return (
        "linear" if any(isinstance(m, LinearBlock) for m in decoder_layers(model)) else "standard"
    )


def serializable_model(model: nn.Module) -> nn.Module:
    """A model save_pretrained accepts.

    Models loaded from GGUF carry a quantization_config and save_pretrained refuses them even
    after dequantization; an identical fresh model built from the config without it saves fine.
    """
    if getattr(model.config, "quantization_config", None) is None:
        return model
    from linearize.loading import model_class

    config = copy.deepcopy(model.config)
    del config.quantization_config
    fresh = model_class(config).from_config(config, dtype=_floating_dtype(model))
    install_recorded_linear_blocks(fresh)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    logger.info("rebuilt the model without quantization_config so that it can be saved")
    return fresh.eval()


def write_model(stack, directory: Path, *, shard_size: str | int, config: bool = True) -> str:
    """Write the weights, streaming tensors into new shards, and (with `config`) the config and
    generation config as transformers serialises them.

    Each tensor comes from memory (the trunk, layers the job changed or loaded) or straight
    from the source shards under the layer's original name (a streamed layer nobody touched),
    so a streamed model is written without ever being materialised. Keys are the model's own
    names at the layers' new positions; tied tensors are written once.
    """
    from linearize.memory import parse_size

    model = stack.model
    fmt = checkpoint_format_of(model)
    prefix = LINEAR_WEIGHTS_PREFIX if fmt == "linear" else STANDARD_WEIGHTS_PREFIX
    limit = parse_size(shard_size)
    shards, current, size = [], {}, 0
    for key, tensor in _tensors_to_write(stack):
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:  # only one shard's tensors are ever held
            shards.append(_flush(current, directory, prefix, len(shards)))
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(_flush(current, directory, prefix, len(shards)))
    _name_shards(shards, directory, prefix)
    if config:
        _write_config(model, directory)
    return fmt


def _tensors_to_write(stack):
    """(key, tensor) in state-dict order: from memory, or read from the source shards."""
    from linearize.architectures import get_architecture
    from linearize.stack import layer_source

    model = stack.model
    layers_path = get_architecture(model).layers_path + "."
    seen: set[int] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue  # a tied alias
        seen.add(id(tensor))
        if not tensor.is_meta:
            yield key, tensor.detach().to("cpu").contiguous()
            continue
        source = key
        if key.startswith(layers_path):
            position, _, rest = key[len(layers_path) :].partition(".")
            source = layer_source(stack.layers[int(position)]) + rest
        name = stack.weights.shard_key(source)
        value = stack.weights.read([name])[name]
        yield key, value.to(stack.dtype) if value.is_floating_point() else value


def _flush(tensors: dict, directory: Path, prefix: str, number: int) -> dict:
    """Write one shard under a temporary name; returns {keys, file, bytes}."""
    from safetensors.torch import save_file

    path = directory / f".{prefix}-shard-{number:05d}.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"keys": list(tensors), "file": path, "bytes": nbytes}


def _name_shards(shards: list, directory: Path, prefix: str) -> None:
    """HF names: `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus an index."""
    if len(shards) == 1:
        os.replace(shards[0]["file"], directory / f"{prefix}.safetensors")
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"{prefix}-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(shard["file"], directory / name)
        weight_map.update(dict.fromkeys(shard["keys"], name))
    index = {
        "metadata": {"total_size": sum(s["bytes"] for s in shards)},
        "weight_map": weight_map,
    }
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_config(model, directory: Path) -> None:
    config = copy.deepcopy(model.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # a GGUF source: the written weights are plain tensors
    config.architectures = [type(model).__name__]
    config.dtype = _floating_dtype(model)
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


# --- the source's other files ------------------------------------------------------------------


def copy_source_files(source: Path, directory: Path) -> list[str]:
    """Copy every top-level non-weight file of `source` byte for byte; returns their names.

    config.json is patched separately (`write_patched_config`); the source's README.md (its
    model card) is kept as README.source.md, since README.md will be ours. Of a linearize
    checkpoint, its manifest, report and card are not copied (this run writes its own).
    """
    from fnmatch import fnmatch

    from linearize.loading import WEIGHT_PATTERNS

    ours = (source / MANIFEST_NAME).is_file()
    copied = []
    for path in sorted(source.iterdir()):
        name = path.name
        skip = WEIGHT_PATTERNS + ("config.json",) + (OWN_FILES if ours else ())
        if not path.is_file() or any(fnmatch(name, pattern) for pattern in skip):
            continue
        target = SOURCE_CARD_NAME if name == "README.md" else name
        shutil.copyfile(path, directory / target)
        copied.append(name)
    logger.info("copied %d files of %s byte for byte: %s", len(copied), source, copied)
    return copied


def write_patched_config(
    model: nn.Module, source: Path, directory: Path, source_config: Any = None
) -> list[str]:
    """config.json: the source's JSON with only the fields that differ between the config as
    loaded and the model's now (layer count, per-layer lists, the linearize layout, a changed
    dtype) rewritten. Returns those fields as dotted paths."""
    path = source / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"cannot read {path}: {err}") from err
    if source_config is None:
        from transformers import AutoConfig

        source_config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    changes = _changed_fields(source_config, model.config)
    after = _config_dict(model.config)
    for field in changes:
        _set_path(raw, after, field.split("."))
    changes += _patch_dtype(raw, model)
    changes += _drop_quantization(raw)
    # The source's key order is kept, so a text diff of the two files shows only the changes.
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return changes


def _changed_fields(before: Any, after: Any) -> list[str]:
    """Dotted paths of the config fields whose values differ (recursing into sub-configs)."""
    if before is None:
        return []
    return _dict_diff(_config_dict(before), _config_dict(after))


def _config_dict(config: Any) -> dict:
    config = copy.deepcopy(config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return json.loads(config.to_json_string(use_diff=False))


_ABSENT = object()


def _dict_diff(before: dict, after: dict, prefix: str = "") -> list[str]:
    # A field the surgery set to None where the loaded config had none (a stale field such as
    # qwen3_next's full_attention_interval) is a change: _set_path drops it from the JSON.
    changed = []
    for key in sorted(set(before) | set(after), key=str):
        old, new = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _dict_diff(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}")
    return changed


def _set_path(raw: dict, after: dict, keys: list[str]) -> None:
    """raw[k0][k1]... = after[k0][k1]...; where the source's JSON lacks the sub-dict (a section
    left to its defaults), the whole section of `after` goes in, so nothing defaulted is lost."""
    head, rest = keys[0], keys[1:]
    if rest and isinstance(raw.get(head), dict) and isinstance(after.get(head), dict):
        _set_path(raw[head], after[head], rest)
    elif head in after and after[head] is not None:
        raw[head] = after[head]
    else:
        raw.pop(head, None)


def _patch_dtype(raw: dict, model: nn.Module) -> list[str]:
    """Point the source's dtype field at the written weights' dtype where it names another."""
    written = str(_floating_dtype(model)).removeprefix("torch.")
    changed = [key for key in ("dtype", "torch_dtype") if raw.get(key) not in (None, written)]
    for key in changed:
        raw[key] = written
    return changed


def _drop_quantization(raw: dict) -> list[str]:
    """A quantized source's config names its format; the weights written are plain tensors,
    and the field left in would make transformers read them as quantized."""
    if raw.pop("quantization_config", None) is None:
        return []
    return ["quantization_config"]


def _write_manifest(directory: Path, model: nn.Module, fmt: str, resolved_spec: dict) -> None:
    from linearize import __version__
    from linearize.loading import model_class

    auto_class = model_class(model.config).__name__
    manifest = {
        "linearize_version": __version__,
        "format": fmt,
        "model_type": model.config.model_type,
        "load_with": "linearize.load(path)"
        if fmt == "linear"
        else f"transformers.{auto_class}.from_pretrained(path)",
        "weights_prefix": LINEAR_WEIGHTS_PREFIX if fmt == "linear" else STANDARD_WEIGHTS_PREFIX,
        "layout": getattr(model.config, "linearize", None),
        "resolved_spec": resolved_spec,
    }
    text = json.dumps(manifest, indent=2, sort_keys=False, default=str)
    (directory / MANIFEST_NAME).write_text(text + "\n")


# --- loading -----------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> dict | None:
    """linearize.json of a checkpoint dir, or None for a checkpoint linearize did not write."""
    manifest_path = Path(path) / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelSourceError(f"cannot read {manifest_path}: {err}") from err
    if manifest.get("format") not in FORMATS:
        raise ModelSourceError(f"{manifest_path}: unknown format {manifest.get('format')!r}")
    return manifest


def load(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a checkpoint in either format, in eval mode. Safetensors only, no remote code."""
    path = Path(path)
    if not path.is_dir():
        raise ModelSourceError(f"checkpoint directory {path} does not exist")
    manifest = read_manifest(path)
    if manifest is None or manifest["format"] == "standard":
        model = _load_standard(path, dtype)
    else:
        model = _load_linear(path, dtype, manifest)
    return model.to(device).eval()


def _load_standard(path: Path, dtype: Any) -> nn.Module:
    from transformers import AutoConfig

    from linearize.loading import model_class

    kwargs = {"dtype": _as_torch_dtype(dtype)} if dtype is not None else {}
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        return model_class(config).from_pretrained(
            path, trust_remote_code=False, use_safetensors=True, **kwargs
        )
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"cannot load checkpoint {path}: {err}") from err


def _load_linear(path: Path, dtype: Any, manifest: dict) -> nn.Module:
    from transformers import AutoConfig, GenerationConfig

    from linearize.loading import model_class

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    layout = getattr(config, "linearize", None)
    if not layout or layout.get("linear_blocks") != manifest["layout"]["linear_blocks"]:
        raise ModelSourceError(f"{path}: config.json and {MANIFEST_NAME} disagree on the layout")
    state = _read_linear_weights(path)
    dtype = _as_torch_dtype(dtype) or next(iter(state.values())).dtype
    model = model_class(config).from_config(config, dtype=dtype)
    install_recorded_linear_blocks(model)
    _load_state_strictly(model, state, path)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def install_recorded_linear_blocks(model: nn.Module) -> None:
    from linearize.surgery import install_linear_blocks

    layout = getattr(model.config, "linearize", None) or {}
    install_linear_blocks(model, layout.get("linear_blocks", []))


def _read_linear_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob(f"{LINEAR_WEIGHTS_PREFIX}*.safetensors"))
    if not files:
        raise ModelSourceError(f"{path}: no {LINEAR_WEIGHTS_PREFIX}*.safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def _load_state_strictly(model: nn.Module, state: dict, path: Path) -> None:
    """load_state_dict, where the only keys allowed missing are tied aliases of loaded ones."""
    result = model.load_state_dict(state, strict=False)
    loaded = set(state)
    aliases: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), set()).add(name)
    names_to_ids = {n: i for i, names in aliases.items() for n in names}
    missing = [
        key for key in result.missing_keys if not aliases.get(names_to_ids.get(key), set()) & loaded
    ]
    if missing or result.unexpected_keys:
        raise ModelSourceError(
            f"{path}: weights do not match the recorded layout "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )


def _as_torch_dtype(dtype: Any) -> torch.dtype | None:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise InputError(f"unknown dtype {dtype!r}")
    return resolved


def _floating_dtype(model: nn.Module) -> torch.dtype:
    import torch

    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.get_default_dtype()
