"""Mixture-of-experts layers: the exact fold into every expert, routers untouched, the dense/sparse
layer pattern after removal, and compressions that reload to their reported perplexity."""

import json

import pytest
import torch
from tiny_models import MOE_ARCHITECTURES, build_tiny_model, save_tiny_model
from transformers import AutoModelForCausalLM

from api_schemas import CompressSpec, DataSpec
from linearize import pipeline
from linearize.architectures import decoder_layers, get_architecture
from linearize.data import find_wikitext
from linearize.errors import FoldError
from linearize.kinds import MixtureOfExperts
from linearize.surgery import AffineMap, OutputFold, fold_and_remove, remove_layers
from linearize.weights import ShardedWeights


def moe_position(model) -> int:
    """The first MoE layer after layer 0 (a fold target needs a layer after it)."""
    arch = get_architecture(model)
    layers = decoder_layers(model)
    return next(
        i
        for i in range(1, len(layers) - 1)
        if isinstance(arch.kind_of(layers[i]), MixtureOfExperts)
    )


def mlp_output_and_hidden(model, position: int, ids):
    """(M, the MLP output of layer `position` as it enters the residual stream; the hidden state
    after that layer)."""
    arch = get_architecture(model)
    layer = decoder_layers(model)[position]
    seen = {}

    def keep(_module, _args, output):
        seen["m"] = output[0] if isinstance(output, tuple) else output

    hook = arch.kind_of(layer).output_module(layer).register_forward_hook(keep)
    try:
        out = model(ids, output_hidden_states=True)
    finally:
        hook.remove()
    hidden = out.hidden_states[position + 1]
    scale = arch.mlp_output_scale(model.config)
    return seen["m"].reshape(hidden.shape) * scale, hidden  # Llama 4's MoE returns (tokens, d)


def random_map(d: int, *, intercept: bool, seed: int = 1) -> AffineMap:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(
        d, d, generator=generator, dtype=torch.float64
    )
    bias = torch.randn(d, generator=generator, dtype=torch.float64) if intercept else None
    return AffineMap(weight, bias)


def router_state(model) -> dict:
    arch = get_architecture(model)
    state = {}
    for i, layer in enumerate(decoder_layers(model)):
        if arch.has_kind(layer):
            for j, p in enumerate(arch.kind_of(layer).frozen(layer)):
                state[(i, j)] = p.detach().clone()
    return state


@pytest.mark.parametrize("family", MOE_ARCHITECTURES)
def test_fold_into_every_expert_is_exact_and_leaves_the_routers(family):
    model = build_tiny_model(family, initializer_range=0.3).double()
    model.set_experts_implementation("eager")  # the grouped-mm kernels take no float64
    position = moe_position(model)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m, hidden = mlp_output_and_hidden(model, position, ids)
    arch = get_architecture(model)
    layer = decoder_layers(model)[position]
    carriers = arch.kind_of(layer).carriers(layer, model.config)
    intercept = any(c.takes_intercept for c in carriers)
    affine = random_map(m.shape[-1], intercept=intercept)
    # The expected block output: the unfolded model's, with M replaced by M T + c.
    expected = hidden - m + affine.apply(m)
    routers_before = {k: v for k, v in router_state(model).items() if k[0] != position + 1}
    fold_and_remove(model, {(position + 1, position + 1): OutputFold(mlp=affine)})
    with torch.no_grad():
        folded = model(ids, output_hidden_states=True).hidden_states[position + 1]
    torch.testing.assert_close(folded, expected, rtol=0, atol=1e-5)
    assert (folded - hidden).abs().max() > 1e-2, "the map must change the block's output"
    routers_after = router_state(model)
    renumbered = {(i - (i > position), j): v for (i, j), v in routers_before.items()}
    assert routers_after.keys() == renumbered.keys()
    for key, before in renumbered.items():
        assert torch.equal(routers_after[key], before), key


def test_fold_refuses_an_intercept_that_no_expert_bias_can_carry():
    model = build_tiny_model("mixtral")
    affine = random_map(32, intercept=True)
    with pytest.raises(FoldError, match="cannot carry the map's non-zero bias"):
        fold_and_remove(model, {(2, 2): OutputFold(mlp=affine)})


def feed_forward_types(model) -> list[str]:
    arch = get_architecture(model)
    return [
        type(arch.kind_of(layer).output_module(layer)).__name__ for layer in decoder_layers(model)
    ]


@pytest.mark.parametrize("family", MOE_ARCHITECTURES)
def test_saved_model_rebuilds_the_kept_layers_pattern(family, tmp_path):
    model = build_tiny_model(family)
    types = feed_forward_types(model)
    removed = [2, 3] if family != "deepseek_v3" else [1, 4]  # deepseek: a dense one goes too
    remove_layers(model, removed)
    kept_types = [t for i, t in enumerate(types) if i not in removed]
    assert feed_forward_types(model) == kept_types
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert feed_forward_types(reloaded) == kept_types
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


# --- through the pipeline ------------------------------------------------------------------------

SMALL = dict(
    calib_tokens=512, seq_len=64, eval_tokens=256, use_cache=False, layers=2, generation_prompts=0
)


@pytest.fixture(scope="module")
def data():
    return DataSpec(path=str(find_wikitext()))


def sharded_moe(directory, family: str):
    """A tiny MoE model in the hub's on-disk layout (one tensor per expert), in several shards."""
    save_tiny_model(family, directory, initializer_range=0.3)
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(directory, max_shard_size="60KB")  # transformers writes per expert
    (directory / "model.safetensors").unlink(missing_ok=True)
    return directory


def compress(model, data, out, **kw):
    return pipeline.run(
        CompressSpec(model=str(model), data=data, **{**SMALL, **kw}), output_dir=out
    )


ROUTERS = ("router.weight", "router.bias", "mlp.gate.weight", "shared_expert_gate.weight")


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("qwen2_moe", dict(heal_steps=0)),
        ("gpt_oss", dict(heal_steps=4)),
        ("deepseek_v3", dict(heal_steps=0, method="remove")),
        ("qwen3_moe", dict(heal_steps=0, format="linear")),
        ("qwen3_next", dict(heal_steps=3)),
    ],
)
def test_compress_moe_reloads_to_the_reported_perplexity(family, options, data, tmp_path):
    source = sharded_moe(tmp_path / "m", family)
    report = compress(source, data, tmp_path / "o", **options)
    ppl = report.perplexity
    assert ppl.validation_reloaded == pytest.approx(ppl.validation_compressed, rel=1e-5)
    if options.get("heal_steps"):
        names = report.selection["healing"]["trained_names"]
        assert any(n.endswith("mlp.experts.down_proj") for n in names)
        assert not any(n.endswith(ROUTERS) for n in names), "routers stay frozen"
    if options.get("format") == "linear":
        assert report.model.extra_params > 0  # a linear block; linearize's loader reads it
        return
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert reloaded.config.num_hidden_layers == 4 == report.model.layers_after
    types = feed_forward_types(AutoModelForCausalLM.from_pretrained(source))
    kept = [t for i, t in enumerate(types) if i not in report.replaced_layers]
    assert feed_forward_types(reloaded) == kept


def test_fold_leaves_qwen3_next_router_and_shared_expert_gate_bit_identical():
    # Named here rather than taken from the registry's `frozen`, so that an entry that forgot
    # the shared expert's sigmoid gate would fail.
    model = build_tiny_model("qwen3_next", initializer_range=0.3)

    def gates():
        names = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")
        return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(names)}

    before, shared = gates(), model.model.layers[0].mlp.shared_expert.down_proj.weight.clone()
    fold_and_remove(model, {(1, 1): OutputFold(mlp=random_map(32, intercept=False))})
    after = gates()
    assert len(before) == 2 * 5 and len(after) == 2 * 4  # layer 4 is dense; layer 1 went
    for name, weight in after.items():
        position = int(name.split(".")[2])
        old = name.replace(f"layers.{position}.", f"layers.{position + (position >= 1)}.")
        assert torch.equal(weight, before[old]), name
    assert not torch.equal(model.model.layers[0].mlp.shared_expert.down_proj.weight, shared)


def hub_qwen3_next(directory):
    """A sharded tiny qwen3_next whose config.json says the layer pattern as the hub's does:
    full_attention_interval, no layer_types."""
    source = sharded_moe(directory, "qwen3_next")
    config = json.loads((source / "config.json").read_text())
    del config["layer_types"]
    config["full_attention_interval"] = 2
    (source / "config.json").write_text(json.dumps(config))
    return source


def test_compress_qwen3_next_across_both_layer_kinds_reloads_and_generates(data, tmp_path):
    source = hub_qwen3_next(tmp_path / "m")
    types = AutoModelForCausalLM.from_pretrained(source).config.layer_types
    report = compress(source, data, tmp_path / "o", heal_steps=0)
    ppl = report.perplexity
    assert ppl.validation_reloaded == pytest.approx(ppl.validation_compressed, rel=1e-5)
    removed = report.replaced_layers
    assert {types[i] for i in removed} == {"linear_attention", "full_attention"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    assert reloaded.config.num_hidden_layers == len(decoder_layers(reloaded)) == 4
    assert reloaded.config.layer_types == [t for i, t in enumerate(types) if i not in removed]
    written = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "full_attention_interval" not in written, "a removal makes the interval stale"
    assert "full_attention_interval" in report.model.config_changes
    # The dynamic cache builds one linear-attention or attention slot per kept layer.
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = reloaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=258)
    assert out.shape == (1, 12)
    others = [p for p in source.iterdir() if "safetensors" not in p.name]
    others = [p for p in others if p.name != "config.json"]
    assert {p.name for p in others} >= {"tokenizer.json", "generation_config.json"}
    for path in others:
        assert (tmp_path / "o" / path.name).read_bytes() == path.read_bytes(), path.name


# qwen3_next as well: a streamed layer is replayed with the mask of its own kind (linear or
# full attention), which a resident forward picks inside the model's loop.
@pytest.mark.parametrize(
    ("family", "expert_key"),
    [("mixtral", ".experts.0.w2.weight"), ("qwen3_next", ".experts.0.down_proj.weight")],
)
def test_streamed_moe_equals_resident(family, expert_key, data, tmp_path):
    source = sharded_moe(tmp_path / "m", family)
    keys = ShardedWeights.open(source).keys()
    assert any(expert_key in k for k in keys), "the hub's per-expert layout"
    resident = compress(source, data, tmp_path / "r", streaming="off", heal_steps=0)
    streamed = compress(source, data, tmp_path / "s", streaming="on", heal_steps=0)
    assert streamed.execution.mode == "streamed"
    assert streamed.replaced_layers == resident.replaced_layers
    for a, b in zip(resident.linearity, streamed.linearity, strict=True):
        assert b.score == pytest.approx(a.score, rel=1e-6)
    rp, sp = resident.perplexity, streamed.perplexity
    assert sp.baseline == pytest.approx(rp.baseline, rel=1e-4)
    assert sp.compressed == pytest.approx(rp.compressed, rel=1e-4)
    assert sp.validation_reloaded == pytest.approx(sp.validation_compressed, rel=1e-5)
