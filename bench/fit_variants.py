"""Variants of the fold's least-squares fit, before healing: ridge, intercept, token weights.

The default folds one map per window into the `down_proj` of the layer before it, fitted through
the origin with a relative ridge of 1e-4 (linearize.fitting). The issue asks whether the ridge
should be chosen on the validation slice, whether a bias term helps, and whether weighting the
fit towards the "triggering" tokens (those the first fit gets most wrong) helps. All variants use
the same fit windows, layers (the default window for each k) and rows; each is folded into a
fresh copy of the model and measured on the validation slice and the evaluation windows.

  ridge=R        relative ridge R (the default is 1e-4)
  bias           with an intercept; Llama's down_proj has no bias, so it is applied by a forward
                 hook for this measurement only (a checkpoint would need a new parameter)
  weighted=P     a second fit whose rows are weighted by (r / mean r)^P, r the first fit's
                 squared residual per token (weights are capped at 10x the mean)

    python bench/fit_variants.py --data ../shared/data/wikitext-2-raw/wiki.test.raw

Prints a table and writes bench/results/fit_variants.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402  (bench/machine.py, beside this script)
from engine import BenchJob  # noqa: E402

from api_schemas import CompressSpec, DataSpec  # noqa: E402
from linearize.architectures import decoder_layers, get_architecture  # noqa: E402
from linearize.capture import (  # noqa: E402
    PairStats,
    hooked,
    iterate_batches,
    layer_io,
    run_decoder,
)
from linearize.evaluation import evaluate_perplexity  # noqa: E402
from linearize.fitting import DEFAULT_RIDGE, fit_affine  # noqa: E402
from linearize.surgery import AffineMap, OutputFold, fold_and_remove  # noqa: E402

VARIANTS = (
    "ridge=0",
    "ridge=1e-6",
    "ridge=1e-5",
    "ridge=1e-4",
    "ridge=1e-3",
    "ridge=1e-2",
    "bias",
    "weighted=0.5",
    "weighted=1",
)


@torch.no_grad()
def fold_rows(model, start: int, end: int, windows) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (M, target) of the fold fit for span [start, end]: M the MLP output of layer
    start-1, target = h_end - h_{start-1} + M (linearize.fitting.collect_span_stats)."""
    layers = decoder_layers(model)
    mlp = layers[start - 1].get_submodule(get_architecture(model).mlp_out)
    seen, features, targets = {}, [], []

    def on_layer(index, args, kwargs, output):
        seen[index] = layer_io(args, kwargs, output)[1]
        if index == end:
            m = seen["mlp"]
            features.append(m.reshape(-1, m.shape[-1]).double())
            target = seen[end] - seen[start - 1] + m
            targets.append(target.reshape(-1, m.shape[-1]).double())

    def on_mlp(_index, args, kwargs, output):
        seen["mlp"] = output[0] if isinstance(output, tuple) else output

    with (
        hooked({start - 1: layers[start - 1], end: layers[end]}, on_layer),
        hooked({0: mlp}, on_mlp),
    ):
        for _, batch in iterate_batches(windows, 4):
            run_decoder(model, batch)
    return torch.cat(features), torch.cat(targets)


def fit(x, y, *, ridge=DEFAULT_RIDGE, bias=False, weights=None) -> AffineMap:
    """The engine's fit (PairStats + fit_affine) on these rows; weights scale the rows by
    sqrt(w), which is weighted least squares for the fit through the origin."""
    if weights is not None:
        scale = weights.sqrt()[:, None]
        x, y = x * scale, y * scale
    stats = PairStats(x.shape[1], y.shape[1], accumulate_dtype=torch.float64, extras=False)
    stats.update(x, y)
    return fit_affine(stats.centered(), ridge=ridge, bias=bias)


def variant_map(name: str, x, y) -> AffineMap:
    kind, _, value = name.partition("=")
    if kind == "ridge":
        return fit(x, y, ridge=float(value))
    if kind == "bias":
        return fit(x, y, bias=True)
    if kind == "weighted":
        first = fit(x, y)
        residual = (y - x @ first.weight).pow(2).sum(1)
        weights = (residual / residual.mean()).pow(float(value))
        weights = (weights / weights.mean()).clamp(max=10.0)
        return fit(x, y, weights=weights)
    raise SystemExit(f"unknown variant {name!r}")


def folded(model, span, affine: AffineMap):
    """A copy of `model` with the span folded; an intercept is added by a forward hook."""
    trial = copy.deepcopy(model)
    mlp = decoder_layers(trial)[span[0] - 1].get_submodule(get_architecture(trial).mlp_out)
    fold_and_remove(trial, {span: OutputFold(mlp=AffineMap(affine.weight, None))})
    if affine.bias is not None:
        offset = affine.bias.float()
        mlp.register_forward_hook(lambda _m, _a, out: out + offset.to(out.dtype))
    return trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", default="4,8")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fit_variants.json"))
    args = parser.parse_args()

    rows = []
    for k in (int(b) for b in args.budgets.split(",")):
        spec = CompressSpec(
            model=args.model,
            data=DataSpec(path=args.data),
            layers=k,
            calib_tokens=args.calib_tokens,
            eval_tokens=args.eval_tokens,
        )
        job = BenchJob(spec)
        loaded = job.load(spec.model)
        model = loaded.model
        windows = job.windows(loaded.tokenizer, eval_tokens=spec.eval_tokens)
        baseline, baseline_val, analysis = job.baseline_and_analysis(
            model, windows, loaded.tokenizer
        )
        indices, _ = job.select(model, windows, analysis, baseline_val, len(decoder_layers(model)))
        span = (indices[0], indices[-1])
        x, y = fold_rows(model, *span, windows.fit)
        for name in args.variants.split(","):
            trial = folded(model, span, variant_map(name, x, y))
            row = {
                "k": k,
                "layers": indices,
                "variant": name,
                "validation_increase_pct": 100
                * (evaluate_perplexity(trial, windows.validation) / baseline_val - 1),
                "eval_increase_pct": 100
                * (evaluate_perplexity(trial, windows.eval) / baseline - 1),
            }
            del trial
            rows.append(row)
            print(
                f"k={k} {name:<14} validation {row['validation_increase_pct']:+7.1f}%  "
                f"eval {row['eval_increase_pct']:+7.1f}%",
                flush=True,
            )
    report = {
        "model": args.model,
        "calib_tokens": args.calib_tokens,
        "eval_tokens": args.eval_tokens,
        "machine": machine.describe(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
