"""`--method auto` (fit or remove) and `--map-shrink auto` (how far the fitted map moves toward
the identity), decided by measurement on text unlike the calibration text.

A fitted map learns the calibration text's domain; plain removal leaves nothing to learn it
(BENCHMARKS.md, issue 16: in domain the fit wins, elsewhere healed removal). Auto therefore tries
both at the chosen budget, unhealed, and keeps the one whose perplexity is lower on a few
windows of the general mixture's held-out part taken after the windows the report evaluates
(so the general text the report shows chose nothing). Without the mixture, auto is the fit.
"""

from __future__ import annotations

import math

from linearize.errors import InputError

CHOICE_WINDOWS = 4  # windows of general text the two trials are measured on
SHRINK_GRID = (0.0, 0.15, 0.3, 0.5)  # the amounts --map-shrink auto tries


def choose_method(job, stack, tokenizer, windows, analysis, n_layers: int) -> dict | None:
    """The method auto stands for, as the report's record (None: no choice to make); the job's
    spec is rewritten to the chosen method so that every later stage runs it."""
    from linearize import pipeline
    from linearize.mixture import is_built
    from linearize.selection import selection_rule

    spec = job.spec
    if spec.method != "auto" or spec.format != "standard" or spec.layers is None:
        return None
    if stack.streamed or not is_built():
        job.notes.append(
            "method auto is the fit: "
            + ("the job streams" if stack.streamed else "the general text mixture is not built")
        )
        return None
    general = choice_windows(tokenizer, spec)
    measured = {}
    for method in ("fit", "remove"):
        trial_spec = spec.model_copy(update={"method": method, **least_squares(spec)})
        choose, _ = selection_rule(trial_spec, analysis, n_layers)
        indices = choose(spec.layers)
        trial = pipeline.trial_stack(stack)
        previous, job.spec = job.spec, trial_spec
        try:
            pipeline.replace(job, trial, windows, indices, remember=True)
        except InputError as exc:  # e.g. a removal whose span starts at layer 0
            measured[method] = {"indices": indices, "refused": str(exc)}
            continue
        finally:
            job.spec = previous
        ppl, _ = pipeline.perplexities(job, trial, {"general": general}, "select")
        measured[method] = {"indices": indices, "general_perplexity": ppl["general"]}
        del trial
    picked = min(measured, key=lambda m: measured[m].get("general_perplexity", math.inf))
    job.spec = spec.model_copy(update={"method": picked})
    other = "remove" if picked == "fit" else "fit"
    why = (
        f"{picked} measured {measured[picked]['general_perplexity']:.3f} against {other}'s "
        + (
            f"{measured[other]['general_perplexity']:.3f}"
            if "general_perplexity" in measured[other]
            else f"refusal ({measured[other]['refused']})"
        )
        + f" on {general.numel()} tokens of general text, both unhealed"
    )
    job.notes.append(f"method auto picked {picked}: {why}")
    return {"picked": picked, "why": why, "trials": measured, "tokens": general.numel()}


def choice_windows(tokenizer, spec):
    """CHOICE_WINDOWS windows of the mixture's held-out part after its first eval_tokens."""
    import torch

    from linearize.data import _tokenize_prefix, read_text
    from linearize.mixture import part_path

    text = read_text(part_path("heldout")).text
    skip = spec.eval_tokens
    want = skip + CHOICE_WINDOWS * spec.seq_len
    ids = _tokenize_prefix(tokenizer, text, want)[skip:want]
    n = len(ids) // spec.seq_len
    if n == 0:
        raise InputError("the general mixture's held-out part is too short to choose a method")
    return torch.tensor(ids[: n * spec.seq_len], dtype=torch.long).view(n, spec.seq_len)


def least_squares(spec) -> dict:
    """The spec update that measures the plain least-squares map when the shrink is undecided."""
    return {"map_shrink": 0.0} if spec.map_shrink == "auto" else {}


def choose_shrink(job, stack, tokenizer, windows, analysis, n_layers: int) -> dict | None:
    """The amount --map-shrink auto stands for, as the report's record (None: no choice was
    made; an undecidable auto becomes 0 with a note). Every amount of SHRINK_GRID is tried on
    the chosen layers, unhealed, from one fit, and the lowest perplexity on the general text's
    choice windows wins (ties: the smaller amount)."""
    from linearize import pipeline
    from linearize.mixture import is_built
    from linearize.selection import selection_rule

    spec = job.spec
    if spec.map_shrink != "auto":
        return None
    reason = _no_shrink_choice(spec, stack.streamed, is_built())
    if reason:
        job.spec = spec.model_copy(update={"map_shrink": 0.0})
        job.notes.append(f"map shrink auto is 0: {reason}")
        return None
    general = choice_windows(tokenizer, spec)
    choose, _ = selection_rule(spec, analysis, n_layers)
    indices = choose(spec.layers)
    key, maps, notes = tuple(indices), job.fitted_maps.get(tuple(indices)), len(job.notes)
    measured = {}
    try:
        for amount in SHRINK_GRID:
            if maps is not None:  # each trial takes the maps (linearize.pipeline.replace)
                job.fitted_maps[key] = maps
            trial = pipeline.trial_stack(stack)
            job.spec = spec.model_copy(update={"map_shrink": amount})
            pipeline.replace(job, trial, windows, indices, remember=True)
            maps = maps if maps is not None else job.fitted_maps[key]  # the first trial's fit
            ppl, _ = pipeline.perplexities(job, trial, {"general": general}, "select")
            measured[amount] = ppl["general"]
            del trial
    finally:
        job.fitted_maps[key] = maps  # the job's own replacement takes them too
        del job.notes[notes:]  # the trials' own notes
    picked = min(SHRINK_GRID, key=lambda amount: (measured[amount], amount))
    job.spec = spec.model_copy(update={"map_shrink": picked})
    tried = ", ".join(f"{amount:g}: {ppl:.3f}" for amount, ppl in measured.items())
    why = f"perplexity on {general.numel()} tokens of general text, unhealed, by amount: {tried}"
    job.notes.append(f"map shrink auto picked {picked:g}: {why}")
    return {
        "picked": picked,
        "why": why,
        "trials": {f"{a:g}": p for a, p in measured.items()},
        "tokens": general.numel(),
    }


def _no_shrink_choice(spec, streamed: bool, mixture_built: bool) -> str | None:
    if spec.method == "remove":
        return "the method is remove, which fits no map"
    if spec.layers is None or spec.layers == "max":
        return "only a fixed --layers K chooses it (a search or a target would choose per trial)"
    if streamed:
        return "the job streams"
    if not mixture_built:
        return "the general text mixture is not built"
    return None
