"""`--method auto`: fit or remove, decided by measurement on text unlike the calibration text.

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
        trial_spec = spec.model_copy(update={"method": method})
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
