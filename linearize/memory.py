"""Memory budgets: parse `--memory-budget`, see what a device has free, measure the peak.

The budget bounds what the engine keeps on the compute device (the GPU, or host RAM when the
device is the CPU): everything the memory plan counts (linearize.memory_plan), weights, caches,
statistics, logits, healing state. `auto` is what the device has free when the job starts,
minus a margin for the framework's own buffers and fragmentation.
"""

from __future__ import annotations

import resource
import sys

from api_schemas.sizes import parse_size as api_parse_size
from linearize.errors import InputError

AUTO_MARGIN_FRACTION = 0.10
AUTO_MARGIN_MIN = 1 << 30  # 1 GiB


def parse_size(text: str | int) -> int:
    """'12GB' -> 12e9 bytes, '512MiB' -> 512 * 2**20, an int is bytes already (api_schemas.sizes)."""
    try:
        return api_parse_size(text)
    except ValueError as err:
        raise InputError(str(err)) from None


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def free_bytes(device) -> int:
    """What the device has free now: CUDA's free memory, or MemAvailable of the host."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_bytes()


def host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = resource.getpagesize()
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * pages


def resolve_budget(budget: str | int, device) -> int:
    """Bytes the job may keep on `device`: a parsed size, or `auto` = free minus a margin."""
    if budget == "auto":
        free = free_bytes(device)
        return max(0, free - max(AUTO_MARGIN_MIN, int(free * AUTO_MARGIN_FRACTION)))
    return parse_size(budget)


def reset_peak(device) -> None:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int:
    """Peak memory of this process on `device`: CUDA's allocator peak, else the peak RSS."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def current_bytes(device) -> int:
    """This process's memory on `device` now: CUDA's allocated bytes, else the resident set."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _status_bytes("VmRSS:")


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM, the high-water mark of its own address space.

    Not getrusage's ru_maxrss: on Linux that keeps the maximum across exec, so a child started
    from a large parent (a test runner, a benchmark that just wrote a model) reports the parent's
    resident set at fork time as its own peak."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
