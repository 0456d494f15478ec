"""Kill a bundled-model compress during healing, run the same command again, time both.

Three runs of `linearize compress` on the bundled SmolLM2-135M (the demo's sizes, healing fixed
at --steps steps so that the checkpoints can be compared), each in a child process, against one
cache directory of their own (the converted GGUF and the mixture linked in):
1. the command, killed with SIGKILL once its first healing checkpoint is on disk;
2. the same command again: it resumes (the report's `resumed` says from what);
3. the same command with another --output (so another resume slot): an uninterrupted run.
Runs 2 and 3 both find the analysis and the baseline in the cache; what 2 saves over 3 is what
the resume took over. The two checkpoints are compared tensor by tensor.

    python bench/resume_bundled.py --data ../shared/data/wikitext-2-raw/wiki.test.raw

Writes bench/results/resume_bundled.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/resume_bundled.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        env = cache_env(scratch / "cache")
        command = compress_command(args, scratch / "out")
        killed = run(command, env, kill_at_checkpoint=scratch / "cache" / "resume")
        resumed = run(command, env)
        fresh = run(compress_command(args, scratch / "fresh"), env)
        same = max_difference(scratch / "out", scratch / "fresh")
    results = {
        "machine": machine.describe(),
        "load_avg": os.getloadavg()[0],
        "command": command[2:],
        "killed": killed,
        "resumed": resumed,
        "fresh": fresh,
        "checkpoint_max_abs_difference": same,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def cache_env(cache: Path) -> dict:
    """A cache of its own holding only the converted GGUF and the mixture (no analysis)."""
    from linearize.cache import cache_dir

    cache.mkdir(parents=True)
    for part in ("gguf", "mixture"):
        (cache / part).symlink_to(cache_dir() / part)
    return {**os.environ, "LINEARIZE_CACHE_DIR": str(cache)}


def compress_command(args, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "linearize.cli", "compress", "--model", "smollm2-135m",
        "--data", args.data, "--layers", "4", "--calib-tokens", "8192", "--eval-tokens", "4096",
        "--heal-tokens", "8192", "--heal-steps", str(args.steps), "--heal-seconds", "100000",
        "--generation-prompts", "0", "--quiet", "--output", str(out),
        "--report", f"{out}.json",
    ]  # fmt: skip


def run(command: list[str], env: dict, kill_at_checkpoint: Path | None = None) -> dict:
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    if kill_at_checkpoint is not None:
        while child.poll() is None and not list(kill_at_checkpoint.glob("*/heal-*.pt")):
            time.sleep(0.5)  # a checkpoint appears under its name only once complete (a rename)
        child.send_signal(signal.SIGKILL)
    _, err = child.communicate()
    wall = round(time.monotonic() - started, 1)
    report_path = Path(command[command.index("--report") + 1])
    if kill_at_checkpoint is not None or not report_path.is_file():
        return {"wall_s": wall, "exit": child.returncode, "stderr": err[-1500:]}
    report = json.loads(report_path.read_text())
    healing = report["selection"].get("healing") or {}
    return {
        "wall_s": wall,
        "exit": child.returncode,
        "resumed": report.get("resumed"),
        "heal_steps": healing.get("steps"),
        "timings": report["timings"],
        "perplexity": report["perplexity"]["reloaded"],
    }


def max_difference(first: Path, second: Path) -> float:
    a, b = checkpoint_tensors(first), checkpoint_tensors(second)
    assert a.keys() == b.keys(), "the two checkpoints hold different tensors"
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def checkpoint_tensors(directory: Path) -> dict:
    """Every tensor of a checkpoint, whether it is one file or sharded."""
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    assert tensors, f"no safetensors file in {directory}"
    return tensors


if __name__ == "__main__":
    main()
