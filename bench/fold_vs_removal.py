"""What is the fitted map for? Fold vs removal, against the number of healing steps.

For each k, the default window of `linearize compress --layers k` is (a) folded, as the
default does (the least-squares map folded into the `down_proj` of the layer before the span),
or (b) simply removed: the fold with its map set to the identity. Both then get the engine's
healing recipe (`linearize.healing`: the carrier plus the 4 layers from the cut, Adam 3e-4,
centred-logit MSE against the original model's final hidden states, one window per step, on
the fit windows or, with --heal-tokens N, on the first N tokens of the healing text), counted in steps, and are measured at each step count of --steps (snapshots of one run, so
the curve is one optimiser trajectory) on the wikitext evaluation windows and out of domain.

    python bench/fold_vs_removal.py --data ../shared/data/wikitext-2-raw/wiki.test.raw

Writes bench/results/fold_vs_removal.json after every curve (a cut-short run keeps what ran)
and prints a table.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import healbench  # noqa: E402  (bench/healbench.py, beside this script)
import machine  # noqa: E402
from engine import BenchJob  # noqa: E402

from linearize import healing  # noqa: E402
from linearize.architectures import decoder_layers  # noqa: E402


def main() -> None:
    parser = healbench.argument_parser(__doc__)
    parser.add_argument("--budgets", default="2,4,8")
    parser.add_argument("--steps", default="0,25,50,100,200,400")
    parser.add_argument("--variants", default="fold,removal")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument(
        "--heal-tokens",
        type=int,
        default=None,
        help="heal on the first N tokens of the healing text (linearize compress --heal-tokens); "
        "default: the fit windows",
    )
    healbench.add_text_arguments(parser, ood_tokens=2048)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "fold_vs_removal.json"
    )
    args = parser.parse_args()
    checkpoints = sorted({int(s) for s in args.steps.split(",")})
    started = time.perf_counter()

    first = make_job(args, 1)
    loaded = first.load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = first.windows(tokenizer, eval_tokens=args.eval_tokens, heal_tokens=args.heal_tokens)
    _, baseline_val, analysis = first.baseline_and_analysis(model, windows, tokenizer)
    sets = healbench.eval_sets(
        tokenizer, windows, args.ood.split(","), args.ood_tokens, args.measure_tokens
    )
    baseline = healbench.perplexities(model, sets)
    print("baseline", {k: round(v, 3) for k, v in baseline.items()}, flush=True)
    teachers = healbench.TeacherCaches(model, windows.heal)
    n_layers = len(decoder_layers(model))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine.describe(),
        "command": " ".join(sys.argv),
        "calib_tokens": args.calib_tokens,
        "fit_windows": len(windows.fit),
        "heal_windows": len(windows.heal),
        "eval_tokens": sets["eval"].numel(),
        "ood_tokens": args.ood_tokens,
        "recipe": f"healing.heal defaults: lr {healing.DEFAULT_LR}, carrier + "
        f"{healing.NEIGHBOUR_LAYERS} layers from the cut, one 512-token window per step",
        "baseline": baseline,
        "curves": [],
    }
    for k in (int(b) for b in args.budgets.split(",")):
        job = first.for_layers(k)
        indices, _ = job.select(model, windows, analysis, baseline_val, n_layers)
        for variant in args.variants.split(","):
            trial = copy.deepcopy(model)
            if variant == "fold":
                carriers = job.replace(trial, windows, indices)
            else:
                _, carriers = healbench.remove_with_carriers(trial, indices)
            start = healbench.injection_start(trial, carriers)
            params = healing.healing_params(trial, carriers)
            t0 = time.perf_counter()
            heal, snaps = healbench.heal_counted(
                trial,
                teachers(start),
                windows.heal,
                params,
                max(checkpoints),
                snapshot_at=checkpoints,
            )
            points = []
            for step in checkpoints:
                healing.restore(params, snaps[step])
                ppl = healbench.perplexities(trial, sets)
                points.append({"steps": step, "ppl": ppl, **pct(ppl, baseline)})
                print(f"k={k} {variant:8s} steps {step:4d}  " + fmt(points[-1]), flush=True)
            result["curves"].append(
                {
                    "k": k,
                    "layers": indices,
                    "variant": variant,
                    "heal_seconds": heal.seconds,
                    "seconds": time.perf_counter() - t0,
                    "points": points,
                }
            )
            del trial, snaps
            result["minutes"] = (time.perf_counter() - started) / 60
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"total {result['minutes']:.1f} min; wrote {args.json}")


def make_job(args, k: int) -> BenchJob:
    return BenchJob.bundled(
        args.data, k, calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens
    )


def pct(ppl: dict, baseline: dict) -> dict:
    return {"increase_pct": healbench.increases(ppl, baseline)}


def fmt(point: dict) -> str:
    return "  ".join(f"{name} {value:+7.1f}%" for name, value in point["increase_pct"].items())


def print_table(result: dict) -> None:
    names = list(result["baseline"])
    print("\nincrease (%) by healing steps: " + " | ".join(names))
    for curve in result["curves"]:
        cells = [
            f"{p['steps']}: " + " | ".join(f"{p['increase_pct'][n]:+.1f}" for n in names)
            for p in curve["points"]
        ]
        print(f"k={curve['k']} {curve['variant']:8s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
