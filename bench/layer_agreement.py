"""Top-1 agreement and KL of the bundled model with ONE decoder layer replaced: its least-squares
affine map (the `linear` format's map, fitted on the calibration half) or nothing (removal).

A diagnostic for gates on agreement: it answers "can any single layer go while top-1 agreement
stays above X?" before a search is run. Top-1 agreement is the search's (argmax equality); the
KL here is over the whole vocabulary, where the search's is on the teacher's top logits. Each
layer is replaced through a forward hook on a resident model, so the 2 x 29 variants share one
model load and one statistics pass.

    python bench/layer_agreement.py --data ../shared/data/wikitext-2-raw/wiki.test.raw

Writes bench/results/layer_agreement.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402  (bench/machine.py, beside this script)

from linearize.capture import PairStats  # noqa: E402
from linearize.data import split_halves, tokenize_windows  # noqa: E402
from linearize.fitting import DEFAULT_RIDGE, fit_affine  # noqa: E402
from linearize.loading import load_model  # noqa: E402

BATCH = 4


def hidden_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def output_of(out):
    return out[0] if isinstance(out, tuple) else out


def collect_stats(model, windows, d: int) -> list[PairStats]:
    """Every layer's (input, output) statistics in one pass over the calibration windows."""
    layers = model.model.layers
    stats = [PairStats(d, d, extras=False) for _ in layers]

    def keep(index):
        def hook(_module, args, kwargs, out):
            x = hidden_of(args, kwargs).reshape(-1, d)
            stats[index].update(x, output_of(out).reshape(-1, d))

        return hook

    hooks = [
        layer.register_forward_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for start in range(0, len(windows), BATCH):
                model(windows[start : start + BATCH])
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def logits_of(model, windows) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                model(windows[s : s + BATCH]).logits[:, :-1].float()
                for s in range(0, len(windows), BATCH)
            ]
        )


def replaced(model, index: int, affine):
    """A hook that makes layer `index` return its map of the input (None: the input itself)."""

    def hook(_module, args, kwargs, out):
        x = hidden_of(args, kwargs)
        y = x if affine is None else x @ affine.weight.to(x.dtype) + affine.bias.to(x.dtype)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    return model.model.layers[index].register_forward_hook(hook, with_kwargs=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "layer_agreement.json"
    )
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    calibration, evaluation = split_halves(Path(args.data).read_text(encoding="utf-8"))
    fit_windows = tokenize_windows(tokenizer, calibration, args.calib_tokens, args.seq_len, "calib")
    eval_windows = tokenize_windows(tokenizer, evaluation, args.eval_tokens, args.seq_len, "eval")
    d = model.config.hidden_size
    stats = collect_stats(model, fit_windows, d)
    reference = logits_of(model, eval_windows).log_softmax(-1)
    top1 = reference.argmax(-1)
    rows = []
    for method in ("fit", "remove"):
        for index in range(1, len(stats) - 1):  # the first and last layers stay, as in selection
            started = time.perf_counter()
            affine = fit_affine(stats[index].centered(), DEFAULT_RIDGE) if method == "fit" else None
            hook = replaced(model, index, affine)
            try:
                logprobs = logits_of(model, eval_windows).log_softmax(-1)
            finally:
                hook.remove()
            kl = (reference.exp() * (reference - logprobs)).sum(-1).mean().item()
            agreement = 100 * (logprobs.argmax(-1) == top1).float().mean().item()
            rows.append(
                {"layer": index, "method": method, "kl": kl, "top1_agreement_pct": agreement}
            )
            print(
                f"{method:6s} layer {index:2d}: top-1 {agreement:5.1f}%  KL {kl:.4f}  "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    best = {
        m: max((r for r in rows if r["method"] == m), key=lambda r: r["top1_agreement_pct"])
        for m in ("fit", "remove")
    }
    print("\n| method | best layer | top-1 agreement | KL |\n|---|---|---|---|")
    for method, row in best.items():
        print(f"| {method} | {row['layer']} | {row['top1_agreement_pct']:.1f}% | {row['kl']:.4f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": machine.describe(),
                "args": {**vars(args), "json": str(args.json)},
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
