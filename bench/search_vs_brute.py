"""`--layers max` against brute force: the k found, the trials and the time.

The search (`linearize compress --layers max`, linearize.search) runs once per gate set. The
brute force runs the search's own healed trial (the same healing, the same validation-slice
measure) at every k of 1..--brute-max, and its answer for a gate set is the largest k whose
healed trial passes every rule of the set; one brute-force run serves every gate set, because
each trial records perplexity, KL and agreement. Healing is bounded by steps, not seconds, so
that a loaded host changes the times and not the models.

    python bench/search_vs_brute.py --data ../shared/data/wikitext-2-raw/wiki.test.raw

Writes bench/results/search_vs_brute.json after each run and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402  (bench/machine.py, beside this script)

from api_schemas import CompressSpec, DataSpec  # noqa: E402
from linearize import pipeline, search  # noqa: E402

GATE_SETS = {
    "agreement 85, ppl +15%": {"gate_agreement": 85.0, "gate_ppl_increase": 15.0},
    "KL 0.15": {"gate_kl": 0.15},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--brute-max", type=int, default=6)
    parser.add_argument("--heal-steps", type=int, default=50)
    parser.add_argument("--heal-tokens", type=int, default=8192)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--only", choices=["search", "brute"], help="run one side only")
    parser.add_argument(
        "--gate-set", choices=list(GATE_SETS), help="search with this gate set only (and first)"
    )
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "search_vs_brute.json"
    )
    args = parser.parse_args()
    results = {"machine": machine.describe(), "args": {**vars(args), "json": str(args.json)}}
    gate_sets = {args.gate_set: GATE_SETS[args.gate_set]} if args.gate_set else GATE_SETS
    first, *others = gate_sets.items()
    if args.only != "brute":
        results[f"search: {first[0]}"] = run(args, first[1])
        save(args.json, results)
    if args.only != "search":
        # Each healed k is written as it finishes: a cut-short brute force keeps what ran.
        partial = results.setdefault("brute trials", [])

        def record(k, passed, seconds):
            partial.append({"k": k, "passed_kl": passed, "seconds": round(seconds, 1)})
            save(args.json, results)

        results["brute"] = run(args, GATE_SETS["KL 0.15"], brute=(args.brute_max, record))
        for name, gates in GATE_SETS.items():
            results[f"brute: {name}"] = largest_passing(results["brute"]["curve"], gates)
        save(args.json, results)
    if args.only != "brute":
        for name, gates in others:
            results[f"search: {name}"] = run(args, gates)
            save(args.json, results)
        results[f"dry run: {first[0]}"] = run(args, first[1], dry_run=True)
        save(args.json, results)
    print(json.dumps(summary(results), indent=2))


def run(args, gates: dict, brute=None, dry_run: bool = False) -> dict:
    spec = CompressSpec(
        data=DataSpec(path=args.data),
        layers="max",
        heal_steps=args.heal_steps,
        heal_seconds=3600,  # the step cap decides, whatever the host's load
        heal_tokens=args.heal_tokens,
        calib_tokens=args.calib_tokens,
        eval_tokens=args.eval_tokens,
        method="fit",  # the brute force heals the fit; the removal beside it is another question
        generation_prompts=0,
        dry_run=dry_run,
        **gates,
    )
    real = search.search_largest_passing
    if brute is not None:
        search.search_largest_passing = lambda max_k, probe, confirm, budget: brute_force(
            *brute, confirm
        )
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as out:
            report = pipeline.run(spec, output_dir=Path(out) / "o")
    finally:
        search.search_largest_passing = real
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "search_s": report.timings.get("search"),
        "chosen_k": report.selection["chosen_k"],
        "trials": report.selection["trials"],
        "healed_trials": report.selection["healed_trials"],
        "gate": report.gate.model_dump() if report.gate else None,
        "curve": [p.model_dump() for p in report.curve],
    }


def brute_force(brute_max: int, record, confirm) -> search.Outcome:
    steps = []
    for k in range(1, brute_max + 1):
        started = time.perf_counter()
        steps.append(search.Step(k, True, confirm(k)))
        record(k, steps[-1].passed, time.perf_counter() - started)
    passing = [s.k for s in steps if s.passed]
    return search.Outcome(max(passing, default=None), 0, steps)


def largest_passing(curve: list[dict], gates: dict) -> int | None:
    def passes(p):
        rules = {
            "gate_ppl_increase": p["ppl_increase_pct"] <= gates.get("gate_ppl_increase", 1e9),
            "gate_kl": p["kl"] <= gates.get("gate_kl", 1e9),
            "gate_agreement": p["top1_agreement_pct"] >= gates.get("gate_agreement", -1),
        }
        return all(rules.values())

    return max((p["k"] for p in curve if p["healed"] and passes(p)), default=None)


def summary(results: dict) -> dict:
    return {
        key: value
        if not isinstance(value, dict)
        else {k: v for k, v in value.items() if k != "curve"}
        for key, value in results.items()
    }


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
