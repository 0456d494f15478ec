"""Registry: HF `config.model_type` -> where a causal LM keeps its decoder layers and projections.

Surgery and capture never hard-code module paths; they ask this registry. Adding a model family
is one `Architecture(...)` entry, checked by tests/test_architectures.py and the exact-fold tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from linearize.errors import FoldError, UnsupportedArchitectureError
from linearize.kinds import DenseMLP, LayerKind, MixtureOfExperts, WeightLayout, always

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Architecture", "LayerKind", "WeightLayout", "get_architecture"]

# A pattern trimmer rewrites the config fields that describe which layer is of which kind, given
# the positions (in the old numbering) of the layers that stay; it runs before the layer count
# changes, so on entry the config still describes the old layers.
PatternTrimmer = Callable[[Any, list[int]], None]


def _no_blocker(config: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Architecture:
    """How one model family is laid out. Paths are dotted `get_submodule` paths.

    layers_path: the decoder layers' ModuleList, relative to the causal-LM model.
    num_layers_key: the config attribute holding the number of decoder layers.
    per_layer_config_keys: config lists with one entry per layer (trimmed on removal).
        Both live in the text config (`layer_config`): a multimodal wrapper's `text_config`.
    mlp_out / attn_out: the block's MLP and attention output projections, relative to a layer.
    weight_layout: "out_in" for nn.Linear (y = x Wᵀ + b), "in_out" for GPT-2's Conv1D (y = x W + b).
    parallel_residual: whether a layer computes x + attn(ln1 x) + mlp(ln2 x), so that the attention
        output also feeds the residual stream directly and can take a fold.
    fold_blocker: the reason a map on the MLP output cannot be folded exactly into `mlp_out`
        for this config, or None when it can.
    layer_kinds: the kinds a layer's feed-forward block may be (linearize.kinds), tried in
        order; empty means one kind, `DenseMLP(mlp_out, weight_layout)`. Surgery, fitting and
        healing ask `kind_of(layer)` for the fold's carriers, the module whose output is the
        MLP output, and what must stay frozen, never `mlp_out` directly.
    pattern_trimmers: functions that keep config fields describing the layer pattern (which
        layer is sparse, dense, ...) true after removal: `trim(config, kept)`.
    mlp_output_scale: the factor the layer multiplies its MLP output by before the residual add
        (Granite's residual_multiplier); fitting sees M times this factor.
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
    layer_kinds: tuple[LayerKind, ...] = ()
    pattern_trimmers: tuple[PatternTrimmer, ...] = ()
    mlp_output_scale: Callable[[Any], float] = lambda config: 1.0

    def is_parallel_residual(self, config: Any) -> bool:
        return bool(self.parallel_residual(config))

    def kinds(self) -> tuple[LayerKind, ...]:
        return self.layer_kinds or (DenseMLP(self.mlp_out, self.weight_layout),)

    def kind_of(self, layer: nn.Module) -> LayerKind:
        """The kind of a decoder layer's feed-forward block; FoldError if it has none we know
        (a linear block, or a module this entry does not describe)."""
        for kind in self.kinds():
            if kind.describes(layer):
                return kind
        names = ", ".join(kind.name for kind in self.kinds())
        raise FoldError(
            f"{type(layer).__name__} has no feed-forward block of a kind {self.name} knows "
            f"({names})"
        )

    def has_kind(self, layer: nn.Module) -> bool:
        return any(kind.describes(layer) for kind in self.kinds())


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
    # Multimodal wrappers: only the language backbone is compressed; the vision tower and
    # projector sit beside it and are written back unchanged.
    _llama_like("llava", layers_path="model.language_model.layers"),
    _llama_like("mistral3", layers_path="model.language_model.layers"),
    _llama_like(
        "qwen2_5_vl",
        layers_path="model.language_model.layers",
        per_layer_config_keys=("layer_types",),
    ),
    _llama_like(
        "qwen3_vl",
        layers_path="model.language_model.layers",
        per_layer_config_keys=("layer_types",),
    ),
    _llama_like(
        "gemma3",
        layers_path="model.language_model.layers",
        per_layer_config_keys=("layer_types",),
        fold_blocker=_gemma_post_norm,
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


# --- mixture-of-experts families ----------------------------------------------------------------
# Layouts checked against transformers 5.24's modeling files (qwen3_next against 5.25's): the
# fused experts' down_proj is (E, d, ff) except gpt_oss and llama4 (E, ff, d); only gpt_oss has
# expert biases, and its gates are a softmax over the top-k (sum 1), so an intercept folds
# exactly through them.


def _norm_topk(config: Any) -> bool:
    return bool(getattr(config, "norm_topk_prob", False))


def _trim_sparse_step(config: Any, kept: list[int]) -> None:
    """Qwen-MoE: layer i is sparse unless i is in mlp_only_layers or (i + 1) % step != 0. After a
    removal the sparse layers are no longer every step-th one, so say it with an explicit list."""
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    dense_only = set(getattr(config, "mlp_only_layers", None) or ())
    experts = int(getattr(config, "num_experts", 0) or 0)

    def sparse(i: int) -> bool:
        return i not in dense_only and experts > 0 and (i + 1) % step == 0

    config.decoder_sparse_step = 1
    config.mlp_only_layers = [new for new, old in enumerate(kept) if not sparse(old)]


def _trim_first_k_dense(config: Any, kept: list[int]) -> None:
    """DeepSeek: the first k layers are dense; kept dense layers are still a prefix."""
    k = getattr(config, "first_k_dense_replace", None)
    if k is not None:
        config.first_k_dense_replace = sum(1 for old in kept if old < int(k))


def _trim_moe_layers(config: Any, kept: list[int]) -> None:
    """Llama 4: moe_layers lists the sparse layers (it overrides interleave_moe_layer_step)."""
    sparse = set(getattr(config, "moe_layers", None) or ())
    config.moe_layers = [new for new, old in enumerate(kept) if old in sparse]


def _drop_attention_interval(config: Any, kept: list[int]) -> None:
    """Qwen3-Next: full_attention_interval (every n-th layer is full attention) only stands in
    for a missing layer_types; after a removal the pattern is no longer periodic, and the trimmed
    layer_types says it. None drops the field from the written config.json."""
    config.full_attention_interval = None


def _moe(name: str, kinds: tuple[LayerKind, ...], **overrides: Any) -> Architecture:
    # Dense layers of a mixed family (mlp_only_layers, first_k_dense_replace) keep mlp.down_proj.
    return _llama_like(name, layer_kinds=(*kinds, DenseMLP("mlp.down_proj")), **overrides)


def _llama4(name: str, layers_path: str) -> Architecture:
    return _llama_like(
        name,
        layers_path=layers_path,
        mlp_out="feed_forward.down_proj",
        layer_kinds=(
            MixtureOfExperts(
                "feed_forward",
                layout="in_out",
                shared=("shared_expert.down_proj",),
                routers=("router",),
            ),
            DenseMLP("feed_forward.down_proj"),
        ),
        per_layer_config_keys=("layer_types", "no_rope_layers"),
        pattern_trimmers=(_trim_moe_layers,),
    )


_MOE_ENTRIES = (
    _moe(
        "qwen2_moe",
        (
            MixtureOfExperts(
                "mlp",
                shared=("shared_expert.down_proj",),
                routers=("gate", "shared_expert_gate"),
                gates_sum_to_one=_norm_topk,
            ),
        ),
        per_layer_config_keys=("layer_types",),
        pattern_trimmers=(_trim_sparse_step,),
    ),
    _moe(
        "qwen3_moe",
        (MixtureOfExperts("mlp", gates_sum_to_one=_norm_topk),),
        pattern_trimmers=(_trim_sparse_step,),
    ),
    _moe(
        "qwen3_next",
        (
            # The shared expert's output is scaled by sigmoid(shared_expert_gate(x)), one scalar
            # per token, so a map on its down projection's output folds exactly through it.
            MixtureOfExperts(
                "mlp",
                shared=("shared_expert.down_proj",),
                routers=("gate", "shared_expert_gate"),
                gates_sum_to_one=_norm_topk,
            ),
        ),
        # layer_types (linear_attention / full_attention) decides the mixer and the cache slot
        # kind; linear-attention layers have linear_attn.out_proj, not self_attn.o_proj.
        per_layer_config_keys=("layer_types",),
        pattern_trimmers=(_trim_sparse_step, _drop_attention_interval),
    ),
    _moe("mixtral", (MixtureOfExperts("mlp", gates_sum_to_one=always),)),
    _moe("olmoe", (MixtureOfExperts("mlp", gates_sum_to_one=_norm_topk),)),
    _moe(
        "deepseek_v3",
        (
            # Gates sum to routed_scaling_factor (2.5 in the release), not 1; no biases anyway.
            MixtureOfExperts("mlp", shared=("shared_experts.down_proj",)),
        ),
        pattern_trimmers=(_trim_first_k_dense,),
    ),
    _moe(
        "gpt_oss",
        (
            MixtureOfExperts(
                "mlp",
                down_bias="down_proj_bias",
                layout="in_out",
                routers=("router",),
                gates_sum_to_one=always,
            ),
        ),
        per_layer_config_keys=("layer_types",),
    ),
    _llama_like(
        "granitemoe",
        mlp_out="block_sparse_moe",
        layer_kinds=(
            # A softmax over the top-k logits: the gates sum to 1.
            MixtureOfExperts("block_sparse_moe", routers=("router",), gates_sum_to_one=always),
        ),
        mlp_output_scale=lambda config: float(getattr(config, "residual_multiplier", 1.0)),
    ),
    _llama4("llama4_text", layers_path="model.layers"),
    # The wrapper (Llama4ForConditionalGeneration) holds a whole causal LM as language_model,
    # so its layers sit under language_model.model, not model.language_model as in llava.
    _llama4("llama4", layers_path="language_model.model.layers"),
)

ARCHITECTURES: dict[str, Architecture] = {entry.name: entry for entry in (*_ENTRIES, *_MOE_ENTRIES)}


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


def layer_config(model_or_config: Any) -> Any:
    """The config that describes the decoder layers: a multimodal wrapper's `text_config`
    (shared with its language model), the config itself for a causal LM."""
    config = _config_of(model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def text_model(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers (embeddings, layers, final norm): called with
    `input_ids` only it returns the last hidden state, for a wrapper without its vision tower."""
    parent_path = get_architecture(model).layers_path.rpartition(".")[0]
    return model.get_submodule(parent_path)


def num_layers(model_or_config: Any) -> int:
    config = _config_of(model_or_config)
    return int(getattr(layer_config(config), get_architecture(config).num_layers_key))


def hidden_size(model_or_config: Any) -> int:
    # Every registered config maps `hidden_size` (GPT-2 through its attribute_map to n_embd).
    return int(layer_config(model_or_config).hidden_size)
