"""Which healing recipe buys the most perplexity in a fixed time budget?

Same model, windows and fitted maps for every variant (the default selection and fit of
`linearize compress --layers K`); each variant restarts from the fitted maps, heals for
--seconds, and is measured on the validation slice and on the evaluation windows. Variants:

  maps/LR          only the maps' carriers train (the folded down_proj), Adam at LR
  maps+N/LR        ... plus every weight matrix of the N decoder layers from the cut
  suffix/LR        ... plus every weight matrix of all layers after the cut
  +kl              KL(teacher || student) on the full logits instead of the centred-logit MSE
  +decay           the learning rate falls linearly to zero over the budget
  +decayNN         ... over its last NN percent only (constant before)

    python bench/heal_sweep.py --data ../shared/data/wikitext-2-raw/wiki.test.raw

Prints a table and writes bench/results/heal_sweep.json. Budgets are wall-clock, so run it on
an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402  (bench/machine.py, beside this script)

from api_schemas import CompressSpec, DataSpec  # noqa: E402
from linearize import healing  # noqa: E402
from linearize.architectures import decoder_layers  # noqa: E402
from linearize.evaluation import evaluate_perplexity  # noqa: E402
from linearize.pipeline import _Job  # noqa: E402
from linearize.progress import Progress  # noqa: E402

VARIANTS = (
    "maps/3e-4",  # the previous default
    "maps/3e-3",
    "maps+2/1e-3",
    "maps+4/1e-3",  # the first choice; the default is maps+4/3e-4 (see BENCHMARKS.md)
    "suffix/1e-4",
    "maps+4/3e-4+kl",
)


def parse_variant(name: str, n_layers: int) -> dict:
    """'maps+4/1e-3+kl+decay30' -> 4 neighbour layers, lr 1e-3, KL, decay over the last 30%."""
    params, rest = name.split("/")
    lr, *flags = rest.split("+")
    neighbours = {"maps": 0, "suffix": n_layers}.get(params)
    if neighbours is None:
        neighbours = int(params.removeprefix("maps+"))
    decay = 0.0
    for flag in flags:
        percent = flag.removeprefix("decay")
        if flag.startswith("decay") and (
            percent == "" or percent.isdigit() and 0 < int(percent) <= 100
        ):
            decay = int(percent or 100) / 100
        elif flag != "kl":
            raise SystemExit(f"unknown variant flag {flag!r} in {name!r}")
    return {"neighbours": neighbours, "lr": float(lr), "kl": "kl" in flags, "decay": decay}


def kl_loss(model):
    head = model.get_output_embeddings()

    def loss(h_student, h_teacher):
        with torch.no_grad():
            teacher = F.log_softmax(head(h_teacher).float(), -1)
        student = F.log_softmax(head(h_student).float(), -1)
        return F.kl_div(
            student.flatten(0, -2), teacher.flatten(0, -2), log_target=True, reduction="batchmean"
        )

    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "heal_sweep.json"))
    args = parser.parse_args()

    spec = CompressSpec(
        model=args.model,
        data=DataSpec(path=args.data),
        layers=args.layers,
        calib_tokens=args.calib_tokens,
        eval_tokens=args.eval_tokens,
    )
    job = _Job(spec, Progress(None))
    loaded = job.load(spec.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = job.windows(tokenizer, eval_tokens=spec.eval_tokens)
    baseline, baseline_val, analysis = job.baseline_and_analysis(model, windows, tokenizer)
    n_layers = len(decoder_layers(model))
    indices, _ = job.select(model, windows, analysis, baseline_val, n_layers)
    teacher = job.capture_teacher(model, windows, indices)
    carriers = job.replace(model, windows, indices)
    fitted = copy.deepcopy(model.state_dict())
    rows = [measure("fitted (no healing)", model, windows, baseline, baseline_val, None)]
    for name in args.variants.split(","):
        model.load_state_dict(fitted)
        variant = parse_variant(name, n_layers)
        params = healing.healing_params(model, carriers, variant["neighbours"])
        result = healing.heal(
            model,
            teacher,
            windows.fit,
            params,
            max_steps=10**9,
            max_seconds=args.seconds,
            lr=variant["lr"],
            loss_fn=kl_loss(model) if variant["kl"] else None,
            decay=variant["decay"],
        )
        row = measure(name, model, windows, baseline, baseline_val, result)
        row["trained_params"] = sum(p.numel() for p in params)
        rows.append(row)
        print_row(row)

    report = {
        "model": args.model,
        "layers": indices,
        "calib_tokens": args.calib_tokens,
        "eval_tokens": args.eval_tokens,
        "seconds": args.seconds,
        "threads": torch.get_num_threads(),
        "machine": machine.describe(),
        "date": time.strftime("%Y-%m-%d"),
        "baseline": baseline,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nlayers {indices}, {args.seconds:.0f} s per variant, baseline {baseline:.3f}")
    for row in rows:
        print_row(row)


def measure(name, model, windows, baseline, baseline_val, result) -> dict:
    val = evaluate_perplexity(model, windows.validation)
    ppl = evaluate_perplexity(model, windows.eval)
    return {
        "variant": name,
        "steps": result.steps if result else 0,
        "validation_increase_pct": 100 * (val / baseline_val - 1),
        "eval_increase_pct": 100 * (ppl / baseline - 1),
        "train_loss_last": result.train_loss_last if result else None,
    }


def print_row(row: dict) -> None:
    print(
        f"{row['variant']:<22} steps {row['steps']:>4}  "
        f"validation {row['validation_increase_pct']:+6.1f}%  eval {row['eval_increase_pct']:+6.1f}%",
        flush=True,
    )


if __name__ == "__main__":
    main()
