"""The facts every report states: model, data, versions, and how the job ran."""

from __future__ import annotations

import platform

from api_schemas.report import DataInfo, Execution, ModelInfo


def model_info(loaded) -> ModelInfo:
    from linearize.architectures import get_architecture, hidden_size, num_layers
    from linearize.evaluation import count_parameters, parameter_bytes

    model = loaded.model
    return ModelInfo(
        source=loaded.source,
        architecture=get_architecture(model).name,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        hidden_size=hidden_size(model),
        layers_before=num_layers(model),
        params_before=count_parameters(model),
        bytes_before=parameter_bytes(model),
        source_quantization=getattr(loaded, "source_quantization", None),
    )


def data_info(windows, model, reservoir_size) -> DataInfo:
    from linearize.architectures import hidden_size

    n_fit = windows.count("fit")
    return DataInfo(
        source=windows.source.name,
        sha256=windows.source.sha256,
        calib_tokens=n_fit + windows.count("validation"),
        eval_tokens=windows.count("eval"),
        validation_tokens=windows.count("validation"),
        seq_len=windows.seq_len,
        calib_windows=len(windows.fit) + len(windows.validation),
        validation_windows=len(windows.validation),
        eval_windows=0 if windows.eval is None else len(windows.eval),
        calib_sha256=windows.calib_sha256,
        eval_sha256=windows.eval_sha256 or "",
        disjoint=True,
        n_over_d=n_fit / hidden_size(model),
        reservoir_size=reservoir_size,
    )


def execution_info(job, stack) -> Execution:
    from linearize.memory import peak_bytes

    placement = job.placement
    spill = job.spill()
    return Execution(
        mode=placement.mode,
        reason=placement.reason,
        device=str(stack.device),
        memory_budget_bytes=placement.budget_bytes,
        weight_bytes=placement.weight_bytes,
        largest_layer_bytes=placement.largest_layer_bytes,
        peak_memory_bytes=peak_bytes(stack.device),
        spilled_caches=spill.spilled,
        planned_peak_bytes=placement.plan.total if placement.plan else None,
        memory_plan=dict(placement.plan.items) if placement.plan else {},
        start_memory_bytes=placement.start_memory,
        peak_rises=dict(job.peak_rises),
        peak_stage=job.peak_stage,
    )


def analysis_notes() -> str:
    from linearize.analysis import ANALYSIS_NOTES

    return ANALYSIS_NOTES


def versions() -> dict[str, str]:
    import torch
    import transformers

    from linearize import __version__

    return {
        "linearize": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
