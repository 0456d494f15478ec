"""The compress job's options, defined once for `linearize compress` and `linearize submit`.

Every option defaults to None here, so an option not given leaves the spec's own default
(api_schemas.specs), the same for a local run and a service job. No torch is imported.
"""

from __future__ import annotations

import argparse
from typing import Any

from api_schemas.specs import ALL_TASKS

# argparse dest -> CompressSpec field, for the options whose value passes through unchanged.
PLAIN_FIELDS = (
    "layers",
    "target_ppl_increase",
    "eval_tokens",
    "format",
    "method",
    "heal_steps",
    "heal_seconds",
    "heal_tokens",
    "gate_ppl_increase",
    "gate_kl",
    "gate_agreement",
    "task_dir",
    "generation_prompts",
)


def add_compress_options(p: argparse.ArgumentParser, *, budget_required: bool) -> None:
    budget = p.add_mutually_exclusive_group(required=budget_required)
    budget.add_argument(
        "--layers", type=int, help="number of layers to replace (the best window of adjacent ones)"
    )
    budget.add_argument("--indices", help="comma-separated original layer indices, e.g. 12,13,14")
    budget.add_argument(
        "--target-ppl-increase",
        type=float,
        metavar="P",
        help="as many layers as keep the validation increase <= P %%",
    )
    p.add_argument("--eval-tokens", type=int, help="evaluation tokens; default 16384")
    p.add_argument("--format", choices=["standard", "linear"], help="default standard")
    p.add_argument(
        "--method",
        choices=["auto", "fit", "remove"],
        help="fit: replace the best-fitting window of layers by its least-squares map; remove: "
        "drop the layers that change their input least, no map, and heal (better on text "
        "unlike the calibration text); default auto (= fit)",
    )
    p.add_argument(
        "--heal-steps",
        type=int,
        metavar="N",
        help="healing (distillation) steps cap; default 400, 0 disables healing",
    )
    p.add_argument(
        "--heal-seconds", type=float, metavar="S", help="healing time budget; default 60 s"
    )
    p.add_argument(
        "--heal-tokens",
        type=int,
        metavar="N",
        help="healing text: the first N tokens of the calibration half without the validation "
        "windows; default all of it, at most steps x seq-len tokens and what fits the memory "
        "budget",
    )
    p.add_argument(
        "--tasks",
        help="comma-separated lm-evaluation-harness tasks run on the original and the compressed "
        "model (needs the `tasks` extra)",
    )
    p.add_argument("--task-dir", help="a directory of local lm-eval task YAMLs")
    p.add_argument(
        "--generation-prompts",
        type=int,
        metavar="N",
        help="prompts of the greedy generation check; default 16, 0 turns it off",
    )
    p.add_argument(
        "--gate-ppl-increase",
        type=float,
        metavar="P",
        help="exit 1 if the perplexity increase exceeds P %%",
    )
    p.add_argument(
        "--gate-kl",
        type=float,
        metavar="X",
        help="exit 1 if the mean KL(original || compressed) exceeds X nats/token",
    )
    p.add_argument(
        "--gate-agreement",
        type=float,
        metavar="P",
        help="exit 1 if the top-1 agreement with the original is below P %%",
    )
    p.add_argument(
        "--gate-task-retained",
        action="append",
        metavar="[TASK:]P",
        help="exit 1 if a task keeps less than P %% of the original's accuracy; P alone: every "
        "task; repeatable",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="recompute the baseline, the analysis and a GGUF conversion instead of reusing the cache",
    )


MEMORY_FIELDS = ("memory_budget", "streaming", "host_budget")


def add_memory_options(p: argparse.ArgumentParser) -> None:
    """Where a job of any kind runs: resident or one decoder layer at a time (docs/METHOD.md, Big models)."""
    p.add_argument(
        "--memory-budget",
        metavar="SIZE",
        help="what the job may keep on the device, e.g. 24GB or 12GiB; "
        "default auto: what the device has free, minus a margin",
    )
    p.add_argument(
        "--streaming",
        choices=["auto", "on", "off"],
        help="run one decoder layer at a time from the shards; default auto: when the model "
        "does not fit the memory budget",
    )
    p.add_argument(
        "--host-budget",
        metavar="SIZE",
        help="host memory the activation caches may take before they spill to disk under "
        "the cache dir (0: always spill); default: no limit",
    )


def memory_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in MEMORY_FIELDS if getattr(args, name) is not None}


def compress_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The CompressSpec fields the options set (raises ValueError on a malformed value)."""
    fields = {name: getattr(args, name) for name in PLAIN_FIELDS if getattr(args, name) is not None}
    if args.indices is not None:
        fields["indices"] = _integers(args.indices, "--indices")
    if args.tasks is not None:
        fields["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.gate_task_retained:
        fields["gate_task_retained"] = parse_task_gates(args.gate_task_retained)
    if args.no_cache:
        fields["use_cache"] = False
    return fields


def given_compress_options(args: argparse.Namespace) -> list[str]:
    """The compress-only options that were given (for commands that run another kind)."""
    names = [*PLAIN_FIELDS, "indices", "tasks", "gate_task_retained"]
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n)]
    return given + (["--no-cache"] if args.no_cache else [])


def parse_task_gates(values: list[str]) -> dict[str, float]:
    """["90"] -> {"*": 90}; ["arc_easy:90,hellaswag:85"] -> {"arc_easy": 90, "hellaswag": 85}."""
    gates: dict[str, float] = {}
    for value in values:
        for item in value.split(","):
            task, sep, limit = item.strip().rpartition(":")
            try:
                gates[task if sep else ALL_TASKS] = float(limit)
            except ValueError:
                raise ValueError(
                    f"--gate-task-retained wants P or TASK:P (P in %), got {item!r}"
                ) from None
    return gates


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None
