"""The registry describes every supported family exactly as transformers builds it."""

from types import SimpleNamespace

import pytest
from tiny_models import ARCHITECTURES as DENSE_ARCHITECTURES
from tiny_models import MOE_ARCHITECTURES, build_tiny_config, build_tiny_model
from tiny_multimodal import MULTIMODAL

from linearize.architectures import (
    ARCHITECTURES,
    decoder_layers,
    get_architecture,
    hidden_size,
    num_layers,
)
from linearize.errors import UnsupportedArchitectureError
from linearize.kinds import has_submodule

TINY_ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES


def test_registry_covers_every_tiny_architecture():
    assert set(ARCHITECTURES) == set(TINY_ARCHITECTURES) | set(MULTIMODAL)


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
def test_registry_paths_resolve_on_real_models(arch_name):
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    model = build_tiny_model(arch_name)
    arch = get_architecture(model)
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList)
    assert len(layers) == num_layers(model) == 6
    assert hidden_size(model) == 32
    expected_type = nn.Linear if arch.weight_layout == "out_in" else Conv1D
    attention = arch.attn_out.rpartition(".")[0]
    for layer in layers:
        kind = arch.kind_of(layer)
        assert kind.output_module(layer) in set(layer.modules())
        for carrier in kind.carriers(layer, model.config):
            side = -2 if carrier.layout == "out_in" else -1  # the hidden side takes the map
            assert carrier.weight.shape[side] == 32, carrier.name
        if has_submodule(layer, attention):  # a hybrid's linear-attention layers have none
            assert isinstance(layer.get_submodule(arch.attn_out), expected_type)
    assert any(has_submodule(layer, arch.attn_out) for layer in layers)
    for key in arch.per_layer_config_keys:
        assert len(getattr(model.config, key)) == num_layers(model)


def test_get_architecture_unknown_type_lists_supported_names():
    with pytest.raises(UnsupportedArchitectureError, match="llama.*opt|opt.*llama") as info:
        get_architecture(SimpleNamespace(model_type="bert"))
    assert "'bert'" in str(info.value)
    assert "gpt_neox" in str(info.value)


@pytest.mark.parametrize("arch_name", ["gemma2", "gemma3_text"])
def test_fold_blocker_gemma_post_feedforward_norm(arch_name):
    config = build_tiny_config(arch_name)
    assert "post_feedforward_layernorm" in get_architecture(config).fold_blocker(config)


def test_fold_blocker_opt_depends_on_layer_norm_placement():
    arch = get_architecture(build_tiny_config("opt"))
    assert arch.fold_blocker(build_tiny_config("opt")) is None
    assert "post-LN" in arch.fold_blocker(build_tiny_config("opt", do_layer_norm_before=False))


@pytest.mark.parametrize("arch_name", ["llama", "gpt2", "qwen3", "phi3", "mistral"])
def test_fold_blocker_none_for_pre_norm_families(arch_name):
    config = build_tiny_config(arch_name)
    assert get_architecture(config).fold_blocker(config) is None


def test_parallel_residual_follows_neox_config():
    arch = get_architecture(build_tiny_config("gpt_neox"))
    assert arch.is_parallel_residual(build_tiny_config("gpt_neox", use_parallel_residual=True))
    assert not arch.is_parallel_residual(build_tiny_config("gpt_neox", use_parallel_residual=False))
    llama = build_tiny_config("llama")
    assert not get_architecture(llama).is_parallel_residual(llama)


def test_num_layers_reads_gpt2_n_layer():
    config = build_tiny_config("gpt2", n_layer=3)
    assert get_architecture(config).num_layers_key == "n_layer"
    assert num_layers(config) == 3
