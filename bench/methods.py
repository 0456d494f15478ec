"""The command's two methods end to end: `linearize compress --method fit` against `--method remove`.

Issue 16: the fold-vs-removal curves (bench/fold_vs_removal.py) rebuild both variants inside a
benchmark; this runs the product itself. For each k and method, `linearize.pipeline.run` with the
default command's settings except a fixed number of healing steps (so that both methods get the
same budget on any host), then the checkpoint is reloaded from disk and measured on the same
out-of-domain windows as the race (bench/healbench.py: licences, Python source, 2048 tokens each;
`--sealed` adds the git release notes, looked at once per change and never tuned on).
In-domain figures are the report's own (the evaluation windows, reloaded checkpoint).

    python bench/methods.py --data ../shared/data/wikitext-2-raw/wiki.test.raw --sealed

Writes bench/results/methods.json after every run and prints a table.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import healbench  # noqa: E402  (bench/healbench.py, beside this script)
import machine  # noqa: E402

from api_schemas import CompressSpec, DataSpec  # noqa: E402
from linearize import load, pipeline  # noqa: E402
from linearize.loading import load_model  # noqa: E402


def main() -> None:
    parser = healbench.argument_parser(__doc__)
    parser.add_argument("--budgets", default="4")
    parser.add_argument("--methods", default="fit,remove")
    parser.add_argument("--steps", type=int, default=140)
    parser.add_argument("--sealed", action="store_true", help="also the sealed text (relnotes)")
    parser.add_argument("--ood-tokens", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "methods.json")
    args = parser.parse_args()
    started = time.perf_counter()

    original = load_model("smollm2-135m")
    names = [*healbench.OOD_TEXTS, *(healbench.SEALED_TEXTS if args.sealed else {})]
    texts = {**healbench.OOD_TEXTS, **healbench.SEALED_TEXTS}
    sets = {
        name: healbench.token_windows(original.tokenizer, texts[name](), args.ood_tokens, 512)
        for name in names
    }
    baseline = healbench.perplexities(original.model, sets)
    del original
    print("baseline", {k: round(v, 3) for k, v in baseline.items()}, flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine.describe(),
        "command": " ".join(sys.argv),
        "steps": args.steps,
        "baseline_ood": baseline,
        "runs": [],
    }
    for k in (int(b) for b in args.budgets.split(",")):
        for method in args.methods.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "out"
                spec = CompressSpec(
                    data=DataSpec(path=str(args.data)),
                    layers=k,
                    method=method,
                    heal_steps=args.steps,
                    heal_seconds=healbench.NO_TIME_LIMIT,
                    generation_prompts=0,
                )
                t0 = time.perf_counter()
                report = pipeline.run(spec, output_dir=out)
                seconds = time.perf_counter() - t0
                ood = healbench.perplexities(load(out), sets)
            row = {
                "k": k,
                "method": report.method,
                "layers": report.replaced_layers,
                "steps": report.selection["healing"]["steps"],
                "kept": report.selection["healing"]["kept"],
                "eval_before_healing_pct": 100
                * (report.perplexity.before_healing / report.perplexity.baseline - 1),
                "eval_pct": report.perplexity.increase_pct,
                "ood_pct": healbench.increases(ood, baseline),
                "seconds": seconds,
                "timings": report.timings,
            }
            result["runs"].append(row)
            print(fmt(row), flush=True)
            result["minutes"] = (time.perf_counter() - started) / 60
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
    print_table(result, names)
    print(f"total {result['minutes']:.1f} min; wrote {args.json}")


def fmt(row: dict) -> str:
    ood = "  ".join(f"{n} {v:+.1f}%" for n, v in row["ood_pct"].items())
    return (
        f"k={row['k']} {row['method']:16s} layers {row['layers']} steps {row['steps']} "
        f"({row['kept']}): eval {row['eval_before_healing_pct']:+.1f}% -> "
        f"{row['eval_pct']:+.1f}%  {ood}  ({row['seconds']:.0f} s)"
    )


def print_table(result: dict, names: list[str]) -> None:
    print(f"\nincrease (%) after {result['steps']} healing steps, reloaded checkpoints")
    print(f"{'k':>3s} {'method':16s} {'eval (unhealed)':>16s} {'eval':>8s}", end="")
    print("".join(f"{n:>10s}" for n in names))
    for row in result["runs"]:
        print(
            f"{row['k']:3d} {row['method']:16s} {row['eval_before_healing_pct']:+16.1f} "
            f"{row['eval_pct']:+8.1f}" + "".join(f"{row['ood_pct'][n]:+10.1f}" for n in names)
        )


if __name__ == "__main__":
    main()
