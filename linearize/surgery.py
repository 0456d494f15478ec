"""Model surgery: replace decoder layers by linear maps, or fold maps into a neighbour and drop layers.

Spans are `(start, end)` pairs of layer positions, both inclusive, in the model as it is when
the call is made (the indices capture, fitting and selection see); several spans in one call all
refer to that same numbering. Every operation works in place, keeps the config consistent with the layers list (layer count, per-layer lists such as
`layer_types`), renumbers the attention `layer_idx` that indexes the KV cache, and records the
layout in `model.config.linearize` (a plain JSON dict, saved with config.json):

    {"version": 1,
     "original_num_layers": 30,
     "origins": [[0, 0], ..., [12, 15], [16, 16], ...],  # base-model layers behind each position
     "linear_blocks": [{"position": 12, "span": [12, 15], "bias": true}],
     "folds": [{"into": 11, "span": [12, 15], "attn": false}],
     "removed": [20, 21]}

`position` is the current index; every other number is a layer index of the base model, so the
record stays meaningful after several surgeries (also across a save and a reload).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from linearize.architectures import (
    Architecture,
    decoder_layers,
    get_architecture,
    hidden_size,
    layer_config,
    num_layers,
)
from linearize.errors import FoldError, InputError, UnsupportedArchitectureError
from linearize.kinds import Carrier

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

Span = tuple[int, int]
LAYOUT_VERSION = 1
FOLD_BLOCK_BYTES = 64 * 2**20  # float64 bytes of a carrier folded at once (fold_into_carrier)
# Attributes some model forwards or cache builders read off a decoder layer; a replacement keeps them.
_LAYER_ATTRIBUTES = ("layer_type", "attention_type", "is_sliding", "sliding_window")


@dataclass(frozen=True)
class AffineMap:
    """y = x @ weight + bias, rows are tokens. weight: (d_in, d_out); bias: (d_out,) or None."""

    weight: Tensor
    bias: Tensor | None = None

    def __post_init__(self) -> None:
        if self.weight.dim() != 2:
            raise InputError(f"affine map weight must be 2-D, got shape {tuple(self.weight.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[1],):
            raise InputError(
                f"affine map bias has shape {tuple(self.bias.shape)}, "
                f"expected ({self.weight.shape[1]},) to match weight {tuple(self.weight.shape)}"
            )

    def apply(self, x: Tensor) -> Tensor:
        """The map on x (..., d_in), computed in x's dtype and device."""
        y = x @ self.weight.to(x)
        return y if self.bias is None else y + self.bias.to(x)


@dataclass(frozen=True)
class OutputFold:
    """Maps folded into a kept block's output projections.

    The block's new output is r + M @ mlp.weight + mlp.bias, with M its MLP output before the
    residual add; `attn` does the same to the attention output (parallel-residual models only).
    """

    mlp: AffineMap
    attn: AffineMap | None = None


class LinearBlock(nn.Module):
    """A decoder layer (or a span of layers) replaced by h -> h A + b.

    It accepts whatever the model passes a decoder layer and returns a tensor, as transformers 5.x
    layers do. It also keeps its own KV-cache slot in step (see `_advance_cache_slot`).
    """

    def __init__(
        self,
        hidden_size: int,
        *,
        bias: bool = True,
        layer_idx: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=bias, dtype=dtype, device=device)
        self.layer_idx = layer_idx

    @classmethod
    def from_map(cls, affine: AffineMap, *, layer_idx: int, dtype, device) -> LinearBlock:
        d_in, d_out = affine.weight.shape
        if d_in != d_out:
            raise InputError(f"a replacement map must be square, got {d_in}x{d_out}")
        block = cls(
            d_in, bias=affine.bias is not None, layer_idx=layer_idx, dtype=dtype, device=device
        )
        with torch.no_grad():
            # nn.Linear stores out x in; the map is in x out.
            block.linear.weight.copy_(affine.weight.T)
            if affine.bias is not None:
                block.linear.bias.copy_(affine.bias)
        return block

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        cache = _find_cache(args, kwargs)
        if cache is not None:
            _advance_cache_slot(cache, self.layer_idx, hidden_states)
        out = self.linear(hidden_states)
        return (out,) if getattr(self, "tuple_output", False) else out

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


def _find_cache(args: tuple, kwargs: dict) -> Any:
    # Models pass the cache under different names (cache, layer_past, positional for GPT-2).
    from transformers.cache_utils import Cache

    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


def _advance_cache_slot(cache: Any, layer_idx: int, hidden_states: Tensor) -> None:
    """Append a tiny placeholder for the new tokens to this position's cache slot.

    The cache has one slot per decoder position, and transformers reads the sequence length and
    mask sizes from the first full-attention (or sliding) slot. An untouched slot there would
    report length 0 during generation; a 1x1 placeholder per token keeps every slot in step.
    """
    cache = getattr(cache, "self_attention_cache", cache)
    batch, tokens = hidden_states.shape[0], hidden_states.shape[-2]
    heads, head_dim = 1, 1
    slots = getattr(cache, "layers", [])
    slot = slots[layer_idx] if layer_idx < len(slots) else None
    if slot is not None and not hasattr(slot, "update"):
        # A linear-attention slot (qwen3_next's Gated DeltaNet) holds a state, not keys and
        # values; only its token count, which get_seq_length reads, moves on.
        count = getattr(slot, "cumulative_length_linear", None)
        if isinstance(count, torch.Tensor):
            count.add_(tokens)
        return
    keys = getattr(slot, "keys", None)
    if isinstance(keys, torch.Tensor) and keys.dim() == 4:
        heads, head_dim = keys.shape[1], keys.shape[-1]  # pre-allocated (static) slots
    placeholder = hidden_states.new_zeros(batch, heads, tokens, head_dim)
    cache.update(placeholder, placeholder, layer_idx)


# --- public operations -------------------------------------------------------------------------


def replace_with_linear(model: nn.Module, spans: dict[Span, AffineMap]) -> nn.Module:
    """Replace each span of layers by one LinearBlock at the span's first position."""
    arch = _checked_architecture(model)
    layout = current_layout(model)
    layers = decoder_layers(model)
    _check_spans(spans, len(layers))
    replacements: dict[int, nn.Module] = {}
    new_origins: dict[int, list[int]] = {}
    for (start, end), affine in spans.items():
        _check_map_size(affine, hidden_size(model), (start, end))
        replacements[start] = _linear_block_like(layers[start], affine, layer_idx=start)
        new_origins[start] = [layout["origins"][start][0], layout["origins"][end][1]]
    removed = {pos for start, end in spans for pos in range(start + 1, end + 1)}
    _rebuild(model, arch, layout, removed, replacements, new_origins)
    _match_layer_outputs(model)
    logger.info("replaced %d span(s) by linear blocks: %s", len(spans), sorted(spans))
    return model


def fold_and_remove(model: nn.Module, folds: dict[Span, OutputFold]) -> nn.Module:
    """Fold each span's map into the output projection(s) of the block before it; drop the span.

    For a Linear projection (weight out x in) the new weight is Tᵀ W, for GPT-2's Conv1D
    (in x out) it is W T; the new bias is b T + c. A projection without a bias accepts only a map
    without bias (or an all-zero one), since adding a bias parameter would change the checkpoint's
    architecture: fit such maps without an intercept, or use the linear format.
    """
    arch = _checked_architecture(model)
    check_foldable(model, folds)
    layout = current_layout(model)
    layers = decoder_layers(model)
    for span, fold in folds.items():
        _check_fold(arch, model, layers[span[0] - 1], span, fold)
    for (start, end), fold in folds.items():
        _fold_into_block(arch, model, layers[start - 1], fold)
        layout["folds"].append(
            {
                "into": layout["origins"][start - 1][0],
                "span": [layout["origins"][start][0], layout["origins"][end][1]],
                "attn": fold.attn is not None,
            }
        )
    removed = {pos for start, end in folds for pos in range(start, end + 1)}
    _rebuild(model, arch, layout, removed, {}, {})
    logger.info("folded and removed %d span(s): %s", len(folds), sorted(folds))
    return model


def check_foldable(model: nn.Module, spans: Iterable[Span]) -> None:
    """Raise FoldError now if these spans cannot be folded (call before the costly fit)."""
    arch = _checked_architecture(model)
    blocker = arch.fold_blocker(model.config)
    if blocker:
        raise FoldError(f"cannot fold into this model: {blocker}; use --format linear instead")
    spans = list(spans)
    layers = decoder_layers(model)
    _check_spans(spans, len(layers))
    for span in spans:
        _check_fold_target(layers, span, spans)


def check_removable(model: nn.Module, spans: Iterable[Span]) -> None:
    """Raise InputError now if a removal of these spans has no layer before each span to heal
    (the removal's carrier is that layer's MLP output projection, as a fold's target is)."""
    arch = _checked_architecture(model)
    spans = list(spans)
    layers = decoder_layers(model)
    _check_spans(spans, len(layers))
    for start, end in spans:
        if start == 0:
            raise InputError(
                f"span {(start, end)} starts at layer 0: a removal heals the layer before the "
                "span, and there is none (the first layer stays)"
            )
        before = layers[start - 1]
        if isinstance(before, LinearBlock) or not arch.has_kind(before):
            raise InputError(
                f"span {(start, end)}: layer {start - 1}, before it, has no MLP output "
                "projection to heal (it is a linear block)"
            )


def remove_layers(model: nn.Module, indices: Iterable[int]) -> nn.Module:
    """Drop the layers at the given positions outright (baselines such as ShortGPT)."""
    arch = _checked_architecture(model)
    layout = current_layout(model)
    removed = set(indices)
    _check_spans([(i, i) for i in removed], len(decoder_layers(model)))
    base_indices = {
        i
        for pos in removed
        for i in range(layout["origins"][pos][0], layout["origins"][pos][1] + 1)
    }
    layout["removed"] = sorted({*layout["removed"], *base_indices})
    _rebuild(model, arch, layout, removed, {}, {})
    logger.info("removed layers %s", sorted(removed))
    return model


def current_layout(model: nn.Module) -> dict:
    """A copy of the recorded layout, or the identity layout of an untouched model."""
    recorded = getattr(model.config, "linearize", None)
    if recorded:
        return copy.deepcopy(recorded)
    count = num_layers(model)
    return {
        "version": LAYOUT_VERSION,
        "original_num_layers": count,
        "origins": [[i, i] for i in range(count)],
        "linear_blocks": [],
        "folds": [],
        "removed": [],
    }


def position_computing_through(model: nn.Module, original: int) -> int:
    """The first current position whose output is the base model's hidden state after layer
    `original`, counting what a fold target computes for the span folded into it, and a layer
    before removed layers as standing for them (its output is all that is left of them)."""
    layout = current_layout(model)
    ends = [last for _, last in layout["origins"]]
    for fold in layout["folds"]:
        for position, (first, _) in enumerate(layout["origins"]):
            if first == fold["into"]:
                ends[position] = max(ends[position], fold["span"][1])
    removed = set(layout["removed"])
    for position, end in enumerate(ends):
        while end + 1 in removed:
            end += 1
        ends[position] = end
    for position, end in enumerate(ends):
        if end >= original:
            return position
    return len(ends) - 1


def install_linear_blocks(model: nn.Module, linear_blocks: list[dict]) -> nn.Module:
    """Put empty LinearBlocks at recorded positions of a model built from a saved config.

    Used by checkpoint loading: the config already has the compressed layer count, so this only
    swaps modules; the weights come from the state dict afterwards.
    """
    layers = decoder_layers(model)
    for entry in linear_blocks:
        position = entry["position"]
        old = layers[position]
        block = LinearBlock(
            hidden_size(model),
            bias=bool(entry["bias"]),
            layer_idx=position,
            dtype=_dtype_of(old, model),
            device=_device_of(old, model),
        )
        _carry_layer_attributes(old, block)
        layers[position] = block
    _match_layer_outputs(model)
    return model


# --- spans and positions -----------------------------------------------------------------------


def _checked_architecture(model: nn.Module) -> Architecture:
    arch = get_architecture(model)
    if getattr(model.config, "is_heterogeneous", False):
        raise UnsupportedArchitectureError(
            "models with per-layer config overrides (per_layer_config) are not supported"
        )
    return arch


def _check_spans(spans: Iterable[Any], count: int) -> None:
    """Each span is an in-range (start, end) pair of positions; no two spans overlap."""
    taken: set[int] = set()
    for span in spans:
        start, end = _validated_span(span, count)
        covered = set(range(start, end + 1))
        if covered & taken:
            raise InputError(f"span {span} overlaps another span")
        taken |= covered


def _validated_span(span: Any, count: int) -> Span:
    try:
        start, end = (int(v) for v in span)
    except (TypeError, ValueError):
        raise InputError(
            f"a span must be a (start, end) pair of layer indices, got {span!r}"
        ) from None
    if not 0 <= start <= end < count:
        raise InputError(f"span {span} is not a valid inclusive range of layers 0..{count - 1}")
    return start, end


def _check_fold_target(layers: nn.ModuleList, span: Span, spans: list[Span]) -> None:
    start, _ = span
    if start == 0:
        raise FoldError(f"span {span} starts at layer 0: there is no block before it to fold into")
    before = start - 1
    if any(s <= before <= e for s, e in spans):
        raise FoldError(f"span {span}: layer {before}, the fold target, is removed by another span")
    if isinstance(layers[before], LinearBlock):
        raise FoldError(f"span {span}: layer {before}, the fold target, is a linear block")


def _check_map_size(affine: AffineMap, d: int, span: Span) -> None:
    if tuple(affine.weight.shape) != (d, d):
        raise InputError(
            f"map for span {span} has shape {tuple(affine.weight.shape)}, expected ({d}, {d})"
        )


# --- folding -----------------------------------------------------------------------------------


def _check_fold(arch: Architecture, model: nn.Module, layer: nn.Module, span, fold) -> None:
    d = hidden_size(model)
    _check_map_size(fold.mlp, d, span)
    carriers = arch.kind_of(layer).carriers(layer, model.config)
    _check_intercept_fits(carriers, fold.mlp, span)
    if fold.attn is None:
        return
    if not arch.is_parallel_residual(model.config):
        raise FoldError(
            f"span {span}: an attention-output fold is exact only for parallel-residual models; "
            f"in {arch.name} the attention output also feeds the MLP"
        )
    _check_map_size(fold.attn, d, span)
    _check_bias_fits(layer.get_submodule(arch.attn_out), fold.attn, f"{arch.attn_out} ({span})")


def _check_intercept_fits(carriers: list[Carrier], affine: AffineMap, span: Span) -> None:
    if affine.bias is None or any(c.takes_intercept and c.bias is not None for c in carriers):
        return
    if torch.count_nonzero(affine.bias) > 0:
        names = ", ".join(c.name for c in carriers)
        raise FoldError(
            f"{names} ({span}) cannot carry the map's non-zero bias (no bias, or expert biases "
            "whose gates do not sum to 1): fit the map without an intercept, or use "
            "--format linear"
        )


def _check_bias_fits(projection: nn.Module, affine: AffineMap, where: str) -> None:
    if getattr(projection, "bias", None) is not None or affine.bias is None:
        return
    if torch.count_nonzero(affine.bias) > 0:
        raise FoldError(
            f"{where} has no bias, but the map has a non-zero bias: fit the map without an "
            "intercept, or use --format linear"
        )


def _fold_into_block(arch: Architecture, model: nn.Module, layer: nn.Module, fold) -> None:
    for carrier in arch.kind_of(layer).carriers(layer, model.config):
        fold_into_carrier(carrier, fold.mlp)
    if fold.attn is not None:
        fold_into_projection(layer.get_submodule(arch.attn_out), fold.attn, arch.weight_layout)


def fold_into_projection(projection: nn.Module, affine: AffineMap, weight_layout: str) -> None:
    """Make `projection(h)` return `affine.apply(projection(h))`, exactly up to rounding."""
    bias = getattr(projection, "bias", None)
    carrier = Carrier("projection", projection.weight, bias, weight_layout, takes_intercept=True)
    fold_into_carrier(carrier, affine)


@torch.no_grad()
def fold_into_carrier(carrier: Carrier, affine: AffineMap) -> None:
    """Right-multiply the carrier's output side by T: W (..., out, in) -> Tᵀ W, W (..., in, out)
    -> W T, for every expert; its bias b -> b T, plus the intercept if it takes it."""
    weight = carrier.weight
    t = affine.weight.to(device=weight.device, dtype=torch.float64)  # (d, d)
    for part in _fold_blocks(weight, carrier.layout):
        w = part.to(torch.float64)
        part.copy_((t.T @ w if carrier.layout == "out_in" else w @ t).to(part.dtype))
    if carrier.bias is not None:
        new_bias = carrier.bias.to(torch.float64) @ t  # (..., d)
        if affine.bias is not None and carrier.takes_intercept:
            new_bias = new_bias + affine.bias.to(new_bias)
        carrier.bias.copy_(new_bias.to(carrier.bias.dtype))


def _fold_blocks(weight: Tensor, layout: str) -> Iterable[Tensor]:
    """Views of `weight` that together cover it, each holding whole d-vectors and at most
    FOLD_BLOCK_BYTES in float64. The fold works in float64: on a whole stack of experts at once
    that was 8x the stack's bf16 size twice over (3.1 GiB for one Qwen3-30B-A3B layer)."""
    if not weight.is_contiguous():  # a view of it would not be its storage: fold it whole
        yield weight
        return
    stack = weight.view(-1, *weight.shape[-2:])  # (experts or 1, rows, columns)
    d = stack.shape[1] if layout == "out_in" else stack.shape[2]
    other = stack.shape[2] if layout == "out_in" else stack.shape[1]
    step = max(1, FOLD_BLOCK_BYTES // (8 * d))
    for matrix in stack:
        for start in range(0, other, step):
            yield (
                matrix[:, start : start + step]
                if layout == "out_in"
                else matrix[start : start + step]
            )


# --- rebuilding the layers list and the config -------------------------------------------------


def _rebuild(
    model: nn.Module,
    arch: Architecture,
    layout: dict,
    removed: set[int],
    replacements: dict[int, nn.Module],
    new_origins: dict[int, list[int]],
) -> None:
    old_layers = decoder_layers(model)
    kept = [pos for pos in range(len(old_layers)) if pos not in removed]
    if not kept:
        raise InputError("surgery would remove every decoder layer")
    new_layers = [replacements.get(pos, old_layers[pos]) for pos in kept]
    _set_layers(model, arch, nn.ModuleList(new_layers))
    _trim_config(layer_config(model), arch, kept)
    _renumber_layer_indices(new_layers)
    layout["origins"] = [new_origins.get(pos, layout["origins"][pos]) for pos in kept]
    layout["linear_blocks"] = [
        {"position": pos, "span": layout["origins"][pos], "bias": layer.linear.bias is not None}
        for pos, layer in enumerate(new_layers)
        if isinstance(layer, LinearBlock)
    ]
    model.config.linearize = layout


def _set_layers(model: nn.Module, arch: Architecture, layers: nn.ModuleList) -> None:
    parent_path, _, name = arch.layers_path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, layers)


def _trim_config(config: Any, arch: Architecture, kept: list[int]) -> None:
    for trim_pattern in arch.pattern_trimmers:
        trim_pattern(config, kept)
    trim_layer_config(config, arch.num_layers_key, arch.per_layer_config_keys, kept)


def trim_layer_config(config: Any, count_key: str, keys: Iterable[str], kept: list[int]) -> None:
    """Keep the layers at positions `kept` in the config: per-layer lists keep their entries,
    lists of layer indices (LAYER_INDEX_KEYS, e.g. lfm2's full_attn_idxs) are renumbered."""
    from linearize.discovery import LAYER_INDEX_KEYS

    old_count = int(getattr(config, count_key))
    for key in keys:
        values = getattr(config, key, None)
        if values is None:
            continue
        if key in LAYER_INDEX_KEYS:
            setattr(config, key, [new for new, old in enumerate(kept) if old in set(values)])
            continue
        if len(values) != old_count:
            raise UnsupportedArchitectureError(
                f"config.{key} has {len(values)} entries for {old_count} layers"
            )
        setattr(config, key, [values[pos] for pos in kept])
    setattr(config, count_key, len(kept))


def _renumber_layer_indices(layers: list[nn.Module]) -> None:
    # layer_idx picks the KV-cache slot; it must equal the layer's position after surgery.
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position


def _linear_block_like(old: nn.Module, affine: AffineMap, *, layer_idx: int) -> LinearBlock:
    block = LinearBlock.from_map(
        affine, layer_idx=layer_idx, dtype=_dtype_of(old), device=_device_of(old)
    )
    _carry_layer_attributes(old, block)
    return block


def _carry_layer_attributes(old: nn.Module, new: nn.Module) -> None:
    for name in _LAYER_ATTRIBUTES:
        if hasattr(old, name) and not isinstance(getattr(old, name), nn.Module):
            setattr(new, name, getattr(old, name))


def unpacks_layer_outputs(model: nn.Module) -> bool:
    """Whether the model's layer loop reads each decoder layer's output as a tuple
    (`hidden_states = layer_outputs[0]`, falcon_h1), so that a module standing in for a layer
    must return one. Read from the loop's source: layers' annotations are not reliable."""
    import inspect

    try:
        source = inspect.getsource(type(model.base_model).forward)
    except (OSError, TypeError):
        return False
    return "= layer_outputs[0]" in source


def _match_layer_outputs(model: nn.Module) -> None:
    unpacks = unpacks_layer_outputs(model)
    for layer in decoder_layers(model):
        if isinstance(layer, LinearBlock):
            layer.tuple_output = unpacks


def _first_parameter(*modules: nn.Module) -> Tensor | None:
    for module in modules:
        for param in module.parameters():
            if param.is_floating_point():
                return param
    return None


def _dtype_of(*modules: nn.Module) -> torch.dtype:
    param = _first_parameter(*modules)
    return param.dtype if param is not None else torch.get_default_dtype()


def _device_of(*modules: nn.Module) -> torch.device:
    param = _first_parameter(*modules)
    return param.device if param is not None else torch.device("cpu")
