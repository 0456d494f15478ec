"""Resident vs streamed compress on random-init Llama-shaped models of growing depth (CPU).

Each model (same width, 8 / 16 / 32 layers by default) is written as sharded safetensors, then
compressed by the CLI in a child process twice: `--streaming off` and `--streaming on` under a
fixed memory budget. The child reports its own peak RSS (getrusage) and the report its mode;
wall time is the child's. Targets (issue #12): the streamed peak grows by <= 10% from the
smallest to the largest model, and the streamed wall time is <= 1.5x the resident one.

    python bench/scale.py [--layers 8 16 32] [--hidden 1024] [--budget 400MB]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PEAK = """
import json, sys
import torch, transformers  # noqa: F401
if len(sys.argv) > 1:
    from linearize.cli import main
    assert main(sys.argv[1:]) == 0
from linearize.memory import peak_rss_bytes  # VmHWM: this process's own peak, not its parent's
print(json.dumps({"peak": peak_rss_bytes()}))
"""


def write_model(directory: Path, hidden: int, layers: int) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import TINY_CONFIGS, build_tiny_tokenizer

    from linearize.weights import ShardedWeights

    config = AutoConfig.for_model(
        "llama",
        **{
            **TINY_CONFIGS["llama"],
            "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4,
            "num_hidden_layers": layers,
            "num_attention_heads": hidden // 128,
            "num_key_value_heads": hidden // 128,
        },
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size="200MB")
    build_tiny_tokenizer().save_pretrained(directory)
    return ShardedWeights.open(directory).total_bytes


def run_child(args: list[str], cwd: Path) -> tuple[int, float]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", PEAK, *args], capture_output=True, text=True, cwd=cwd
    )
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak"]
    return peak, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--budget", default="400MB")
    parser.add_argument(
        "--data", default=str(ROOT.parent / "shared/data/wikitext-2-raw/wiki.test.raw")
    )
    parser.add_argument("--modes", nargs="+", default=["resident", "streamed"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/scale.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="linearize-scale-") as tmp:
        tmp = Path(tmp)
        baseline, _ = run_child([], tmp)
        for layers in args.layers:
            model = tmp / f"llama-{layers}"
            weights = write_model(model, args.hidden, layers)
            common = ["compress", "--model", str(model), "--data", args.data, "--layers", "2",
                      "--calib-tokens", "2048", "--eval-tokens", "1024", "--seq-len", "256",
                      "--heal-steps", "20", "--heal-seconds", "600", "--no-cache", "--quiet",
                      "--force"]  # fmt: skip
            row = {"layers": layers, "weight_bytes": weights}
            runs = {"resident": ["--streaming", "off"],
                    "streamed": ["--streaming", "on", "--memory-budget", args.budget]}  # fmt: skip
            for mode, extra in ((m, runs[m]) for m in args.modes):
                report = tmp / f"{mode}-{layers}.json"
                peak, wall = run_child(
                    [*common, *extra, "--output", str(tmp / f"{mode}-{layers}"), "--report", str(report)],
                    tmp,
                )  # fmt: skip
                data = json.loads(report.read_text())
                assert data["execution"]["mode"] == mode
                execution = data["execution"]  # the memory plan beside the measured peak
                row[mode] = {"peak_rss": peak, "wall_s": round(wall, 1),
                             "planned_peak": execution.get("planned_peak_bytes"),
                             "memory_plan": execution.get("memory_plan", {}),
                             "start_rss": execution.get("start_memory_bytes"),
                             "ppl_increase": data["perplexity"]["increase_pct"],
                             "replaced": data["replaced_layers"]}  # fmt: skip
                planned = (execution.get("planned_peak_bytes") or 0) / 2**20
                print(f"{layers:3d} layers {mode:9s} peak {peak / 2**20:7.0f} MiB "
                      f"(planned {planned:.0f} MiB) "
                      f"wall {wall:6.1f} s", flush=True)  # fmt: skip
            shutil_rm(model)
            rows.append(row)
    result = {"machine": describe(), "date": time.strftime("%Y-%m-%d"),
              "baseline_rss": baseline, "budget": args.budget, "hidden": args.hidden,
              "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def print_table(result: dict) -> None:
    mib = 2**20
    print(f"\nbaseline (empty torch process) peak RSS {result['baseline_rss'] / mib:.0f} MiB; "
          f"streamed budget {result['budget']}; d = {result['hidden']}")  # fmt: skip
    print("| layers | weights MiB | resident peak MiB | streamed peak MiB | resident s | "
          "streamed s | streamed/resident time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    if not all("resident" in row and "streamed" in row for row in result["rows"]):
        return
    for row in result["rows"]:
        r, s = row["resident"], row["streamed"]
        print(f"| {row['layers']} | {row['weight_bytes'] / mib:.0f} | {r['peak_rss'] / mib:.0f} | "
              f"{s['peak_rss'] / mib:.0f} | {r['wall_s']} | {s['wall_s']} | "
              f"{s['wall_s'] / r['wall_s']:.2f} |")  # fmt: skip
    first, last = result["rows"][0]["streamed"], result["rows"][-1]["streamed"]
    growth = 100 * (last["peak_rss"] / first["peak_rss"] - 1)
    print(f"streamed peak growth {result['rows'][0]['layers']} -> "
          f"{result['rows'][-1]['layers']} layers: {growth:+.1f}% (target <= +10%)")  # fmt: skip


if __name__ == "__main__":
    main()
