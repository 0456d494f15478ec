"""Downstream tasks through lm-evaluation-harness (the optional `tasks` extra: `lm-eval`).

`check_tasks` runs before any compression: every task name must be known to lm-eval's
TaskManager (its built-in tasks plus the YAMLs under `task_dir`). `run_tasks` evaluates an
in-memory model with `lm_eval.simple_evaluate` through `HFLM(pretrained=<model>, tokenizer=...,
batch_size=..., max_length=...)`, zero-shot, `log_samples=False`, with the tokenizer's own BOS
setting for both the original and the compressed model. Hub datasets are read offline
(HF_DATASETS_OFFLINE=1 unless the caller set it): a task whose dataset is not in the local
datasets cache fails with a clear error, and since the original model runs first, that happens
before the compression starts.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from linearize.errors import InputError

log = logging.getLogger(__name__)

METRICS = ("acc", "acc_norm")
BATCH_SIZE = 8


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise InputError(
            "--tasks needs lm-evaluation-harness: pip install 'linearize[tasks]' "
            f"(import failed: {exc})"
        ) from None
    return lm_eval, HFLM, TaskManager


def check_tasks(tasks: list[str], task_dir: str | None):
    """Refuse unknown task names now, before any model work; returns lm-eval's TaskManager with
    `task_dir`'s YAMLs registered. Indexing lm-eval's thousands of built-in task YAMLs takes tens
    of seconds on a small CPU, so it is skipped when `task_dir` defines every requested task."""
    _, _, TaskManager = _import_lm_eval()
    if task_dir is not None and not Path(task_dir).is_dir():
        raise InputError(f"--task-dir {task_dir}: no such directory")
    with _quiet_lm_eval():
        manager = None
        if task_dir is not None:
            manager = TaskManager(include_path=task_dir, include_defaults=False)
        if manager is None or any(t not in set(manager.all_tasks) for t in tasks):
            manager = TaskManager(include_path=task_dir)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        where = f" or in --task-dir {task_dir}" if task_dir else " (no --task-dir given)"
        raise InputError(f"unknown lm-eval task(s) {unknown}: not among lm-eval's tasks{where}")
    return manager


@contextmanager
def _offline_datasets():
    previous = os.environ.get("HF_DATASETS_OFFLINE")
    if previous is None:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)


@contextmanager
def _quiet_lm_eval():
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def run_tasks(model, tokenizer, tasks: list[str], manager, *, max_length: int) -> dict:
    """{task: {"acc": .., "acc_stderr": .., "acc_norm": .., "acc_norm_stderr": .., "samples": n}}."""
    lm_eval, HFLM, _ = _import_lm_eval()
    device = str(next(model.parameters()).device)
    with _offline_datasets(), _quiet_lm_eval():
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=BATCH_SIZE,
            max_length=max_length,
            device=device,
            # Explicit, so the original and the compressed run cannot differ: the tokenizer's own.
            add_bos_token=bool(getattr(tokenizer, "add_bos_token", False)),
        )
        try:
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                num_fewshot=0,
                log_samples=False,
                bootstrap_iters=1000,
            )
        except Exception as exc:  # noqa: BLE001 - a task's dataset or config is the user's input
            raise InputError(f"lm-eval could not run {tasks}: {type(exc).__name__}: {exc}") from exc
    return {task: _task_metrics(output, task) for task in tasks}


def _task_metrics(output: dict, task: str) -> dict:
    row = output["results"].get(task)
    if row is None:
        raise InputError(f"lm-eval returned no result for task {task!r}")
    metrics: dict[str, float | int | None] = {}
    for name in METRICS:
        value = row.get(f"{name},none")
        stderr = row.get(f"{name}_stderr,none")
        metrics[name] = None if value is None else float(value)
        metrics[f"{name}_stderr"] = stderr if isinstance(stderr, float) else None
    if metrics["acc"] is None:
        raise InputError(f"task {task!r} reports no accuracy (acc); only acc tasks are supported")
    samples = (output.get("n-samples") or {}).get(task) or {}
    metrics["samples"] = samples.get("effective")
    return metrics


def retained_pct(original: dict, compressed: dict, metric: str = "acc") -> float | None:
    """compressed / original accuracy in percent (None when the original scored 0)."""
    base = original.get(metric)
    value = compressed.get(metric)
    if base is None or value is None or base == 0:
        return None
    return 100 * value / base
