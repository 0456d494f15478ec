"""Healing: distil the fitted maps (and a few layers after them) against the original model.

The student differs from the teacher only from the first changed position (the cut) on, so the
teacher's hidden states entering the cut are cached once (linearize.fitting.SpanFit) and
injected; each step runs only the *segment* of decoder layers from the cut, one layer at a time
through linearize.stack, and compares where the segment ends with the teacher at the same depth:

- resident (the whole model fits): the segment runs to the last layer and the model's final norm,
  and the loss is the mean squared difference of *centred logits*, computed without the LM head:
  with W the output embedding (V x d) and Wc its rows centred,

      (z_s - z_t) centred = (h_s - h_t) Wc^T,   so   ||.||^2 / V = (h_s - h_t) S (h_s - h_t)^T,
      S = Wc^T Wc / V  (d x d, precomputed),

  where h are final (normed) hidden states. An LM-head bias cancels in the difference, and
  centring removes the softmax's shift invariance.
- streamed (it does not): the segment is the healed layers only, and the loss is the mean squared
  difference of the hidden states after them (a local loss; bench/heal_sweep.py measured a loss
  at that depth as equal to the default on the bundled model). Only the healed layers, their
  optimizer state and the cached teacher states are resident.

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
from dataclasses import dataclass, field

import torch
from torch import nn

from linearize.architectures import decoder_layers

log = logging.getLogger(__name__)

NEIGHBOUR_LAYERS = 4
DEFAULT_LR = 3e-4
CURVE_POINTS = 200  # the most points of the loss curve a report keeps


@dataclass
class HealingResult:
    steps: int
    seconds: float
    train_loss_first: float
    train_loss_last: float
    curve: list[list[float]] = field(default_factory=list)  # loss_curve of the training losses

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def loss_curve(losses: list[float], max_points: int = CURVE_POINTS) -> list[list[float]]:
    """The training loss per step, downsampled to at most `max_points` [step, loss] pairs.

    Consecutive steps are grouped into buckets of ceil(len / max_points) (the last bucket may be
    shorter); each point is [the bucket's last step (1-based), the mean loss of its steps]. A
    mean rather than every n-th step because one window's loss is noisy; the bucket's last step
    so that the curve ends at the last step taken.
    """
    size = max(1, math.ceil(len(losses) / max_points))
    curve = []
    for start in range(0, len(losses), size):
        bucket = losses[start : start + size]
        curve.append([start + len(bucket), math.fsum(bucket) / len(bucket)])
    return curve


@dataclass
class TeacherCache:
    start: int  # the position whose input is injected (the cut)
    inputs: object  # ActivationCache (n_windows, S, d): teacher hidden states entering `start`
    targets: object  # ActivationCache (n_windows, S, d): teacher states where the segment ends
    kind: str  # "final": final normed hidden states; "hidden": output of a decoder layer

    @property
    def loss_name(self) -> str:
        if self.kind == "final":
            return "centred-logit MSE at the final hidden state (linearize.healing)"
        return "MSE of the hidden states after the healed layers (local loss, linearize.healing)"


def capture_teacher(model, windows: torch.Tensor, start: int, *, batch_size: int = 4):
    """The teacher of a resident model: inputs of layer `start` and final hidden states."""
    from linearize.activations import CachePlanner, Spill
    from linearize.fitting import fit_pass
    from linearize.stack import LayerStack

    stack = LayerStack.of(model, batch_size)
    planner = CachePlanner(stack.device, 1 << 62, Spill())
    _, inputs, targets = fit_pass(stack, planner, [], "linear", windows, teacher_start=start)
    return TeacherCache(start, inputs, targets, "final")


def healing_params(model, carriers: list, neighbours: int = NEIGHBOUR_LAYERS) -> list:
    """The maps' carriers plus the weight matrices of the `neighbours` decoder layers from each
    cut on, a cut being a layer that holds a carrier (the fold target or the block).

    Weights are the parameters of ndim >= 2: matrices, and the fused 3-D experts of an MoE
    layer (every expert's projections). Routers and shared-expert gates stay frozen (the
    layer's kind lists them): the fold leaves them unchanged, a top-k choice is discrete so a
    small step can move tokens to experts whose statistics healing never saw, and healing runs
    without the load-balancing loss the router was trained with.
    """
    from linearize.architectures import get_architecture

    arch = get_architecture(model)
    layers = decoder_layers(model)
    carrier_ids = {id(p) for p in carriers}
    cuts = [
        i for i, layer in enumerate(layers) if carrier_ids & {id(p) for p in layer.parameters()}
    ]
    chosen = {id(p): p for p in carriers}
    for cut in cuts:
        for layer in layers[cut : cut + neighbours]:
            frozen = {id(p) for p in _frozen_parameters(arch, layer)}
            for p in layer.parameters():
                if p.ndim >= 2 and id(p) not in frozen:
                    chosen.setdefault(id(p), p)
    return list(chosen.values())


def _frozen_parameters(arch, layer) -> list:
    return arch.kind_of(layer).frozen(layer) if arch.has_kind(layer) else []


def trained_parameter_names(model, params: list) -> list[str]:
    """The model's names of `params` (for the report's account of what healing trained)."""
    wanted = {id(p) for p in params}
    return [name for name, p in model.named_parameters() if id(p) in wanted]


def logit_metric(output_weight: torch.Tensor) -> torch.Tensor:
    """S = Wc^T Wc / V for the centred-logit MSE (float32, on the weight's device)."""
    weight = output_weight.detach().double()  # (V, d)
    centred = weight - weight.mean(0, keepdim=True)
    metric = centred.T @ centred / weight.shape[0]
    return metric.float().to(output_weight.device)


def centred_logit_mse(h_student: torch.Tensor, h_teacher: torch.Tensor, metric: torch.Tensor):
    diff = (h_student - h_teacher).reshape(-1, h_student.shape[-1])
    return ((diff @ metric) * diff).sum(-1).mean()


def hidden_mse(h_student: torch.Tensor, h_teacher: torch.Tensor) -> torch.Tensor:
    return (h_student - h_teacher).pow(2).sum(-1).mean()


def topk_kl(logits_student: torch.Tensor, logits_teacher: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k tokens, both
    distributions renormalised over those k (LinearPatch distils on the top logits): the tail
    the teacher deems unlikely carries no gradient. k = V is the full KL exactly."""
    top = logits_teacher.topk(k, dim=-1).indices  # (..., k)
    log_t = logits_teacher.gather(-1, top).log_softmax(-1)
    log_s = logits_student.gather(-1, top).log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


LOSSES = ("mse", "kl")
TOPK = 256  # the teacher's top logits the KL loss reads


def default_loss(stack, teacher: TeacherCache, name: str = "mse"):
    """The distillation loss on final hidden states: the centred-logit MSE ("mse") or the
    top-k KL through the LM head ("kl"); a streamed segment ends mid-model (hidden MSE)."""
    if teacher.kind == "hidden":
        return hidden_mse
    if name not in LOSSES:
        raise ValueError(f"unknown healing loss {name!r}; known: {', '.join(LOSSES)}")
    with stack.output_head() as head:
        if name == "kl":
            return _head_kl(head)
        metric = logit_metric(head.weight)

    def loss(h_student, h_teacher):
        return centred_logit_mse(h_student, h_teacher, metric)

    return loss


def _head_kl(head: nn.Module):
    weight = head.weight.detach()  # (V, d); the head is frozen
    bias = None if getattr(head, "bias", None) is None else head.bias.detach()

    def loss(h_student, h_teacher):
        with torch.no_grad():
            teacher = nn.functional.linear(h_teacher, weight, bias)
        student = nn.functional.linear(h_student, weight, bias)
        return topk_kl(student, teacher, min(TOPK, weight.shape[0]))

    return loss


def heal(
    stack,
    teacher: TeacherCache,
    windows: torch.Tensor,
    params: list[nn.Parameter],
    *,
    last: int | None = None,
    max_steps: int,
    max_seconds: float,
    lr: float = DEFAULT_LR,
    batch_size: int = 1,
    seed: int = 0,
    loss_fn=None,
    decay: float = 0.0,
    on_step=None,
    checkpoints=None,
) -> HealingResult:
    """Adam on `params` only, running positions teacher.start..last (default: the last layer)
    of the stack (or of a plain resident model) from the
    teacher's inputs and minimising the loss against its targets (`default_loss`, or
    `loss_fn(h_student, h_teacher)` for experiments such as bench/heal_sweep.py's KL).

    Stops at `max_steps` or after `max_seconds`, whichever comes first. With `decay` > 0 the
    learning rate falls linearly to zero over that last fraction of the budget (1: from the
    start), the budget spent being the larger of the step and the time fractions, so a
    time-bound run decays on any machine. The caller judges the result on the validation slice
    (and may restore a snapshot taken before). `windows` only sets how many windows there are.

    `checkpoints` (linearize.resume.HealingCheckpoints) restores an interrupted run's state
    before the first step (the steps and seconds it spent count against the budget) and saves
    the state after the steps it chooses.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(
            f"decay is the fraction of the budget to decay over, in [0, 1]; got {decay}"
        )
    from linearize.stack import as_stack

    stack = as_stack(stack)
    last = len(stack.layers) - 1 if last is None else last
    if any(p.is_meta for p in params):
        raise ValueError(
            "healing parameters are not loaded (still on the meta device): prepare and keep "
            "their layers before choosing them, so the optimizer trains the weights in use"
        )
    loss_fn = loss_fn or default_loss(stack, teacher)
    positions = range(teacher.start, last + 1)
    segment = [stack.prepare(i) for i in positions]
    was_trainable = [p for p in stack.model.parameters() if p.requires_grad]
    for p in was_trainable:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    spent = 0.0  # seconds of an interrupted run this one resumes
    if checkpoints is not None:
        losses, spent = checkpoints.restore(params, optimizer, generator)
    started = time.perf_counter() - spent
    try:
        while len(losses) < max_steps and time.perf_counter() - started < max_seconds:
            pick = torch.randint(0, len(windows), (batch_size,), generator=generator)
            hidden = teacher.inputs[pick]
            with _autocast(stack.device):
                for position, layer in zip(positions, segment, strict=True):
                    hidden = stack.call(position, layer, hidden)
                if teacher.kind == "final":
                    hidden = stack.finalize(hidden)
            loss = loss_fn(hidden.float(), teacher.targets[pick].float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if decay:
                elapsed = time.perf_counter() - started
                optimizer.param_groups[0]["lr"] = decayed_lr(
                    lr, len(losses), max_steps, elapsed, max_seconds, decay
                )
            optimizer.step()
            losses.append(loss.item())
            if checkpoints is not None:
                elapsed = time.perf_counter() - started
                checkpoints.after_step(params, optimizer, generator, losses, elapsed)
            if on_step is not None:
                on_step(len(losses), losses[-1])
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in was_trainable:
            p.requires_grad_(True)
        for position in positions:
            stack.release(position)
        stack.model.eval()
    tail = losses[-5:]
    return HealingResult(
        steps=len(losses),
        seconds=round(time.perf_counter() - started, 2),
        train_loss_first=losses[0] if losses else math.nan,
        train_loss_last=sum(tail) / len(tail) if tail else math.nan,
        curve=loss_curve(losses),
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
    GPUs; the parameters, the optimizer state and the loss stay in float32. A CPU without native
    bf16 (AVX2 only) emulates it: a step there took ~35 s instead of ~0.5 s, so it runs float32."""
    if device.type == "cpu" and not _cpu_has_bf16():
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _cpu_has_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def snapshot(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    for p, value in zip(params, saved, strict=True):
        p.copy_(value)
