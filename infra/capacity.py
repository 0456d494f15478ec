"""What a job needs and what a worker has, without torch: refusals at submit.

The estimate is a floor, not a plan: it counts only what the engine certainly holds at once, so
a job refused here could never run on that worker, and an accepted one may still need more.
- weights: the safetensors files' size on disk (exact for the dtype they are stored in); a source
  stored quantized (fp8, mxfp4), which the engine reads dequantized, counts every value at its
  config dtype's size (from the files' headers); under a memory budget with streaming allowed,
  at most the budget of them is resident;
- the activation cache of the calibration windows at one layer boundary: calib_tokens x d x 4 B
  (float32 hidden states), unless host_budget spills it;
- one d x d float32 Gram pair of the fit: 2 x d^2 x 4 B;
- the logits of one evaluation window: seq_len x vocab x 4 B.
Scratch disk: the staged checkpoint, at most the size of the (dequantized) source weights (a
compressed model only loses layers); output size: the same bound.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from api_schemas.sizes import parse_size

FLOAT32 = 4


@dataclass(frozen=True)
class JobNeeds:
    memory_bytes: int
    scratch_bytes: int
    output_bytes: int


@dataclass(frozen=True)
class Capacity:
    memory_bytes: int | None
    scratch_free_bytes: int | None
    device: str
    device_memory_bytes: int | None


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate reads from a model's files (the spec supplies the rest)."""

    weights_bytes: int
    hidden: int
    vocab: int


def model_facts(model_dir: Path) -> ModelFacts | None:
    """None when the model is not a local safetensors directory with a readable config."""
    config_path = model_dir / "config.json"
    if not model_dir.is_dir() or not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        text = _text_config(config)
        hidden, vocab = int(text["hidden_size"]), int(text["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return ModelFacts(weights_bytes(model_dir, config), hidden, vocab)


def estimate_needs(spec: object, model_dir: Path) -> JobNeeds | None:
    """None when the model is not a local safetensors directory with a readable config."""
    facts = model_facts(model_dir)
    return None if facts is None else needs_for(spec, facts)


def needs_for(spec: object, facts: ModelFacts) -> JobNeeds:
    return needs_from(
        spec, weights_bytes=facts.weights_bytes, hidden=facts.hidden, vocab=facts.vocab
    )


# Quantized formats the engine reads dequantized (linearize.quantization), and the compute dtypes
# a config may name (float32 when it names none, as the engine does).
DEQUANTIZED_METHODS = ("fp8", "mxfp4")
ITEMSIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
_VALUE_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def weights_bytes(model_dir: Path, config: dict) -> int:
    """The weights' bytes as the engine holds them: their size on disk, or for a source stored
    quantized, every value at the config dtype's size (scales are consumed by the dequantization;
    an MXFP4 block byte holds two values)."""
    files = sorted(model_dir.glob("*.safetensors"))
    on_disk = sum(p.stat().st_size for p in files)
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") not in DEQUANTIZED_METHODS:
        return on_disk
    itemsize = ITEMSIZES.get(config.get("dtype") or config.get("torch_dtype"), FLOAT32)
    try:
        return sum(_dequantized_bytes(_header(p), itemsize) for p in files)
    except (OSError, ValueError, KeyError, TypeError):
        return on_disk  # an unreadable header: the engine refuses the model with its reason


def _header(path: Path) -> dict:
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors header")
        return json.loads(handle.read(length))


def _dequantized_bytes(header: dict, itemsize: int) -> int:
    total = 0
    for name, info in header.items():
        if name == "__metadata__" or name.endswith(("_scale_inv", "_scales", "activation_scale")):
            continue
        values = 1
        for n in info["shape"]:
            values *= n
        if name.endswith("_blocks"):
            total += 2 * values * itemsize
        elif info["dtype"] in _VALUE_DTYPES:
            total += values * itemsize
        else:  # integer tensors keep their size
            start, end = info["data_offsets"]
            total += end - start
    return total


def needs_from(spec: object, *, weights_bytes: int, hidden: int, vocab: int) -> JobNeeds:
    resident = weights_bytes
    budget = getattr(spec, "memory_budget", "auto")
    if budget != "auto" and getattr(spec, "streaming", "auto") != "off":
        resident = min(weights_bytes, parse_size(budget))
    activations = getattr(spec, "calib_tokens", 0) * hidden * FLOAT32
    host_budget = getattr(spec, "host_budget", None)
    if host_budget is not None:
        activations = min(activations, parse_size(host_budget))
    grams = 2 * hidden * hidden * FLOAT32
    logits = getattr(spec, "seq_len", 0) * vocab * FLOAT32
    writes_checkpoint = getattr(spec, "kind", None) == "compress"
    output = weights_bytes if writes_checkpoint else 0
    return JobNeeds(
        memory_bytes=resident + activations + grams + logits,
        scratch_bytes=output,
        output_bytes=output,
    )


def refusal(needs: JobNeeds, workers: list) -> tuple[str, str] | None:
    """(field, message) when no live worker that reports its capacity can hold the job."""
    sized = [w for w in workers if w.memory_bytes is not None]
    if not sized:
        return None  # nobody reported capacity: nothing is known, nothing is refused
    if needs.memory_bytes > max(w.memory_bytes for w in sized):
        largest = max(w.memory_bytes for w in sized)
        return "memory_budget", (
            f"the job needs at least {_gb(needs.memory_bytes)} of memory (estimate: weights, "
            f"activation cache, Grams, logits) and the largest registered worker has "
            f"{_gb(largest)}; set a memory_budget (streaming) or add a larger worker"
        )
    disks = [w.scratch_free_bytes for w in sized if w.scratch_free_bytes is not None]
    if disks and needs.scratch_bytes > max(disks):
        return "model", (
            f"the job needs at least {_gb(needs.scratch_bytes)} of scratch disk for its "
            f"checkpoint (output size estimate) and the most any registered worker has free is "
            f"{_gb(max(disks))}"
        )
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB ({n} bytes)"


def measure_capacity(scratch_dir: Path) -> Capacity:
    """This host: physical memory (or the cgroup limit below it), free scratch, a GPU if any."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = _cgroup_memory_limit()
    if cgroup is not None:
        memory = min(memory, cgroup)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    device, device_memory = _gpu()
    return Capacity(memory, shutil.disk_usage(scratch_dir).free, device, device_memory)


def _cgroup_memory_limit() -> int | None:
    try:
        text = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _gpu() -> tuple[str, int | None]:
    """From nvidia-smi: the worker's parent process never imports torch or touches CUDA."""
    if shutil.which("nvidia-smi") is None:
        return "cpu", None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
        return "cuda", int(out.splitlines()[0].strip()) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return "cpu", None
