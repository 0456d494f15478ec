"""Healing: distil only the fitted maps against the original model, cheaply, on the CPU.

The student differs from the teacher only from the first replaced position on, so the
teacher's hidden states entering that position are cached once and injected; each step runs
only the layers after it. The loss is the mean squared difference of *centred logits*,
computed without the LM head: with W the output embedding (V x d) and Wc its rows centred,

    (z_s - z_t) centred = (h_s - h_t) Wc^T,   so   ||.||^2 / V = (h_s - h_t) S (h_s - h_t)^T,
    S = Wc^T Wc / V  (d x d, precomputed),

where h are final (normed) hidden states. An LM-head bias cancels in the difference, and
centring removes the softmax's shift invariance. Cost per token: one d x d product instead of
a V x d head, which for small models is a large part of the forward.

Trainable parameters: the linear blocks (linear format) or the output projections that carry
the folded maps (standard format; training the whole projection is training T before the fold,
with the projection's own freedom added), plus every weight matrix of the first NEIGHBOUR_LAYERS
decoder layers from the cut, which learn to absorb what the map gets wrong. Norms, biases,
embeddings and all other layers stay frozen. With a 60 s budget this beat training the maps
alone at any learning rate (bench/heal_sweep.py, BENCHMARKS.md). The pipeline keeps the result
only if the validation-slice perplexity improved.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from linearize.architectures import decoder_layers, get_architecture
from linearize.capture import hooked, iterate_batches, layer_io

log = logging.getLogger(__name__)

NEIGHBOUR_LAYERS = 4
DEFAULT_LR = 3e-4


@dataclass
class HealingResult:
    steps: int
    seconds: float
    train_loss_first: float
    train_loss_last: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TeacherCache:
    start: int  # the position whose input is injected
    inputs: torch.Tensor  # (n_windows, S, d) teacher hidden states entering `start`
    finals: torch.Tensor  # (n_windows, S, d) teacher final normed hidden states


@torch.no_grad()
def capture_teacher(
    model, windows: torch.Tensor, start: int, *, batch_size: int = 4, on_batch=None
) -> TeacherCache:
    """One pass of the original model: inputs of layer `start` and final hidden states."""
    layers = decoder_layers(model)
    inputs, finals = [], []

    def on_layer(_index, args, kwargs, output):
        inputs.append(layer_io(args, kwargs, output)[0].float().cpu())

    base = model.base_model
    with hooked({start: layers[start]}, on_layer):
        for _, batch in iterate_batches(windows, batch_size):
            device = next(model.parameters()).device
            out = base(input_ids=batch.to(device), use_cache=False)
            finals.append(out.last_hidden_state.float().cpu())
            if on_batch is not None:
                on_batch(len(batch))
    return TeacherCache(start, torch.cat(inputs), torch.cat(finals))


def healing_params(model, carriers: list, neighbours: int = NEIGHBOUR_LAYERS) -> list:
    """The maps' carriers plus the weight matrices (ndim 2) of the `neighbours` decoder layers
    from each cut on, a cut being a layer that holds a carrier (the fold target or the block)."""
    layers = decoder_layers(model)
    carrier_ids = {id(p) for p in carriers}
    cuts = [
        i for i, layer in enumerate(layers) if carrier_ids & {id(p) for p in layer.parameters()}
    ]
    chosen = {id(p): p for p in carriers}
    for cut in cuts:
        for layer in layers[cut : cut + neighbours]:
            for p in layer.parameters():
                if p.ndim == 2:
                    chosen.setdefault(id(p), p)
    return list(chosen.values())


def logit_metric(model) -> torch.Tensor:
    """S = Wc^T Wc / V for the centred-logit MSE (float32, on the model's device)."""
    weight = model.get_output_embeddings().weight.detach().double()  # (V, d)
    centred = weight - weight.mean(0, keepdim=True)
    metric = centred.T @ centred / weight.shape[0]
    return metric.float().to(weight.device)


def centred_logit_mse(h_student: torch.Tensor, h_teacher: torch.Tensor, metric: torch.Tensor):
    diff = (h_student - h_teacher).reshape(-1, h_student.shape[-1])
    return ((diff @ metric) * diff).sum(-1).mean()


class _Injector(nn.Module):
    """Stands in for layers [0, start): returns the cached teacher hidden states."""

    def __init__(self):
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden.to(hidden_states.dtype)


@contextlib.contextmanager
def suffix_stack(model, start: int):
    """Temporarily run only layers[start:], fed by an injector at position 0."""
    arch = get_architecture(model)
    layers = decoder_layers(model)
    config = model.config
    injector = _Injector()
    for name in ("attention_type", "layer_type", "is_sliding", "sliding_window"):
        if hasattr(layers[start], name):
            setattr(injector, name, getattr(layers[start], name))
    saved = {
        key: getattr(config, key, None)
        for key in (arch.num_layers_key, *arch.per_layer_config_keys)
    }
    parent_path, _, attr = arch.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    new_layers = nn.ModuleList([injector, *list(layers)[start:]])
    try:
        setattr(parent, attr, new_layers)
        setattr(config, arch.num_layers_key, len(new_layers))
        for key in arch.per_layer_config_keys:
            if saved[key] is not None:
                setattr(config, key, [saved[key][start], *saved[key][start:]])
        yield injector
    finally:
        setattr(parent, attr, layers)
        for key, value in saved.items():
            if value is not None:
                setattr(config, key, value)


def heal(
    model,
    cache: TeacherCache,
    windows: torch.Tensor,
    params: list[nn.Parameter],
    *,
    max_steps: int,
    max_seconds: float,
    lr: float = DEFAULT_LR,
    batch_size: int = 1,
    seed: int = 0,
    loss_fn=None,
    decay: float = 0.0,
    on_step=None,
) -> HealingResult:
    """Adam on `params` only, minimising the centred-logit MSE at the final hidden state
    (or `loss_fn(h_student, h_teacher)`, for experiments such as bench/heal_sweep.py's KL).

    Stops at `max_steps` or after `max_seconds`, whichever comes first. With `decay` > 0 the
    learning rate falls linearly to zero over that last fraction of the budget (1: from the
    start), the budget spent being the larger of the step and the time fractions, so a
    time-bound run decays on any machine. The caller judges the result on the validation slice
    (and may restore a snapshot taken before).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(
            f"decay is the fraction of the budget to decay over, in [0, 1]; got {decay}"
        )
    if loss_fn is None:
        metric = logit_metric(model)

        def loss_fn(h_student, h_teacher):
            return centred_logit_mse(h_student, h_teacher, metric)

    was_trainable = [p for p in model.parameters() if p.requires_grad]
    for p in was_trainable:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses: list[float] = []
    started = time.perf_counter()
    try:
        with suffix_stack(model, cache.start) as injector:
            while len(losses) < max_steps and time.perf_counter() - started < max_seconds:
                pick = torch.randint(0, len(windows), (batch_size,), generator=generator)
                injector.hidden = cache.inputs[pick].to(device)
                with _autocast(device):
                    out = model.base_model(input_ids=windows[pick].to(device), use_cache=False)
                loss = loss_fn(out.last_hidden_state.float(), cache.finals[pick].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if decay:
                    elapsed = time.perf_counter() - started
                    optimizer.param_groups[0]["lr"] = decayed_lr(
                        lr, len(losses), max_steps, elapsed, max_seconds, decay
                    )
                optimizer.step()
                losses.append(loss.item())
                if on_step is not None:
                    on_step(len(losses), losses[-1])
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in was_trainable:
            p.requires_grad_(True)
        model.eval()
    tail = losses[-5:]
    return HealingResult(
        steps=len(losses),
        seconds=round(time.perf_counter() - started, 2),
        train_loss_first=losses[0] if losses else math.nan,
        train_loss_last=sum(tail) / len(tail) if tail else math.nan,
    )


def decayed_lr(
    lr: float, step: int, max_steps: int, elapsed: float, max_seconds: float, tail: float = 1.0
) -> float:
    """`lr` until the last `tail` fraction of the budget, then linear decay to zero; the budget
    spent is the larger of the step and the time fractions (whichever limit stops the run)."""
    left = 1.0 - max(step / max_steps, elapsed / max_seconds)
    return lr * min(1.0, max(0.0, left) / tail)


def _autocast(device: torch.device):
    """bf16 autocast for the distillation steps: about 2x faster on CPUs with AVX512-BF16 and on
    GPUs; the parameters, the optimizer state and the loss stay in float32."""
    if device.type == "cpu" and not torch.backends.mkldnn.is_available():
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    for p, value in zip(params, saved, strict=True):
        p.copy_(value)
