"""Side-by-side quality benchmark: published ways of dropping or linearizing layers, and ours,
each without and with the same healing.

One run, one model (the bundled SmolLM2-135M), the same calibration and evaluation windows, the
budgets k = 1, 2, 4, 6, 8 (L - k layers remain in every row). Training-free methods, each
measured as it is and again after `--heal-steps` steps of the engine's healing recipe
(`linearize.healing`: the maps' carriers, or for a removal the `down_proj` a fold would have
changed, plus the 4 decoder layers from the cut; Adam 3e-4; the centred-logit MSE against the
original model's final hidden states; one window per step; the budget counted in steps, not
seconds, so rows agree across hosts):

  shortgpt      remove the k layers with the lowest block influence 1 - cos(input, output)
  sleb          greedy removal: each step removes the block whose removal raises the calibration
                loss least (proxy: the first --sleb-windows fit windows)
  paper_affine  each of the k layers with the highest paper linearity score becomes its own affine
                map (least squares, the paper's replacement; --format linear)
  replaceme     the k-block span with the smallest mean last-token angular distance
                arccos(cos(h_l, h_{l+k}))/pi, removed, its lstsq map T folded into down_proj
  ours          the default's window (`linearize compress --layers k`), its lstsq map folded
                (row "fitted"), then healed (row "+ heal"): the engine's stages driven in-process

Two methods that train by design, for the same number of steps:

  lu            Lu et al. 2024 ("Reassessing Layer Pruning"): remove the k layers before the
                final one (reverse order), train lm_head (untied) and the last three layers
  streamline    Chen et al. 2024 (LLM-Streamline): the k + 1 adjacent layers whose input and
                output are most alike become one decoder layer of the model's shape (initialised
                from the span's first layer), trained on the span's input -> output (MSE)

Each model is measured on the wikitext evaluation windows and on two out-of-domain texts of
different kinds, reported separately: the Debian licence texts (legal prose) and Python
standard-library source (code, docstrings and comments). `--sealed` adds a third (git's release
notes: technical documentation), looked at once per change and never tuned on.

    python bench/quality.py --data ../shared/data/wikitext-2-raw/wiki.test.raw

Prints one table per text, writes bench/results/quality.json (after every k, so a cut-short run
keeps what ran) and bench/results/quality.png.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import healbench  # noqa: E402  (bench/healbench.py, beside this script)
import machine  # noqa: E402  (bench/machine.py, beside this script)
from engine import BenchJob  # noqa: E402

from linearize import healing  # noqa: E402
from linearize.architectures import decoder_layers, get_architecture  # noqa: E402
from linearize.capture import hooked, iterate_batches, layer_io, run_decoder  # noqa: E402
from linearize.evaluation import window_nll  # noqa: E402
from linearize.fitting import collect_span_stats, fit_spans  # noqa: E402
from linearize.surgery import LinearBlock, fold_and_remove, replace_with_linear  # noqa: E402

ANCHORS = ("shortgpt", "sleb", "paper_affine", "replaceme")
METHODS = (*ANCHORS, "ours", "lu", "streamline")


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
    """A compressed copy of `model` by a training-free anchor: (model, replaced indices, the
    parameters healing treats as the maps' carriers)."""
    n_layers = len(decoder_layers(model))
    trial = copy.deepcopy(model)
    if name in ("shortgpt", "sleb"):
        if name == "shortgpt":
            influence = [1 - row["cosine_in_out"] for row in analysis.layers]
            chosen = sorted(sorted(range(n_layers), key=lambda i: influence[i])[:k])
        else:
            chosen = sorted(sleb[:k])
        trial, carriers = healbench.remove_with_carriers(trial, chosen)
        return trial, chosen, carriers
    if name == "paper_affine":
        scores = [row["score"] for row in analysis.layers]
        chosen = sorted(sorted(range(1, n_layers - 1), key=lambda i: -scores[i])[:k])
        spans = [(i, i) for i in chosen]
        stats = collect_span_stats(trial, spans, windows.fit, fmt="linear")
        replace_with_linear(trial, fit_spans(trial, stats, fmt="linear"))
        blocks = [p for m in trial.modules() if isinstance(m, LinearBlock) for p in m.parameters()]
        return trial, chosen, blocks
    if name == "replaceme":
        start = replaceme_start(states, k)
        span = (start + 1, start + k)
        carrier = decoder_layers(trial)[start].get_submodule(get_architecture(trial).mlp_out)
        stats = collect_span_stats(trial, [span], windows.fit, fmt="standard")
        fold_and_remove(trial, fit_spans(trial, stats, fmt="standard"))
        return trial, list(range(span[0], span[1] + 1)), list(carrier.parameters())
    raise ValueError(name)


class Race:
    """One run's shared state: model, windows, texts, baselines, teacher caches, rows."""

    def __init__(self, args):
        self.args = args
        self.job = make_job(args, 1)
        loaded = self.job.load("smollm2-135m")
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.windows = self.job.windows(self.tokenizer, eval_tokens=args.eval_tokens)
        _, self.baseline_val, self.analysis = self.job.baseline_and_analysis(
            self.model, self.windows, self.tokenizer
        )
        texts = args.ood.split(",") + (list(healbench.SEALED_TEXTS) if args.sealed else [])
        self.sets = healbench.eval_sets(
            self.tokenizer, self.windows, texts, args.ood_tokens, args.measure_tokens
        )
        self.baseline = healbench.perplexities(self.model, self.sets)
        self.teachers = healbench.TeacherCaches(self.model, self.windows.fit)
        self.rows: list[dict] = []

    def record(self, method, k, model, replaced, t0, **extra) -> None:
        ppl = healbench.perplexities(model, self.sets)
        row = {
            "method": method,
            "k": k,
            "replaced": replaced,
            "ppl": ppl,
            "increase_pct": healbench.increases(ppl, self.baseline),
            "seconds": round(time.perf_counter() - t0, 1),
            **extra,
        }
        self.rows.append(row)
        cells = "  ".join(f"{n} {v:+7.1f}%" for n, v in row["increase_pct"].items())
        print(f"k={k} {method:20s} {cells}  layers {replaced}  {row['seconds']:.0f}s", flush=True)

    def heal_and_record(self, method, k, trial, replaced, carriers, t0) -> None:
        """The engine's healing recipe for --heal-steps steps, then the '+ heal' row."""
        params = healing.healing_params(trial, carriers)
        start = healbench.injection_start(trial, carriers)
        result, _ = healbench.heal_counted(
            trial, self.teachers(start), self.windows.fit, params, self.args.heal_steps
        )
        self.record(f"{method}+heal", k, trial, replaced, t0, healing=result.as_dict())

    def anchor(self, name, k, states, sleb) -> None:
        t0 = time.perf_counter()
        built = build_anchor(name, self.model, self.windows, self.analysis, states, sleb, k)
        trial, replaced, carriers = built
        self.record(name, k, trial, replaced, t0)
        self.heal_and_record(name, k, trial, replaced, carriers, time.perf_counter())

    def ours(self, k) -> None:
        t0 = time.perf_counter()
        job = self.job.for_layers(k)
        n_layers = len(decoder_layers(self.model))
        indices, _ = job.select(
            self.model, self.windows, self.analysis, self.baseline_val, n_layers
        )
        trial = copy.deepcopy(self.model)
        carriers = job.replace(trial, self.windows, indices)
        self.record("ours", k, trial, indices, t0)
        self.heal_and_record("ours", k, trial, indices, carriers, time.perf_counter())

    def lu(self, k) -> None:
        t0 = time.perf_counter()
        trial, removed, result = healbench.lu_reverse_order(
            self.model, self.teachers, self.windows.fit, k, self.args.heal_steps
        )
        self.record("lu", k, trial, removed, t0, healing=result.as_dict())

    def streamline(self, k) -> None:
        t0 = time.perf_counter()
        trial, span, loss = healbench.streamline(
            self.model, self.windows.fit, k, self.args.heal_steps
        )
        self.record("streamline", k, trial, span, t0, train_loss_last=loss)


def make_job(args, k: int) -> BenchJob:
    return BenchJob.bundled(
        args.data,
        k,
        calib_tokens=args.calib_tokens,
        eval_tokens=args.eval_tokens,
        seq_len=args.seq_len,
    )


def main() -> None:
    parser = healbench.argument_parser(__doc__)
    parser.add_argument("--budgets", default="1,2,4,6,8")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--heal-steps", type=int, default=50)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    healbench.add_text_arguments(parser, ood_tokens=1024)
    parser.add_argument("--sealed", action="store_true", help="also the sealed text (see above)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sleb-windows", type=int, default=1)
    parser.add_argument("--sleb-minutes", type=float, default=8.0)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "quality.json")
    args = parser.parse_args()
    budgets = [int(k) for k in args.budgets.split(",")]
    methods = args.methods.split(",")
    started = time.perf_counter()

    race = Race(args)
    print(f"baseline {race.baseline}; healing budget {args.heal_steps} steps", flush=True)
    states = last_token_states(race.model, race.windows.fit) if "replaceme" in methods else None
    sleb, sleb_cut = [], False
    if "sleb" in methods:
        deadline = time.perf_counter() + 60 * args.sleb_minutes
        sleb, sleb_cut = sleb_order(
            race.model, race.windows.fit[: args.sleb_windows], max(budgets), deadline
        )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine.describe(),
        "command": " ".join(sys.argv),
        "heal_steps": args.heal_steps,
        "fit_windows": len(race.windows.fit),
        "eval_tokens": race.sets["eval"].numel(),
        "ood_tokens": args.ood_tokens,
        "baseline": race.baseline,
        "rows": race.rows,
        "sleb_cut_short": sleb_cut,
        "sleb_order": sleb,
    }
    for k in budgets:
        for name in methods:
            if name == "sleb" and k > len(sleb):
                race.rows.append({"method": name, "k": k, "ppl": None, "note": "cut short"})
            elif name in ANCHORS:
                race.anchor(name, k, states, sleb)
            else:
                getattr(race, name)(k)
        result["minutes"] = (time.perf_counter() - started) / 60
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    print_tables(race.rows, budgets, race.baseline, args.heal_steps)
    plot(race.rows, race.baseline, args.json.with_suffix(".png"))
    print(f"total {result['minutes']:.1f} min; wrote {args.json}")


def row_names(rows) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def print_tables(rows, budgets, baseline, steps) -> None:
    for text in baseline:
        print(
            f"\nperplexity increase (%) on {text} (baseline {baseline[text]:.2f}); "
            f"'+heal', lu and streamline: {steps} training steps of one 512-token window"
        )
        print(f"{'method':20s}" + "".join(f"{'k=' + str(k):>10s}" for k in budgets))
        for name in row_names(rows):
            cells = []
            for k in budgets:
                row = next((r for r in rows if r["method"] == name and r["k"] == k), None)
                ok = row is not None and row.get("ppl") is not None
                cells.append(f"{row['increase_pct'][text]:+10.1f}" if ok else f"{'-':>10s}")
            print(f"{name:20s}" + "".join(cells))


def plot(rows, baseline, path: Path) -> None:
    """One colour per method; its healed row dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = list(dict.fromkeys(name.removesuffix("+heal") for name in row_names(rows)))
    colours = dict(zip(methods, plt.get_cmap("tab10").colors, strict=False))
    for name in row_names(rows):
        points = sorted(
            (r["k"], r["ppl"]["eval"]) for r in rows if r["method"] == name and r.get("ppl")
        )
        if points:
            healed = name.endswith("+heal")
            style = dict(ls="--" if healed else "-", marker="s" if healed else "o")
            colour = colours[name.removesuffix("+heal")]
            ax.plot(*zip(*points, strict=True), color=colour, label=name, **style)
    ax.axhline(baseline["eval"], color="k", ls=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("replaced layers k (of 30)")
    ax.set_ylabel("wikitext perplexity")
    ax.legend(fontsize=8, ncol=2)
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
