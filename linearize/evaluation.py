"""Perplexity, with the definition that goes into every report, as one layer-by-layer pass.

Perplexity = exp(mean token NLL over all predicted tokens of the windows). Each window of
seq_len tokens predicts its tokens 2..seq_len from their prefix inside the window (labels =
inputs, shifted inside the window), so a window contributes seq_len - 1 predictions.

The pass carries every window set through the decoder layers (linearize.stack), then applies the
final norm and the LM head in row chunks: NLL needs the log-sum-exp over the vocabulary and the
label's logit per position, never a tokens x vocabulary tensor for the whole set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

LogitsObserver = Callable[[str, int, int, torch.Tensor], None]


class NllMeter:
    """Summed NLL per window (float64) from head chunks: on_logits(name, window, start, logits)."""

    def __init__(self, windows: dict[str, torch.Tensor]):
        self.windows = windows
        self.sums = {
            name: torch.zeros(len(ids), dtype=torch.float64) for name, ids in windows.items()
        }

    def __call__(self, name: str, window: int, start: int, logits: torch.Tensor) -> None:
        ids = self.windows[name][window]
        labels = ids[start + 1 : start + 1 + len(logits)].to(logits.device)
        logits = logits[: len(labels)]  # the window's last position predicts nothing
        if len(labels):
            nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
            self.sums[name][window] += float(nll.double().sum())

    def perplexity(self, name: str) -> float:
        return perplexity_from_nll(self.sums[name], self.windows[name].shape[1])


class HeadFanout:
    """Hands each head chunk to the NLL meter and to extra observers (e.g. the agreement
    reference or meter), timing the observers so throughput figures leave them out."""

    def __init__(self, meter: NllMeter, observers=()):
        self.meter, self.observers = meter, list(observers)
        self.observer_seconds: dict[str, float] = {}

    def __call__(self, name: str, window: int, start: int, logits: torch.Tensor) -> None:
        self.meter(name, window, start, logits)
        if self.observers:
            started = time.perf_counter()
            for observer in self.observers:
                observer(name, window, start, logits)
            spent = time.perf_counter() - started
            self.observer_seconds[name] = self.observer_seconds.get(name, 0.0) + spent

    def seconds(self, streams) -> dict[str, float]:
        """Each stream's own time (layers and head), without the observers'."""
        return {
            name: streams[name].seconds - self.observer_seconds.get(name, 0.0)
            for name in self.meter.windows
        }


def measure_perplexities(
    stack,
    planner,
    windows: dict[str, torch.Tensor],
    *,
    stage=None,
    observers: list[LogitsObserver] = (),
) -> tuple[dict[str, float], dict[str, float]]:
    """({name: perplexity}, {name: seconds}) of each window set, in one layer-by-layer pass.

    `observers` also receive every head chunk (e.g. an agreement reference or meter).
    """
    meter = NllMeter(windows)
    fanout = HeadFanout(meter, observers)
    advance = None if stage is None else stage.advance
    streams = stack.open_streams(planner, windows)
    try:
        stack.run(streams, on_batch=advance)
        stack.run_head(streams, fanout)
    finally:
        for stream in streams.values():
            planner.release(stream.cache)
    ppl = {name: meter.perplexity(name) for name in windows}
    return ppl, fanout.seconds(streams)


def pass_length(stack, windows: dict[str, torch.Tensor]) -> int:
    """Progress units of one pass: every window through every layer."""
    return len(stack.layers) * sum(len(ids) for ids in windows.values())


def evaluate_perplexity(model, windows: torch.Tensor, *, batch_size: int = 4) -> float:
    """Perplexity of a resident model on one window set (the same pass as the pipeline's)."""
    return perplexity_from_nll(window_nll(model, windows, batch_size=batch_size), windows.shape[1])


def window_nll(model, windows: torch.Tensor, *, batch_size: int = 4) -> torch.Tensor:
    """Summed NLL per window (float64) of a resident model (benchmarks compare windows)."""
    from linearize.activations import CachePlanner, Spill
    from linearize.stack import LayerStack

    stack = LayerStack.of(model, batch_size)
    meter = NllMeter({"eval": windows})
    with Spill() as spill:
        planner = CachePlanner(stack.device, 1 << 62, spill)
        streams = stack.open_streams(planner, {"eval": windows})
        stack.run(streams)
        stack.run_head(streams, meter)
        planner.release(streams["eval"].cache)
    return meter.sums["eval"]


def perplexity_from_nll(nll_per_window: torch.Tensor, seq_len: int) -> float:
    predicted = nll_per_window.numel() * (seq_len - 1)
    return math.exp(float(nll_per_window.sum()) / predicted)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
