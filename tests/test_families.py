"""Families without a registry entry: layouts discovered from the model class, the surgery
check that decides what each takes, and compressions end to end (hybrids included)."""

from pathlib import Path

import pytest
import torch
from tiny_families import (
    FAMILIES,
    FAMILY_CONFIGS,
    build_family_config,
    build_family_model,
    save_family_model,
)
from tiny_models import ARCHITECTURES as KNOWN
from tiny_models import build_tiny_config
from transformers import AutoModelForCausalLM

from api_schemas import CompressSpec, DataSpec
from linearize import pipeline
from linearize.architectures import ARCHITECTURES, decoder_layers, get_architecture
from linearize.data import find_wikitext
from linearize.errors import FoldError, UnsupportedArchitectureError
from linearize.foldcheck import check_surgery, require_surgery
from linearize.surgery import remove_layers

# The layer normalises (olmo2, gemma) or otherwise transforms (glm4's post_mlp_layernorm) the
# MLP output after its output projection: a map on the MLP output cannot be folded exactly.
FOLD_REFUSED = {"olmo2", "glm4", "gemma2", "gemma3_text"}
PER_LAYER_KEYS = {
    "smollm3": {"layer_types", "no_rope_layers"},
    "cohere2": {"layer_types"},
    "lfm2": {"layer_types", "full_attn_idxs"},
}
HYBRIDS = ("lfm2", "falcon_h1")


@pytest.mark.parametrize("family", FAMILIES)
def test_discover_architecture_finds_layers_projection_and_per_layer_lists(family):
    from torch import nn

    model = build_family_model(family)
    arch = get_architecture(model)
    assert family not in ARCHITECTURES
    assert len(decoder_layers(model)) == 4
    for layer in decoder_layers(model):
        assert isinstance(layer.get_submodule(arch.mlp_out), nn.Linear)
    assert set(arch.per_layer_config_keys) == PER_LAYER_KEYS.get(family, set())


# qwen3_next: a registry entry with linear-attention layers and a gated shared expert.
@pytest.mark.parametrize("family", [*FAMILIES, *KNOWN, "qwen3_next"])
def test_check_surgery_decides_the_fold_and_proves_the_removal(family):
    config = build_family_config(family) if family in FAMILIES else build_tiny_config(family)
    result = check_surgery(config)
    assert result.removal is None
    assert (result.fold is not None) == (family in FOLD_REFUSED), result.fold
    # docs/FAMILIES.md says what the check says.
    assert _documented_standard()[family] == ("no" if result.fold else "yes")


def _documented_standard() -> dict[str, str]:
    """family -> the standard column of docs/FAMILIES.md's table."""
    doc = Path(__file__).parent.parent / "docs" / "FAMILIES.md"
    lines = doc.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| family | layout |"))
    rows = []
    for line in lines[start + 2 :]:  # the table of families, after its header and rule
        if not line.startswith("| "):
            break
        rows.append(line.split("|")[1:-1])
    return {cells[0].strip(): cells[2].strip() for cells in rows}


@pytest.mark.parametrize(
    "family, overrides",
    [("granite", dict(residual_multiplier=0.5)), ("falcon_h1", dict(mlp_multipliers=[1.0, 0.5]))],
)
def test_check_surgery_scaled_mlp_output_still_folds_exactly(family, overrides):
    # granite adds residual_multiplier * MLP output, falcon_h1 scales down_proj's output by
    # mlp_multipliers[1]: the fit sees the scaled output, and a map without intercept commutes
    # with the scale, so the fold into down_proj stays exact.
    config = build_family_config(family, **overrides)
    assert get_architecture(config).mlp_output_scale(config) == 0.5
    result = check_surgery(config)
    assert result.fold is None and result.removal is None


def test_trim_renumbers_layer_index_lists_and_keeps_per_layer_lists():
    model = build_family_model("lfm2")  # full_attn_idxs [1, 3]: layers 0 and 2 are convolutions
    remove_layers(model, [1])
    assert model.config.full_attn_idxs == [2]
    assert model.config.layer_types == ["conv", "conv", "full_attention"]
    indices = [
        (position, module.layer_idx)
        for position, layer in enumerate(decoder_layers(model))
        for module in layer.modules()
        if isinstance(getattr(module, "layer_idx", None), int)
    ]
    assert indices and all(position == index for position, index in indices)


@pytest.mark.parametrize("family", [*HYBRIDS, "cohere2"])
def test_generate_with_cache_after_removal_equals_greedy_without_cache(family):
    model = build_family_model(family)
    remove_layers(model, [1])
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_generate(model, ids, 6), _greedy_without_cache(model, ids, 6))


@pytest.fixture(scope="module")
def planted_post_norm():
    """A family transformers knows but the registry does not, whose MLP output goes through a
    nonlinearity after down_proj: discovery finds down_proj, and the fold check refuses it."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    class PlantedConfig(LlamaConfig):
        model_type = "planted_post_norm"

    class PlantedMLP(LlamaMLP):
        def forward(self, x):
            return torch.tanh(super().forward(x))

    class PlantedForCausalLM(LlamaForCausalLM):
        config_class = PlantedConfig

        def __init__(self, config):
            super().__init__(config)
            for layer in self.model.layers:
                layer.mlp = PlantedMLP(config)

    AutoConfig.register("planted_post_norm", PlantedConfig, exist_ok=True)
    AutoModelForCausalLM.register(PlantedConfig, PlantedForCausalLM, exist_ok=True)
    return PlantedConfig(**FAMILY_CONFIGS["olmo2"])


def test_require_surgery_refuses_planted_post_norm_family_in_one_line(planted_post_norm):
    assert get_architecture(planted_post_norm).mlp_out == "mlp.down_proj"
    with pytest.raises(FoldError) as info:
        require_surgery(planted_post_norm, fold=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("planted_post_norm: a map folded into mlp.down_proj does not")
    assert "--format linear or --method remove" in message
    assert require_surgery(planted_post_norm, fold=False).removal is None


@pytest.fixture(scope="module")
def planted_broken_forward():
    """A family whose forward raises, as transformers 5.24's Llama4ForConditionalGeneration does
    on any input ('MoeCausalLMOutputWithPast' object has no attribute 'image_outputs')."""
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    class BrokenConfig(LlamaConfig):
        model_type = "planted_broken_forward"

    class BrokenForCausalLM(LlamaForCausalLM):
        config_class = BrokenConfig

        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs).image_outputs

    AutoConfig.register("planted_broken_forward", BrokenConfig, exist_ok=True)
    AutoModelForCausalLM.register(BrokenConfig, BrokenForCausalLM, exist_ok=True)
    return BrokenConfig(**FAMILY_CONFIGS["olmo2"])


def test_require_surgery_refuses_a_family_whose_forward_fails_in_one_line(planted_broken_forward):
    with pytest.raises(UnsupportedArchitectureError) as info:
        require_surgery(planted_broken_forward, fold=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("planted_broken_forward: the model's forward fails on a tiny model")
    assert "no attribute 'image_outputs'" in message


@pytest.fixture(scope="module")
def data():
    return DataSpec(path=str(find_wikitext()))


def test_compress_refuses_standard_fold_of_glm4_before_any_pass(data, tmp_path):
    model = save_family_model("glm4", tmp_path / "glm4")
    spec = CompressSpec(model=str(model), data=data, layers=1, calib_tokens=1024, seq_len=64)
    with pytest.raises(FoldError, match=r"^glm4: a map folded into mlp.down_proj") as info:
        pipeline.run(spec, output_dir=tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


# (family, format, method, heal steps): standard where the check proves the fold, else the
# linear format or the removal; each family once, with or without a few healing steps.
CASES = [
    ("olmo2", "standard", "remove", 3),
    ("glm4", "linear", "auto", 0),
    ("granite", "standard", "auto", 3),
    ("smollm3", "standard", "auto", 0),
    ("cohere2", "standard", "auto", 0),
    ("lfm2", "standard", "auto", 3),
    ("falcon_h1", "linear", "auto", 0),
]


@pytest.mark.parametrize("family, fmt, method, heal_steps", CASES)
def test_compress_family_reloads_with_fewer_layers_and_the_reported_perplexity(
    data, tmp_path, family, fmt, method, heal_steps
):
    from linearize.checkpoint import load

    source = save_family_model(family, tmp_path / family)
    spec = CompressSpec(
        model=str(source),
        data=data,
        layers=2,
        format=fmt,
        method=method,
        heal_steps=heal_steps,
        calib_tokens=1024,
        eval_tokens=512,
        seq_len=64,
        generation_prompts=0,
    )
    out = tmp_path / "out"
    report = pipeline.run(spec, output_dir=out)
    ppl = report.perplexity
    assert ppl.validation_reloaded == pytest.approx(ppl.validation_compressed, rel=1e-4)
    expected_layers = 3 if fmt == "linear" and method == "auto" else 2
    assert report.model.layers_after == expected_layers
    model = AutoModelForCausalLM.from_pretrained(out) if fmt == "standard" else load(out)
    assert model.config.num_hidden_layers == len(decoder_layers(model)) == expected_layers
    for key in get_architecture(model).per_layer_config_keys:
        if key != "full_attn_idxs":
            assert len(getattr(model.config, key)) == expected_layers
    if family in HYBRIDS:
        ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
        assert torch.equal(_generate(model.eval(), ids, 4), _greedy_without_cache(model, ids, 4))


def _generate(model, ids, steps):
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=steps, do_sample=False, use_cache=True, pad_token_id=258
        )


def _greedy_without_cache(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids
