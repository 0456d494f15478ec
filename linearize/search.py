"""`--layers max`: the largest budget k whose healed model passes every searched gate.

Full healing is the expensive step (minutes per k on a small CPU model), so the search spends it
only near the boundary:

1. bracket: cheap unhealed probes at k = 1, 2, ... until PROBE_PATIENCE probes in a row fail.
   Healing only repairs, so a k whose unhealed probe passes is expected to pass healed too; the
   largest such k is the bracket's lower end. Scanning on past the first failure checks, on
   the measured points, that the probes fail for good rather than assuming it.
2. confirm: fully healed trials from the first k above the bracket, upwards while they pass.
   When the first one fails, the bracket's lower end itself is confirmed healed (the checkpoint
   is always a healed model), and downwards while that fails.

Every trial shares the job's one baseline and analysis pass, its fitted maps (one fit pass fits
FIT_BATCH budgets) and the original's reference logits on the validation slice, which is where
trials are measured (the evaluation windows choose nothing); the chosen k's checkpoint is
then saved, reloaded and measured on the evaluation windows like any other. The bracket and
confirm logic is `search_largest_passing`, which takes the two measures as functions, so that it
is tested on planted quality curves.

`select` is the older search of `--target-ppl-increase` (unhealed trials, perplexity only) and
the plain budgets `--layers K` and `--indices`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from linearize.errors import InputError

log = logging.getLogger(__name__)

PROBE_PATIENCE = 2  # unhealed failures in a row that end the bracket
# Budgets whose maps one fit pass collects: a fit pass runs the original model through the
# chosen layers whatever their number, so the bracket's usual reach (up to 2 past the answer)
# costs one pass instead of one per probe. A span's statistics are a few d x d matrices.
FIT_BATCH = 4
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class SearchBudget:
    """What bounds the search: a number of trials, or wall seconds checked before each trial."""

    trials: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> SearchBudget:
        """None -> unbounded; "8" -> 8 trials; "90s", "20m", "1.5h" -> seconds."""
        if text is None:
            return cls()
        if text[-1] in UNITS:
            return cls(seconds=float(text[:-1]) * UNITS[text[-1]])
        return cls(trials=int(text))  # >= 1: the spec's pattern

    def exhausted(self, trials: int, elapsed: float) -> str | None:
        """Why no further trial may start, or None."""
        if self.trials is not None and trials >= self.trials:
            return f"trial budget ({self.trials} trials)"
        if self.seconds is not None and elapsed >= self.seconds:
            return f"time budget ({self.seconds:g} s)"
        return None


@dataclass
class Step:
    k: int
    healed: bool
    passed: bool


@dataclass
class Outcome:
    chosen: int | None  # the largest k whose healed trial passed; None: none did
    lower: int  # the bracket: the largest k whose unhealed probe passed (0: none)
    steps: list[Step] = field(default_factory=list)
    stopped_by: str | None = None  # the budget that ended the search early, if one did
    violations: list[str] = field(default_factory=list)  # where the curve is not monotone

    @property
    def trials(self) -> int:
        return len(self.steps)


Measure = Callable[[int], bool]  # k -> whether the trial passed every searched gate


class _Run:
    """The steps taken and the budget they spend."""

    def __init__(self, budget: SearchBudget, clock: Callable[[], float]):
        self.budget, self.clock, self.start = budget, clock, clock()
        self.steps: list[Step] = []
        self.stopped_by: str | None = None

    def can_run(self, reserve: int = 0) -> bool:
        """Whether a trial may start, keeping `reserve` trials of a trial budget for later."""
        reason = self.budget.exhausted(len(self.steps) + reserve, self.clock() - self.start)
        if reason:
            self.stopped_by = reason
        return reason is None

    def measure(self, measure: Measure, k: int, healed: bool) -> bool:
        passed = bool(measure(k))
        self.steps.append(Step(k, healed, passed))
        return passed


def search_largest_passing(
    max_k: int,
    probe: Measure,
    confirm: Measure | None,
    budget: SearchBudget = SearchBudget(),
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Outcome:
    """The bracket-then-confirm search (module docstring) over k = 1..max_k.

    `confirm` None: the probes are final (no healing), the bracket's lower end is the answer.
    The checkpoint must be a measured, healed model: the bracket leaves the last trial of a
    trial budget to a healed one, and a time budget that runs out before any healed trial still
    allows one, at the bracket's lower end (or k = 1)."""
    run = _Run(budget, clock)
    lower = _bracket(run, max_k, probe, reserve=0 if confirm is None else 1)
    if confirm is None:
        return _outcome(run, lower if lower else None, lower)
    chosen = _confirm_upwards(run, max_k, lower, confirm)
    if chosen is None:
        chosen = _confirm_downwards(run, lower, confirm)
    if not any(s.healed for s in run.steps):
        run.measure(confirm, max(lower, 1), healed=True)  # over budget: see the docstring
        chosen = max(lower, 1) if run.steps[-1].passed else None
    return _outcome(run, chosen, lower)


def _bracket(run: _Run, max_k: int, probe: Measure, reserve: int) -> int:
    lower, misses, k = 0, 0, 1
    while k <= max_k and misses < PROBE_PATIENCE and run.can_run(reserve):
        if run.measure(probe, k, healed=False):
            lower, misses = k, 0
        else:
            misses += 1
        k += 1
    return lower


def _confirm_upwards(run: _Run, max_k: int, lower: int, confirm: Measure) -> int | None:
    chosen, k = None, lower + 1
    while k <= max_k and run.can_run() and run.measure(confirm, k, healed=True):
        chosen, k = k, k + 1
    return chosen


def _confirm_downwards(run: _Run, lower: int, confirm: Measure) -> int | None:
    for k in range(lower, 0, -1):
        if not run.can_run():
            return None
        if run.measure(confirm, k, healed=True):
            return k
    return None


def _outcome(run: _Run, chosen: int | None, lower: int) -> Outcome:
    return Outcome(chosen, lower, run.steps, run.stopped_by, monotonicity_violations(run.steps))


def monotonicity_violations(steps: list[Step]) -> list[str]:
    """Where the measured points contradict "quality falls with k, and healing only helps":
    a pass above a failure of the same kind of trial, or a healed failure at a k whose unhealed
    probe passed."""
    found = []
    for healed in (False, True):
        kind = "healed trial" if healed else "unhealed probe"
        points = sorted((s.k, s.passed) for s in steps if s.healed == healed)
        failed = [k for k, passed in points if not passed]
        for k, passed in points:
            below = [f for f in failed if f < k]
            if passed and below:
                found.append(f"{kind}: k = {k} passed although k = {below[-1]} failed")
    probed = {s.k: s.passed for s in steps if not s.healed}
    for s in steps:
        if s.healed and not s.passed and probed.get(s.k):
            found.append(f"k = {s.k} failed healed although its unhealed probe passed")
    return found


# --- the search as a compress stage --------------------------------------------------------------


@dataclass
class Found:
    """The search's result for the compress pipeline: the checkpoint's model and the curve."""

    stack: object  # the LayerStack of the trial that becomes the checkpoint
    indices: list[int]
    selection: dict
    validation: float  # the trial's validation perplexity (the reload check compares with it)
    curve: list  # api_schemas.report.CurvePoint, in the order measured
    method: str  # the report's method name (linearize.pipeline.method_name)


def search_max(job, stack, windows, analysis, baseline_val: float, n_layers: int) -> Found:
    """Run the search on trial copies of `stack` and return the trial to publish: the largest
    passing k's healed trial, else the smallest k's (its gates then fail on the checkpoint)."""
    from linearize.pipeline import healing_budget, method_name
    from linearize.selection import max_budget

    spec = job.spec
    reference = validation_reference(job, stack, windows)
    trials = Trials(job, stack, windows, analysis, n_layers, baseline_val, reference)
    healing = healing_budget(spec) is not None and not spec.dry_run
    with job.timed("search"):
        outcome = search_largest_passing(
            max_budget(n_layers),
            trials.unhealed,
            trials.healed if healing else None,
            SearchBudget.parse(spec.search_budget),
        )
        k = outcome.chosen or min(p.k for p in trials.points if p.healed == healing)
        if outcome.chosen and healing and spec.method == "auto" and spec.format == "standard":
            trials = better_method(trials, k)
    if outcome.chosen is None:
        job.notes.append(
            f"no k passed the gates on the validation slice ({len(outcome.steps)} trials); "
            f"the checkpoint is k = {k}'s, the least changed model tried"
        )
    if outcome.stopped_by:
        job.notes.append(f"the search was stopped by its {outcome.stopped_by}")
    point, chosen_stack = trials.take(k, healing)
    selection = search_record(spec, trials, outcome)
    if point.k in trials.healing:
        selection["healing"] = trials.healing[point.k]
    return Found(
        chosen_stack,
        list(point.layers),
        selection,
        point.perplexity,
        trials.points,
        method_name(trials.job.spec),
    )


def search_record(spec, trials: Trials, outcome: Outcome) -> dict:
    """The report's `selection` of a search: the ranking, the rule, and how the search went."""
    from linearize.pipeline import removes

    return {
        **trials.info,
        "mode": "max",
        "search": (
            "unhealed probes bracket the largest passing k, fully healed trials confirm it "
            "(linearize.search); every trial is "
            + ("removed" if removes(spec) else "fitted")
            + " and measured on the validation slice against the gates "
            + ", ".join(spec.searched_gates())
        ),
        "gates": {name: getattr(spec, name) for name in spec.searched_gates()},
        "dry_run": spec.dry_run,
        "chosen_k": outcome.chosen,
        "bracket_k": outcome.lower,
        "trials": len(trials.points),
        "healed_trials": sum(p.healed for p in trials.points),
        "stopped_by": outcome.stopped_by,
        "monotone": not outcome.violations,
        "violations": outcome.violations,
    }


def complete_curve(report) -> None:
    """The checkpoint's task results on its curve point (tasks run on the checkpoint only)."""
    for point in report.curve:
        if point.chosen:
            point.tasks_retained_pct = {
                t.task: t.retained_pct for t in report.tasks if t.retained_pct is not None
            }


def better_method(fitted: Trials, k: int) -> Trials:
    """method auto: at the chosen k, a healed removal beside the healed fit; the trials of the
    better one (both pass the gates: the lower validation perplexity wins)."""
    import copy

    job = copy.copy(fitted.job)  # the same timings, notes, progress and memory planner
    job.spec = fitted.job.spec.model_copy(update={"method": "remove"})
    removal = Trials(
        job,
        fitted.stack,
        fitted.windows,
        fitted.analysis,
        fitted.n_layers,
        fitted.baseline_val,
        fitted.reference,
        points=fitted.points,
    )
    removal.healed(k)
    fit, removed = (next(p for p in t.points if p.k == k and p.healed) for t in (fitted, removal))
    removal_wins = removed.passed and removed.perplexity < fit.perplexity
    fitted.job.notes.append(
        f"method auto at k = {k}: the healed removal's validation perplexity "
        f"{removed.perplexity:.3f} against the fit's {fit.perplexity:.3f}; "
        f"kept the {'removal' if removal_wins else 'fit'}"
    )
    return removal if removal_wins else fitted


class Trials:
    """The two measures of the search on copies of the analysed model; every trial shares the
    job's baseline, analysis and the original's reference logits on the validation slice."""

    def __init__(
        self, job, stack, windows, analysis, n_layers, baseline_val, reference, points=None
    ):
        from linearize.evaluation import count_parameters
        from linearize.selection import selection_rule

        self.job, self.stack, self.windows = job, stack, windows
        self.analysis, self.n_layers = analysis, n_layers
        self.choose, self.info = selection_rule(job.spec, analysis, n_layers)
        self.baseline_val, self.reference = baseline_val, reference
        self.params_before = count_parameters(stack.model)
        self.neighbours: int | None = None
        self.points: list = [] if points is None else points  # shared by both methods' trials
        self.healing: dict[int, dict] = {}  # k -> the healing record of its healed trial
        self._stacks: dict[tuple[int, bool], object] = {}
        self._maps: dict[int, dict] = {}  # k -> the fitted maps of choose(k), shared by trials

    @property
    def max_k(self) -> int:
        from linearize.selection import max_budget

        return max_budget(self.n_layers)

    @property
    def method(self) -> str:
        from linearize.pipeline import removes

        return "remove" if removes(self.job.spec) else "fit"

    def unhealed(self, k: int) -> bool:
        return self._trial(k, healed=False)

    def healed(self, k: int) -> bool:
        return self._trial(k, healed=True)

    def take(self, k: int, healed: bool):
        """(CurvePoint, LayerStack) of the trial to publish, marked chosen in the curve."""
        point = next(
            p
            for p in self.points
            if (p.k, p.healed, p.method) == (k, healed, self.method)
            and (p.k, healed) in self._stacks
        )
        point.chosen = True
        return point, self._stacks.pop((k, healed))

    def _trial(self, k: int, healed: bool) -> bool:
        from linearize.pipeline import replace, trial_stack

        start = time.perf_counter()
        indices = self.choose(k)
        self._hand_over_maps(k, indices)
        trial = trial_stack(self.stack)
        if healed:
            self.healing[k] = self._replace_and_heal(trial, indices)
        else:
            replace(self.job, trial, self.windows, indices)
        point = self._measure(trial, k, indices, healed, time.perf_counter() - start)
        self.points.append(point)
        self._keep(point, trial)
        self.job.progress.note(
            "search",
            f"k = {k} {'healed' if healed else 'unhealed'}: {point.ppl_increase_pct:+.1f}% "
            f"validation perplexity, {'passed' if point.passed else 'failed'}",
        )
        return point.passed

    def _hand_over_maps(self, k: int, indices: list[int]) -> None:
        """Leave choose(k)'s fitted maps where the trial's replacement takes them
        (job.fitted_maps), fitting them with the next budgets' in one pass when not known yet:
        every trial fits the same unchanged model, so an unhealed probe and a healed trial of
        one k, and the probes of neighbouring k, share their statistics."""
        if self.method == "remove":
            return  # a removal fits nothing
        if k not in self._maps:
            self._fit_batch(k)
        self.job.fitted_maps[tuple(indices)] = self._maps[k]

    def _fit_batch(self, k: int) -> None:
        from linearize.fitting import fit_pass, fit_spans
        from linearize.selection import contiguous_spans

        job, stack = self.job, self.stack
        wanted = [b for b in range(k, min(k + FIT_BATCH, self.max_k + 1)) if b not in self._maps]
        spans = {b: contiguous_spans(self.choose(b)) for b in wanted}
        union = sorted({span for b in wanted for span in spans[b]})
        sets = {"fit": self.windows.fit}
        fmt = job.spec.format
        with job.timed("fit"), job.pass_stage("fit", stack, sets, f"k = {wanted}") as st:
            stats, _, _ = fit_pass(
                stack, job.planner(stack), union, fmt, self.windows.fit, stage=st
            )
            maps = fit_spans(stack.model, stats, fmt=fmt)
        for b in wanted:
            self._maps[b] = {span: maps[span] for span in spans[b]}
        for old in sorted(self._maps, key=lambda b: abs(b - k))[2 * FIT_BATCH :]:
            del self._maps[old]  # bounded: the bracket and its confirmations stay near k

    def _replace_and_heal(self, trial, indices: list[int]) -> dict:
        from linearize.pipeline import (
            heal,
            healed_layers_that_fit,
            healing_budget,
            replace_with_teacher,
        )

        job = self.job
        if self.neighbours is None:
            self.neighbours = healed_layers_that_fit(job, trial)
        carriers, teacher, last = replace_with_teacher(
            job, trial, self.windows, indices, self.neighbours
        )
        _, info = heal(
            job,
            trial,
            self.windows,
            teacher,
            carriers,
            last,
            healing_budget(job.spec),
            self.neighbours,
            eval_before=False,
        )
        return info

    def _measure(self, trial, k: int, indices: list[int], healed: bool, seconds: float):
        from api_schemas.report import CurvePoint
        from linearize.agreement import AgreementMeter
        from linearize.evaluation import count_parameters
        from linearize.gates import trial_rules
        from linearize.pipeline import perplexities

        job, windows = self.job, self.windows
        meter = AgreementMeter(self.reference)
        observer = head_positions(meter.update, windows, "validation")
        start = time.perf_counter()
        ppl, _ = perplexities(job, trial, {"validation": windows.validation}, "search", [observer])
        agreement = meter.result()
        increase = 100 * (ppl["validation"] / self.baseline_val - 1)
        rules = trial_rules(
            job.spec,
            ppl_increase_pct=increase,
            kl=agreement.kl,
            top1_agreement_pct=100 * agreement.top1_agreement,
        )
        params = count_parameters(trial.model)
        return CurvePoint(
            k=k,
            layers=sorted(indices),
            method=self.method,
            healed=healed,
            params=params,
            params_removed=self.params_before - params,
            perplexity=ppl["validation"],
            ppl_increase_pct=increase,
            kl=agreement.kl,
            top1_agreement_pct=100 * agreement.top1_agreement,
            passed=all(r.passed for r in rules),
            seconds=round(seconds + time.perf_counter() - start, 3),
        )

    def _keep(self, point, trial) -> None:
        """Keep the stacks that may be published: of each kind (healed or not), the largest
        passing k and the smallest k; the other copies are freed."""
        key = (point.k, point.healed)
        self._stacks[key] = trial
        same = [p for p in self.points if (p.healed, p.method) == (point.healed, self.method)]
        wanted = {min(p.k for p in same)}
        passing = [p.k for p in same if p.passed]
        if passing:
            wanted.add(max(passing))
        for k, healed in list(self._stacks):
            if healed == point.healed and k not in wanted:
                del self._stacks[(k, healed)]


def validation_reference(job, stack, windows):
    """The original's top-k logits on the validation slice: one pass, for every trial's KL and
    agreement."""
    from linearize.agreement import Reference
    from linearize.pipeline import perplexities

    reference = Reference()
    observer = head_positions(reference.update, windows, "validation")
    perplexities(job, stack, {"validation": windows.validation}, "search_reference", [observer])
    return reference


def head_positions(hook, windows, name: str):
    """A head observer handing `hook` the predicting positions of window set `name` (tokens
    1..S-1 of each window, in order): the chunks linearize.agreement expects."""
    last = windows.seq_len - 1  # the last position of a window predicts nothing

    def observe(set_name, window, start, logits):
        if set_name == name and start < last:
            hook(logits[: last - start])

    return observe


# --- a fixed budget or --target-ppl-increase (no healing in the trials) ------------------------


def select(job, stack, windows, analysis, baseline_val: float, n_layers: int):
    from linearize.pipeline import perplexities, removes, replace, trial_stack
    from linearize.selection import (
        check_indices,
        max_budget,
        search_largest_budget,
        selection_rule,
    )

    spec = job.spec
    choose, info = selection_rule(spec, analysis, n_layers)
    if spec.indices is not None:
        return check_indices(spec.indices, n_layers), {**info, "mode": "indices"}
    if spec.layers is not None:
        return choose(spec.layers), {**info, "mode": "layers"}

    def increase_for(indices: list[int]) -> float:
        trial = trial_stack(stack)
        replace(job, trial, windows, indices)
        ppl, _ = perplexities(job, trial, {"validation": windows.validation}, "select")
        return 100 * (ppl["validation"] / baseline_val - 1)

    with job.timed("select"):
        choices = [choose(k) for k in range(1, max_budget(n_layers) + 1)]
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
            "binary search on k, each k's choice by the rule above; each trial is "
            f"{'removed' if removes(spec) else 'fitted'} without healing and measured on the "
            "validation slice"
        ),
        "trace": trace,
    }
