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
    "heal_mix",
    "fit_mix",
    "map_shrink",
    "heal_loss",
    "heal_text",
    "gate_kl",
    "gate_agreement",
    "search_budget",
    "task_dir",
    "generation_prompts",
)


def add_compress_options(p: argparse.ArgumentParser, *, budget_required: bool) -> None:
    budget = p.add_mutually_exclusive_group(required=budget_required)
    budget.add_argument(
        "--layers",
        type=layers_value,
        metavar="K|max",
        help="number of layers to replace (the best window of adjacent ones); max: the largest "
        "number whose healed model passes every --gate-* rule (a search)",
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
        "unlike the calibration text); default auto: both tried unhealed, the one with the "
        "lower perplexity on held-out general text kept (the fit when the job streams or the "
        "mixture is not built)",
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
        "--heal-mix",
        type=float,
        metavar="SHARE",
        help="share of the healing windows drawn from the general text mixture (replay), in "
        "[0, 1]; 0 turns it off; default 0.5 when the mixture is built",
    )
    p.add_argument(
        "--fit-mix",
        type=float,
        metavar="SHARE",
        help="share of the fit windows (the analysis's and the map's statistics) drawn from the "
        "general text mixture, in [0, 1]; default 0, the calibration text alone",
    )
    p.add_argument(
        "--map-shrink",
        type=shrink_value,
        metavar="S|auto",
        help="shrink each fitted map toward the identity by S in [0, 1] (1: plain removal of "
        "the fit's layers); auto: the amount whose unhealed model does best on held-out general "
        "text; default 0, the least-squares map",
    )
    p.add_argument(
        "--heal-text",
        metavar="calibration|generated[:N]",
        help="healing text: the calibration text, or N tokens sampled from the original model "
        "(KV cache, batched); default generated on a GPU, calibration on a CPU",
    )
    p.add_argument(
        "--heal-loss",
        choices=["mse", "kl"],
        help="distillation loss: mse (centred logits, the default) or kl (on the teacher's "
        "top-256 logits)",
    )
    p.add_argument(
        "--eval-data",
        action="append",
        metavar="NAME=FILE",
        help="another text measured before and after, side by side in the report; repeatable; "
        "default: the general mixture's held-out part, as 'general'",
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
        action="append",
        metavar="[NAME=]P",
        help="exit 1 if the perplexity increase exceeds P %%; NAME=P: on the --eval-data text "
        "NAME (or 'general'); repeatable",
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
        "--search-budget",
        metavar="N|TIME",
        help="--layers max: stop the search after N trials or a time (90s, 20m, 1h); "
        "default: no bound",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="--layers max: the analysis and the curve predicted from unhealed probes; no "
        "healing, no checkpoint (report.md, report.json and plots in --output)",
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
    if args.eval_data:
        fields["eval_data"] = parse_named_texts(args.eval_data)
    if args.gate_ppl_increase:
        overall, per_text = parse_ppl_gates(args.gate_ppl_increase)
        if overall is not None:
            fields["gate_ppl_increase"] = overall
        if per_text:
            fields["gate_text_ppl_increase"] = per_text
    if args.no_cache:
        fields["use_cache"] = False
    if args.dry_run:
        fields["dry_run"] = True
    return fields


def shrink_value(text: str) -> float | str:
    """--map-shrink: an amount, or auto (chosen on general text)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number in [0, 1] or auto, got {text!r}"
        ) from None


def layers_value(text: str) -> int | str:
    """--layers: a count, or max (the search)."""
    if text == "max":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of layers or max, got {text!r}"
        ) from None


def given_compress_options(args: argparse.Namespace) -> list[str]:
    """The compress-only options that were given (for commands that run another kind)."""
    names = [*PLAIN_FIELDS, "indices", "tasks", "gate_task_retained", "eval_data"]
    names.append("gate_ppl_increase")
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n)]
    flags = [f for f, on in (("--no-cache", args.no_cache), ("--dry-run", args.dry_run)) if on]
    return given + flags


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


def parse_named_texts(values: list[str]) -> dict[str, str]:
    """["code=src.txt", "chat=chat.jsonl"] -> {"code": "src.txt", "chat": "chat.jsonl"}."""
    texts: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--eval-data wants NAME=FILE, got {value!r}")
        if name.strip() in texts:
            raise ValueError(f"--eval-data names {name.strip()!r} twice")
        texts[name.strip()] = path.strip()
    return texts


def parse_ppl_gates(values: list[str]) -> tuple[float | None, dict[str, float]]:
    """["20", "code=30"] -> (20.0, {"code": 30.0}): P alone gates the evaluation windows."""
    overall, per_text = None, {}
    for value in values:
        name, sep, limit = value.rpartition("=")
        try:
            number = float(limit)
        except ValueError:
            raise ValueError(
                f"--gate-ppl-increase wants P or NAME=P (P in %), got {value!r}"
            ) from None
        if sep:
            per_text[name.strip()] = number
        else:
            overall = number
    return overall, per_text


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None
