"""The one entry point: the CLI and the Celery worker both call `run(spec, ...)`.

Data flow of a compression (ARCHITECTURE.md), every model pass layer by layer (linearize.stack),
resident or streamed as the memory budget decides (linearize.placement):
spec -> model -> windows (fit / validation / eval, disjoint) -> one pass: analysis of every
layer + baseline perplexities -> selection -> one pass over the fit windows: the span's fit
statistics + the teacher's states for healing -> surgery -> one pass: perplexity before healing
-> healing (validation perplexity after) -> checkpoint streamed into new shards -> reload from
disk, one pass: validation check + evaluation windows -> report -> atomic publish.
Only the progress sink differs between callers (terminal bars vs job events).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

from pydantic import TypeAdapter

from api_schemas import JobSpec, ProgressEvent, Report
from api_schemas.report import LayerLinearity, Perplexity
from linearize import quantization
from linearize.errors import Cancelled, InputError, OutputExistsError, VerificationError
from linearize.facts import analysis_notes, data_info, execution_info, model_info, versions
from linearize.job import Job
from linearize.progress import Progress

log = logging.getLogger(__name__)

ProgressSink = Callable[[ProgressEvent], None]
RELOAD_TOLERANCE = 0.005  # reloaded vs in-memory validation perplexity, relative
DEFAULT_HEAL_STEPS = 400
DEFAULT_HEAL_SECONDS = 60.0
HEAL_BATCH = 1  # windows per healing step (linearize.healing.heal's default)
# The default healing text at most: at 140 steps (k = 4) 64k tokens healed as well as 128k
# (BENCHMARKS.md, issue 16), and their teacher pass is twice the analysis pass's 32k tokens.
DEFAULT_HEAL_TOKENS = 65536


def run(
    spec,
    *,
    output_dir: Path | None = None,
    report_path: Path | None = None,
    progress: ProgressSink | None = None,
    force: bool = False,
    resume_slot: str | None = None,
) -> Report:
    """Run one job spec (AnalyzeSpec | CompressSpec | EvalSpec | CompareSpec) to its report.

    `progress` receives ProgressEvents; if it raises `linearize.errors.Cancelled`, the run stops
    at that point (cooperative cancellation), nothing partial is left in `output_dir`, and every
    spilled activation file is removed.

    A compress resumes an interrupted run of the same `resume_slot` (the service: the job id;
    default: the spec itself, so the same command resumes), unless `use_cache` is off
    (linearize.resume).
    """
    if isinstance(spec, dict):
        spec = TypeAdapter(JobSpec).validate_python(spec)
    output_dir = Path(output_dir) if output_dir is not None else None
    if spec.kind == "compress":
        if output_dir is None:
            raise InputError("compress needs an output directory")
        _refuse_existing_output(output_dir, force)
    job = Job(spec, Progress(progress))
    if spec.kind == "compress" and spec.use_cache:
        from linearize.resume import slot_for_arguments

        job.resume_slot = resume_slot or slot_for_arguments(spec)
    runner = {"compress": compress, "analyze": analyze, "eval": evaluate, "compare": compare}
    try:
        report = runner[spec.kind](job, output_dir, force)
    except Cancelled:
        if job.resume is not None:
            job.resume.clear()  # a cancelled job is not retried
        raise
    finally:
        job.close()
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


# --- kinds ---------------------------------------------------------------------------------------


def analyze(job: Job, output_dir: Path | None, force: bool) -> Report:
    from linearize.analysis import measure_layers

    loaded = job.load(job.spec.model, activation_tokens=job.spec.calib_tokens)
    windows = job.windows(loaded.tokenizer, eval_tokens=None)
    analysis, _, _ = measure_layers(job, loaded.stack, windows, loaded.tokenizer, with_eval=False)
    report = Report(
        kind="analyze",
        model=model_info(loaded),
        linearity=[LayerLinearity(**row) for row in analysis.layers],
        linearity_notes=analysis_notes(),
        data=data_info(windows, loaded.model, analysis.reservoir_size),
        execution=execution_info(job, loaded.stack),
        timings=job.timings,
        versions=versions(),
        notes=job.notes,
    )
    if output_dir is not None:
        from linearize.report import write_report_bundle

        write_report_bundle(report, output_dir, residuals=analysis.residuals)
    return report


def evaluate(job: Job, output_dir: Path | None, force: bool) -> Report:
    from linearize.behaviour import Behaviour

    spec = job.spec
    behaviour = Behaviour(spec, job.timings)
    reference_sha = reference_pass(job, behaviour) if spec.reference is not None else None
    loaded = job.load(spec.model, activation_tokens=spec.eval_tokens)
    windows = job.windows(loaded.tokenizer, eval_tokens=spec.eval_tokens)
    observers = []
    if reference_sha is not None:
        if windows.eval_sha256 != reference_sha:
            raise InputError(
                f"--reference {spec.reference} tokenizes the evaluation text differently "
                f"from {spec.model}; agreement needs the same tokenizer"
            )
        observers = [eval_positions(behaviour.meter_hook(), windows)]
    ppl, _ = perplexities(job, loaded.stack, {"eval": windows.eval}, "evaluate", observers)
    report = Report(
        kind="eval",
        model=model_info(loaded),
        perplexity=Perplexity(baseline=ppl["eval"]),
        data=data_info(windows, loaded.model, None),
        execution=execution_info(job, loaded.stack),
        timings=job.timings,
        versions=versions(),
        notes=job.notes,
    )
    behaviour.fill(report)
    return report


def reference_pass(job: Job, behaviour) -> str:
    """The reference model's top-k logits on the evaluation windows (linearize.agreement); it
    is released before the evaluated model loads. Returns the windows' token hash: the two
    models must cut the same windows (the same tokenizer)."""
    spec = job.spec
    loaded = job.load(spec.reference, activation_tokens=spec.eval_tokens)
    windows = job.windows(loaded.tokenizer, eval_tokens=spec.eval_tokens)
    hook = eval_positions(behaviour.reference_hook(), windows)
    ppl, _ = perplexities(job, loaded.stack, {"eval": windows.eval}, "reference", [hook])
    job.notes.append(f"reference {spec.reference}: perplexity {ppl['eval']:.4f}")
    return windows.eval_sha256


def eval_positions(hook, windows):
    """A head observer that hands `hook` the evaluation windows' predicting positions only
    (tokens 1..S-1 of each window, in order): the chunks linearize.agreement expects."""
    last = windows.seq_len - 1  # the last position of a window predicts nothing

    def observe(name, window, start, logits):
        if name == "eval" and start < last:
            hook(logits[: last - start])

    return observe


def compare(job: Job, output_dir: Path | None, force: bool) -> Report:
    from linearize.compare import compare_models

    return compare_models(job, output_dir)


def compress(job: Job, output_dir: Path, force: bool) -> Report:
    from linearize.architectures import num_layers
    from linearize.auto import choose_method, choose_shrink
    from linearize.behaviour import Behaviour
    from linearize.foldcheck import require_surgery
    from linearize.replay import mix_fit
    from linearize.resume import open_resume

    spec = job.spec
    behaviour = Behaviour(spec, job.timings)
    behaviour.check()  # unknown tasks fail before the model is even loaded
    loaded = job.load(spec.model, activation_tokens=spec.calib_tokens + spec.eval_tokens)
    stack, tokenizer = loaded.stack, loaded.tokenizer
    info_before = model_info(loaded)
    n_layers = num_layers(stack.model)
    _check_budget_early(spec, n_layers)
    with job.timed("surgery_check"):  # the family's fold and removal, proven on a tiny copy
        require_surgery(stack.model.config, fold=spec.format == "standard" and not removes(spec))
    text = healing_text(job, stack)
    windows = job.windows(tokenizer, eval_tokens=spec.eval_tokens, **text)
    fit_mixed = mix_fit(spec, tokenizer, windows)
    texts, replayed = outside_texts(job, stack, tokenizer, windows)
    job.resume = resume = open_resume(job, stack, windows)
    whole = whole_model_measures(job, stack)
    if whole and not spec.dry_run:  # a dry run measures no checkpoint
        with job.progress.stage("behaviour", total=1, message="original model"):
            behaviour.measure_original(stack.model, tokenizer, windows)
    baseline, baseline_val, analysis, _ = baseline_and_analysis(
        job, stack, windows, tokenizer, behaviour
    )
    if texts:
        from linearize.texts import record_baselines, window_sets

        ppl, _ = perplexities(job, stack, window_sets(texts), "evaluate")
        record_baselines(texts, ppl)
    found = None
    if spec.layers == "max":
        from linearize.search import search_max

        choose_shrink(job, stack, tokenizer, windows, analysis, n_layers)  # auto: 0, with a note

        found = search_max(job, stack, windows, analysis, baseline_val, n_layers)
        stack = loaded.stack = found.stack
        indices, selection, before_healing = found.indices, found.selection, None
        compressed_val = None if spec.dry_run else found.validation
    else:
        choice = choose_method(job, stack, tokenizer, windows, analysis, n_layers)
        shrink = choose_shrink(job, stack, tokenizer, windows, analysis, n_layers)
        indices, selection, before_healing, compressed_val = replace_and_heal(
            job, stack, windows, analysis, baseline_val, n_layers, replayed
        )
        if choice:
            selection["method_choice"] = choice
        if shrink:
            selection["shrink_choice"] = shrink
    if fit_mixed:
        selection["fit_mix"] = fit_mixed
    spec = job.spec  # auto resolved to the method it picked
    # The evaluation windows are measured once, on the checkpoint reloaded from disk
    # (save_and_verify); the reload is checked against the in-memory validation figure.
    report = Report(
        kind="compress",
        model=info_before,
        replaced_layers=indices,
        format=spec.format,
        method=found.method if found else method_name(spec),
        selection=selection,
        linearity=[LayerLinearity(**row) for row in analysis.layers],
        linearity_notes=analysis_notes(),
        perplexity=Perplexity(
            baseline=baseline,
            before_healing=before_healing,
            validation_baseline=baseline_val,
            validation_compressed=compressed_val,
        ),
        data=data_info(windows, stack.model, analysis.reservoir_size),
        versions=versions(),
        notes=job.notes,
        curve=found.curve if found else [],
        resumed=resume.info(),
    )
    if spec.dry_run:
        return dry_run_report(job, stack, report, output_dir, analysis.residuals)
    report = save_and_verify(
        job, loaded, windows, report, output_dir, force, analysis.residuals, behaviour, whole, texts
    )
    resume.clear()  # published: nothing is left to resume
    return report


def replace_and_heal(
    job: Job, stack, windows, analysis, baseline_val: float, n_layers: int, replayed=None
):
    """Select, replace and heal on the job's model: (indices, selection, eval perplexity
    before healing, validation perplexity of the result)."""
    from linearize.search import select

    spec, resume = job.spec, job.resume
    indices, selection = resume.json_stage(
        "selection", lambda: select(job, stack, windows, analysis, baseline_val, n_layers)
    )
    job.progress.note("select", f"replacing layers {indices}")
    budget = healing_budget(spec)
    teacher = None
    if budget:
        neighbours = healed_layers_that_fit(job, stack)
        carriers, teacher, last = replace_with_teacher(
            job, stack, windows, indices, neighbours, resume
        )
    else:
        carriers = replace(job, stack, windows, indices, resume)
    before_healing = None
    if budget:
        before_healing, selection["healing"] = heal(
            job, stack, windows, teacher, carriers, last, budget, neighbours, resume=resume
        )
        info = selection["healing"]
        if replayed:
            info["replay"] = replayed
        compressed_val = info[
            "validation_after" if info["kept"] == "healed" else "validation_before"
        ]
    else:
        ppl, _ = perplexities(job, stack, {"validation": windows.validation}, "evaluate")
        compressed_val = ppl["validation"]
    return indices, selection, before_healing, compressed_val


def outside_texts(job: Job, stack, tokenizer, windows):
    """The texts measured besides the evaluation half (linearize.texts), and the replay of
    general text in the healing windows (linearize.replay; None when it is off)."""
    from linearize.replay import replay
    from linearize.texts import eval_texts

    texts = eval_texts(job.spec, tokenizer, job.notes)
    replayed = None
    if healing_budget(job.spec):
        generate_healing_text(job, stack, windows)
        with job.timed("data"):
            replayed = replay(job.spec, tokenizer, windows, job.notes)
    return texts, replayed


def generate_healing_text(job: Job, stack, windows) -> None:
    """--heal-text generated[:N]: the fit windows, then N tokens sampled from the original
    model (linearize.selfdata), as the healing windows."""
    import torch

    from linearize.selfdata import generated_windows, parse_heal_text

    spec = job.spec
    tokens = parse_heal_text(spec.heal_text, stack.device.type, windows.count("heal"))
    if tokens is None:
        return
    if stack.streamed:
        raise InputError("--heal-text generated samples from the whole model, which is streamed")
    n = max(1, tokens // spec.seq_len)
    with job.timed("generate"), job.progress.stage("generate", total=1, message=f"{n} windows"):
        sampled, rate = generated_windows(stack.model, windows.fit, n, spec.seq_len, seed=spec.seed)
    windows.heal = torch.cat([windows.fit, sampled])
    job.notes.append(
        f"healing text: the fit windows, then {sampled.numel()} tokens sampled from the "
        f"original model ({rate:.0f} tokens/s)"
    )


def dry_run_report(job: Job, stack, report: Report, output_dir: Path, residuals) -> Report:
    """layers=max with dry_run: the analysis and the predicted curve, no checkpoint."""
    from linearize.report import write_report_bundle

    report.execution = execution_info(job, stack)
    report.timings = job.timings
    write_report_bundle(report, output_dir, residuals=residuals)
    return report


def whole_model_measures(job: Job, stack) -> bool:
    """Generation and lm-eval tasks need the whole model resident; a streamed run refuses
    tasks (asked for explicitly) and skips the generation check, saying so."""
    spec = job.spec
    if not stack.streamed:
        return True
    if spec.tasks:
        raise InputError(
            "--tasks runs lm-eval on the whole model, which does not fit the memory budget "
            "(the job streams one layer at a time); evaluate the checkpoint on a larger device"
        )
    if spec.generation_prompts:
        job.notes.append(
            "generation check skipped: it decodes with the whole model, and this job streams "
            "one decoder layer at a time"
        )
    return False


# --- compress stages -------------------------------------------------------------------------


def perplexities(job: Job, stack, windows: dict, stage: str, observers=(), timing=None):
    """({name: perplexity}, {name: seconds}) of window sets, in one layer-by-layer pass;
    its time is booked under `timing` (default: stage_sets)."""
    from linearize.evaluation import measure_perplexities

    name = "+".join(windows)
    timing = timing or f"{stage}_{name}"
    with job.timed(timing), job.pass_stage(stage, stack, windows, name) as st:
        return measure_perplexities(
            stack, job.planner(stack), windows, stage=st, observers=observers
        )


def baseline_and_analysis(job: Job, stack, windows, tokenizer, behaviour=None):
    """Baseline perplexities and the analysis in one pass (with the agreement reference from
    the same head chunks), or from the cache when the same model, windows and settings were
    seen before (linearize.cache)."""
    from linearize import cache
    from linearize.analysis import Analysis, measure_layers

    spec = job.spec
    key = cache.entry_key(stack, windows, spec) if spec.use_cache else None
    entry = cache.load_entry(key) if key else None
    observers = []
    if behaviour is not None:
        observers = [eval_positions(behaviour.reference_hook(), windows)]
    if entry is not None:
        shared = ", fetched from the shared cache" if entry["fetched"] else ""
        job.notes.append(f"baseline and analysis read from the cache ({cache.cache_dir()}{shared})")
        if behaviour is not None:

            def reference(_model, eval_windows, timing, stage, hook):
                observer = eval_positions(hook, windows)
                perplexities(job, stack, {"eval": eval_windows}, stage, [observer], timing)

            behaviour.cached_reference(key, stack.model, windows, reference)
        analysis = Analysis(entry["layers"], entry["residuals"], entry["reservoir_size"])
        return (
            entry["baseline"],
            entry["baseline_validation"],
            analysis,
            entry["baseline_eval_seconds"],
        )
    analysis, ppl, seconds = measure_layers(
        job, stack, windows, tokenizer, with_eval=True, observers=observers
    )
    if key:
        entry = {
            "baseline": ppl["eval"],
            "baseline_validation": ppl["validation"],
            "baseline_eval_seconds": seconds["eval"],
            "layers": analysis.layers,
            "reservoir_size": analysis.reservoir_size,
        }
        cache.save_entry(key, entry, analysis.residuals)
        if behaviour is not None:
            behaviour.save_reference(key)
    return ppl["eval"], ppl["validation"], analysis, seconds["eval"]


def removes(spec) -> bool:
    """Whether the span is dropped without a map (method remove; auto is the fitted map)."""
    return spec.method == "remove"


def method_name(spec) -> str:
    if removes(spec):
        name = "remove"
    else:
        name = "affine-span-lstsq" if spec.format == "linear" else "fold-lstsq"
    return name + ("+heal" if healing_budget(spec) else "")


def healing_budget(spec) -> tuple[int, float] | None:
    """(max steps, max seconds), or None when healing is off (heal_steps=0)."""
    steps = DEFAULT_HEAL_STEPS if spec.heal_steps is None else spec.heal_steps
    if steps == 0:
        return None
    return steps, spec.heal_seconds or DEFAULT_HEAL_SECONDS


def healing_text(job: Job, stack) -> dict:
    """job.windows' healing arguments: the spec's heal_tokens, else by default all of the
    calibration half without its validation windows, bounded by
    - the step cap: windows beyond steps x batch (one window per step) are never drawn;
    - the memory budget: the teacher pass holds three caches of the healing windows (its
      stream, the teacher's inputs and targets), which must fit half of what the planner has
      free, so the default never spills (an explicit heal_tokens spills to disk instead).
    - DEFAULT_HEAL_TOKENS, a time bound counted in tokens rather than seconds, so the healing
      text, like the result, does not depend on the host's speed or load (BENCHMARKS.md).
    Below the fit windows the default heals on the fit windows, as before heal_tokens."""
    import math

    spec = job.spec
    budget = healing_budget(spec)
    if budget is None:
        return {}
    if spec.heal_tokens is not None:
        return {"heal_tokens": spec.heal_tokens}
    seq_len = spec.seq_len
    n_calib = spec.calib_tokens // seq_len
    fit_tokens = (n_calib - max(1, math.ceil(spec.validation_fraction * n_calib))) * seq_len
    from linearize.architectures import hidden_size

    per_token = 3 * hidden_size(stack.model) * stack.dtype.itemsize
    room = job.planner(stack).device_free // 2 // per_token
    steps = budget[0] * HEAL_BATCH * seq_len
    tokens = min(steps, DEFAULT_HEAL_TOKENS, room)
    if tokens <= fit_tokens:
        if room < min(steps, DEFAULT_HEAL_TOKENS):
            job.notes.append(
                "healing on the fit windows only: more healing text would not fit the memory "
                "budget (pass --heal-tokens N to spill it to disk)"
            )
        return {}
    return {"heal_tokens": tokens, "heal_at_most": True}


def injection_point(spec, indices: list[int]) -> int:
    """The first position whose computation changes: the fold target (or, for a removal, the
    layer before the span, which heals) or the first block."""
    first = min(indices)
    return first - 1 if spec.format == "standard" else first


def trial_stack(stack):
    """A copy to try a replacement on; a streamed copy shares the shards, not the weights."""
    from linearize.stack import LayerStack

    return LayerStack(
        model=copy.deepcopy(stack.model),
        device=stack.device,
        weights=stack.weights,
        batch_size=stack.batch_size,
        head_step_rows=stack.head_step_rows,
    )


def replace(
    job: Job, stack, windows, indices: list[int], resume=None, *, remember: bool = False
) -> list:
    """Fit and apply the maps; returns the parameters that carry them (for healing).
    remember: keep the fitted maps for the job's own replacement of the same layers (a trial
    on a copy of the unchanged model fits exactly what that replacement would)."""
    carriers, _, _ = _fit_and_replace(
        job, stack, windows, indices, teacher=None, resume=resume, remember=remember
    )
    return carriers


def replace_with_teacher(
    job: Job, stack, windows, indices: list[int], neighbours: int, resume=None
):
    """`replace`, with the teacher's states for healing captured in the same fit pass.

    Returns (carriers, TeacherCache, last position of the healed segment)."""
    return _fit_and_replace(job, stack, windows, indices, teacher=neighbours, resume=resume)


def _fit_and_replace(
    job: Job, stack, windows, indices, *, teacher: int | None, resume=None, remember=False
):
    """teacher: None for no teacher, else the number of layers healed after the cut.
    resume: the job's linearize.resume.Resume, whose fitted maps skip the fit pass."""
    from linearize.fitting import fit_pass, fit_spans
    from linearize.healing import TeacherCache
    from linearize.selection import contiguous_spans
    from linearize.surgery import check_foldable, check_removable, position_computing_through

    spec = job.spec
    spans = contiguous_spans(indices)
    fmt = spec.format
    removing = removes(spec)
    if removing:
        check_removable(stack.model, spans)
    elif fmt == "standard":
        check_foldable(stack.model, spans)  # refuse before the costly fit pass
    start = injection_point(spec, indices) if teacher is not None else None
    end = None  # resident: the teacher's final hidden states
    if teacher is not None and stack.streamed:
        # Streamed: the teacher where the healed layers end (the fold target or the block
        # stands for the whole span, so one healed layer ends at the span's last layer).
        end = min(max(e for _, e in spans) + max(teacher, 1) - 1, len(stack.layers) - 1)
    planner = job.planner(stack)
    sets = {"fit": windows.fit}
    # The teacher comes with the fit pass when healing reads the fit windows, else from a pass
    # of its own over the healing windows (the statistics stay those of the fit windows).
    # A removal fits nothing: its only pass is the teacher's.
    maps = None
    if not removing:
        maps = job.fitted_maps.pop(tuple(indices), None)
        if maps is None and resume is not None:
            maps = resume.load_maps(indices)
    joint = start is not None and windows.heal is windows.fit and not removing and maps is None
    if not removing and maps is None:
        with job.timed("fit"), job.pass_stage("fit", stack, sets) as st:
            stats, t_in, t_out = fit_pass(
                stack,
                planner,
                spans,
                fmt,
                windows.fit,
                teacher_start=start if joint else None,
                teacher_end=end if joint else None,
                stage=st,
            )
            maps = fit_spans(stack.model, stats, fmt=fmt)
        if remember:
            job.fitted_maps[tuple(indices)] = maps
        if resume is not None:
            resume.save_maps(indices, maps)
    if start is not None and not joint:
        heal_sets = {"heal": windows.heal}
        with job.timed("teacher"), job.pass_stage("teacher", stack, heal_sets) as st:
            _, t_in, t_out = fit_pass(
                stack,
                planner,
                [],
                fmt,
                windows.heal,
                teacher_start=start,
                teacher_end=end,
                stage=st,
            )
    if maps is not None and spec.map_shrink:
        from linearize.fitting import shrink_toward_identity

        maps = shrink_toward_identity(maps, spec.map_shrink)
        job.notes.append(f"each fitted map shrunk toward the identity by {spec.map_shrink:g}")
    with job.timed("surgery"), job.progress.stage("surgery", total=1):
        carriers = apply_maps(stack, spans, maps, fmt)
    if teacher is None:
        return carriers, None, None
    kind = "final" if end is None else "hidden"
    last = len(stack.layers) - 1 if end is None else position_computing_through(stack.model, end)
    return carriers, TeacherCache(start, t_in, t_out, kind), last


def apply_maps(stack, spans, maps, fmt: str) -> list:
    """Surgery on the stack's model; the changed layers are kept in memory from now on.

    maps None: a removal, the spans are dropped and the layers before them carry the healing,
    as a fold's targets do (removal is the fold with its map set to the identity)."""
    from linearize.architectures import get_architecture
    from linearize.surgery import LinearBlock, fold_and_remove, remove_layers, replace_with_linear

    model = stack.model
    if maps is not None and fmt == "linear":
        for start, _ in spans:
            stack.prepare(start)  # the block is built like the layer it replaces
        replace_with_linear(model, maps)
        blocks = [m for m in stack.layers if isinstance(m, LinearBlock)]
        for block in blocks:
            stack.keep(block)
        return [p for block in blocks for p in block.parameters()]
    arch = get_architecture(model)
    targets = [stack.prepare(start - 1) for start, _ in spans]
    for layer in targets:
        stack.keep(layer)
    carriers = [c for layer in targets for c in arch.kind_of(layer).carriers(layer, model.config)]
    if maps is None:
        remove_layers(model, [i for start, end in spans for i in range(start, end + 1)])
    else:
        fold_and_remove(model, maps)
    for layer in targets:
        layer.to("cpu" if stack.streamed else stack.device)
    return [p for carrier in carriers for p in carrier.parameters()]


def heal(
    job: Job,
    stack,
    windows,
    teacher,
    carriers,
    last: int,
    budget,
    neighbours: int,
    *,
    eval_before: bool = True,
    resume=None,
):
    """Distil the maps; keep the result only if the validation perplexity improved.
    eval_before: also measure the evaluation windows before healing (the first result).
    resume: the job's linearize.resume.Resume (its stages and healing checkpoints); None for a
    trial that is not the job's own result (the search's), which keeps no state."""
    from linearize.healing import (
        TOPK,
        default_loss,
        healing_params,
        restore,
        snapshot,
        trained_parameter_names,
    )
    from linearize.healing import heal as distil
    from linearize.resume import Resume

    resume = resume or Resume.disabled(job)
    max_steps, max_seconds = budget
    if stack.streamed:
        # The segment is the healed layers: read them now and keep them, so that the parameters
        # handed to the optimizer are the ones the forward uses (and the checkpoint writes).
        for position in range(teacher.start, last + 1):
            stack.keep(stack.prepare(position))
    params = healing_params(stack.model, carriers, neighbours=neighbours)
    sets = {"validation": windows.validation}
    if eval_before:
        sets["eval"] = windows.eval
    ppl = resume.json_stage("heal_before", lambda: perplexities(job, stack, sets, "heal")[0])
    val_before, eval_before = ppl["validation"], ppl.get("eval")
    saved = snapshot(params)
    with job.timed("heal"), job.progress.stage("heal", total=max_steps) as st:
        result = distil(
            stack,
            teacher,
            windows.heal,
            params,
            last=last,
            max_steps=max_steps,
            max_seconds=max_seconds,
            seed=job.spec.seed,
            loss_fn=default_loss(stack, teacher, job.spec.heal_loss),
            on_step=lambda step, loss: st.advance(step - st.current, f"loss {loss:.4f}"),
            checkpoints=resume.healing(max_steps),
        )
        stopped_by = "step cap" if result.steps >= max_steps else f"{max_seconds:g} s time budget"
        if result.steps < max_steps:
            st.stop(f"stopped after {result.steps} of {max_steps} steps: {stopped_by}")
    for cache in (teacher.inputs, teacher.targets):
        job.planner(stack).release(cache)
    ppl, _ = perplexities(job, stack, {"validation": windows.validation}, "heal")
    val_after = ppl["validation"]
    kept = val_after < val_before
    if not kept:
        restore(params, saved)
        job.notes.append("healing did not improve the validation slice; kept the fitted maps")
    info = {
        **result.as_dict(),
        "stopped_by": stopped_by,
        "validation_before": val_before,
        "validation_after": val_after,
        "kept": "healed" if kept else "fitted",
        "loss": teacher.loss_name
        if job.spec.heal_loss == "mse" or teacher.kind != "final"
        else f"KL(teacher || student) on the teacher's top-{TOPK} logits (linearize.healing)",
        "segment": [teacher.start, last],  # positions the distillation runs through
        "neighbour_layers": neighbours,
        "trained_parameters": sum(p.numel() for p in params),
        "trained_names": trained_parameter_names(stack.model, params),  # experts count as weights
        "heal_tokens": windows.count("heal"),
        "heal_windows": len(windows.heal),
        "heal_text": (
            "the fit windows"
            if windows.heal is windows.fit
            else "the fit windows, then the calibration half after the calibration windows"
        ),
        "teacher_cache": teacher.inputs.place,  # device | host | disk
    }
    return eval_before, info


def healed_layers_that_fit(job: Job, stack) -> int:
    """NEIGHBOUR_LAYERS, or fewer when their weights, gradients and Adam state would not fit
    the budget beside the trunk (streamed); 0 trains the maps' carriers only."""
    from linearize.healing import NEIGHBOUR_LAYERS

    if not stack.streamed:
        return NEIGHBOUR_LAYERS
    fits = job.placement.plan.neighbours  # what the memory plan left room for
    if fits < NEIGHBOUR_LAYERS:
        job.notes.append(
            f"healing trains {fits} layer(s) after the cut instead of {NEIGHBOUR_LAYERS}: "
            "that is what fits the memory budget with gradients and optimizer state"
        )
    return int(fits)


def save_and_verify(
    job: Job,
    loaded,
    windows,
    report: Report,
    output_dir: Path,
    force: bool,
    residuals,
    behaviour,
    whole: bool,
    texts=(),
) -> Report:
    """Stage the checkpoint, reload it from disk, check it reproduces the in-memory model on
    the validation slice, measure it on the evaluation windows (perplexity and agreement with
    the original), then publish atomically."""
    from linearize.checkpoint import stage_checkpoint
    from linearize.evaluation import count_parameters, parameter_bytes
    from linearize.gates import evaluate_gates
    from linearize.report import model_card, report_bundle_files
    from linearize.throughput import time_against_original

    stack = loaded.stack
    spec_json = job.spec.model_dump(mode="json")
    with job.timed("save"), job.progress.stage("save", total=1):
        staged = stage_checkpoint(
            stack,
            loaded.tokenizer,
            output_dir,
            resolved_spec=spec_json,
            force=force,
            shard_size=shard_size(job.placement),
            files_dir=loaded.files_dir,
            source_config=loaded.source_config,
        )
    report.model.config_changes = staged.config_changes
    stack.drop()  # streamed: the checkpoint now holds the changed layers; measure the reload
    with staged:  # discarded unless published
        with job.timed("verify"):
            reloaded = job.load(str(staged.path)).stack
        from linearize.texts import results, window_sets

        sets = {"validation": windows.validation, "eval": windows.eval, **window_sets(texts)}
        meter = eval_positions(behaviour.meter_hook(), windows)
        ppl, _ = perplexities(job, reloaded, sets, "verify", [meter])
        _check_reload(ppl["validation"], report.perplexity.validation_compressed)
        if whole:
            with job.progress.stage("behaviour", total=1, message="compressed model"):
                behaviour.measure_compressed(reloaded.model)
        behaviour.fill(report)
        if report.curve:
            from linearize.search import complete_curve

            complete_curve(report)
        p = report.perplexity
        p.compressed = p.reloaded = ppl["eval"]
        p.increase_pct = 100 * (ppl["eval"] / p.baseline - 1)
        report.eval_texts = results(texts, ppl, p.increase_pct)
        p.validation_reloaded = ppl["validation"]
        time_against_original(job, report, reloaded, windows.eval, whole)
        model = reloaded.model
        report.model.layers_after = len(reloaded.layers)
        report.model.params_after = count_parameters(model)
        report.model.bytes_after = parameter_bytes(model)
        report.model.extra_params = _extra_params(model)
        report.model.checkpoint_bytes = _dir_bytes(staged.path)
        quantization.complete(report.model, staged.path)
        report.gate = evaluate_gates(job.spec, report)
        report.execution = execution_info(job, stack)
        report.timings = job.timings
        report.output_dir = str(output_dir)
        files = report_bundle_files(report, residuals=residuals)
        files["README.md"] = model_card(report)
        staged.publish(files)
    return report


def shard_size(placement) -> int:
    """Bytes per written shard, as the memory plan counts them (linearize.memory_plan)."""
    from linearize.memory_plan import shard_bytes

    return shard_bytes(placement.budget_bytes, placement.mode == "streamed")


def _check_reload(reloaded: float, in_memory: float) -> None:
    if abs(reloaded / in_memory - 1) > RELOAD_TOLERANCE:
        raise VerificationError(
            f"the reloaded checkpoint's validation perplexity {reloaded:.4f} differs from the "
            f"in-memory model's {in_memory:.4f} by more than {RELOAD_TOLERANCE:.1%}; "
            "nothing was published"
        )


def _check_budget_early(spec, n_layers: int) -> None:
    from linearize.selection import check_indices, check_layer_budget

    if isinstance(spec.layers, int):
        check_layer_budget(spec.layers, n_layers)
    if spec.indices is not None:
        check_indices(spec.indices, n_layers)


def _extra_params(model) -> int:
    from linearize.surgery import LinearBlock

    return sum(
        p.numel() for m in model.modules() if isinstance(m, LinearBlock) for p in m.parameters()
    )


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
