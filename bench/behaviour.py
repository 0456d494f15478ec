"""How each budget behaves: perplexity, agreement, generation and a local multiple-choice task.

For each k the default `linearize compress --layers K` runs on the bundled model with the
local task below; the table puts the perplexity increase next to the KL, the top-1 agreement,
the generation exact match and the task accuracy, and times the agreement and generation
measures against the whole run.

The task (`wikitext_next_sentence`) is built at run time from the EVALUATION half of the text
(the second half by characters; calibration never sees it), so nothing is shipped: the half is
split into sentences (". " boundaries inside paragraphs, headings and lines under 8 words
dropped); item i takes sentence s as the context and offers 4 continuations: the sentence that
really follows s, and 3 sentences drawn (seeded) from elsewhere in the half. Accuracy is the
share of items where the model's log-likelihood of the true continuation is the highest
(lm-eval `multiple_choice`, acc; acc_norm divides by the continuation's length in bytes).
Chance is 25%.

    python bench/behaviour.py --data ../shared/data/wikitext-2-raw/wiki.test.raw --ks 1,2,4,6,8

Prints a table and writes bench/results/behaviour.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402  (bench/machine.py, beside this script)

from api_schemas import CompressSpec, DataSpec  # noqa: E402
from linearize import pipeline  # noqa: E402
from linearize.data import load_source, split_halves  # noqa: E402

TASK = "wikitext_next_sentence"
CHOICES = 4


def sentences(text: str) -> list[list[str]]:
    """Paragraphs of the text as lists of sentences (wikitext headings `= x =` dropped)."""
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        parts = [p.strip() for p in re.split(r"(?<=\.) (?=[A-Z])", line)]
        parts = [p for p in parts if len(p.split()) >= 8]
        if len(parts) >= 2:
            paragraphs.append(parts)
    return paragraphs


def build_task(text: str, directory: Path, items: int, seed: int = 0) -> int:
    """Write the JSONL + YAML of the next-sentence task; returns the number of items."""
    rng = random.Random(seed)
    paragraphs = sentences(split_halves(text)[1])
    pool = [s for p in paragraphs for s in p]
    pairs = [(p[i], p[i + 1]) for p in paragraphs for i in range(len(p) - 1)]
    rng.shuffle(pairs)
    rows = []
    for context, truth in pairs[:items]:
        distractors = rng.sample([s for s in pool if s not in (context, truth)][:5000], CHOICES - 1)
        choices = [truth, *distractors]
        rng.shuffle(choices)
        rows.append(
            {
                "context": context,
                "choices": [" " + c for c in choices],
                "label": choices.index(truth),
            }
        )
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{TASK}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return len(rows)


def run_one(k: int, args: argparse.Namespace, task_dir: Path) -> dict:
    spec = CompressSpec(
        model="smollm2-135m",
        layers=k,
        data=DataSpec(path=str(args.data)),
        tasks=[TASK],
        task_dir=str(task_dir),
        calib_tokens=args.calib_tokens,
        eval_tokens=args.eval_tokens,
        heal_steps=args.heal_steps,
        heal_seconds=args.heal_seconds,
    )
    out = args.out
    started = time.perf_counter()
    report = pipeline.run(spec, output_dir=out / f"k{k}", force=True)
    wall = time.perf_counter() - started
    t = report.timings
    (task,) = report.tasks
    # The measures this issue adds, without the tasks (they run only with --tasks).
    measures = t.get("agreement", 0) + t.get("generation", 0) + t.get("agreement_reference", 0)
    return {
        "k": k,
        "layers": report.replaced_layers,
        "ppl_increase_pct": report.perplexity.increase_pct,
        "kl": report.agreement.kl,
        "top1_agreement": report.agreement.top1_agreement,
        "top5_contains_top1": report.agreement.top5_contains_top1,
        "generation_exact_match": report.generation.exact_match,
        "generation_common_prefix": report.generation.mean_common_prefix,
        "task_acc_original": task.original["acc"],
        "task_acc_compressed": task.compressed["acc"],
        "task_acc_stderr": task.compressed["acc_stderr"],
        "task_retained_pct": task.retained_pct,
        "heal_steps": report.selection.get("healing", {}).get("steps"),
        "healing_kept": report.selection.get("healing", {}).get("kept"),
        "timings": t,
        "wall_s": wall,
        "tasks_s": t.get("tasks", 0),
        "agreement_s": t.get("agreement", 0) + t.get("agreement_reference", 0),
        "generation_s": t.get("generation", 0),
        "measures_pct_of_compress": 100 * measures / (wall - t.get("tasks", 0) - measures),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ks", default="1,2,4,6,8")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--heal-steps", type=int, default=None)
    parser.add_argument("--heal-seconds", type=float, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench-behaviour")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "behaviour.json")
    args = parser.parse_args()
    task_dir = args.out / "tasks"
    items = build_task(load_source(DataSpec(path=str(args.data))).text, task_dir, args.items)
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        rows.append(run_one(k, args, task_dir))
        print(json.dumps(rows[-1]), flush=True)
        result = {
            "machine": machine.describe(),
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv),
            "task_items": items,
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    print(
        "| k | ppl increase | KL (nats/token) | top-1 agreement | top-5 | generation exact "
        "| common prefix | task acc (orig -> compressed) | retained | heal steps | measures |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['k']} | {r['ppl_increase_pct']:+.1f}% | {r['kl']:.3f} | "
            f"{100 * r['top1_agreement']:.1f}% | {100 * r['top5_contains_top1']:.1f}% | "
            f"{100 * r['generation_exact_match']:.0f}% | {r['generation_common_prefix']:.1f} | "
            f"{r['task_acc_original']:.3f} -> {r['task_acc_compressed']:.3f} "
            f"(± {r['task_acc_stderr']:.3f}) | {r['task_retained_pct']:.1f}% | {r['heal_steps']} "
            f"| {r['measures_pct_of_compress']:.1f}% |"
        )


if __name__ == "__main__":
    sys.exit(main())
