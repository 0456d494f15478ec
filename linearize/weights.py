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
from typing import Any

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
        # the model's name of a tensor built from several shard tensors (one per expert, or gate
        # and up apart) -> (transformers' WeightConverter, [(source pattern, shard key), ...])
        self.conversions: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
        # A quantized source (linearize.quantization): a meta copy of the model as bound, whose
        # parameters' dtypes the dequantize ops read; None for plain shards.
        self.layout = None

    def bind(self, model, dequantizer=None) -> None:
        """Learn the model's names for the shards' tensors, the way transformers renames and
        converts them on load (legacy names such as GPT-NeoX's `embed_out`, a missing base-model
        prefix, MoE experts stored one tensor per expert that the model holds fused). With a
        `dequantizer` (transformers' quantizer in dequantize mode), quantized tensors and their
        scales convert into the plain tensors a resident load holds."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        transforms = get_model_conversion_mapping(model, hf_quantizer=dequantizer)
        if dequantizer is not None:
            from copy import deepcopy

            self.layout = deepcopy(model)  # on meta: no memory; the model's surgery leaves it
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        names = model.state_dict(keep_vars=True)
        # Natural order (experts.2 before experts.10): the converter stacks experts in it.
        for key in sorted(self.entries, key=dot_natural_key):
            renamed, pattern = rename_source_key(
                key, renamings, converters, model.base_model_prefix, names
            )
            if pattern is not None:
                group = self.conversions.setdefault(renamed, (by_pattern[pattern], []))
                group[1].append((pattern, key))
            elif renamed != key:
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
        return key in self.entries or key in self.conversions

    def keys(self) -> list[str]:
        return list(self.entries)

    @property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    def bytes_under(self, prefix: str) -> int:
        return sum(e.nbytes for key, e in self.entries.items() if key.startswith(prefix))

    def read(self, keys: Iterable[str]) -> dict:
        """{key: tensor} for `keys`, grouped by file; every handle is closed on return. A key
        the model holds converted (fused experts) is built from its shard tensors."""
        keys = list(keys)
        # A quantized source stores some tensors under the model's own name (an FP8 weight next
        # to its scale): those convert too.
        dequantizing = self.layout is not None
        converted = [
            k for k in keys if k in self.conversions and (dequantizing or k not in self.entries)
        ]
        tensors = self._read_stored(k for k in keys if k not in converted)
        for key in converted:
            tensors[key] = self._read_converted(key)
        return tensors

    def _read_converted(self, key: str):
        """One converted tensor, through the same transformers WeightConverter as a load."""
        from copy import deepcopy

        template, sources = self.conversions[key]
        converter = deepcopy(template)
        stored = self._read_stored(shard_key for _, shard_key in sources)
        for pattern, shard_key in sources:
            converter.add_tensor(key, shard_key, pattern, lambda t=stored.pop(shard_key): t)
        built = converter.convert(key, model=self.layout)
        if key not in built:
            raise ModelSourceError(
                f"{self.directory}: converting {len(sources)} shard tensors gave "
                f"{sorted(built)}, not {key!r}"
            )
        return built[key]

    def _read_stored(self, keys: Iterable[str]) -> dict:
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
