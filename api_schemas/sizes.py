"""Sizes such as 24GB, 12GiB or 512MB: one reader for the engine, the service and the worker.

Here rather than in the engine so that the API process, which never imports torch, reads a
size exactly as the engine does.
"""

from __future__ import annotations

import re

SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([kKmMgGtT]i?[bB]|[bB])?\s*$"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)  # SIZE_PATTERN
_UNITS = {"": 1, "b": 1} | {
    f"{prefix}{suffix}": base**power
    for power, prefix in enumerate("kmgt", start=1)
    for suffix, base in (("b", 1000), ("ib", 1024))
}


def parse_size(value: object) -> int:
    """'50GB' -> 50e9, '512MiB' -> 512 * 2**20, '1000' or 1000 -> 1000 bytes; positive only.

    ValueError names the text and the accepted forms."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise ValueError(
                f"cannot read the size {value!r}: use a positive number of bytes or a number "
                "with a unit such as 50GB, 512MiB or 2TiB"
            )
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if size <= 0:
        raise ValueError(f"cannot read the size {value!r}: a size must be positive")
    return size
