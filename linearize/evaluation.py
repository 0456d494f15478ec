"""Perplexity and throughput, with the definition that goes into every report.

Perplexity = exp(mean token NLL over all predicted tokens of the windows). Each window of
seq_len tokens predicts its tokens 2..seq_len from their prefix inside the window (labels =
inputs, shifted inside the model's loss), so a window contributes seq_len - 1 predictions.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def window_nll(
    model, windows: torch.Tensor, *, batch_size: int = 4, on_batch=None, on_logits=None
) -> torch.Tensor:
    """Summed NLL per window (float64), predicting tokens 2..S of each window.

    `on_logits`, if given, receives each batch's logits of the predicted positions as one
    (positions, V) chunk, window after window (linearize.agreement consumes them)."""
    device = next(model.parameters()).device
    sums = []
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        sums.append(nll.view(len(ids), -1).double().sum(1).cpu())
        if on_logits is not None:
            on_logits(logits.reshape(-1, logits.shape[-1]))
        if on_batch is not None:
            on_batch(len(ids))
    return torch.cat(sums)


def perplexity_from_nll(nll_per_window: torch.Tensor, seq_len: int) -> float:
    predicted = nll_per_window.numel() * (seq_len - 1)
    return math.exp(float(nll_per_window.sum()) / predicted)


def evaluate_perplexity(
    model, windows: torch.Tensor, *, batch_size: int = 4, on_batch=None, on_logits=None
) -> float:
    nll = window_nll(model, windows, batch_size=batch_size, on_batch=on_batch, on_logits=on_logits)
    return perplexity_from_nll(nll, windows.shape[1])


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
