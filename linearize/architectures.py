"""Registry: HF `config.model_type` -> where a causal LM keeps its decoder layers and projections.

Surgery and capture never hard-code module paths; they ask this registry. Adding a model family
is one `Architecture(...)` entry, checked by tests/test_architectures.py and the exact-fold tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from linearize.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from torch import nn

WeightLayout = Literal["out_in", "in_out"]


def _no_blocker(config: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Architecture:
    """How one model family is laid out. Paths are dotted `get_submodule` paths.

    layers_path: the decoder layers' ModuleList, relative to the causal-LM model.
    num_layers_key: the config attribute holding the number of decoder layers.
    per_layer_config_keys: config lists with one entry per layer (trimmed on removal).
    mlp_out / attn_out: the block's MLP and attention output projections, relative to a layer.
    weight_layout: "out_in" for nn.Linear (y = x Wᵀ + b), "in_out" for GPT-2's Conv1D (y = x W + b).
    parallel_residual: whether a layer computes x + attn(ln1 x) + mlp(ln2 x), so that the attention
        output also feeds the residual stream directly and can take a fold.
    fold_blocker: the reason a map on the MLP output cannot be folded exactly into `mlp_out`
        for this config, or None when it can.
    """

    name: str
    layers_path: str
    num_layers_key: str
    mlp_out: str
    attn_out: str
    weight_layout: WeightLayout = "out_in"
    per_layer_config_keys: tuple[str, ...] = ()
    parallel_residual: Callable[[Any], bool] = lambda config: False
    fold_blocker: Callable[[Any], str | None] = _no_blocker

    def is_parallel_residual(self, config: Any) -> bool:
        return bool(self.parallel_residual(config))


def _gemma_post_norm(config: Any) -> str:
    return (
        f"{config.model_type} normalises the MLP output (post_feedforward_layernorm) after "
        "down_proj, so a linear map on the MLP output cannot be folded into down_proj exactly"
    )


def _opt_post_layer_norm(config: Any) -> str | None:
    if getattr(config, "do_layer_norm_before", True):
        return None
    return (
        "this OPT model is post-LN (do_layer_norm_before=False): the layer norm after the "
        "residual add sits between fc2 and the block output, so a fold into fc2 is not exact"
    )


def _llama_like(name: str, **overrides: Any) -> Architecture:
    fields = dict(
        name=name,
        layers_path="model.layers",
        num_layers_key="num_hidden_layers",
        mlp_out="mlp.down_proj",
        attn_out="self_attn.o_proj",
    )
    return Architecture(**{**fields, **overrides})


_ENTRIES = (
    _llama_like("llama"),
    _llama_like("mistral"),
    _llama_like("qwen2", per_layer_config_keys=("layer_types",)),
    _llama_like("qwen3", per_layer_config_keys=("layer_types",)),
    _llama_like("phi3"),
    _llama_like("gemma2", per_layer_config_keys=("layer_types",), fold_blocker=_gemma_post_norm),
    _llama_like(
        "gemma3_text", per_layer_config_keys=("layer_types",), fold_blocker=_gemma_post_norm
    ),
    Architecture(
        name="gpt2",
        layers_path="transformer.h",
        num_layers_key="n_layer",
        mlp_out="mlp.c_proj",
        attn_out="attn.c_proj",
        weight_layout="in_out",
    ),
    Architecture(
        name="opt",
        layers_path="model.decoder.layers",
        num_layers_key="num_hidden_layers",
        mlp_out="fc2",
        attn_out="self_attn.out_proj",
        fold_blocker=_opt_post_layer_norm,
    ),
    Architecture(
        name="gpt_neox",
        layers_path="gpt_neox.layers",
        num_layers_key="num_hidden_layers",
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        parallel_residual=lambda config: getattr(config, "use_parallel_residual", True),
    ),
)

ARCHITECTURES: dict[str, Architecture] = {entry.name: entry for entry in _ENTRIES}


def _config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def get_architecture(model_or_config: Any) -> Architecture:
    """The registry entry for a model or its config, else the layout discovered from the model
    class (linearize.discovery; linearize.foldcheck proves it before a compression); raises
    UnsupportedArchitectureError."""
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    supported = ", ".join(sorted(ARCHITECTURES))
    if hasattr(config, "to_json_string"):
        from linearize.discovery import discover_architecture

        try:
            return discover_architecture(config)
        except UnsupportedArchitectureError as err:
            raise UnsupportedArchitectureError(
                f"model type {model_type!r} is not supported: {err}; supported model types: "
                f"{supported}, and Llama-like families whose layout is found and proven"
            ) from None
    raise UnsupportedArchitectureError(
        f"model type {model_type!r} is not supported; supported model types: {supported}"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order."""
    return model.get_submodule(get_architecture(model).layers_path)


def num_layers(model_or_config: Any) -> int:
    config = _config_of(model_or_config)
    return int(getattr(config, get_architecture(config).num_layers_key))


def hidden_size(model_or_config: Any) -> int:
    # Every registered config maps `hidden_size` (GPT-2 through its attribute_map to n_embd).
    return int(_config_of(model_or_config).hidden_size)
