"""The analysis stage: one streaming pass over the fit windows, then one over the validation slice.

Pass 1 (fit windows) accumulates PairStats per layer and a bounded random reservoir of layer
inputs (for TwoNN). From the statistics come the paper scores, anisotropy and a fitted affine
map per layer. Pass 2 (validation windows) needs those maps first: it measures each map's
held-out error and the per-token residuals that show which tokens carry the nonlinearity.
Neither pass stores activations beyond the fixed-size reservoir and per-token residual scalars.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from linearize.architectures import decoder_layers
from linearize.capture import collect_layer_stats
from linearize.fitting import DEFAULT_RIDGE, fit_affine
from linearize.linearity import (
    intrinsic_dimension_twonn,
    summarize_pair,
    top_share,
    trigger_tokens,
    validation_residuals,
)

log = logging.getLogger(__name__)

DEFAULT_RESERVOIR = 2048

ANALYSIS_NOTES = (
    "score / score_without_residual / anisotropy: streamed statistics of the fit windows "
    "(pass 1, fp32 shifted batch Grams combined in fp64). intrinsic_dimension: TwoNN on a random "
    "reservoir of layer inputs from the same pass (10% largest ratios discarded). "
    "validation_error, top1pct_residual_share, trigger_tokens: a second pass over the validation "
    "slice with each layer's affine map fitted in pass 1 (held-out). Anisotropy is of the layer input."
)


@dataclass
class Analysis:
    """What later stages need. The per-layer statistics, maps and reservoir are dropped once the
    scores exist: they are O(L d^2) and would otherwise stay alive through fitting and healing."""

    layers: list[dict]  # one dict per layer: LayerLinearity fields
    residuals: torch.Tensor  # (L, validation tokens) per-token squared residual
    reservoir_size: int


def analyze(
    model,
    windows,
    tokenizer,
    progress,
    *,
    batch_size: int = 4,
    reservoir_size: int = DEFAULT_RESERVOIR,
    seed: int = 0,
) -> Analysis:
    layers = decoder_layers(model)
    with progress.stage("analyze", total=len(windows.fit), message="layer statistics") as stage:
        capture = collect_layer_stats(
            model,
            layers,
            windows.fit,
            batch_size=batch_size,
            reservoir_size=reservoir_size,
            seed=seed,
            on_batch=stage.advance,
        )
    maps = [fit_affine(s.centered(), ridge=DEFAULT_RIDGE, bias=True) for s in capture.stats]
    with progress.stage(
        "analyze", total=len(windows.validation), message="held-out residuals"
    ) as stage:
        residual, variance = validation_residuals(
            model, layers, windows.validation, maps, batch_size=batch_size, on_batch=stage.advance
        )
    reports = []
    for index, stats in enumerate(capture.stats):
        row = {"index": index, **summarize_pair(stats)}
        row["validation_error"] = float(residual[index].sum() / variance[index])
        row["top1pct_residual_share"] = top_share(residual[index])
        row["trigger_tokens"] = trigger_tokens(residual[index], windows.validation, tokenizer)
        if capture.reservoir is not None:
            row["intrinsic_dimension"] = intrinsic_dimension_twonn(capture.reservoir[index])
        reports.append(row)
    reservoir_size = 0 if capture.reservoir is None else len(capture.reservoir[0])
    return Analysis(reports, residual, reservoir_size)
