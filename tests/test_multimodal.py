"""Multimodal wrappers: only the language backbone is compressed; the vision tower, projector and
every non-weight file come through unchanged, and the checkpoint loads with the family's own
auto class and still takes an image."""

import filecmp
import json

import pytest
import torch
from tiny_multimodal import (
    MULTIMODAL,
    build_multimodal_model,
    image_text_inputs,
    save_multimodal_model,
)
from transformers import AutoModelForImageTextToText

from api_schemas import CompressSpec, DataSpec, EvalSpec
from linearize import pipeline
from linearize.architectures import decoder_layers
from linearize.checkpoint import SOURCE_CARD_NAME, load
from linearize.data import find_wikitext
from linearize.errors import FoldError
from linearize.weights import ShardedWeights

SMALL = dict(calib_tokens=512, seq_len=64, eval_tokens=256, generation_prompts=0)
# Llama 4 holds a whole causal LM as `language_model` (its head included).
TEXT_PARTS = ("model.language_model.", "lm_head.", "language_model.")
# Gemma's post-norm makes the fold inexact, so it is compressed in the linear format.
FORMATS = {"gemma3": "linear"}


@pytest.fixture(scope="module")
def data():
    return DataSpec(path=str(find_wikitext()))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("multimodal")
    return {family: save_multimodal_model(family, root / family) for family in MULTIMODAL}


def compress(source, data, out, **kw):
    spec = CompressSpec(model=str(source), data=data, **{**SMALL, "layers": 2, **kw})
    return pipeline.run(spec, output_dir=out)


def reload(out, fmt):
    if fmt == "linear":
        return load(out)
    return AutoModelForImageTextToText.from_pretrained(out).eval()


def non_weight_files(directory):
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith("model") and p.name != "config.json"
    )


# Every family without healing; healing (through the wrapper's text forward) on a fold and a
# linear-format family, which keeps the suite's time budget, and on llama4, whose wrapper
# forward raised in transformers 5.24.
RUNS = [(family, 0) for family in MULTIMODAL] + [("llava", 3), ("gemma3", 3), ("llama4", 3)]


@pytest.mark.parametrize(("family", "heal_steps"), RUNS)
def test_compress_multimodal_backbone_keeps_vision_and_files(
    sources, data, tmp_path, family, heal_steps
):
    source, out, fmt = sources[family], tmp_path / "out", FORMATS.get(family, "standard")
    report = compress(source, data, out, format=fmt, heal_steps=heal_steps)

    ppl = report.perplexity
    assert ppl.validation_reloaded == pytest.approx(ppl.validation_compressed, rel=1e-5)
    if (family, heal_steps) == RUNS[0]:  # an independent eval job of the published checkpoint
        again = pipeline.run(EvalSpec(model=str(out), data=data, eval_tokens=256, seq_len=64))
        assert again.perplexity.baseline == pytest.approx(ppl.compressed, rel=1e-5)
    assert report.model.layers_before == 6
    assert report.selection.get("healing", {}).get("steps", 0) == heal_steps
    model = reload(out, fmt)
    text = model.config.get_text_config()
    if fmt == "standard":
        assert text.num_hidden_layers == 4 == len(decoder_layers(model))
        assert report.model.layers_after == 4
    else:  # the two replaced layers became one linear block
        assert text.num_hidden_layers == 5 and report.model.layers_after == 5
    assert "text_config.num_hidden_layers" in report.model.config_changes
    if getattr(text, "layer_types", None) is not None:
        assert len(text.layer_types) == text.num_hidden_layers

    original = AutoModelForImageTextToText.from_pretrained(source).state_dict()
    vision = {k: v for k, v in original.items() if not k.startswith(TEXT_PARTS)}
    assert vision, "the vision tower and projector are part of the source"
    reloaded = model.state_dict()
    for key, tensor in vision.items():
        assert torch.equal(reloaded[key], tensor), key

    for name in non_weight_files(source):
        copy = out / (SOURCE_CARD_NAME if name == "README.md" else name)
        assert filecmp.cmp(source / name, copy, shallow=False), name

    with torch.no_grad():
        logits = model(**image_text_inputs(family)).logits
    assert logits.shape[-1] == text.vocab_size and torch.isfinite(logits).all()


def test_gemma3_standard_fold_is_refused_and_removal_works(sources, data, tmp_path):
    with pytest.raises(FoldError, match="post_feedforward_layernorm"):
        compress(sources["gemma3"], data, tmp_path / "fold", heal_steps=0)
    report = compress(sources["gemma3"], data, tmp_path / "rm", heal_steps=0, method="remove")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "rm")
    assert model.config.text_config.num_hidden_layers == 4 == report.model.layers_after
    assert model.config.text_config.layer_types == [
        t
        for i, t in enumerate(
            json.loads((sources["gemma3"] / "config.json").read_text())["text_config"][
                "layer_types"
            ]
        )
        if i not in report.replaced_layers
    ]


def test_a_streamed_multimodal_run_equals_the_resident_one(sources, data, tmp_path):
    # qwen2_5_vl's hub layout (`model.layers.N.`) differs from its module names
    # (`model.language_model.layers.N.`): streaming reads through transformers' renames.
    source = sources["qwen2_5_vl"]
    assert "model.layers.0.mlp.down_proj.weight" in ShardedWeights.open(source)
    resident = compress(source, data, tmp_path / "r", streaming="off", heal_steps=0)
    streamed = compress(source, data, tmp_path / "s", streaming="on", heal_steps=0)
    assert streamed.execution.mode == "streamed"
    assert streamed.replaced_layers == resident.replaced_layers
    assert streamed.perplexity.compressed == pytest.approx(resident.perplexity.compressed, rel=1e-4)
    a, b = ShardedWeights.open(tmp_path / "r"), ShardedWeights.open(tmp_path / "s")
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.entries:
        torch.testing.assert_close(b.read([key])[key], a.read([key])[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", MULTIMODAL)
def test_registry_finds_the_language_backbone_of_a_wrapper(family):
    from linearize.architectures import get_architecture, hidden_size, num_layers, text_model

    model = build_multimodal_model(family)
    # llava and the others: model.language_model is the text model; llama4: language_model is
    # a causal LM whose .model is.
    backbone = model.language_model.model if family == "llama4" else model.model.language_model
    layers = decoder_layers(model)
    assert layers is backbone.layers
    assert len(layers) == num_layers(model) == 6 and hidden_size(model) == 32
    assert text_model(model) is backbone
    arch = get_architecture(model)
    kinds = {arch.kind_of(layer).name for layer in layers}
    assert kinds == ({"mixture of experts", "dense MLP"} if family == "llama4" else {"dense MLP"})
