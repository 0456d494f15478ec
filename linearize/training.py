"""The cosine regularizer of consecutive hidden states, and a small training loop.

The seed paper proposes a cosine-similarity term between consecutive layers' hidden states,
added to the pretraining loss, to make layers *less* linear. It gives no formula we can rely
on, so this is ours. For decoder layer l with input x_l (= h_l) and output y_l (= h_{l+1}),
both captured by owned forward hooks on the decoder layers (not `output_hidden_states`, whose
last entry already has the final norm applied), and tokens t of the batch (mask-weighted):

    R = weight * mean_{l in layers} mean_t cos(x_{l,t}, y_{l,t})
    loss = lm_loss + R

Sign: `weight > 0` penalises similarity, so minimising the loss pushes each layer's output
away from its input in direction (cos down: a layer further from the identity, "less linear"
in the paper's intent). `weight < 0` pulls consecutive states together (cos up, towards the
identity, "more linear"). tests/test_training.py checks both directions on a tiny model.

Caution: cos(x, y) is a proxy. The paper's linearity score is the R^2 of an affine map from X
to Y after centring, which a rotation or a scaling keeps at 1 whatever the cosine; whether a
lower cosine gives a lower score is an empirical question (bench/regularizer.py measures it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linearize.architectures import decoder_layers
from linearize.capture import hooked, layer_io
from linearize.errors import InputError

log = logging.getLogger(__name__)


def token_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos(x_t, y_t) per token: (..., d), (..., d) -> (...), computed in float32."""
    return F.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-8)


class CosineRegularizer:
    """Collects R = weight * mean over layers and tokens of cos(layer input, layer output).

    Usage, inside any normal forward (the hooks are owned and removed on exit):

        reg = CosineRegularizer(weight=0.1)
        with reg.attach(model):
            out = model(input_ids=ids, labels=ids)
            loss = out.loss + reg.pop()

    `pop()` returns the term for the forwards since the last `pop()` and clears them, so
    several forwards (gradient accumulation) each get their own term. `layers` restricts the
    term to some decoder layer indices (default: all).
    """

    def __init__(self, weight: float, layers: Iterable[int] | None = None):
        self.weight = float(weight)
        self.layers = None if layers is None else sorted(set(layers))
        self._cos: dict[int, torch.Tensor] = {}  # layer index -> (B, T) cos of the last forward
        self.last_mean_cos: float | None = None  # detached, of the last pop(): for logging

    @contextlib.contextmanager
    def attach(self, model) -> Iterator[CosineRegularizer]:
        layers = decoder_layers(model)
        indices = range(len(layers)) if self.layers is None else self.layers
        bad = [i for i in indices if not 0 <= i < len(layers)]
        if bad:
            raise InputError(f"regularizer layers {bad} out of range (model has {len(layers)})")
        self._cos.clear()
        with hooked({i: layers[i] for i in indices}, self._on_layer):
            try:
                yield self
            finally:
                self._cos.clear()

    def _on_layer(self, index, args, kwargs, output) -> None:
        x, y = layer_io(args, kwargs, output)  # (B, T, d) each: h_l and h_{l+1}
        if index in self._cos:
            raise InputError(
                "the regularizer saw a second forward before pop(): call pop() after each forward"
            )
        self._cos[index] = token_cosine(x, y)

    def mean_cosine(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over the collected layers and (masked) tokens of cos(x, y); keeps the graph."""
        if not self._cos:
            raise InputError("the regularizer collected nothing: run a forward inside attach()")
        per_layer = []
        for cos in self._cos.values():  # (B, T)
            if mask is None:
                per_layer.append(cos.mean())
            else:
                m = mask.to(cos.device, cos.dtype)
                per_layer.append((cos * m).sum() / m.sum().clamp_min(1))
        return torch.stack(per_layer).mean()

    def pop(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """weight * mean cos for the last forward; clears the collected values."""
        mean_cos = self.mean_cosine(mask)
        self._cos.clear()
        self.last_mean_cos = float(mean_cos.detach())
        return self.weight * mean_cos


@dataclass
class StepLog:
    step: int  # 1-based
    loss: float  # total loss that was minimised
    lm_loss: float | None  # the model's own loss (None when lm_weight == 0)
    reg: float | None  # the regularizer term R (None without a regularizer)
    mean_cos: float | None  # mean cos(h_l, h_{l+1}) over the regularized layers
    lr: float


def learning_rate(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio * lr` at `steps`."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(
    model,
    batches: Iterable[torch.Tensor],
    steps: int,
    lr: float,
    regularizer: CosineRegularizer | None = None,
    on_step: Callable[[StepLog], None] | None = None,
    *,
    parameters: Iterable[torch.nn.Parameter] | None = None,
    lm_weight: float = 1.0,
    warmup: int = 0,
    min_lr_ratio: float = 1.0,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
) -> list[StepLog]:
    """AdamW on loss = lm_weight * causal-LM loss + R, for `steps` steps.

    `batches` yields input-id tensors (B, T) (labels = inputs) and is cycled when it runs out.
    `parameters` defaults to every parameter that requires grad. `lm_weight = 0` trains on the
    regularizer alone (the mechanics tests). The learning rate is constant unless `warmup` or
    `min_lr_ratio < 1` ask for warm-up and cosine decay. The model's train/eval mode is
    restored afterwards. Returns one StepLog per step (also passed to `on_step`).
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    if lm_weight == 0 and regularizer is None:
        raise InputError("nothing to train: lm_weight is 0 and there is no regularizer")
    params = [p for p in (parameters or model.parameters()) if p.requires_grad]
    if not params:
        raise InputError("no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = next(model.parameters()).device
    stream = itertools.cycle(batches)
    was_training = model.training
    history: list[StepLog] = []
    attach = regularizer.attach(model) if regularizer is not None else contextlib.nullcontext()
    model.train()
    try:
        with attach:
            for step in range(steps):
                step_lr = learning_rate(step, steps, lr, warmup, min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = step_lr
                ids = next(stream).to(device)
                out = model(input_ids=ids, labels=ids if lm_weight else None, use_cache=False)
                loss = lm_weight * out.loss if lm_weight else 0.0
                reg = regularizer.pop() if regularizer is not None else None
                if reg is not None:
                    loss = loss + reg
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                record = StepLog(
                    step=step + 1,
                    loss=float(loss.detach()),
                    lm_loss=float(out.loss.detach()) if lm_weight else None,
                    reg=None if reg is None else float(reg.detach()),
                    mean_cos=None if regularizer is None else regularizer.last_mean_cos,
                    lr=step_lr,
                )
                history.append(record)
                if on_step is not None:
                    on_step(record)
    finally:
        model.train(was_training)
    return history
