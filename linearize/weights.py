"""The tensors of a safetensors checkpoint, read by name when a step needs them.

A checkpoint directory holds one `model.safetensors` or several shards named by an index JSON.
`ShardedWeights` reads each file's header once (its JSON says every tensor's dtype, shape and
byte range), so sizes are known without touching the data, and reads tensors through
`safetensors.safe_open` (memory-mapped), one file handle per read, closed right after: the
mapped pages then leave the process instead of accumulating in its resident set.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from linearize.errors import ModelSourceError

STANDARD_PREFIX = "model"
HEADER_LIMIT = 100 * 2**20  # a header larger than this is not a safetensors file


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]
    nbytes: int


class ShardedWeights:
    """Name -> TensorEntry for every tensor of a checkpoint; `read` loads a few of them."""

    def __init__(self, directory: Path, entries: dict[str, TensorEntry]):
        self.directory = directory
        self.entries = entries
        self.aliases: dict[str, str] = {}  # the model's name of a tensor -> its name in the shards

    def bind(self, model) -> None:
        """Learn the model's names for the shards' tensors, the way transformers renames them
        on load (legacy names such as GPT-NeoX's `embed_out`, a missing base-model prefix)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        names = model.state_dict(keep_vars=True)
        for key in self.entries:
            renamed, converted = rename_source_key(
                key, renamings, converters, model.base_model_prefix, names
            )
            if converted is None and renamed != key:
                self.aliases[renamed] = key

    def shard_key(self, key: str) -> str:
        """The name in the shards of the model's tensor `key`."""
        return self.aliases.get(key, key)

    @classmethod
    def open(cls, directory: str | Path, prefix: str = STANDARD_PREFIX) -> ShardedWeights:
        directory = Path(directory)
        files = weight_files(directory, prefix)
        entries: dict[str, TensorEntry] = {}
        for file in files:
            entries.update(read_header(file))
        return cls(directory, entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> list[str]:
        return list(self.entries)

    @property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    def bytes_under(self, prefix: str) -> int:
        return sum(e.nbytes for key, e in self.entries.items() if key.startswith(prefix))

    def read(self, keys: Iterable[str]) -> dict:
        """{key: tensor} for `keys`, grouped by file; every handle is closed on return."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            if key not in self.entries:
                raise ModelSourceError(f"{self.directory}: no tensor named {key!r} in the shards")
            by_file[self.entries[key].file].append(key)
        tensors = {}
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in names:
                    tensors[name] = handle.get_tensor(name)
        return tensors


def weight_files(directory: Path, prefix: str = STANDARD_PREFIX) -> list[Path]:
    """The shard files of a checkpoint: from its index JSON, else the single file."""
    index = directory / f"{prefix}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as err:
            raise ModelSourceError(f"cannot read the shard index {index}: {err}") from err
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = [directory / f"{prefix}.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelSourceError(f"{directory}: weight files missing: {', '.join(missing)}")
    return files


def read_header(file: Path) -> dict[str, TensorEntry]:
    """The tensor table of one safetensors file (8-byte little-endian length, then JSON)."""
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > HEADER_LIMIT:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise ModelSourceError(f"{file} is not a readable safetensors file: {err}") from err
    header.pop("__metadata__", None)
    return {
        key: TensorEntry(
            file=file,
            dtype=info["dtype"],
            shape=tuple(info["shape"]),
            nbytes=info["data_offsets"][1] - info["data_offsets"][0],
        )
        for key, info in header.items()
    }
