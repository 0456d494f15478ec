"""The activation cache: hidden states of a set of windows between two decoder layers.

A layer-by-layer pass keeps the hidden states of every window it carries, (n_windows, S, d),
and overwrites them in place as each layer runs. They live where they fit, in this order: on
the compute device, in (pinned, when the device is a GPU) host memory, or in a file under the
spill directory when they exceed the host budget. Spill files are removed when the cache closes,
and the job's `Spill` removes its whole directory at the end of a run, also when it fails or is
cancelled.

A spilled cache is read and written with positioned file I/O (`os.preadv`/`os.pwrite`), not
memory-mapped: the pages of a shared mapping count in the process's resident set for as long
as they stay mapped, so a memmap spill freed no resident memory at all (measured: +160 MB RSS
for 13 spilled caches of a 400 MB model). Through the page cache they cost only the batch read.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class Spill:
    """Where caches go that fit neither the device nor the host budget; removed by `close`."""

    parent: Path | None = None
    host_budget: int | None = None  # bytes of host memory caches may take; None: no limit
    always: bool = False  # spill every cache (tests, and users who want the host RAM free)
    _directory: Path | None = field(default=None, init=False)
    host_used: int = field(default=0, init=False)
    spilled: int = field(default=0, init=False)  # caches written to disk so far

    def directory(self) -> Path:
        if self._directory is None:
            parent = self.parent or Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            self._directory = Path(tempfile.mkdtemp(prefix="linearize-spill-", dir=parent))
        return self._directory

    def wants_disk(self, nbytes: int) -> bool:
        if self.always:
            return True
        return self.host_budget is not None and self.host_used + nbytes > self.host_budget

    def close(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ActivationCache:
    """(n, S, d) hidden states; `cache[i:j]` reads to the compute device, assignment writes."""

    def __init__(
        self,
        n: int,
        seq_len: int,
        d: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        place: str = "device",
        spill: Spill | None = None,
    ):
        self.shape = (n, seq_len, d)
        self.dtype, self.device, self.place = dtype, torch.device(device), place
        self.path: Path | None = None
        self._fd: int | None = None
        if place == "device":
            self.data = torch.empty(self.shape, dtype=dtype, device=self.device)
        elif place == "host":
            pin = self.device.type == "cuda"
            self.data = torch.empty(self.shape, dtype=dtype, pin_memory=pin)
        elif place == "disk":
            if spill is None:
                raise ValueError("a disk cache needs a Spill directory")
            self.path = spill.directory() / f"{uuid.uuid4().hex}.bin"
            spill.spilled += 1
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(self._fd, self.nbytes)
            self.data = None
        else:
            raise ValueError(f"unknown placement {place!r}")

    @property
    def nbytes(self) -> int:
        n, s, d = self.shape
        return n * s * d * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0]

    def __getitem__(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """Windows `rows` (a slice, or an index tensor as healing draws) on the compute device."""
        if self._fd is None:
            return self.data[rows].to(self.device, non_blocking=True)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step != 1:
                raise ValueError("a spilled activation cache reads contiguous slices only")
            return self._read(start, stop - start).to(self.device)
        picked = [self._read(int(i), 1) for i in torch.as_tensor(rows).reshape(-1)]
        return torch.cat(picked).to(self.device)

    def __setitem__(self, rows: slice, value: torch.Tensor) -> None:
        if self._fd is None:
            self.data[rows].copy_(value.detach(), non_blocking=self.place == "host")
            return
        start, stop, step = rows.indices(self.shape[0])
        if step != 1 or tuple(value.shape) != (stop - start, *self.shape[1:]):
            raise ValueError(f"cannot write {tuple(value.shape)} into rows {start}:{stop}")
        data = value.detach().to("cpu", self.dtype).contiguous()
        _write_all(self._fd, _bytes_of(data), start * self.row_bytes)

    def _read(self, start: int, count: int) -> torch.Tensor:
        out = torch.empty((count, *self.shape[1:]), dtype=self.dtype)
        _read_all(self._fd, _bytes_of(out), start * self.row_bytes)
        return out

    def close(self) -> None:
        self.data = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, any dtype (bfloat16 has no numpy type)."""
    return memoryview(tensor.view(-1).view(torch.uint8).numpy())


def _read_all(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done)
        if got == 0:
            raise OSError(f"spill file ended early at byte {offset + done}")
        done += got


def _write_all(fd: int, buffer: memoryview, offset: int) -> None:
    done = 0
    while done < len(buffer):
        done += os.pwrite(fd, buffer[done:], offset + done)


@dataclass
class CachePlanner:
    """Places caches: the device while `device_free` lasts, then host memory, then disk."""

    device: torch.device
    device_free: int  # bytes of the device budget left for activations
    spill: Spill

    def allocate(self, n: int, seq_len: int, d: int, dtype: torch.dtype) -> ActivationCache:
        nbytes = n * seq_len * d * dtype.itemsize
        if self.spill.always:
            place = "disk"
        elif nbytes <= self.device_free:
            place = "device"
            self.device_free -= nbytes
        elif self.device.type != "cpu" and not self.spill.wants_disk(nbytes):
            place = "host"
        else:  # on the CPU the device is the host: past its budget the cache goes to disk
            place = "disk"
        if place == "host":
            self.spill.host_used += nbytes
        if place != "device":
            log.info("activation cache of %d bytes placed on %s", nbytes, place)
        return ActivationCache(
            n, seq_len, d, dtype=dtype, device=self.device, place=place, spill=self.spill
        )

    def release(self, cache: ActivationCache) -> None:
        if cache.place == "device":
            self.device_free += cache.nbytes
        elif cache.place == "host":
            self.spill.host_used -= cache.nbytes
        cache.close()
