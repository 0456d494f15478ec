"""One line naming the machine a benchmark ran on, for the JSON results.

Time-budgeted healing fits a different number of steps on a different CPU (the same 2-core VM
type gave 130 steps at k = 4 on one host and 65 on another), so results must say where they
were measured.
"""

from __future__ import annotations

from pathlib import Path

import torch


def describe() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, CUDA"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, CPU"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else "unknown CPU"
