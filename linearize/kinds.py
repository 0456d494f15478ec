"""Layer kinds: what a decoder layer's feed-forward block is, as far as a fold is concerned.

The standard format folds a span's map T (and intercept c) into the block before the span, so
that the block's MLP output M becomes M T + c. Where M comes from depends on the layer's kind:

- `DenseMLP`: M is one output projection's output; the projection is the fold's one carrier.
- `MixtureOfExperts`: M = sum_e g_e (a_e W_e + b_e) + s(x) (a_s W_s + b_s), a gated sum of routed
  experts plus an optional (possibly gated) shared expert, each linear in its own down
  projection. Every routed expert's down projection and the shared expert's take T; the router
  and the shared expert's gate never change. The intercept c can ride on the routed experts'
  biases only where the gates g_e sum to 1 for every token (then sum_e g_e c = c).

A kind answers four questions (the interface surgery, fitting, healing and the checks use):
`describes(layer)`: is this layer of the kind; `output_module(layer)`: the module whose output
(its first element, if a tuple) is M, which fitting hooks; `carriers(layer, config)`: the
parameters a fold changes; `frozen(layer)`: parameters healing must not train (routers, gates).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from torch import nn

WeightLayout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class Carrier:
    """One weight (with its bias) that a map on the MLP output folds into.

    weight: (..., d_out, d_in) for "out_in" (nn.Linear and the fused experts of most families),
        (..., d_in, d_out) for "in_out" (GPT-2's Conv1D, gpt_oss and llama4 experts); leading
        dimensions are experts. The map acts on the d (hidden size) side.
    bias: (..., d) or None.
    takes_intercept: whether adding the map's intercept to this bias adds it to M exactly once.
    """

    name: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    layout: WeightLayout
    takes_intercept: bool

    def parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]


class LayerKind(Protocol):
    """What surgery, fitting and healing ask of a layer's feed-forward block."""

    name: str

    def describes(self, layer: nn.Module) -> bool: ...

    def output_module(self, layer: nn.Module) -> nn.Module: ...

    def carriers(self, layer: nn.Module, config: Any) -> list[Carrier]: ...

    def frozen(self, layer: nn.Module) -> list[nn.Parameter]: ...


def has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


@dataclass(frozen=True)
class DenseMLP:
    """A feed-forward block whose output is one projection's output (`path`, from the layer)."""

    path: str
    layout: WeightLayout = "out_in"
    name: str = "dense MLP"

    def describes(self, layer: nn.Module) -> bool:
        return has_submodule(layer, self.path)

    def output_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.path)

    def carriers(self, layer: nn.Module, config: Any) -> list[Carrier]:
        projection = layer.get_submodule(self.path)
        bias = getattr(projection, "bias", None)
        return [Carrier(self.path, projection.weight, bias, self.layout, takes_intercept=True)]

    def frozen(self, layer: nn.Module) -> list[nn.Parameter]:
        return []


def always(config: Any) -> bool:
    return True


def never(config: Any) -> bool:
    return False


@dataclass(frozen=True)
class MixtureOfExperts:
    """A routed mixture of experts, fused as transformers 5 stores it (3-D parameters).

    block: the MoE module, from the layer (its output is M).
    experts: the fused experts module, from the block; `down` / `down_bias` its down projection
        parameter names (`down_bias` None: the experts have no bias).
    layout: of one expert's down projection ("out_in": (E, d, ff); "in_out": (E, ff, d)).
    shared: the shared experts' down projections (nn.Linear), from the block.
    routers: modules from the block that choose or gate experts; they never change.
    gates_sum_to_one: whether the routed weights of a token sum to 1 for this config (softmax
        over the top-k, or renormalised top-k), which the intercept's fold needs.
    """

    block: str
    experts: str = "experts"
    down: str = "down_proj"
    down_bias: str | None = None
    layout: WeightLayout = "out_in"
    shared: tuple[str, ...] = ()
    routers: tuple[str, ...] = ("gate",)
    gates_sum_to_one: Callable[[Any], bool] = never
    name: str = "mixture of experts"

    def describes(self, layer: nn.Module) -> bool:
        return has_submodule(layer, f"{self.block}.{self.experts}")

    def output_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.block)

    def carriers(self, layer: nn.Module, config: Any) -> list[Carrier]:
        experts = layer.get_submodule(f"{self.block}.{self.experts}")
        prefix = f"{self.block}.{self.experts}"
        bias = getattr(experts, self.down_bias) if self.down_bias else None
        routed = Carrier(
            f"{prefix}.{self.down}",
            getattr(experts, self.down),
            bias,
            self.layout,
            takes_intercept=bias is not None and bool(self.gates_sum_to_one(config)),
        )
        shared = [
            Carrier(
                f"{self.block}.{path}",
                projection.weight,
                projection.bias,
                "out_in",
                takes_intercept=False,  # gated (or added) next to the routed sum: c would count twice
            )
            for path in self.shared
            if has_submodule(layer, f"{self.block}.{path}")
            for projection in [layer.get_submodule(f"{self.block}.{path}")]
        ]
        return [routed, *shared]

    def frozen(self, layer: nn.Module) -> list[nn.Parameter]:
        frozen = []
        for path in self.routers:
            if has_submodule(layer, f"{self.block}.{path}"):
                frozen.extend(layer.get_submodule(f"{self.block}.{path}").parameters())
        return frozen
