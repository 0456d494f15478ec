"""The analysis stage: per-layer linearity from one layer-by-layer pass.

The pass carries the fit windows, the validation slice and (for compress) the evaluation
windows through the decoder layers (linearize.stack). At layer i:
- fit windows: the layer's PairStats (streamed sufficient statistics, fp64 combine) and a bounded
  random reservoir of its inputs (for TwoNN);
- when the fit windows are through, the statistics are reduced to the report's scalars and the
  layer's affine map; the Grams are then dropped, so only one layer's d x d statistics exist;
- validation windows: each token's squared residual under that map (held-out error, and which
  tokens carry the nonlinearity);
- evaluation windows: carried along, so the baseline perplexity costs no pass of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from linearize.architectures import hidden_size
from linearize.capture import PairStats, accumulation_dtype, reservoir_positions
from linearize.fitting import DEFAULT_RIDGE, fit_affine
from linearize.linearity import (
    GramSpectrum,
    intrinsic_dimension_twonn,
    summarize_pair,
    top_share,
    trigger_tokens,
)

log = logging.getLogger(__name__)

DEFAULT_RESERVOIR = 2048

ANALYSIS_NOTES = (
    "score / score_without_residual / anisotropy: streamed statistics of the fit windows "
    "(fp32 shifted batch Grams combined in fp64). intrinsic_dimension: TwoNN on a random "
    "reservoir of layer inputs from the same windows (10% largest ratios discarded). "
    "validation_error, top1pct_residual_share, trigger_tokens: the validation slice under each "
    "layer's affine map fitted on the fit windows (held-out). Anisotropy is of the layer input. "
    "The layers are measured one at a time in one layer-by-layer pass."
)


@dataclass
class Analysis:
    """What later stages need: the per-layer rows and the held-out per-token residuals."""

    layers: list[dict]  # one dict per layer: LayerLinearity fields
    residuals: torch.Tensor  # (L, validation tokens) per-token squared residual
    reservoir_size: int


class LayerAnalysis:
    """Visitor of a stack pass (linearize.stack.LayerStack.run) that measures every layer."""

    def __init__(self, stack, windows, tokenizer, *, reservoir_size: int, seed: int):
        self.windows, self.tokenizer = windows, tokenizer
        self.d = hidden_size(stack.model)
        self.acc = accumulation_dtype(stack.dtype, stack.device)
        fit = windows.fit
        self.seq_len = fit.shape[1]
        self.positions = (
            reservoir_positions(fit.numel(), reservoir_size, seed) if reservoir_size else None
        )
        self.reservoir_size = 0 if self.positions is None else len(self.positions)
        self.rows: list[dict] = []
        self.residuals: list[torch.Tensor] = []

    def layer_start(self, index, layer) -> None:
        self.stats = PairStats(self.d, self.d, accumulate_dtype=self.acc)
        self.kept = torch.empty(self.reservoir_size, self.d)
        self.filled = 0
        self.map = None
        self.val_rows: list[torch.Tensor] = []
        self.y_sum = torch.zeros(self.d, dtype=torch.float64)
        self.y_sq = 0.0

    def batch(self, index, name, rows, x, y) -> None:
        if name == "fit":
            self.stats.update(x, y)
            self._keep_reservoir_rows(rows, x)
        elif name == "validation":
            self._add_residuals(x, y)

    def _keep_reservoir_rows(self, rows: slice, x: torch.Tensor) -> None:
        if self.positions is None:
            return
        lo, hi = rows.start * self.seq_len, rows.stop * self.seq_len
        chosen = self.positions[(self.positions >= lo) & (self.positions < hi)] - lo
        picked = x.reshape(-1, self.d)[chosen.to(x.device)].float().cpu()
        self.kept[self.filled : self.filled + len(picked)] = picked
        self.filled += len(picked)

    def _add_residuals(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.reshape(-1, self.d).float()
        y = y.reshape(-1, self.d).float()
        weight, bias = (t.float().to(x.device) for t in (self.map.weight, self.map.bias))
        self.val_rows.append((y - (x @ weight + bias)).pow(2).sum(1).double().cpu())
        self.y_sum += y.double().sum(0).cpu()
        self.y_sq += float(y.double().pow(2).sum())

    def stream_end(self, index, name) -> None:
        if name == "fit":
            # One eigendecomposition of G serves both scores, the anisotropy and the map.
            centered = self.stats.centered(consume=True)
            spectrum = GramSpectrum.of(centered.gram)
            self.row = {"index": index, **summarize_pair(self.stats, centered, spectrum)}
            self.stats = None  # the d x d statistics of this layer are not needed any more
            self.map = fit_affine(centered, ridge=DEFAULT_RIDGE, bias=True, spectrum=spectrum)

    def layer_end(self, index, layer) -> None:
        residual = torch.cat(self.val_rows)
        n = residual.numel()
        variance = self.y_sq - float(self.y_sum.pow(2).sum()) / n
        row = self.row
        row["validation_error"] = float(residual.sum() / variance)
        row["top1pct_residual_share"] = top_share(residual)
        row["trigger_tokens"] = trigger_tokens(residual, self.windows.validation, self.tokenizer)
        if self.reservoir_size:
            row["intrinsic_dimension"] = intrinsic_dimension_twonn(self.kept)
        self.rows.append(row)
        self.residuals.append(residual)
        self.kept = self.map = None

    def result(self) -> Analysis:
        return Analysis(self.rows, torch.stack(self.residuals), self.reservoir_size)


def analysis_windows(windows, with_eval: bool) -> dict[str, torch.Tensor]:
    """The window sets of the analysis pass, in the order the visitor needs (fit first)."""
    sets = {"fit": windows.fit, "validation": windows.validation}
    if with_eval and windows.eval is not None:
        sets["eval"] = windows.eval
    return sets


def analyze(
    stack,
    planner,
    windows,
    tokenizer,
    *,
    stage=None,
    seed=0,
    with_eval=False,
    reservoir_size: int = DEFAULT_RESERVOIR,
    observers=(),
):
    """(Analysis, {name: perplexity}, {name: seconds}): every layer measured, and the
    perplexity of the validation (and, with_eval, evaluation) windows, in one pass."""
    from linearize.evaluation import HeadFanout, NllMeter

    sets = analysis_windows(windows, with_eval)
    visitor = LayerAnalysis(stack, windows, tokenizer, reservoir_size=reservoir_size, seed=seed)
    measured = {name: ids for name, ids in sets.items() if name != "fit"}
    meter = NllMeter(measured)
    on_logits = HeadFanout(meter, observers)

    streams = stack.open_streams(planner, sets)
    try:
        stack.run(streams, visitor, on_batch=None if stage is None else stage.advance)
        stack.run_head({name: streams[name] for name in measured}, on_logits)
    finally:
        for stream in streams.values():
            planner.release(stream.cache)
    ppl = {name: meter.perplexity(name) for name in measured}
    return visitor.result(), ppl, on_logits.seconds(streams)


def measure_layers(job, stack, windows, tokenizer, *, with_eval: bool, observers=()):
    """The analysis stage of a job: checks N/d first, then one pass (see `analyze`)."""
    from linearize.errors import DataError

    d = hidden_size(stack.model)
    n_fit = windows.count("fit")
    if n_fit <= d:
        raise DataError(
            f"the linearity score needs more fit tokens than the hidden size: {n_fit} <= d={d}; "
            f"use --calib-tokens > {int((d + 1) / (1 - job.spec.validation_fraction)) + 1}"
        )
    if n_fit < 10 * d:
        job.notes.append(
            f"N/d = {n_fit / d:.1f}: in-sample scores are optimistic when N is not >> d; "
            "rankings use held-out errors"
        )
    sets = analysis_windows(windows, with_eval)
    with job.timed("analyze"), job.pass_stage("analyze", stack, sets, "layer by layer") as stage:
        return analyze(
            stack,
            job.planner(stack),
            windows,
            tokenizer,
            stage=stage,
            seed=job.spec.seed,
            with_eval=with_eval,
            observers=observers,
        )
