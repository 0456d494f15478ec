"""More text for healing: the same healing steps on 12k (the fit windows), 16k, 64k, 128k tokens.

Issue 16, section 3. The default window of `linearize compress --layers k` is fitted and folded
as the default does, then healed with the engine's recipe (`linearize.healing`, one 512-token
window per step) for a fixed number of steps, drawing from the first N tokens of the healing
text (`--heal-tokens N`: the fit windows, then the calibration half after the calibration
windows; linearize.data). The teacher's states are captured once on the largest N; a smaller
N heals on the first rows of the same states, which is what a run with that N would capture.
Measured on the wikitext evaluation windows and out of domain (bench/healbench.py's texts):

    python bench/heal_tokens.py --data ../shared/data/wikitext-2-raw/wiki.test.raw

Writes bench/results/heal_tokens.json after every row (a cut-short run keeps what ran).
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

from linearize import healing, pipeline  # noqa: E402
from linearize.architectures import decoder_layers  # noqa: E402


def main() -> None:
    parser = healbench.argument_parser(__doc__)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument(
        "--heal-tokens", default="12288,16384,65536,131072", help="0 adds the fold unhealed"
    )
    parser.add_argument("--steps", type=int, default=140)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    healbench.add_text_arguments(parser, ood_tokens=2048)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "heal_tokens.json"
    )
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.heal_tokens.split(","))
    started = time.perf_counter()

    job = BenchJob.bundled(
        args.data,
        args.k,
        calib_tokens=args.calib_tokens,
        eval_tokens=args.eval_tokens,
        heal_steps=args.steps,
    )
    loaded = job.load("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = job.job.windows(tokenizer, eval_tokens=args.eval_tokens, heal_tokens=max(sizes))
    _, baseline_val, analysis = job.baseline_and_analysis(model, windows, tokenizer)
    sets = {"validation": windows.validation}
    sets |= healbench.eval_sets(
        tokenizer, windows, args.ood.split(","), args.ood_tokens, args.measure_tokens
    )
    baseline = healbench.perplexities(model, sets)
    print("baseline", {k: round(v, 3) for k, v in baseline.items()}, flush=True)
    indices, _ = job.select(model, windows, analysis, baseline_val, len(decoder_layers(model)))
    start = pipeline.injection_point(job.spec, indices)
    t0 = time.perf_counter()
    teacher = job.capture_teacher(model, windows, indices, ids=windows.heal)
    teacher_seconds = time.perf_counter() - t0
    print(f"teacher on {windows.count('heal')} tokens: {teacher_seconds:.0f} s", flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine.describe(),
        "command": " ".join(sys.argv),
        "k": args.k,
        "layers": indices,
        "steps": args.steps,
        "calib_tokens": args.calib_tokens,
        "fit_windows": len(windows.fit),
        "heal_windows_available": len(windows.heal),
        "eval_tokens": sets["eval"].numel(),
        "ood_tokens": args.ood_tokens,
        "teacher_seconds": teacher_seconds,
        "recipe": f"healing.heal defaults: lr {healing.DEFAULT_LR}, carrier + "
        f"{healing.NEIGHBOUR_LAYERS} layers from the cut, one {windows.seq_len}-token window "
        "per step, centred-logit MSE at the final hidden state",
        "baseline": baseline,
        "rows": [],
    }
    for n in sizes:  # 0: the fold before healing
        n_windows = n // windows.seq_len
        trial = copy.deepcopy(model)
        carriers = job.replace(trial, windows, indices)
        params = healing.healing_params(trial, carriers)
        t1 = time.perf_counter()
        heal = None
        if n_windows:
            part = healing.TeacherCache(
                start, teacher.inputs[:n_windows], teacher.targets[:n_windows], teacher.kind
            )
            heal, _ = healbench.heal_counted(
                trial, part, windows.heal[:n_windows], params, args.steps
            )
        ppl = healbench.perplexities(trial, sets)
        row = {
            "heal_tokens": n_windows * windows.seq_len,
            "heal_windows": n_windows,
            "steps": 0 if heal is None else heal.steps,
            "train_loss_first": None if heal is None else heal.train_loss_first,
            "train_loss_last": None if heal is None else heal.train_loss_last,
            "ppl": ppl,
            "increase_pct": healbench.increases(ppl, baseline),
            "seconds": time.perf_counter() - t1,
        }
        result["rows"].append(row)
        print(fmt(row), flush=True)
        del trial
        result["minutes"] = (time.perf_counter() - started) / 60
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"total {result['minutes']:.1f} min; wrote {args.json}")


def fmt(row: dict) -> str:
    cells = "  ".join(f"{name} {value:+7.1f}%" for name, value in row["increase_pct"].items())
    loss = "" if row["train_loss_last"] is None else f"  train loss {row['train_loss_last']:.4f}"
    return f"heal tokens {row['heal_tokens']:6d} steps {row['steps']:4d}  {cells}{loss}"


def print_table(result: dict) -> None:
    names = list(result["baseline"])
    print(f"\nk={result['k']} {result['layers']}, {result['steps']} steps; increase (%)")
    print("| healing tokens | windows | " + " | ".join(names) + " | train loss (last 5) |")
    print("|---" * (len(names) + 3) + "|")
    for row in result["rows"]:
        cells = " | ".join(f"{row['increase_pct'][n]:+.1f}" for n in names)
        loss = "–" if row["train_loss_last"] is None else f"{row['train_loss_last']:.4f}"
        label = "0 (no healing)" if not row["heal_windows"] else str(row["heal_tokens"])
        print(f"| {label} | {row['heal_windows']} | {cells} | {loss} |")


if __name__ == "__main__":
    main()
