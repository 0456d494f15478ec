"""Pretraining dynamics of linearity, with and without the cosine regularizer (CPU, minutes).

Trains tiny llama decoders from scratch on wikitext-2's calibration half (first half by
characters), byte-level (ids = UTF-8 bytes, vocab 256), one run per regularizer weight, with the
same seed, initialisation and batch order. At a few checkpoints (step 0 = random init included)
it measures the linearity profile (paper score with and without residual, mean cos(in, out),
anisotropy) on fixed probe windows of the second half, and the eval loss on the second half.
The regularizer is linearize.training.CosineRegularizer:
    R = weight * mean_{layers, tokens} cos(h_l, h_{l+1});  weight > 0 pushes states apart.

    .venv/bin/python bench/regularizer.py          # the study: 4 weights x 2 seeds, ~15 min
    .venv/bin/python bench/regularizer.py --weights 0 0.1 --seeds 0 --steps 150 --every 30

Writes bench/results/regularizer.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import machine  # bench/machine.py, beside this script
import torch

log = logging.getLogger("bench.regularizer")


def byte_windows(text: str, n: int, seq_len: int) -> torch.Tensor:
    """The first n non-overlapping seq_len windows of the text's UTF-8 bytes."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    if len(data) < n * seq_len:
        raise SystemExit(f"text too short: {len(data)} bytes < {n * seq_len}")
    return data[: n * seq_len].view(n, seq_len)


def training_batches(text: str, steps: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """(steps, batch, seq_len) random windows of the text's bytes; a fixed order per seed."""
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq_len, (steps, batch), generator=generator)
    return data[starts[..., None] + torch.arange(seq_len)]


def build_model(args, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=args.d,
        intermediate_size=3 * args.d,
        num_hidden_layers=args.layers,
        num_attention_heads=args.d // 32,
        num_key_value_heads=args.d // 32,
        vocab_size=256,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def measure(model, probe: torch.Tensor, evaluation: torch.Tensor) -> dict:
    from linearize.architectures import decoder_layers
    from linearize.capture import collect_layer_stats
    from linearize.evaluation import window_nll
    from linearize.linearity import summarize_pair

    was_training = model.training
    model.eval()
    capture = collect_layer_stats(model, decoder_layers(model), probe, batch_size=16)
    layers = [summarize_pair(s) for s in capture.stats]
    nll = window_nll(model, evaluation, batch_size=16)
    model.train(was_training)
    return {
        "eval_loss": float(nll.sum()) / (evaluation.numel() - len(evaluation)),
        "score": [r["score"] for r in layers],
        "score_without_residual": [r["score_without_residual"] for r in layers],
        "cosine_in_out": [r["cosine_in_out"] for r in layers],
        "anisotropy": [r["anisotropy"] for r in layers],
    }


def run_one(args, weight: float, seed: int, batches, probe, evaluation) -> dict:
    from linearize.training import CosineRegularizer, train

    model = build_model(args, seed)
    checkpoints = sorted({0, *range(args.every, args.steps + 1, args.every), args.steps})
    points = [{"step": 0, **measure(model, probe, evaluation)}]
    train_loss: list[float] = []
    reg = CosineRegularizer(weight) if weight else None
    start = time.perf_counter()
    done = 0
    for end in checkpoints[1:]:
        history = train(
            model,
            batches[done:end],
            steps=end - done,
            lr=args.lr,
            regularizer=reg,
            weight_decay=0.1,
        )
        train_loss += [h.lm_loss for h in history]
        done = end
        points.append({"step": end, **measure(model, probe, evaluation)})
        p = points[-1]
        log.info(
            "weight %+.3f seed %d step %d: eval loss %.4f, mean score %.5f, w/o res %.4f, cos %.3f",
            weight,
            seed,
            end,
            p["eval_loss"],
            _mean(p["score"]),
            _mean(p["score_without_residual"]),
            _mean(p["cosine_in_out"]),
        )
    return {
        "weight": weight,
        "seed": seed,
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_loss_last50": _mean(train_loss[-50:]),
        "checkpoints": points,
    }


def _mean(values) -> float:
    return sum(values) / len(values)


def table(runs: list[dict]) -> str:
    lines = [
        "| weight | seed | step | eval loss | mean score | mean 1-score | mean w/o residual "
        "| mean cos(in,out) | per-layer score |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for p in run["checkpoints"]:
            lines.append(
                f"| {run['weight']:+g} | {run['seed']} | {p['step']} | {p['eval_loss']:.4f} | "
                f"{_mean(p['score']):.5f} | {1 - _mean(p['score']):.2e} | "
                f"{_mean(p['score_without_residual']):.4f} | {_mean(p['cosine_in_out']):.3f} | "
                + " ".join(f"{s:.4f}" for s in p["score"])
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.01, 0.1, -0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=50, help="checkpoint interval (steps)")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--probe-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy box")
    parser.add_argument("--out", type=Path, default=Path("bench/results/regularizer.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from linearize.data import find_wikitext, split_halves

    path = find_wikitext()
    calib_text, eval_text = split_halves(path.read_text(encoding="utf-8"))
    evaluation = byte_windows(eval_text, args.eval_windows, args.seq_len)
    # Probe windows for the profile: held-out text, disjoint from the eval-loss windows.
    probe = byte_windows(eval_text, args.eval_windows + args.probe_windows, args.seq_len)
    probe = probe[args.eval_windows :]
    result = {
        "machine": machine.describe(),
        "data": f"{path} (train: first half by characters; eval/probe: second half), bytes",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "regularizer": "R = weight * mean_{layers,tokens} cos(h_l, h_{l+1}); weight>0 pushes apart",
        "probe_tokens": probe.numel(),
        "eval_tokens": evaluation.numel(),
        "runs": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    for seed in args.seeds:
        batches = training_batches(calib_text, args.steps, args.batch, args.seq_len, seed)
        for weight in args.weights:
            runs.append(run_one(args, weight, seed, batches, probe, evaluation))
            args.out.write_text(json.dumps(result, indent=2))  # after each run: partial results
    print(table(runs))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
