"""The one entry point: the CLI and the Celery worker both call `run(spec, ...)`.

Work in progress: the stages are filled in by the engine modules.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from api_schemas import ProgressEvent, Report

ProgressSink = Callable[[ProgressEvent], None]


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
    raise NotImplementedError
