"""Layouts of model families without a registry entry, found the way accelerate and
llm-compressor find layers: the model class's `_no_split_modules` names the decoder layer class,
the ModuleList holding those layers is the layers path, and the MLP output projection is found
by its well-known names under the layer's MLP submodule.

A discovered layout is only a candidate: linearize.foldcheck proves the fold and the removal on
a tiny model of the same config before any pass, and refuses the family when they fail.
"""

from __future__ import annotations

import copy
from typing import Any

from linearize.errors import UnsupportedArchitectureError

# Submodule names of a layer's feed-forward block and of its output projection, in the order
# tried (GPT-2 has both attn.c_proj and mlp.c_proj: the MLP parent decides).
MLP_PARENTS = ("mlp", "feed_forward", "ffn", "ff", "")
MLP_OUTPUTS = ("down_proj", "fc2", "c_proj", "w2", "dense_4h_to_h", "fc_out", "wo")
ATTN_PARENTS = ("self_attn", "attn", "attention", "self_attention")
ATTN_OUTPUTS = ("o_proj", "out_proj", "c_proj", "dense", "wo")
# Config lists that hold layer indices rather than one entry per layer; they are renumbered.
LAYER_INDEX_KEYS = ("full_attn_idxs",)
# Config lists whose length may equal the layer count without describing layers.
NOT_PER_LAYER = ("architectures", "eos_token_id", "bad_words_ids", "suppress_tokens")


def discover_architecture(config: Any):
    """An Architecture for a config whose model type has no registry entry, or
    UnsupportedArchitectureError naming the family and what could not be found."""
    # Keyed by the whole config: the layout is a pure function of it (and of transformers).
    key = (type(config), config.to_json_string(use_diff=False))
    if key not in _DISCOVERED:
        if len(_DISCOVERED) >= 32:
            _DISCOVERED.clear()
        _DISCOVERED[key] = _discover(config)
    return _DISCOVERED[key]


_DISCOVERED: dict = {}


def _discover(config: Any):
    from linearize.architectures import Architecture

    model_type = config.model_type
    count_key = num_layers_key(config)
    model = _meta_model(config, count_key)
    layers_path, layer = _find_layers(model, model_type)
    mlp_out, layout = _find_projection(layer, MLP_PARENTS, MLP_OUTPUTS)
    if mlp_out is None:
        raise UnsupportedArchitectureError(
            f"no MLP output projection (one of {', '.join(MLP_OUTPUTS)} under "
            f"{', '.join(p for p in MLP_PARENTS if p)}) in {type(layer).__name__}"
        )
    attn_out, _ = _find_projection(layer, ATTN_PARENTS, ATTN_OUTPUTS)
    return Architecture(
        name=model_type,
        layers_path=layers_path,
        num_layers_key=count_key,
        mlp_out=mlp_out,
        attn_out=attn_out or "",
        weight_layout=layout,
        per_layer_config_keys=per_layer_keys(config, int(getattr(config, count_key))),
        mlp_output_scale=mlp_output_scale,
    )


def mlp_output_scale(config: Any) -> float:
    """The factor between the MLP output projection's output and what reaches the residual
    stream, from the config fields that say it: granite's residual_multiplier, falcon_h1's
    mlp_multipliers (gate, down). The fold check proves it on every config."""
    scale = float(getattr(config, "residual_multiplier", None) or 1.0)
    multipliers = getattr(config, "mlp_multipliers", None)
    if isinstance(multipliers, (list, tuple)) and len(multipliers) == 2:
        scale *= float(multipliers[1])
    return scale


def num_layers_key(config: Any) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return key
    raise UnsupportedArchitectureError("the config has no layer count (num_hidden_layers)")


def per_layer_keys(config: Any, count: int) -> tuple[str, ...]:
    """Config attributes that are lists with one entry per decoder layer (layer_types,
    no_rope_layers, ...), and the lists of layer indices this module knows."""
    keys = []
    for key, value in sorted(config.to_dict().items()):
        if key in NOT_PER_LAYER or not isinstance(value, (list, tuple)):
            continue
        if len(value) == count or key in LAYER_INDEX_KEYS:
            keys.append(key)
    return tuple(keys)


def _meta_model(config: Any, count_key: str):
    """The causal LM of a two-layer copy of the config, on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    small = shrunk_config(config, layers=2)
    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(small)
    except (ValueError, KeyError) as err:
        raise UnsupportedArchitectureError(
            f"transformers has no causal-LM class for it ({err})"
        ) from None


def shrunk_config(config: Any, *, layers: int) -> Any:
    """A copy of the config with at most `layers` decoder layers, its per-layer lists cut to
    the same layers: the first layer of each kind in `layer_types`, then the first ones."""
    from linearize.architectures import layer_config
    from linearize.surgery import trim_layer_config

    small = copy.deepcopy(config)
    text = layer_config(small)  # a multimodal wrapper's layers are described by its text_config
    key = num_layers_key(text)
    count = int(getattr(text, key))
    kinds = getattr(text, "layer_types", None) or []
    kept = sorted({kinds.index(kind) for kind in kinds})[:layers] if len(kinds) == count else []
    kept = sorted({*kept, *[i for i in range(count) if i not in kept][: layers - len(kept)]})
    trim_layer_config(text, key, per_layer_keys(text, count), kept)
    return small


def _find_layers(model, model_type: str):
    """(path of the ModuleList of decoder layers, its first layer)."""
    from torch import nn

    names = set(getattr(model, "_no_split_modules", None) or [])
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in names:
            return path, module[0]
    raise UnsupportedArchitectureError(
        f"no list of decoder layers ({', '.join(sorted(names)) or 'no class named'}"
        " in the model's _no_split_modules)"
    )


def _find_projection(layer, parents, outputs):
    """(path, weight layout) of the first Linear / Conv1D named parent.output in `layer`."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    for parent in parents:
        for output in outputs:
            path = f"{parent}.{output}" if parent else output
            try:
                module = layer.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, nn.Linear):
                return path, "out_in"
            if isinstance(module, Conv1D):
                return path, "in_out"
    return None, "out_in"
