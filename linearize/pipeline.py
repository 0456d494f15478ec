"""The one entry point: the CLI and the Celery worker both call `run(spec, ...)`.

Data flow of a compression (ARCHITECTURE.md): spec -> model -> windows (fit / validation /
eval, disjoint) -> baseline perplexity -> analysis -> selection -> fit -> surgery -> healing
(validation perplexity before and after) -> staged checkpoint -> reload from disk, check it on the
validation slice, measure it on the eval windows -> report -> atomic publish.
Only the progress sink differs between callers (terminal bars vs job events).
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from pydantic import TypeAdapter

from api_schemas import JobSpec, ProgressEvent, Report
from api_schemas.report import (
    DataInfo,
    LayerLinearity,
    ModelInfo,
    Perplexity,
    Throughput,
)
from linearize.errors import DataError, InputError, OutputExistsError, VerificationError
from linearize.progress import Progress

log = logging.getLogger(__name__)

ProgressSink = Callable[[ProgressEvent], None]
RELOAD_TOLERANCE = 0.005  # reloaded vs in-memory validation perplexity, relative
DEFAULT_HEAL_STEPS = 400
DEFAULT_HEAL_SECONDS = 60.0


def run(
    spec,
    *,
    output_dir: Path | None = None,
    report_path: Path | None = None,
    progress: ProgressSink | None = None,
    force: bool = False,
) -> Report:
    """Run one job spec (AnalyzeSpec | CompressSpec | EvalSpec | CompareSpec) to its report.

    `progress` receives ProgressEvents; if it raises `linearize.errors.Cancelled`, the run stops
    at that point (cooperative cancellation) and nothing partial is left in `output_dir`.
    """
    if isinstance(spec, dict):
        spec = TypeAdapter(JobSpec).validate_python(spec)
    output_dir = Path(output_dir) if output_dir is not None else None
    if spec.kind == "compress":
        if output_dir is None:
            raise InputError("compress needs an output directory")
        _refuse_existing_output(output_dir, force)
    job = _Job(spec, Progress(progress))
    runner = {
        "compress": job.compress,
        "analyze": job.analyze,
        "eval": job.evaluate,
        "compare": job.compare,
    }[spec.kind]
    report = runner(output_dir=output_dir, force=force)
    if report_path is not None:
        write_report(report, Path(report_path))
    return report


def write_report(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report.model_dump_json(indent=2))
    tmp.replace(path)


def _refuse_existing_output(output_dir: Path, force: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputExistsError(f"--output {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not force:
        raise OutputExistsError(f"--output {output_dir} is not empty (use --force to replace it)")


class _Job:
    """One run's state: spec, progress, timings, and the loaded model."""

    def __init__(self, spec, progress: Progress):
        self.spec = spec
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.behaviour = None  # compress only: linearize.behaviour.Behaviour

    @contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        yield
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 3)

    # --- shared stages ---------------------------------------------------------------------

    def text(self):
        """The data source, read once; read before the model so bad data fails in a second."""
        from linearize.data import load_source

        if not hasattr(self, "_text"):
            self._text = load_source(self.spec.data)
        return self._text

    def load(self, source: str):
        from linearize.loading import load_model

        self.text()
        with self.timed("load"), self.progress.stage("load", total=1, message=source):
            return load_model(
                source,
                dtype=self.spec.dtype,
                device=self.spec.device,
                use_cache=getattr(self.spec, "use_cache", True),
            )

    def windows(self, tokenizer, eval_tokens: int | None):
        from linearize.data import build_windows

        with self.timed("data"), self.progress.stage("data", total=1):
            return build_windows(
                tokenizer,
                self.text(),
                calib_tokens=self.spec.calib_tokens,
                eval_tokens=eval_tokens,
                seq_len=self.spec.seq_len,
                validation_fraction=self.spec.validation_fraction,
            )

    def perplexity(self, model, windows, name: str, stage: str, on_logits=None) -> float:
        from linearize.evaluation import evaluate_perplexity

        hooks_before = self.timings.get("agreement", 0.0)
        with self.timed(name), self.progress.stage(stage, total=len(windows), message=name) as st:
            ppl = evaluate_perplexity(model, windows, on_batch=st.advance, on_logits=on_logits)
        # The agreement hook's time is booked under "agreement", not under the pass itself.
        spent = self.timings.get("agreement", 0.0) - hooks_before
        self.timings[name] = round(self.timings[name] - spent, 3)
        return ppl

    def analysis(self, model, windows, tokenizer):
        from linearize.analysis import analyze
        from linearize.architectures import hidden_size

        d = hidden_size(model)
        n_fit = windows.count("fit")
        if n_fit <= d:
            raise DataError(
                f"the linearity score needs more fit tokens than the hidden size: {n_fit} <= d={d}; "
                f"use --calib-tokens > {int((d + 1) / (1 - self.spec.validation_fraction)) + 1}"
            )
        if n_fit < 10 * d:
            self.notes.append(
                f"N/d = {n_fit / d:.1f}: in-sample scores are optimistic when N is not >> d; "
                "rankings use held-out errors"
            )
        with self.timed("analyze"):
            return analyze(model, windows, tokenizer, self.progress, seed=self.spec.seed)

    # --- kinds -------------------------------------------------------------------------------

    def analyze(self, output_dir: Path | None, force: bool) -> Report:
        loaded = self.load(self.spec.model)
        windows = self.windows(loaded.tokenizer, eval_tokens=None)
        analysis = self.analysis(loaded.model, windows, loaded.tokenizer)
        report = Report(
            kind="analyze",
            model=_model_info(loaded),
            linearity=[LayerLinearity(**row) for row in analysis.layers],
            linearity_notes=_analysis_notes(),
            data=_data_info(windows, loaded.model, analysis.reservoir_size),
            timings=self.timings,
            versions=_versions(),
            notes=self.notes,
        )
        if output_dir is not None:
            from linearize.report import write_report_bundle

            write_report_bundle(report, output_dir, residuals=analysis.residuals)
        return report

    def evaluate(self, output_dir: Path | None, force: bool) -> Report:
        from linearize.behaviour import Behaviour

        behaviour = Behaviour(self.spec, self.timings)
        if self.spec.reference is not None:
            self.reference_pass(behaviour)
        loaded = self.load(self.spec.model)
        windows = self.windows(loaded.tokenizer, eval_tokens=self.spec.eval_tokens)
        meter = None
        if self.spec.reference is not None:
            if windows.eval_sha256 != self._reference_eval_sha256:
                raise InputError(
                    f"--reference {self.spec.reference} tokenizes the evaluation text differently "
                    f"from {self.spec.model}; agreement needs the same tokenizer"
                )
            meter = behaviour.meter_hook()
        ppl = self.perplexity(loaded.model, windows.eval, "eval", "evaluate", meter)
        report = Report(
            kind="eval",
            model=_model_info(loaded),
            perplexity=Perplexity(baseline=ppl),
            data=_data_info(windows, loaded.model, None),
            timings=self.timings,
            versions=_versions(),
            notes=self.notes,
        )
        behaviour.fill(report)
        return report

    def reference_pass(self, behaviour) -> None:
        """The reference model's top-k logits on the evaluation windows; the model is released
        before the evaluated one loads (windows are cut with each model's own tokenizer, so the
        two must share a tokenizer: the token hashes are compared)."""
        loaded = self.load(self.spec.reference)
        windows = self.windows(loaded.tokenizer, eval_tokens=self.spec.eval_tokens)
        self._reference_eval_sha256 = windows.eval_sha256
        hook = behaviour.reference_hook()
        ppl = self.perplexity(loaded.model, windows.eval, "reference_eval", "reference", hook)
        self.notes.append(f"reference {self.spec.reference}: perplexity {ppl:.4f}")
        del loaded

    def compare(self, output_dir: Path | None, force: bool) -> Report:
        from linearize.compare import compare_models

        return compare_models(self, output_dir)

    def compress(self, output_dir: Path, force: bool) -> Report:
        from linearize.architectures import num_layers
        from linearize.behaviour import Behaviour

        spec = self.spec
        self.behaviour = Behaviour(spec, self.timings)
        self.behaviour.check()  # unknown tasks fail before the model is even loaded
        loaded = self.load(spec.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        info_before = _model_info(loaded)
        n_layers = num_layers(model)
        _check_budget_early(spec, n_layers)
        windows = self.windows(tokenizer, eval_tokens=spec.eval_tokens)
        with self.progress.stage("behaviour", total=1, message="original model"):
            self.behaviour.measure_original(model, tokenizer, windows)
        baseline, baseline_val, analysis = self.baseline_and_analysis(model, windows, tokenizer)

        indices, selection = self.select(model, windows, analysis, baseline_val, n_layers)
        self.progress.note("select", f"replacing layers {indices}")
        healing = self.healing_budget()
        teacher = self.capture_teacher(model, windows, indices) if healing else None
        params = self.replace(model, windows, indices)
        before_healing = None
        if healing:
            from linearize.healing import healing_params

            params = healing_params(model, params)
            before_healing, selection["healing"] = self.heal(
                model, windows, teacher, params, healing
            )
            del teacher
            # heal() measured the validation slice of the model it leaves behind.
            info = selection["healing"]
            compressed_val = info[
                "validation_after" if info["kept"] == "healed" else "validation_before"
            ]
        else:
            compressed_val = self.perplexity(
                model, windows.validation, "compressed_validation", "evaluate"
            )
        # The evaluation windows are measured once, on the checkpoint reloaded from disk
        # (save_and_verify); the reload is checked against the in-memory validation figure.
        report = Report(
            kind="compress",
            model=info_before,
            replaced_layers=indices,
            format=spec.format,
            method=self.method_name(),
            selection=selection,
            linearity=[LayerLinearity(**row) for row in analysis.layers],
            linearity_notes=_analysis_notes(),
            perplexity=Perplexity(
                baseline=baseline,
                before_healing=before_healing,
                validation_baseline=baseline_val,
                validation_compressed=compressed_val,
            ),
            throughput=Throughput(
                # Forward tokens/s of the evaluation passes themselves (LM head included).
                tokens_per_s_before=windows.count("eval") / self.timings["baseline_eval"],
                device=str(next(model.parameters()).device),
            ),
            data=_data_info(windows, model, analysis.reservoir_size),
            versions=_versions(),
            notes=self.notes,
        )
        return self.save_and_verify(
            model, tokenizer, windows, report, output_dir, force, residuals=analysis.residuals
        )

    # --- compress helpers ----------------------------------------------------------------------

    def baseline_and_analysis(self, model, windows, tokenizer):
        """Baseline perplexities and the analysis, from the cache when the same model, windows
        and settings were seen before (linearize.cache)."""
        from linearize import cache
        from linearize.analysis import Analysis

        key = cache.entry_key(model, windows, self.spec) if self.spec.use_cache else None
        entry = cache.load_entry(key) if key else None
        reference = self.behaviour.reference_hook() if self.behaviour else None
        if entry is not None:
            self.notes.append(f"baseline and analysis read from the cache ({cache.cache_dir()})")
            self.timings["baseline_eval"] = entry["baseline_eval_seconds"]
            analysis = Analysis(entry["layers"], entry["residuals"], entry["reservoir_size"])
            if reference is not None:
                self.behaviour.cached_reference(key, model, windows, self.perplexity)
            return entry["baseline"], entry["baseline_validation"], analysis
        baseline = self.perplexity(model, windows.eval, "baseline_eval", "baseline", reference)
        baseline_val = self.perplexity(model, windows.validation, "baseline_validation", "baseline")
        analysis = self.analysis(model, windows, tokenizer)
        if key:
            entry = {
                "baseline": baseline,
                "baseline_validation": baseline_val,
                "baseline_eval_seconds": self.timings["baseline_eval"],
                "layers": analysis.layers,
                "reservoir_size": analysis.reservoir_size,
            }
            cache.save_entry(key, entry, analysis.residuals)
            if reference is not None:
                self.behaviour.save_reference(key)
        return baseline, baseline_val, analysis

    def method_name(self) -> str:
        name = "affine-span-lstsq" if self.spec.format == "linear" else "fold-lstsq"
        return name + ("+heal" if self.healing_budget() else "")

    def healing_budget(self) -> tuple[int, float] | None:
        """(max steps, max seconds), or None when healing is off (heal_steps=0)."""
        steps = DEFAULT_HEAL_STEPS if self.spec.heal_steps is None else self.spec.heal_steps
        if steps == 0:
            return None
        return steps, self.spec.heal_seconds or DEFAULT_HEAL_SECONDS

    def injection_point(self, indices: list[int]) -> int:
        """The first position whose computation changes: the fold target or the first block."""
        first = min(indices)
        return first - 1 if self.spec.format == "standard" else first

    def capture_teacher(self, model, windows, indices):
        from linearize.healing import capture_teacher

        start = self.injection_point(indices)
        with (
            self.timed("heal"),
            self.progress.stage("heal", total=len(windows.fit), message="teacher states") as st,
        ):
            return capture_teacher(model, windows.fit, start, on_batch=st.advance)

    def heal(self, model, windows, teacher, params, budget):
        """Distil the maps; keep the result only if the validation perplexity improved."""
        from linearize.healing import heal, restore, snapshot

        max_steps, max_seconds = budget
        val_before = self.perplexity(model, windows.validation, "healing_validation", "heal")
        eval_before = self.perplexity(model, windows.eval, "healing_eval_before", "heal")
        saved = snapshot(params)
        with self.timed("heal"), self.progress.stage("heal", total=max_steps) as st:
            result = heal(
                model,
                teacher,
                windows.fit,
                params,
                max_steps=max_steps,
                max_seconds=max_seconds,
                seed=self.spec.seed,
                on_step=lambda step, loss: st.advance(1, f"loss {loss:.4f}"),
            )
            stopped_by = (
                "step cap" if result.steps >= max_steps else f"{max_seconds:g} s time budget"
            )
            if result.steps < max_steps:
                st.stop(f"stopped after {result.steps} of {max_steps} steps: {stopped_by}")
        val_after = self.perplexity(model, windows.validation, "healing_validation", "heal")
        kept = val_after < val_before
        if not kept:
            restore(params, saved)
            self.notes.append("healing did not improve the validation slice; kept the fitted maps")
        info = {
            **result.as_dict(),
            "validation_before": val_before,
            "validation_after": val_after,
            "kept": "healed" if kept else "fitted",
            "stopped_by": stopped_by,
            "loss": "centred-logit MSE at the final hidden state (linearize.healing)",
        }
        return eval_before, info

    def select(self, model, windows, analysis, baseline_val: float, n_layers: int):
        from linearize.selection import (
            check_indices,
            max_budget,
            rank_layers,
            search_largest_budget,
            select_window,
        )

        spec = self.spec
        # Held-out ranking: 1 - validation error of each layer's own affine map.
        scores = [1 - row["validation_error"] for row in analysis.layers]
        info = {
            "ranking_signal": "held-out R^2 of the per-layer affine map (validation slice)",
            "ranking": rank_layers(scores, n_layers),
        }
        if spec.indices is not None:
            return check_indices(spec.indices, n_layers), {**info, "mode": "indices"}
        info["rule"] = "the k adjacent layers with the highest total ranking signal (one span)"
        if spec.layers is not None:
            return select_window(scores, spec.layers, n_layers), {**info, "mode": "layers"}

        def increase_for(indices: list[int]) -> float:
            trial = copy.deepcopy(model)
            self.replace(trial, windows, indices)
            ppl = self.perplexity(trial, windows.validation, "search_validation", "select")
            del trial
            return 100 * (ppl / baseline_val - 1)

        with self.timed("select"):
            choices = [
                select_window(scores, k, n_layers) for k in range(1, max_budget(n_layers) + 1)
            ]
            best, trace = search_largest_budget(choices, spec.target_ppl_increase, increase_for)
        if not best:
            raise InputError(
                f"no layer can be replaced within a {spec.target_ppl_increase}% validation "
                f"increase (k=1 gives {trace[0]['validation_increase_pct']:.1f}%)"
            )
        return best, {
            **info,
            "mode": "target_ppl_increase",
            "search": (
                "binary search on k, each k's best window of adjacent layers; each trial is "
                "fitted without healing and measured on the validation slice"
            ),
            "trace": trace,
        }

    def replace(self, model, windows, indices: list[int]) -> list:
        """Fit and apply the maps; returns the parameters that carry them (for healing)."""
        from linearize.architectures import decoder_layers, get_architecture
        from linearize.fitting import collect_span_stats, fit_spans
        from linearize.selection import contiguous_spans
        from linearize.surgery import (
            LinearBlock,
            check_foldable,
            fold_and_remove,
            replace_with_linear,
        )

        spans = contiguous_spans(indices)
        fmt = self.spec.format
        if fmt == "standard":
            check_foldable(model, spans)  # refuse before the costly fit pass
        with self.timed("fit"), self.progress.stage("fit", total=len(windows.fit)) as st:
            stats = collect_span_stats(model, spans, windows.fit, fmt=fmt, on_batch=st.advance)
            maps = fit_spans(model, stats, fmt=fmt)
        with self.timed("surgery"), self.progress.stage("surgery", total=1):
            if fmt == "linear":
                replace_with_linear(model, maps)
                return [
                    p for m in model.modules() if isinstance(m, LinearBlock) for p in m.parameters()
                ]
            arch, layers = get_architecture(model), decoder_layers(model)
            projections = [layers[start - 1].get_submodule(arch.mlp_out) for start, _ in spans]
            fold_and_remove(model, maps)
            return [p for proj in projections for p in proj.parameters()]

    def save_and_verify(
        self, model, tokenizer, windows, report: Report, output_dir: Path, force: bool, residuals
    ) -> Report:
        """Stage the checkpoint, reload it from disk, check it reproduces the in-memory model on
        the validation slice, measure it on the evaluation windows, then publish atomically."""
        from linearize.checkpoint import load, stage_checkpoint
        from linearize.evaluation import count_parameters, parameter_bytes
        from linearize.gates import evaluate_gates
        from linearize.report import model_card, report_bundle_files

        spec_json = self.spec.model_dump(mode="json")
        with self.timed("save"), self.progress.stage("save", total=1):
            staged = stage_checkpoint(
                model, tokenizer, output_dir, resolved_spec=spec_json, force=force
            )
        with staged:  # discarded unless published
            param = next(model.parameters())
            with self.timed("verify"):
                reloaded = load(staged.path, dtype=param.dtype, device=param.device)
                val = self.perplexity(reloaded, windows.validation, "reloaded_validation", "verify")
            _check_reload(val, report.perplexity.validation_compressed)
            meter = self.behaviour.meter_hook()
            ppl = self.perplexity(reloaded, windows.eval, "reloaded_eval", "verify", meter)
            with self.progress.stage("behaviour", total=1, message="compressed model"):
                self.behaviour.measure_compressed(reloaded)
            self.behaviour.fill(report)
            p = report.perplexity
            p.compressed = p.reloaded = ppl
            p.increase_pct = 100 * (ppl / p.baseline - 1)
            p.validation_reloaded = val
            report.throughput.tokens_per_s_after = (
                windows.count("eval") / self.timings["reloaded_eval"]
            )
            report.model.layers_after = len(_layers_of(reloaded))
            report.model.params_after = count_parameters(reloaded)
            report.model.bytes_after = parameter_bytes(reloaded)
            report.model.extra_params = _extra_params(reloaded)
            report.model.checkpoint_bytes = _dir_bytes(staged.path)
            report.gate = evaluate_gates(self.spec, report)
            report.timings = self.timings
            report.output_dir = str(output_dir)
            files = report_bundle_files(report, residuals=residuals)
            files["README.md"] = model_card(report)
            staged.publish(files)
        return report


def _check_reload(reloaded: float, in_memory: float) -> None:
    if abs(reloaded / in_memory - 1) > RELOAD_TOLERANCE:
        raise VerificationError(
            f"the reloaded checkpoint's validation perplexity {reloaded:.4f} differs from the "
            f"in-memory model's {in_memory:.4f} by more than {RELOAD_TOLERANCE:.1%}; "
            "nothing was published"
        )


def _check_budget_early(spec, n_layers: int) -> None:
    from linearize.selection import check_indices, check_layer_budget

    if spec.layers is not None:
        check_layer_budget(spec.layers, n_layers)
    if spec.indices is not None:
        check_indices(spec.indices, n_layers)


def _layers_of(model):
    from linearize.architectures import decoder_layers

    return decoder_layers(model)


def _extra_params(model) -> int:
    from linearize.surgery import LinearBlock

    return sum(
        p.numel() for m in model.modules() if isinstance(m, LinearBlock) for p in m.parameters()
    )


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _model_info(loaded) -> ModelInfo:
    from linearize.architectures import get_architecture, hidden_size, num_layers
    from linearize.evaluation import count_parameters, parameter_bytes

    model = loaded.model
    return ModelInfo(
        source=loaded.source,
        architecture=get_architecture(model).name,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        hidden_size=hidden_size(model),
        layers_before=num_layers(model),
        params_before=count_parameters(model),
        bytes_before=parameter_bytes(model),
    )


def _data_info(windows, model, reservoir_size) -> DataInfo:
    from linearize.architectures import hidden_size

    n_fit = windows.count("fit")
    return DataInfo(
        source=windows.source.name,
        sha256=windows.source.sha256,
        calib_tokens=n_fit + windows.count("validation"),
        eval_tokens=windows.count("eval"),
        validation_tokens=windows.count("validation"),
        seq_len=windows.seq_len,
        calib_windows=len(windows.fit) + len(windows.validation),
        validation_windows=len(windows.validation),
        eval_windows=0 if windows.eval is None else len(windows.eval),
        calib_sha256=windows.calib_sha256,
        eval_sha256=windows.eval_sha256 or "",
        disjoint=True,
        n_over_d=n_fit / hidden_size(model),
        reservoir_size=reservoir_size,
    )


def _analysis_notes() -> str:
    from linearize.analysis import ANALYSIS_NOTES

    return ANALYSIS_NOTES


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from linearize import __version__

    return {
        "linearize": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
