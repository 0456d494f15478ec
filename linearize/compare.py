"""`compare`: the same analysis on several models over the same token windows.

The windows are built once, with the first model's tokenizer. Every other model must read the
same token ids: its tokenizer is run on the same text and its windows must be identical (a
fine-tune with an unchanged tokenizer passes; a different vocabulary is refused, because then
"the same windows" would mean different text per model and different ids per embedding row).

Each model gets the full analysis (linearize.analysis.analyze): the paper score with and without
residual, anisotropy, intrinsic dimension and the held-out error, per layer. Differences are
model minus the first model, layer by layer, when the layer counts agree. Models are loaded one
at a time and dropped after their analysis, so peak memory is about one model.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

from api_schemas import Report
from api_schemas.report import LayerLinearity
from linearize.errors import InputError

log = logging.getLogger(__name__)

# Per-layer fields compared across models (all in api_schemas.report.LayerLinearity).
METRICS = (
    "score",
    "score_without_residual",
    "anisotropy",
    "intrinsic_dimension",
    "validation_error",
    "cosine_in_out",
)
PLOTTED = ("score", "score_without_residual", "anisotropy", "intrinsic_dimension")
LABELS = {
    "score": "paper score",
    "score_without_residual": "score w/o residual",
    "anisotropy": "anisotropy",
    "intrinsic_dimension": "intrinsic dim (TwoNN)",
    "validation_error": "held-out error",
    "cosine_in_out": "cos(in, out)",
}


def compare_models(job, output_dir: Path | None) -> Report:
    """Analyze every model of `job.spec.models` on the first model's windows; one Report."""
    from linearize import facts
    from linearize.analysis import measure_layers

    spec = job.spec
    first = job.load(spec.models[0], activation_tokens=spec.calib_tokens)
    windows = job.windows(first.tokenizer, eval_tokens=None)
    tokenizer = first.tokenizer
    entries: list[dict] = []
    first_info = first_layers = data_info = None
    for position, source in enumerate(spec.models):
        loaded = first if position == 0 else job.load(source, activation_tokens=spec.calib_tokens)
        if position > 0:
            check_same_windows(
                tokenizer, loaded.tokenizer, windows, source, job.notes, spec.validation_fraction
            )
        analysis, _, _ = measure_layers(job, loaded.stack, windows, tokenizer, with_eval=False)
        info = facts.model_info(loaded)
        layers = [_layer_row(row) for row in analysis.layers]
        if position == 0:
            first_info, first_layers = info, analysis.layers
            data_info = facts.data_info(windows, loaded.model, analysis.reservoir_size)
        entries.append({"model": source, "info": info.model_dump(mode="json"), "layers": layers})
        del loaded, analysis  # one model in memory at a time (the first is dropped here too)
        first = None
    _add_differences(entries, job.notes)
    report = Report(
        kind="compare",
        model=first_info,
        linearity=[LayerLinearity(**row) for row in first_layers],
        linearity_notes=facts.analysis_notes(),
        data=data_info,
        timings=job.timings,
        versions=facts.versions(),
        notes=job.notes,
        compare=entries,
    )
    if output_dir is not None:
        report.output_dir = str(output_dir)
        write_compare_bundle(report, Path(output_dir))
    return report


def check_same_windows(
    tokenizer, other, windows, source: str, notes: list[str], validation_fraction: float = 0.25
) -> None:
    """Refuse a model whose tokenizer does not give the same ids on the compared windows."""
    from linearize.data import build_windows

    if _same_vocab(tokenizer, other):
        return
    try:
        theirs = build_windows(
            other,
            windows.source,
            calib_tokens=windows.count("fit") + windows.count("validation"),
            eval_tokens=None,
            seq_len=windows.seq_len,
            validation_fraction=validation_fraction,
        )
        same = theirs.calibration.shape == windows.calibration.shape and bool(
            (theirs.calibration == windows.calibration).all()
        )
    except InputError:
        same = False
    if not same:
        raise InputError(
            f"{source}: its tokenizer differs from the first model's "
            f"(vocab {len(other)} vs {len(tokenizer)}) and gives different token ids on the "
            "compared text; compare needs models that share a tokenizer"
        )
    notes.append(f"{source}: tokenizer vocab differs but gives identical ids on the windows")


def _same_vocab(a, b) -> bool:
    try:
        return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids
    except (AttributeError, NotImplementedError):
        return False


def _layer_row(row: dict) -> dict:
    return {"index": row["index"], **{m: row.get(m) for m in METRICS}}


def _add_differences(entries: list[dict], notes: list[str]) -> None:
    """Per layer `differences` (model - first) and per model `summary` means."""
    base = entries[0]["layers"]
    for entry in entries:
        entry["summary"] = {f"mean_{m}": _mean([r[m] for r in entry["layers"]]) for m in METRICS}
        entry["summary"]["mean_one_minus_score"] = _mean([1 - r["score"] for r in entry["layers"]])
    for entry in entries[1:]:
        layers = entry["layers"]
        if len(layers) != len(base):
            entry["differences"] = None
            notes.append(
                f"{entry['model']}: {len(layers)} layers vs {len(base)}; no per-layer differences"
            )
            continue
        entry["differences"] = [
            {"index": mine["index"], **{m: _sub(mine[m], ref[m]) for m in METRICS}}
            for mine, ref in zip(layers, base, strict=True)
        ]
        diff = entry["differences"]
        entry["summary"]["layers_more_linear"] = sum(d["score"] > 0 for d in diff)
        entry["summary"]["mean_score_difference"] = _mean([d["score"] for d in diff])
        # Relative change of the nonlinearity 1 - score: scores sit at 0.999x, so this is the
        # readable number ("the fine-tune's layers are 20% less nonlinear").
        base_nl = entries[0]["summary"]["mean_one_minus_score"]
        entry["summary"]["relative_change_one_minus_score"] = (
            entry["summary"]["mean_one_minus_score"] / base_nl - 1 if base_nl > 0 else None
        )


def _sub(a, b):
    return None if a is None or b is None else a - b


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


# --- rendering -------------------------------------------------------------------------------


def compare_files(report: Report) -> dict[str, str | bytes]:
    """compare.md, compare.png and report.json, as {file name: content}."""
    return {
        "report.json": report.model_dump_json(indent=2),
        "compare.png": render_compare_plot(report.compare),
        "compare.md": render_compare_markdown(report, plot="compare.png"),
    }


def write_compare_bundle(report: Report, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in compare_files(report).items():
        path = directory / name
        tmp = path.with_name(name + ".tmp")
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        tmp.replace(path)


def summary_lines(report: Report) -> list[str]:
    """One line per model for a terminal: mean score and its change against the first."""
    lines = []
    for i, entry in enumerate(report.compare or []):
        s = entry["summary"]
        line = (
            f"model {i}    {entry['model']}: mean score {s['mean_score']:.5f}, "
            f"w/o residual {s['mean_score_without_residual']:.4f}"
        )
        if i and entry.get("differences") is not None:
            change = s["relative_change_one_minus_score"]
            line += (
                f"; vs model 0: {s['layers_more_linear']}/{len(entry['layers'])} layers more "
                f"linear, mean 1-score {_pct(change)}"
            )
        lines.append(line)
    return lines


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def render_compare_markdown(report: Report, plot: str | None = None) -> str:
    entries = report.compare or []
    names = [f"M{i}" for i in range(len(entries))]
    d = report.data
    out = [
        "# linearize compare report",
        "",
        *[
            f"- **{n}** `{e['model']}` ({e['info']['layers_before']} layers)"
            for n, e in zip(names, entries, strict=True)
        ],
        "",
        f"Same token windows for every model: {d.calib_windows} x {d.seq_len} tokens of "
        f"`{d.source}` (first half), tokenized once with M0's tokenizer; fit part N/d = "
        f"{d.n_over_d:.1f}. Differences are Mi - M0 per layer.",
        "",
        report.linearity_notes,
        "",
        "## Summary",
        "",
        "| model | mean score | mean 1-score | change of 1-score vs M0 | layers more linear | "
        "mean w/o residual | mean anisotropy | mean intrinsic dim |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in zip(names, entries, strict=True):
        s = e["summary"]
        more = s.get("layers_more_linear")
        more = "" if more is None else f"{more}/{len(e['layers'])}"
        out.append(
            f"| {name} | {s['mean_score']:.5f} | {s['mean_one_minus_score']:.3e} | "
            f"{_pct(s.get('relative_change_one_minus_score')) if name != 'M0' else ''} | "
            f"{more} | "
            f"{s['mean_score_without_residual']:.4f} | {s['mean_anisotropy']:.3f} | "
            f"{_fmt(s['mean_intrinsic_dimension'], '.1f')} |"
        )
    out.append("")
    for metric in (*PLOTTED, "validation_error"):
        fmt = ".5f" if metric == "score" else ".4f" if metric != "intrinsic_dimension" else ".1f"
        dfmt = (
            "+.2e" if metric == "score" else "+.4f" if metric != "intrinsic_dimension" else "+.1f"
        )
        header = ["layer", *names, *[f"{n} - M0" for n in names[1:]]]
        out += [f"## {LABELS[metric]}", "", "| " + " | ".join(header) + " |"]
        out.append("|" + "---|" * len(header))
        n_layers = max(len(e["layers"]) for e in entries)
        for i in range(n_layers):
            cells = [str(i)]
            for e in entries:
                cells.append(_fmt(_at(e["layers"], i, metric), fmt))
            for e in entries[1:]:
                cells.append(_fmt(_at(e.get("differences"), i, metric), dfmt))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    if plot:
        out += [f"![per-layer comparison]({plot})", ""]
    if report.notes:
        out += ["## Notes", "", *[f"- {n}" for n in report.notes], ""]
    out += ["## Timings (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items()), ""]
    return "\n".join(out)


def _at(rows, i: int, metric: str):
    return rows[i][metric] if rows is not None and i < len(rows) else None


def _fmt(value, spec: str = ".4f") -> str:
    return "" if value is None else format(value, spec)


def render_compare_plot(entries: list[dict]) -> bytes:
    """Left column: each metric per layer for every model; right: the differences to M0.

    The paper score sits at 0.999x, so its panel shows 1 - score on a log axis (lower = more
    linear); the difference panel shows score differences (positive = more linear than M0).
    """
    import matplotlib

    matplotlib.use("Agg")  # headless; no display on workers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PLOTTED), 2, figsize=(11, 2.6 * len(PLOTTED)), sharex=True)
    for row, metric in enumerate(PLOTTED):
        left, right = axes[row]
        for i, e in enumerate(entries):
            idx = [r["index"] for r in e["layers"]]
            values = [r[metric] for r in e["layers"]]
            if metric == "score":
                values = [max(1 - v, 1e-12) for v in values]
            values = [math.nan if v is None else v for v in values]
            label = f"M{i}: {Path(e['model']).name or e['model']}"
            left.plot(idx, values, "o-", ms=3, label=label)
            if i and e.get("differences") is not None:
                diff = [math.nan if r[metric] is None else r[metric] for r in e["differences"]]
                right.plot(idx, diff, "o-", ms=3, color=f"C{i}", label=f"M{i} - M0")
        if metric == "score":
            left.set_yscale("log")
            left.set_ylabel("1 - score (log)")
        else:
            left.set_ylabel(LABELS[metric])
        right.axhline(0, color="grey", lw=0.8)
        right.set_ylabel(f"Δ {LABELS[metric]}")
    axes[0][0].set_title("per layer (paper score shown as 1 - score: lower = more linear)")
    axes[0][1].set_title("difference to M0 (score: > 0 = more linear)")
    axes[0][0].legend(fontsize=7)
    if len(entries) > 1:
        axes[0][1].legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
