"""The default command in and out of domain (issue 22): variants side by side on the bundled model.

Each run is `linearize compress` in a child process, the way a user types it, with four texts
measured before and after (`--eval-data`): the general mixture's held-out part, software
licences, Python source and git's release notes (the sealed text; bench/healbench.py), each cut
to its first --text-tokens tokens. The in-domain figure is the evaluation half of the wikitext
file; every figure is the reloaded checkpoint's. A run names its extra arguments, e.g.

    python bench/robustness.py --data ../shared/data/wikitext-2-raw/wiki.test.raw \
        --run "k4 default=--layers 4" \
        --run "k4 no replay, 140 steps=--layers 4 --heal-mix 0 --heal-steps 140 --heal-seconds 100000"

Writes bench/results/robustness.json after each run and prints a table. The generation check is
off (--generation-prompts 0): it measures behaviour, not the figures here, and costs a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import healbench  # noqa: E402  (bench/healbench.py, beside this script)
import machine  # noqa: E402

TEXTS = {
    "licences": healbench.licence_text,
    "python": healbench.python_source_text,
    "relnotes": healbench.relnotes_text,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=ARGS")
    parser.add_argument("--text-tokens", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "robustness.json")
    args = parser.parse_args()
    results = load(args.json)
    results["machine"] = machine.describe()
    with tempfile.TemporaryDirectory() as scratch:
        texts = write_texts(Path(scratch), args.text_tokens)
        for item in args.run:
            name, _, extra = item.partition("=")
            results["runs"][name] = run(args.data, shlex.split(extra), texts, Path(scratch))
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
            print(table(results["runs"]), flush=True)


def load(path: Path) -> dict:
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault("runs", {})
    return results


def write_texts(scratch: Path, n_tokens: int) -> dict[str, Path]:
    """The four out-of-domain texts, each cut to its first n_tokens tokens of the bundled
    tokenizer, as files for --eval-data."""
    from linearize.loading import load_model
    from linearize.mixture import part_path

    tokenizer = load_model("smollm2-135m").tokenizer
    sources = {"general": lambda: part_path("heldout").read_text(), **TEXTS}
    paths = {}
    for name, read in sources.items():
        ids = tokenizer(read())["input_ids"][: n_tokens + 64]
        paths[name] = scratch / f"{name}.txt"
        paths[name].write_text(tokenizer.decode(ids))
    return paths


def run(data: str, extra: list[str], texts: dict[str, Path], scratch: Path) -> dict:
    out = scratch / f"out-{time.time_ns()}"
    report_path = scratch / f"{out.name}.json"
    command = [
        sys.executable, "-m", "linearize.cli", "compress", "--model", "smollm2-135m",
        "--data", data, "--generation-prompts", "0", "--quiet",
        *[a for name, path in texts.items() for a in ("--eval-data", f"{name}={path}")],
        "--output", str(out), "--report", str(report_path), *extra,
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=os.environ, capture_output=True, text=True)
    wall = time.monotonic() - started
    if not report_path.is_file():
        return {"args": extra, "error": done.stderr[-2000:], "exit": done.returncode}
    report = json.loads(report_path.read_text())
    return summarise(report, extra, wall, done.returncode)


def summarise(report: dict, extra: list[str], wall: float, exit_code: int) -> dict:
    ppl = report["perplexity"]
    healing = report["selection"].get("healing") or {}
    texts = {t["name"]: t["increase_pct"] for t in report["eval_texts"]}
    in_domain = ppl["increase_pct"]
    return {
        "args": extra,
        "exit": exit_code,
        "layers": report["replaced_layers"],
        "method": report["method"],
        "method_choice": report["selection"].get("method_choice"),
        "shrink_choice": report["selection"].get("shrink_choice"),
        "fit_mix": report["selection"].get("fit_mix"),
        "heal_steps": healing.get("steps"),
        "heal_seconds": healing.get("seconds"),
        "before_healing_pct": pct(ppl.get("before_healing"), ppl["baseline"]),
        "in_domain_pct": in_domain,
        "texts_pct": texts,
        "worst_ratio": max(v / in_domain for v in texts.values()) if in_domain > 0 else None,
        "kl": report["agreement"]["kl"],
        "top1_pct": 100 * report["agreement"]["top1_agreement"],
        "wall_s": round(wall, 1),
        "threads": os.environ.get("OMP_NUM_THREADS", "all cores"),
        "load_avg": os.getloadavg()[0],
    }


def pct(value, baseline):
    return None if value is None else 100 * (value / baseline - 1)


def table(runs: dict) -> str:
    names = list(TEXTS) + ["general"]
    head = "| run | method, layers | steps | eval | " + " | ".join(names)
    lines = [head + " | worst ratio | KL | top-1 | wall s |", "|---" * (len(names) + 8) + "|"]
    for name, r in runs.items():
        if "error" in r:
            lines.append(f"| {name} | failed (exit {r['exit']}) |")
            continue
        texts = " | ".join(f"{r['texts_pct'][n]:+.1f}%" for n in names)
        lines.append(
            f"| {name} | {r['method']} {r['layers']} | {r['heal_steps']} | "
            f"{r['in_domain_pct']:+.1f}% | {texts} | {r['worst_ratio']:.2f} | {r['kl']:.3f} | "
            f"{r['top1_pct']:.1f}% | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
