"""Quality gates: each rule compares one measured number with its limit; any failed rule fails
the job (exit 1) after the checkpoint and the report are written."""

from __future__ import annotations

from api_schemas.report import Gate, GateRule, Report
from api_schemas.specs import ALL_TASKS
from linearize.errors import InputError


def evaluate_gates(spec, report: Report) -> Gate | None:
    rules = [
        *_perplexity_rule(spec, report),
        *_text_rules(spec, report),
        *_agreement_rules(spec, report),
        *_task_rules(spec, report),
    ]
    if not rules:
        return None
    return Gate(passed=all(r.passed for r in rules), rules=rules)


def trial_rules(
    spec, *, ppl_increase_pct: float, kl: float, top1_agreement_pct: float
) -> list[GateRule]:
    """The perplexity, KL and agreement rules on one trial of the layers=max search (measured on
    the validation slice; linearize.search), named like the checkpoint's rules."""
    rules = []
    if spec.gate_ppl_increase is not None:
        rules.append(_rule("ppl_increase_pct", ppl_increase_pct, spec.gate_ppl_increase, "<="))
    if spec.gate_kl is not None:
        rules.append(_rule("kl", kl, spec.gate_kl, "<="))
    if spec.gate_agreement is not None:
        rules.append(_rule("top1_agreement_pct", top1_agreement_pct, spec.gate_agreement, ">="))
    return rules


def _rule(name: str, value: float, limit: float, comparison: str) -> GateRule:
    passed = value <= limit if comparison == "<=" else value >= limit
    return GateRule(name=name, value=value, limit=limit, passed=passed, comparison=comparison)


def _perplexity_rule(spec, report: Report) -> list[GateRule]:
    if spec.gate_ppl_increase is None:
        return []
    return [_rule("ppl_increase_pct", report.perplexity.increase_pct, spec.gate_ppl_increase, "<=")]


def _text_rules(spec, report: Report) -> list[GateRule]:
    limits = getattr(spec, "gate_text_ppl_increase", {})
    measured = {t.name: t for t in report.eval_texts}
    rules = []
    for name, limit in limits.items():
        if name not in measured or measured[name].increase_pct is None:
            raise InputError(f"the gate on text {name!r} names a text that was not measured")
        rules.append(_rule(f"ppl_increase_pct:{name}", measured[name].increase_pct, limit, "<="))
    return rules


def _agreement_rules(spec, report: Report) -> list[GateRule]:
    rules = []
    wanted = spec.gate_kl is not None or spec.gate_agreement is not None
    if wanted and report.agreement is None:
        raise InputError("a KL or agreement gate needs the agreement measure, which did not run")
    if spec.gate_kl is not None:
        rules.append(_rule("kl", report.agreement.kl, spec.gate_kl, "<="))
    if spec.gate_agreement is not None:
        value = 100 * report.agreement.top1_agreement
        rules.append(_rule("top1_agreement_pct", value, spec.gate_agreement, ">="))
    return rules


def _task_rules(spec, report: Report) -> list[GateRule]:
    results = {t.task: t for t in report.tasks}
    limits = spec.gate_task_retained
    rules = []
    for task in results if ALL_TASKS in limits else []:
        if task not in limits:
            rules.append(_task_rule(results[task], limits[ALL_TASKS]))
    for task, limit in limits.items():
        if task == ALL_TASKS:
            continue
        if task not in results:
            raise InputError(f"the gate on task {task!r} names a task that did not run")
        rules.append(_task_rule(results[task], limit))
    return rules


def _task_rule(result, limit: float) -> GateRule:
    # An original accuracy of 0 leaves nothing to retain: the rule passes only at limit 0.
    value = result.retained_pct if result.retained_pct is not None else 0.0
    return _rule(f"task_retained_pct:{result.task}", value, limit, ">=")
