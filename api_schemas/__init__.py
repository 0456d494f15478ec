"""The contract shared by the CLI, the engine, the service and the workers: pydantic models only."""

from api_schemas.events import ProgressEvent
from api_schemas.report import REPORT_SCHEMA_VERSION, Report
from api_schemas.specs import (
    MAX_LAYER_FRACTION_NOTE,
    AnalyzeSpec,
    CompareSpec,
    CompressSpec,
    DataSpec,
    EvalSpec,
    JobSpec,
)

__all__ = [
    "MAX_LAYER_FRACTION_NOTE",
    "REPORT_SCHEMA_VERSION",
    "AnalyzeSpec",
    "CompareSpec",
    "CompressSpec",
    "DataSpec",
    "EvalSpec",
    "JobSpec",
    "ProgressEvent",
    "Report",
]
