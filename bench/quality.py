"""Side-by-side quality benchmark: every published way of dropping or linearizing layers, and ours.

One run, one model (the bundled SmolLM2-135M), the same calibration and evaluation windows, the
budgets k = 1, 2, 4, 6, 8. Methods:

  shortgpt      remove the k layers with the lowest block influence 1 - cos(input, output)
  sleb          greedy removal: each step removes the block whose removal raises the calibration
                loss least (proxy: the first --sleb-windows fit windows)
  paper_affine  each of the k layers with the highest paper linearity score becomes its own affine
                map (least squares, the paper's replacement; --format linear)
  replaceme     the k-block span with the smallest mean last-token angular distance
                arccos(cos(h_l, h_{l+k}))/pi, removed, its lstsq map T folded into down_proj
  ours          `linearize compress --layers k` with no other flags (the default), judged after
                reloading the checkpoint from disk

Each checkpoint is evaluated on the evaluation windows (wikitext, second half) and on an
out-of-domain text: the Debian licence texts in /usr/share/common-licenses (real, non-wiki
English prose that every Debian machine has without network access).

    python bench/quality.py --data ../shared/data/wikitext-2-raw/wiki.test.raw

Prints a table, writes bench/results/quality.json and bench/results/quality.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402  (bench/machine.py, beside this script)

from api_schemas import CompressSpec, DataSpec  # noqa: E402
from linearize import pipeline  # noqa: E402
from linearize.analysis import analyze  # noqa: E402
from linearize.architectures import decoder_layers  # noqa: E402
from linearize.capture import hooked, iterate_batches, layer_io, run_decoder  # noqa: E402
from linearize.checkpoint import load as load_checkpoint  # noqa: E402
from linearize.data import build_windows, read_text  # noqa: E402
from linearize.evaluation import evaluate_perplexity, window_nll  # noqa: E402
from linearize.fitting import collect_span_stats, fit_spans  # noqa: E402
from linearize.loading import load_model  # noqa: E402
from linearize.progress import Progress  # noqa: E402
from linearize.surgery import fold_and_remove, remove_layers, replace_with_linear  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
OOD_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-3", "Artistic", "GFDL-1.3", "CC0-1.0")
ANCHORS = ("shortgpt", "sleb", "paper_affine", "replaceme")


def ood_windows(tokenizer, n_tokens: int, seq_len: int) -> torch.Tensor:
    text = "\n\n".join((LICENSES / name).read_text() for name in OOD_FILES)
    ids = tokenizer(text)["input_ids"][:n_tokens]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def last_token_states(model, windows) -> torch.Tensor:
    """(L + 1, n_windows, d): the input of layer 0 and the output of every layer, last token."""
    layers = decoder_layers(model)
    states: dict[int, list] = {i: [] for i in range(len(layers) + 1)}

    def on_layer(index, args, kwargs, output):
        x, y = layer_io(args, kwargs, output)
        if index == 0:
            states[0].append(x[:, -1].float().cpu())
        states[index + 1].append(y[:, -1].float().cpu())

    with hooked(dict(enumerate(layers)), on_layer):
        for _, batch in iterate_batches(windows, 4):
            run_decoder(model, batch)
    return torch.stack([torch.cat(states[i]) for i in range(len(layers) + 1)])


def replaceme_start(states: torch.Tensor, k: int) -> int:
    """ReplaceMe's choice: remove blocks l+1..l+k for the l minimising the angular distance of
    the last-token states h_l (output of block l) and h_{l+k}; states[i + 1] is block i's output."""
    n_layers = states.shape[0] - 1
    best, best_l = math.inf, None
    for l in range(0, n_layers - k):  # noqa: E741 - the paper's name
        a, b = states[l + 1], states[l + 1 + k]
        dist = torch.arccos(torch.nn.functional.cosine_similarity(a, b).clamp(-1, 1)) / math.pi
        if float(dist.mean()) < best:
            best, best_l = float(dist.mean()), l
    return best_l


class _Skip(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def sleb_order(model, windows, k_max: int, deadline: float) -> tuple[list[int], bool]:
    """Greedy SLEB removal order (original indices) on a calibration-loss proxy."""
    layers = decoder_layers(model)
    removed: list[int] = []
    for _ in range(k_max):
        best, best_i = math.inf, None
        for i in range(len(layers)):
            if i in removed:
                continue
            original = layers[i]
            layers[i] = _Skip()
            loss = float(window_nll(model, windows).sum())
            layers[i] = original
            if loss < best:
                best, best_i = loss, i
            if time.perf_counter() > deadline:
                return removed, True
        removed.append(best_i)
        print(f"  sleb step {len(removed)}: remove {best_i} (proxy nll {best:.1f})", flush=True)
    return removed, False


def build_anchor(name, model, windows, analysis, states, sleb, k):
    """A compressed copy of `model` by an anchor method; returns (model, replaced indices)."""
    n_layers = len(decoder_layers(model))
    trial = copy.deepcopy(model)
    if name == "shortgpt":
        influence = [1 - row["cosine_in_out"] for row in analysis.layers]
        chosen = sorted(sorted(range(n_layers), key=lambda i: influence[i])[:k])
        return remove_layers(trial, chosen), chosen
    if name == "sleb":
        chosen = sorted(sleb[:k])
        return remove_layers(trial, chosen), chosen
    if name == "paper_affine":
        scores = [row["score"] for row in analysis.layers]
        chosen = sorted(sorted(range(1, n_layers - 1), key=lambda i: -scores[i])[:k])
        spans = [(i, i) for i in chosen]
        stats = collect_span_stats(trial, spans, windows.fit, fmt="linear")
        return replace_with_linear(trial, fit_spans(trial, stats, fmt="linear")), chosen
    if name == "replaceme":
        start = replaceme_start(states, k)
        span = (start + 1, start + k)
        stats = collect_span_stats(trial, [span], windows.fit, fmt="standard")
        return fold_and_remove(trial, fit_spans(trial, stats, fmt="standard")), list(
            range(span[0], span[1] + 1)
        )
    raise ValueError(name)


def run_ours(args, k: int, workdir: Path, ood: torch.Tensor) -> dict:
    spec = CompressSpec(
        model="smollm2-135m",
        layers=k,
        data=DataSpec(path=str(args.data)),
        calib_tokens=args.calib_tokens,
        eval_tokens=args.eval_tokens,
        seq_len=args.seq_len,
    )
    started = time.perf_counter()
    report = pipeline.run(spec, output_dir=workdir / f"ours-{k}")
    reloaded = load_checkpoint(workdir / f"ours-{k}")
    return {
        "ppl": report.perplexity.reloaded,
        "ood_ppl": evaluate_perplexity(reloaded, ood),
        "replaced": report.replaced_layers,
        "seconds": time.perf_counter() - started,
        "before_healing": report.perplexity.before_healing,
        "healing": report.selection.get("healing"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path("../shared/data/wikitext-2-raw/wiki.test.raw")
    )
    parser.add_argument("--budgets", default="1,2,4,6,8")
    parser.add_argument("--methods", default=",".join((*ANCHORS, "ours")))
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--ood-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sleb-windows", type=int, default=1)
    parser.add_argument("--sleb-minutes", type=float, default=12.0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    args = parser.parse_args()
    budgets = [int(k) for k in args.budgets.split(",")]
    methods = args.methods.split(",")
    started = time.perf_counter()

    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    windows = build_windows(
        tokenizer,
        read_text(args.data),
        calib_tokens=args.calib_tokens,
        eval_tokens=args.eval_tokens,
        seq_len=args.seq_len,
    )
    ood = ood_windows(tokenizer, args.ood_tokens, args.seq_len)
    baseline = {
        "ppl": evaluate_perplexity(model, windows.eval),
        "ood_ppl": evaluate_perplexity(model, ood),
    }
    print(f"baseline ppl {baseline['ppl']:.3f}  ood {baseline['ood_ppl']:.3f}", flush=True)
    analysis = analyze(model, windows, tokenizer, Progress())
    states = last_token_states(model, windows.fit)
    sleb, sleb_cut = [], False
    if "sleb" in methods:
        deadline = time.perf_counter() + 60 * args.sleb_minutes
        sleb, sleb_cut = sleb_order(model, windows.fit[: args.sleb_windows], max(budgets), deadline)

    rows = []
    for k in budgets:
        for name in methods:
            t0 = time.perf_counter()
            if name == "ours":
                with tempfile.TemporaryDirectory(dir=ROOT / "bench" / "results") as tmp:
                    row = run_ours(args, k, Path(tmp), ood)
            elif name == "sleb" and k > len(sleb):
                rows.append({"method": name, "k": k, "ppl": None, "note": "cut short"})
                continue
            else:
                trial, chosen = build_anchor(name, model, windows, analysis, states, sleb, k)
                row = {
                    "ppl": evaluate_perplexity(trial, windows.eval),
                    "ood_ppl": evaluate_perplexity(trial, ood),
                    "replaced": chosen,
                    "seconds": time.perf_counter() - t0,
                }
                del trial
            row = {
                "method": name,
                "k": k,
                **row,
                "increase_pct": 100 * (row["ppl"] / baseline["ppl"] - 1),
                "ood_increase_pct": 100 * (row["ood_ppl"] / baseline["ood_ppl"] - 1),
            }
            rows.append(row)
            print(
                f"k={k} {name:13s} ppl {row['ppl']:8.3f} ({row['increase_pct']:+7.1f}%)  "
                f"ood {row['ood_ppl']:8.3f} ({row['ood_increase_pct']:+7.1f}%)  "
                f"layers {row['replaced']}  {row['seconds']:.0f}s",
                flush=True,
            )

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine.describe(),
        "command": " ".join(sys.argv),
        "baseline": baseline,
        "rows": rows,
        "sleb_cut_short": sleb_cut,
        "sleb_order": sleb,
        "minutes": (time.perf_counter() - started) / 60,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print_table(rows, budgets, methods, baseline)
    plot(rows, methods, baseline, args.json.with_suffix(".png"))
    print(f"total {result['minutes']:.1f} min; wrote {args.json}")


def print_table(rows, budgets, methods, baseline) -> None:
    print(
        f"\nperplexity increase (%), wikitext eval | out-of-domain; baseline "
        f"{baseline['ppl']:.2f} | {baseline['ood_ppl']:.2f}"
    )
    print("method        " + "".join(f"{'k=' + str(k):>18s}" for k in budgets))
    for name in methods:
        cells = []
        for k in budgets:
            row = next((r for r in rows if r["method"] == name and r["k"] == k), None)
            if row is None or row.get("ppl") is None:
                cells.append(f"{'cut short':>18s}")
            else:
                cells.append(f"{row['increase_pct']:+8.1f} |{row['ood_increase_pct']:+7.1f}")
        print(f"{name:13s} " + "".join(cells))


def plot(rows, methods, baseline, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in methods:
        points = sorted((r["k"], r["ppl"]) for r in rows if r["method"] == name and r.get("ppl"))
        if points:
            ax.plot(*zip(*points, strict=True), "o-", label=name)
    ax.axhline(baseline["ppl"], color="k", ls=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("replaced layers k (of 30)")
    ax.set_ylabel("wikitext perplexity")
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
