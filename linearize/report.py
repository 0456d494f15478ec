"""Report rendering: report.json (the schema), report.md with PNG plots, and the model card."""

from __future__ import annotations

import io
from pathlib import Path

from api_schemas import Report

PLOTS = ("linearity_profile.png", "perplexity_vs_layers.png", "token_nonlinearity.png")


def report_bundle_files(report: Report, residuals=None) -> dict[str, bytes | str]:
    """report.json, report.md and the plots, as {file name: content}."""
    files: dict[str, bytes | str] = {"report.json": report.model_dump_json(indent=2)}
    files.update(render_plots(report, residuals))
    files["report.md"] = render_markdown(report, plots=[n for n in PLOTS if n in files])
    return files


def write_report_bundle(report: Report, directory: Path, residuals=None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in report_bundle_files(report, residuals).items():
        path = directory / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def throughput_text(t) -> str:
    """Measured tokens/s with their spread and the speed-up the FLOPs allow; a flagged
    measurement says so first, so it is never read as a result."""
    if t.repeats is None:  # a report written before the interleaved measurement
        return f"{t.tokens_per_s_before:.0f} -> {t.tokens_per_s_after:.0f} tokens/s ({t.device})"
    from linearize.throughput import spread_pct

    figures = (
        f"{t.tokens_per_s_before:.0f} -> {t.tokens_per_s_after:.0f} tokens/s ({t.device}, median "
        f"of {t.repeats}, spread {spread_pct(t.runs_before):.0f}% / "
        f"{spread_pct(t.runs_after):.0f}%), {t.measured_speedup:.2f}x measured, "
        f"{t.expected_speedup:.2f}x expected from the FLOPs"
    )
    return f"FLAGGED, not a result: {t.flag} ({figures})" if t.flag else figures


def _throughput_row(t) -> str:
    if t.flag or t.repeats is None:
        return f"| tokens/s | {throughput_text(t)} | |"
    return (
        f"| tokens/s ({t.device}, median of {t.repeats}) | {t.tokens_per_s_before:.0f} | "
        f"{t.tokens_per_s_after:.0f} ({t.measured_speedup:.2f}x; the FLOPs allow "
        f"{t.expected_speedup:.2f}x) |"
    )


def summary_lines(report: Report) -> list[str]:
    """The few lines a terminal or a CI summary shows."""
    m = report.model
    lines = [f"model      {m.source} ({m.architecture}, {m.dtype}, d={m.hidden_size})"]
    if m.source_quantization is not None:
        lines.append(f"quantized  {quantization_text(m.source_quantization)}")
    if report.replaced_layers:
        lines.append(
            f"replaced   layers {report.replaced_layers} -> {report.format}, {report.method} "
            f"({m.layers_before} -> {m.layers_after} layers)"
        )
    if report.curve:
        s = report.selection
        stopped = f"; stopped by its {s['stopped_by']}" if s.get("stopped_by") else ""
        found = "no k" if s.get("chosen_k") is None else f"k = {s['chosen_k']}"
        lines.append(
            f"search     {found} passes the gates "
            f"({'predicted by unhealed probes, ' if s.get('dry_run') else ''}"
            f"{s.get('trials')} trials, {s.get('healed_trials')} healed{stopped})"
        )
    if m.params_after is not None:
        lines.append(
            f"params     {m.params_before:,} -> {m.params_after:,} "
            f"({100 * (m.params_after / m.params_before - 1):+.1f}%)"
        )
    p = report.perplexity
    if p is not None:
        if p.compressed is None:
            lines.append(f"perplexity {p.baseline:.3f}")
        else:
            lines.append(
                f"perplexity {p.baseline:.3f} -> {p.compressed:.3f} "
                f"({p.increase_pct:+.1f}%; the checkpoint, reloaded from disk)"
            )
    for t in report.eval_texts:
        lines.append(f"text       {text_line(t)}")
    a = report.agreement
    if a is not None:
        lines.append(
            f"agreement  KL {a.kl:.4f} nats/token, top-1 {100 * a.top1_agreement:.1f}%, "
            f"original top-1 in top-5 {100 * a.top5_contains_top1:.1f}%"
        )
    g = report.generation
    if g is not None:
        lines.append(
            f"generation exact match {100 * g.exact_match:.0f}% of {g.prompts} greedy "
            f"continuations, common prefix {g.mean_common_prefix:.1f}/{g.new_tokens} tokens"
        )
    for task in report.tasks:
        lines.append(f"task       {_task_line(task)}")
    t = report.throughput
    if t is not None and t.tokens_per_s_after:
        lines.append(f"throughput {throughput_text(t)}")
    e = report.execution
    if e is not None:
        lines.append(
            f"execution  {e.mode} on {e.device}, budget {_size(e.memory_budget_bytes)}, "
            f"{memory_text(e)}"
            + (
                f", {e.spilled_caches} activation caches spilled to disk"
                if e.spilled_caches
                else ""
            )
        )
    if report.gate is not None:
        lines.append(
            "gate       "
            + ("PASSED" if report.gate.passed else "FAILED")
            + "  "
            + ", ".join(
                f"{r.name} {r.value:.4g} {r.comparison} {r.limit}"
                + ("" if r.passed else " (failed)")
                for r in report.gate.rules
            )
        )
    return lines


def quantization_text(q) -> str:
    """The source's quantization, its weights' size on disk, and what was written from it."""
    text = f"source {q.scheme} ({q.dtype}), {_size(q.bytes)} on disk, read dequantized"
    if q.output_bytes is None:
        return text
    return f"{text}; written as {q.output_dtype}, {_size(q.output_bytes)}"


def render_quantization(report: Report) -> list[str]:
    q = report.model.source_quantization
    if q is None:
        return []
    written = q.output_bytes is not None  # analyze and eval write no checkpoint
    read = (
        f"The source is stored quantized ({q.scheme}, `quant_method: {q.method}`); its weights "
        "were dequantized by transformers' own quantizer as they were read"
    )
    if written:
        read += ", and the checkpoint is written dequantized, without `quantization_config`"
    lines = [
        "## Quantized source",
        "",
        read + ".",
        "",
        "| | dtype | weight files |",
        "|---|---|---|",
        f"| source | {q.dtype} | {_size(q.bytes)} ({q.bytes:,} bytes) |",
    ]
    if written:
        lines.append(
            f"| output | {q.output_dtype} | {_size(q.output_bytes)} ({q.output_bytes:,} bytes) |"
        )
    return [*lines, ""]


def text_line(t) -> str:
    """One --eval-data (or general) text: perplexity before -> after and the ratio."""
    if t.compressed is None:
        return f"{t.name}: {t.baseline:.3f}"
    ratio = "" if t.ratio_to_eval is None else f", {t.ratio_to_eval:.2f}x the eval increase"
    return f"{t.name}: {t.baseline:.3f} -> {t.compressed:.3f} ({t.increase_pct:+.1f}%{ratio})"


def render_texts(report: Report) -> list[str]:
    if not report.eval_texts:
        return []
    p = report.perplexity
    out = [
        "## Outside the calibration text",
        "",
        "Each text's first evaluation tokens, measured on the original model and on the "
        "reloaded checkpoint; the ratio is its increase over the evaluation windows' increase.",
        "",
        "| text | source | tokens | before | after | increase | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    if p is not None and p.compressed is not None:
        out.append(
            f"| eval (calibration text's second half) | {_cell(report.data.source if report.data else '')} "
            f"| {report.data.eval_tokens if report.data else ''} | {p.baseline:.3f} | "
            f"{p.compressed:.3f} | {p.increase_pct:+.1f}% | 1.00 |"
        )
    for t in report.eval_texts:
        after = "" if t.compressed is None else f"{t.compressed:.3f}"
        increase = "" if t.increase_pct is None else f"{t.increase_pct:+.1f}%"
        ratio = "" if t.ratio_to_eval is None else f"{t.ratio_to_eval:.2f}"
        out.append(
            f"| {t.name} | {_cell(t.source)} | {t.tokens} | {t.baseline:.3f} | {after} | "
            f"{increase} | {ratio} |"
        )
    return [*out, ""]


def _task_line(task) -> str:
    o, c = task.original["acc"], task.compressed["acc"]
    return f"{task.task} acc {o:.4f} -> {c:.4f} (retained {_retained(task)})"


def _retained(task) -> str:
    return "-" if task.retained_pct is None else f"{task.retained_pct:.1f}%"


def render_behaviour(report: Report) -> list[str]:
    """The "How it behaves" section: agreement, task table, generation pairs."""
    a, g = report.agreement, report.generation
    if a is None and g is None and not report.tasks:
        return []
    out = ["## How it behaves", ""]
    if a is not None:
        out += [
            f"Agreement with the original on {a.positions} evaluation positions "
            f"(top-k = {a.top_k}). Definition: {a.definition}",
            "",
            "| measure | value |",
            "|---|---|",
            f"| mean KL(original ‖ compressed), nats/token | {a.kl:.4f} |",
            f"| top-1 agreement | {100 * a.top1_agreement:.2f}% |",
            f"| original top-1 in compressed top-5 | {100 * a.top5_contains_top1:.2f}% |",
            "",
        ]
    if report.tasks:
        out += [
            "Downstream tasks (lm-evaluation-harness, zero-shot; retained = compressed acc / "
            "original acc):",
            "",
            "| task | acc original | acc compressed | acc_norm original | acc_norm compressed "
            "| retained | samples |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in report.tasks:
            o, c = t.original, t.compressed
            out.append(
                f"| {t.task} | {_pm(o, 'acc')} | {_pm(c, 'acc')} | {_pm(o, 'acc_norm')} | "
                f"{_pm(c, 'acc_norm')} | {_retained(t)} | {o.get('samples')} |"
            )
        out.append("")
    if g is not None:
        out += [
            f"Generation: exact match {100 * g.exact_match:.1f}% of {g.prompts} prompts, mean "
            f"common prefix {g.mean_common_prefix:.1f} of {g.new_tokens} tokens. "
            f"Definition: {g.definition}",
            "",
        ]
        for i, pair in enumerate(g.pairs, 1):
            out += [
                f"**Prompt {i}** (common prefix {pair.common_prefix} tokens):",
                "",
                "```text",
                pair.prompt,
                "```",
                "",
                "| original | compressed |",
                "|---|---|",
                f"| {_cell(pair.original)} | {_cell(pair.compressed)} |",
                "",
            ]
    return out


def curve_table(report: Report) -> list[str]:
    """The layers=max search's curve as a Markdown table, one row per trial, in measured order
    (also the GitHub step summary's)."""
    out = [
        "| k | trial | method | layers | parameters | removed | perplexity | increase | KL "
        "| top-1 | gates | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report.curve:
        mark = " **chosen**" if p.chosen else ""
        out.append(
            f"| {p.k} | {'healed' if p.healed else 'probe'} | {p.method} | {_span_text(p.layers)} | "
            f"{p.params:,} | {p.params_removed:,} | {p.perplexity:.3f} | "
            f"{p.ppl_increase_pct:+.1f}% | {_fmt(p.kl, '.4f')} | "
            f"{_fmt(p.top1_agreement_pct, '.1f')}% | "
            f"{'pass' if p.passed else 'fail'}{mark} | {p.seconds:.1f} |"
        )
    return out


def memory_text(e) -> str:
    """'planned P, peak M (A over the process at start)': the plan beside the measurement;
    the start is the process with the model's code imported, before any weight was read."""
    text = f"peak {_size(e.peak_memory_bytes)}"
    if e.start_memory_bytes is not None:
        added = e.peak_memory_bytes - e.start_memory_bytes
        text += f" ({_size(added)} over the process at start)"
    if e.planned_peak_bytes is not None:
        text = f"planned {_size(e.planned_peak_bytes)}, {text}"
    if e.peak_stage:
        text += f", reached in {e.peak_stage}"
    return text


def render_memory_plan(e) -> list[str]:
    """The memory plan's items and total beside the measured peak (report.md)."""
    if not e.memory_plan:
        return []
    rows = [f"| {name} | {_size(size)} |" for name, size in e.memory_plan.items()]
    measured = f"| **measured peak** | {_size(e.peak_memory_bytes)} |"
    if e.start_memory_bytes is not None:
        added = e.peak_memory_bytes - e.start_memory_bytes
        measured += f"\n| **measured peak minus the process at start** | {_size(added)} |"
    rises = [f"{name} +{_size(size)}" for name, size in e.peak_rises.items()]
    if rises:
        measured += f"\n| **where the peak rose (stage +bytes)** | {', '.join(rises)} |"
    if e.peak_stage:
        measured += f"\n| **stage that reached the peak** | {e.peak_stage} |"
    return [
        "| memory plan | bytes |",
        "|---|---|",
        *rows,
        f"| **planned peak (total)** | {_size(e.planned_peak_bytes)} |",
        measured,
        "",
    ]


def render_curve(report: Report) -> list[str]:
    if not report.curve:
        return []
    s = report.selection
    stopped = f" The search was stopped by its {s['stopped_by']}." if s.get("stopped_by") else ""
    checked = (
        "The measured points are monotone in k."
        if s.get("monotone", True)
        else "The measured points are not monotone in k: " + "; ".join(s["violations"]) + "."
    )
    return [
        "## Size against quality",
        "",
        f"Every budget the search of `--layers max` measured ({s.get('search', '')}): "
        f"{s.get('trials')} trials, {s.get('healed_trials')} of them healed; "
        f"chosen k = {s.get('chosen_k')}.{stopped} {checked} Probes are unhealed, measured on "
        "the validation slice like the healed trials; the checkpoint is measured on the "
        "evaluation windows above.",
        "",
        *curve_table(report),
        "",
    ]


def _span_text(layers: list[int]) -> str:
    from linearize.selection import contiguous_spans

    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in contiguous_spans(layers))


def _pm(metrics: dict, name: str) -> str:
    value, stderr = metrics.get(name), metrics.get(f"{name}_stderr")
    if value is None:
        return "-"
    return f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def _cell(text: str) -> str:
    """One Markdown table cell: pipes escaped, newlines as <br>."""
    return "<br>".join(text.replace("|", "\\|").splitlines())


def render_markdown(report: Report, plots: list[str] = ()) -> str:
    out = [f"# linearize {report.kind} report", "", "```", *summary_lines(report), "```", ""]
    if report.perplexity is not None:
        out += [
            "## Perplexity",
            "",
            f"Definition: {report.perplexity.definition}",
            "",
            "| | value |",
            "|---|---|",
        ]
        for key in (
            "baseline",
            "before_healing",
            "compressed",
            "reloaded",
            "validation_baseline",
            "validation_compressed",
            "validation_reloaded",
            "increase_pct",
        ):
            value = getattr(report.perplexity, key)
            if value is not None:
                out.append(f"| {key} | {value:.4f} |")
        out += [
            "",
            "Perplexity degrades far more than multiple-choice accuracy does; treat it as "
            "a strict measure of damage.",
            "",
        ]
    out += render_quantization(report)
    out += render_texts(report)
    if report.linearity:
        out += [
            "## Linearity per layer",
            "",
            report.linearity_notes,
            "",
            "| layer | score | w/o residual | held-out error | anisotropy | intrinsic dim | "
            "top-1% share | cos(in,out) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in report.linearity:
            mark = " *" if row.index in report.replaced_layers else ""
            out.append(
                f"| {row.index}{mark} | {row.score:.5f} | {row.score_without_residual:.4f} | "
                f"{_fmt(row.validation_error)} | {row.anisotropy:.3f} | "
                f"{_fmt(row.intrinsic_dimension, '.1f')} | {_fmt(row.top1pct_residual_share, '.3f')} | "
                f"{row.cosine_in_out:.3f} |"
            )
        out += [
            "",
            "`*` replaced. The nonlinearity concentrates on a few tokens (top-1% share); "
            "the tokens carrying most of each replaced layer's residual:",
            "",
        ]
        for row in report.linearity:
            if row.index in report.replaced_layers and row.trigger_tokens:
                tokens = "; ".join(
                    f"{t.token!r} (w{t.window}:{t.position}, {100 * t.residual_share:.1f}%)"
                    for t in row.trigger_tokens
                )
                out.append(f"- layer {row.index}: {tokens}")
        out.append("")
    out += render_behaviour(report)
    out += render_curve(report)
    for name in plots:
        out += [f"![{name}]({name})", ""]
    if report.execution is not None:
        e = report.execution
        out += [
            "## Execution",
            "",
            f"Mode: **{e.mode}** ({e.reason}) on {e.device}. Memory budget "
            f"{_size(e.memory_budget_bytes)}; weights {_size(e.weight_bytes)}, the largest "
            f"decoder layer {_size(e.largest_layer_bytes)}; peak "
            f"{'GPU memory allocated' if e.device.startswith('cuda') else 'resident set (RSS)'} "
            f"{_size(e.peak_memory_bytes)}; activation caches spilled to disk: {e.spilled_caches}.",
            "",
            *render_memory_plan(e),
        ]
    if report.notes:
        out += ["## Notes", "", *[f"- {n}" for n in report.notes], ""]
    out += ["## Timings (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in report.timings.items()), ""]
    return "\n".join(out)


def model_card(report: Report) -> str:
    from linearize.checkpoint import render_model_card

    m, p = report.model, report.perplexity
    removed = (report.method or "").startswith("remove")
    healed = (report.method or "").endswith("+heal")
    body = [
        f"# {Path(m.source).name} with {len(report.replaced_layers)} layers "
        + ("removed" if removed else "linearized"),
        "",
        f"Made by [linearize](https://example.invalid/linearize) from `{m.source}`: layers "
        f"{report.replaced_layers} were "
        + (
            "removed"
            + (", and the layers from the one before each cut on healed" if healed else "")
            if removed
            else "replaced by fitted linear maps"
        )
        + f" ({report.format} format, method `{report.method}`).",
        "",
        "| metric | before | after |",
        "|---|---|---|",
        f"| layers | {m.layers_before} | {m.layers_after} |",
        f"| parameters | {m.params_before:,} | {m.params_after:,} |",
    ]
    if p is not None and p.compressed is not None:
        body += [
            f"| perplexity | {p.baseline:.3f} | {p.reloaded or p.compressed:.3f} "
            f"({p.increase_pct:+.1f}%) |"
        ]
    if report.throughput and report.throughput.tokens_per_s_after:
        body += [_throughput_row(report.throughput)]
    body += [
        "",
        f"Perplexity: {p.definition if p else ''}",
        "",
        "Perplexity degrades far more than multiple-choice accuracy does; evaluate on your "
        "own tasks before use. See report.md and report.json for the full analysis.",
        "",
    ]
    if report.format == "linear":
        body += [
            "Load with `linearize.load(path)` (the linear blocks are not a stock "
            "transformers layer).",
            "",
        ]
    else:
        body += [
            "Loads with plain `from_pretrained(path)` of its transformers auto class "
            "(`load_with` in linearize.json).",
            "",
        ]
    return render_model_card(
        "\n".join(body),
        base_model=m.source,
        library_name="transformers",
        tags=("linearize", "pruned", "layer-linearization"),
    )


def render_plots(report: Report, residuals=None) -> dict[str, bytes]:
    if not report.linearity:
        return {}
    import matplotlib

    matplotlib.use("Agg")  # headless; no display on workers
    import matplotlib.pyplot as plt

    plots = {"linearity_profile.png": _plot_profile(plt, report)}
    if len({p.k for p in report.curve}) > 1:
        plots["perplexity_vs_layers.png"] = _plot_curve(plt, report)
    elif report.perplexity is not None and report.perplexity.compressed is not None:
        plots["perplexity_vs_layers.png"] = _plot_ppl(plt, report)
    if residuals is not None:
        plots["token_nonlinearity.png"] = _plot_tokens(plt, report, residuals)
    return plots


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _plot_profile(plt, report: Report) -> bytes:
    idx = [r.index for r in report.linearity]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(idx, [r.score for r in report.linearity], "o-", label="with residual")
    top.set_ylabel("linearity score")
    top.legend()
    bottom.plot(
        idx,
        [r.score_without_residual for r in report.linearity],
        "s-",
        color="C1",
        label="without residual",
    )
    bottom.set_ylabel("linearity score")
    bottom.set_xlabel("layer")
    bottom.legend()
    for ax in (top, bottom):
        for i in report.replaced_layers:
            ax.axvline(i, color="grey", alpha=0.3)
    top.set_title("Linearity profile (grey: replaced layers)")
    return _png(fig)


def _plot_ppl(plt, report: Report) -> bytes:
    p = report.perplexity
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [0, len(report.replaced_layers)],
        [p.baseline, p.compressed],
        "o-",
        label="evaluation windows",
    )
    trace = report.selection.get("trace") or []
    if trace and p.validation_baseline:
        points = sorted(
            (t["k"], p.validation_baseline * (1 + t["validation_increase_pct"] / 100))
            for t in trace
        )
        ax.plot(
            [0] + [k for k, _ in points],
            [p.validation_baseline] + [v for _, v in points],
            "s--",
            label="validation slice (search)",
        )
    ax.set_xlabel("replaced layers")
    ax.set_ylabel("perplexity")
    ax.legend()
    ax.set_title("Perplexity against the number of replaced layers")
    return _png(fig)


# (curve field, axis label, spec gate field): the panels of the curve plot
CURVE_PANELS = (
    ("ppl_increase_pct", "validation perplexity increase (%)", "gate_ppl_increase"),
    ("kl", "KL(original || compressed), nats/token", "gate_kl"),
    ("top1_agreement_pct", "top-1 agreement (%)", "gate_agreement"),
)


def _plot_curve(plt, report: Report) -> bytes:
    """Quality against parameters removed, one panel per measure: unhealed probes hollow,
    healed trials filled, the gates as dashed lines, the checkpoint's trial starred."""
    gates = report.selection.get("gates", {})
    fig, axes = plt.subplots(len(CURVE_PANELS), 1, figsize=(7, 8), sharex=True)
    for ax, (field, label, gate) in zip(axes, CURVE_PANELS, strict=True):
        series = sorted({(p.healed, p.method) for p in report.curve})
        for healed, method in series:
            points = sorted(
                (p.params_removed / 1e6, getattr(p, field), p.k)
                for p in report.curve
                if (p.healed, p.method) == (healed, method) and getattr(p, field) is not None
            )
            if not points:
                continue
            x, y, _ = zip(*points, strict=True)
            style = ("s-" if method == "fit" else "D-") if healed else "o--"
            kind = "healed" if healed else "unhealed probe"
            ax.plot(x, y, style, mfc=None if healed else "none", label=f"{kind} ({method})")
            for xi, yi, k in points:
                ax.annotate(
                    f"k={k}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        if gates.get(gate) is not None:
            ax.axhline(gates[gate], color="red", linestyle=":", label="gate")
        for p in report.curve:
            if p.chosen and getattr(p, field) is not None:
                ax.plot(
                    p.params_removed / 1e6,
                    getattr(p, field),
                    "*",
                    ms=14,
                    color="gold",
                    mec="black",
                    label="checkpoint",
                )
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=7)
    axes[-1].set_xlabel("parameters removed (millions)")
    axes[0].set_title("Quality against size: every k the search measured")
    return _png(fig)


def _plot_tokens(plt, report: Report, residuals) -> bytes:
    import torch

    chosen = (
        report.replaced_layers
        or sorted(
            range(len(report.linearity)), key=lambda i: report.linearity[i].score, reverse=True
        )[:4]
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    for i in chosen[:8]:
        r = residuals[i]
        share = (r / r.sum().clamp_min(1e-300)).sort(descending=True).values.cumsum(0)
        frac = torch.arange(1, len(r) + 1) / len(r)
        ax.plot(frac.numpy(), share.numpy(), label=f"layer {i}")
    uniform = torch.logspace(-4, 0, 50)
    ax.plot(uniform.numpy(), uniform.numpy(), "k:", label="uniform")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of validation tokens (largest residual first)")
    ax.set_ylabel("share of the layer's residual")
    ax.set_title("Where the nonlinearity lives: cumulative per-token residual")
    ax.legend(fontsize=8)
    return _png(fig)


def _size(nbytes: int) -> str:
    from linearize.memory import format_size

    return format_size(nbytes)


def _fmt(value, spec: str = ".2e") -> str:
    return "-" if value is None else format(value, spec)
