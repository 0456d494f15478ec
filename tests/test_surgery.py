"""Surgery keeps the model exact: a fold equals the unfolded model, an identity block equals removal."""

import copy

import pytest
import torch
from tiny_models import ARCHITECTURES as TINY_ARCHITECTURES
from tiny_models import build_tiny_model

from linearize.architectures import decoder_layers, get_architecture, num_layers
from linearize.errors import FoldError, InputError, UnsupportedArchitectureError
from linearize.surgery import (
    AffineMap,
    LinearBlock,
    OutputFold,
    check_removable,
    fold_and_remove,
    position_computing_through,
    remove_layers,
    replace_with_linear,
)

D = 32
FOLDABLE = [a for a in TINY_ARCHITECTURES if not a.startswith("gemma")]


def _random_map(seed: int, *, bias: bool, dtype=torch.float64) -> AffineMap:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.eye(D, dtype=dtype) + 0.3 * torch.randn(D, D, generator=gen, dtype=dtype)
    return AffineMap(weight, 0.1 * torch.randn(D, generator=gen, dtype=dtype) if bias else None)


def _tokens(batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def _projection(model, position: int, kind: str = "mlp"):
    arch = get_architecture(model)
    return decoder_layers(model)[position].get_submodule(
        arch.mlp_out if kind == "mlp" else arch.attn_out
    )


def _has_bias(model, kind: str = "mlp") -> bool:
    return _projection(model, 0, kind).bias is not None


def _map_output_hook(affine: AffineMap):
    return lambda module, args, output: affine.apply(output)


# --- folding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch_name", FOLDABLE)
def test_fold_and_remove_equals_unfolded_reference(arch_name):
    model = build_tiny_model(arch_name).double()
    parallel = get_architecture(model).is_parallel_residual(model.config)
    fold = OutputFold(
        mlp=_random_map(0, bias=_has_bias(model, "mlp")),
        attn=_random_map(1, bias=_has_bias(model, "attn")) if parallel else None,
    )
    # Reference: layers 2..3 dropped, and the map applied to layer 1's projection outputs by hooks.
    reference = remove_layers(copy.deepcopy(model), [2, 3])
    plain_removal = copy.deepcopy(reference)
    _projection(reference, 1, "mlp").register_forward_hook(_map_output_hook(fold.mlp))
    if fold.attn is not None:
        _projection(reference, 1, "attn").register_forward_hook(_map_output_hook(fold.attn))

    fold_and_remove(model, {(2, 3): fold})

    ids = _tokens()
    folded, expected = _logits(model, ids), _logits(reference, ids)
    torch.testing.assert_close(folded, expected, atol=1e-10, rtol=0)
    assert (folded - _logits(plain_removal, ids)).abs().max() > 1e-4  # the fold did something
    assert num_layers(model) == len(decoder_layers(model)) == 4


def test_fold_and_remove_several_spans_at_once():
    model = build_tiny_model("llama").double()
    folds = {
        (1, 2): OutputFold(_random_map(0, bias=False)),
        (4, 4): OutputFold(_random_map(1, bias=False)),
    }
    reference = remove_layers(copy.deepcopy(model), [1, 2, 4])  # positions: 0, 3 -> 1, 5 -> 2
    _projection(reference, 0).register_forward_hook(_map_output_hook(folds[(1, 2)].mlp))
    _projection(reference, 1).register_forward_hook(_map_output_hook(folds[(4, 4)].mlp))

    fold_and_remove(model, folds)

    ids = _tokens()
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=1e-10, rtol=0)
    assert model.config.linearize["origins"] == [[0, 0], [3, 3], [5, 5]]


def test_the_position_after_a_fold_is_the_fold_target_for_the_folded_span():
    model = build_tiny_model("llama").double()  # 6 layers
    fold_and_remove(model, {(1, 2): OutputFold(_random_map(0, bias=False))})
    # positions: 0 -> [0], 1 -> [3] (ends at 3), 2 -> [4], 3 -> [5]; layer 0 computes 0..2
    assert [position_computing_through(model, base) for base in range(6)] == [0, 0, 0, 1, 2, 3]
    replace_with_linear(model, {(2, 2): _random_map(1, bias=True)})  # base layer 4 -> a block
    fold_and_remove(model, {(1, 1): OutputFold(_random_map(2, bias=False))})  # 3 into 0
    assert model.config.linearize["origins"] == [[0, 0], [4, 4], [5, 5]]
    assert [position_computing_through(model, base) for base in range(6)] == [0, 0, 0, 0, 1, 2]


def test_the_position_before_removed_layers_stands_for_them():
    model = build_tiny_model("llama")  # 6 layers
    remove_layers(model, [2, 3])
    # positions: 0 -> [0], 1 -> [1] (then 2, 3 removed: ends at 3), 2 -> [4], 3 -> [5]
    assert [position_computing_through(model, base) for base in range(6)] == [0, 1, 1, 1, 2, 3]


def test_a_removal_needs_a_layer_before_each_span_to_heal():
    model = build_tiny_model("llama")
    check_removable(model, [(1, 2), (4, 4)])
    with pytest.raises(InputError, match="starts at layer 0"):
        check_removable(model, [(0, 1)])
    with pytest.raises(InputError, match="not a valid inclusive range"):
        check_removable(model, [(4, 6)])
    replace_with_linear(model, {(2, 2): _random_map(1, bias=True)})
    with pytest.raises(InputError, match="layer 2, before it, has no MLP output projection"):
        check_removable(model, [(3, 3)])


def test_fold_and_remove_accepts_all_zero_bias_on_biasless_projection():
    model = build_tiny_model("llama").double()
    fold = OutputFold(AffineMap(torch.eye(D, dtype=torch.float64), torch.zeros(D)))
    reference = remove_layers(copy.deepcopy(model), [3])
    fold_and_remove(model, {(3, 3): fold})
    ids = _tokens()
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=1e-12, rtol=0)


@pytest.mark.parametrize("arch_name", ["gemma2", "gemma3_text"])
def test_fold_and_remove_refuses_gemma_post_norm(arch_name):
    model = build_tiny_model(arch_name)
    with pytest.raises(FoldError, match="--format linear"):
        fold_and_remove(model, {(2, 3): OutputFold(_random_map(0, bias=False))})
    assert len(decoder_layers(model)) == 6


def test_fold_and_remove_refuses_post_layer_norm_opt():
    model = build_tiny_model("opt", do_layer_norm_before=False)
    with pytest.raises(FoldError, match="post-LN"):
        fold_and_remove(model, {(2, 3): OutputFold(_random_map(0, bias=True))})


def test_fold_and_remove_refuses_span_starting_at_layer_zero():
    with pytest.raises(FoldError, match="layer 0"):
        fold_and_remove(build_tiny_model("llama"), {(0, 1): OutputFold(_random_map(0, bias=False))})


def test_fold_and_remove_refuses_nonzero_bias_on_biasless_projection():
    model = build_tiny_model("llama")
    before = _projection(model, 1).weight.clone()
    with pytest.raises(FoldError, match="no bias"):
        fold_and_remove(model, {(2, 3): OutputFold(_random_map(0, bias=True))})
    # Validation happens before any weight changes.
    assert torch.equal(_projection(model, 1).weight, before)
    assert len(decoder_layers(model)) == 6


def test_fold_and_remove_refuses_attention_fold_without_parallel_residual():
    fold = OutputFold(_random_map(0, bias=False), attn=_random_map(1, bias=False))
    with pytest.raises(FoldError, match="parallel-residual"):
        fold_and_remove(build_tiny_model("llama"), {(2, 3): fold})


def test_fold_and_remove_refuses_target_removed_by_adjacent_span():
    folds = {
        (1, 2): OutputFold(_random_map(0, bias=False)),
        (3, 4): OutputFold(_random_map(1, bias=False)),
    }
    with pytest.raises(FoldError, match="fold target"):
        fold_and_remove(build_tiny_model("llama"), folds)


def test_surgery_refuses_unknown_architecture_naming_supported_ones():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(
        BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            is_decoder=True,
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match="supported model types: .*llama"):
        fold_and_remove(model, {(1, 1): OutputFold(_random_map(0, bias=False))})


@pytest.mark.parametrize(
    "spans",
    [{(2, 3): None, (3, 4): None}, {(4, 9): None}, {(3, 2): None}],
    ids=["overlap", "out-of-range", "reversed"],
)
def test_replace_with_linear_refuses_bad_spans(spans):
    model = build_tiny_model("llama")
    spans = dict.fromkeys(spans, _random_map(0, bias=True, dtype=torch.float32))
    with pytest.raises(InputError):
        replace_with_linear(model, spans)
    assert len(decoder_layers(model)) == 6


# --- linear blocks -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
def test_identity_linear_block_equals_removing_the_span(arch_name):
    model = build_tiny_model(arch_name)
    reference = remove_layers(copy.deepcopy(model), [2, 3, 4])
    identity = AffineMap(torch.eye(D), torch.zeros(D))
    replace_with_linear(model, {(2, 4): identity})
    ids = _tokens()
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=1e-6, rtol=0)
    assert isinstance(decoder_layers(model)[2], LinearBlock)


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
def test_replace_with_linear_matches_hand_computed_reference(arch_name):
    model = build_tiny_model(arch_name).double()
    affine = _random_map(0, bias=True)
    # Reference: keep layer 1 but override its output with x A + b computed from its input.
    reference = remove_layers(copy.deepcopy(model), [2, 3])
    decoder_layers(reference)[1].register_forward_hook(
        lambda module, args, kwargs, output: affine.apply(
            args[0] if args else kwargs["hidden_states"]
        ),
        with_kwargs=True,
    )
    replace_with_linear(model, {(1, 3): affine})
    ids = _tokens()
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=1e-10, rtol=0)


def test_surgery_takes_current_positions_and_records_base_model_indices():
    model = build_tiny_model("qwen2")
    replace_with_linear(model, {(1, 2): _random_map(0, bias=True, dtype=torch.float32)})
    remove_layers(model, [3])  # base layer 4, now at position 3
    replace_with_linear(model, {(3, 3): _random_map(1, bias=False, dtype=torch.float32)})
    layout = model.config.linearize
    assert layout["origins"] == [[0, 0], [1, 2], [3, 3], [5, 5]]
    assert layout["linear_blocks"] == [
        {"position": 1, "span": [1, 2], "bias": True},
        {"position": 3, "span": [5, 5], "bias": False},
    ]
    assert layout["removed"] == [4]
    with pytest.raises(FoldError, match="is a linear block"):
        fold_and_remove(model, {(2, 2): OutputFold(_random_map(2, bias=False))})
    fold_and_remove(model, {(3, 3): OutputFold(_random_map(2, bias=False))})
    assert model.config.linearize["folds"] == [{"into": 3, "span": [5, 5], "attn": False}]
    assert model.config.linearize["origins"] == [[0, 0], [1, 2], [3, 3]]


def test_linear_block_keeps_dtype_of_replaced_layer():
    model = build_tiny_model("llama").to(torch.bfloat16)
    replace_with_linear(model, {(2, 2): _random_map(0, bias=True)})
    block = decoder_layers(model)[2]
    assert block.linear.weight.dtype == torch.bfloat16
    assert _logits(model, _tokens()).dtype == torch.bfloat16


# --- config and indices ------------------------------------------------------------------------


@pytest.mark.parametrize("arch_name", ["gemma2", "qwen3", "gpt2"])
def test_surgery_trims_config_layer_count_and_layer_types(arch_name):
    model = build_tiny_model(arch_name)
    arch = get_architecture(model)
    types_before = list(getattr(model.config, "layer_types", None) or [])
    replace_with_linear(model, {(1, 2): _random_map(0, bias=True, dtype=torch.float32)})
    remove_layers(model, [3])  # base layer 4
    assert getattr(model.config, arch.num_layers_key) == len(decoder_layers(model)) == 4
    if types_before:
        assert model.config.layer_types == [types_before[i] for i in (0, 1, 3, 5)]


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
def test_surgery_renumbers_every_layer_idx_to_its_position(arch_name):
    model = build_tiny_model(arch_name)
    replace_with_linear(model, {(1, 2): _random_map(0, bias=True, dtype=torch.float32)})
    remove_layers(model, [4])
    seen = 0
    for position, layer in enumerate(decoder_layers(model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == position
                seen += 1
    assert seen >= len(decoder_layers(model))


# --- generation with a KV cache ----------------------------------------------------------------


def _assert_cached_generation_matches_uncached(model):
    ids = _tokens(batch=2, length=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the masks must be sized from the cache correctly
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=258)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 14)
    assert torch.equal(cached, uncached)


# qwen3_next: the blocks at positions 0 and 4 stand in linear-attention slots (a state, no keys).
@pytest.mark.parametrize("arch_name", [*TINY_ARCHITECTURES, "qwen3_next"])
def test_generate_with_cache_after_replace_with_linear(arch_name):
    model = build_tiny_model(arch_name)
    # A block at position 0 owns the cache slot transformers reads the sequence length from.
    replace_with_linear(
        model,
        {
            (0, 1): _random_map(0, bias=True, dtype=torch.float32),
            (4, 4): _random_map(1, bias=True, dtype=torch.float32),
        },
    )
    _assert_cached_generation_matches_uncached(model)


# qwen3_next: the span (2, 3) is a linear-attention and a full-attention layer.
@pytest.mark.parametrize("arch_name", [*FOLDABLE, "qwen3_next"])
def test_generate_with_cache_after_fold_and_remove(arch_name):
    model = build_tiny_model(arch_name)
    target = decoder_layers(model)[1]
    carriers = get_architecture(model).kind_of(target).carriers(target, model.config)
    bias = any(c.takes_intercept and c.bias is not None for c in carriers)
    fold_and_remove(model, {(2, 3): OutputFold(_random_map(0, bias=bias, dtype=torch.float32))})
    _assert_cached_generation_matches_uncached(model)


def test_check_foldable_refuses_before_fitting():
    from linearize.surgery import check_foldable

    check_foldable(build_tiny_model("llama"), [(2, 3)])
    with pytest.raises(FoldError, match="--format linear"):
        check_foldable(build_tiny_model("gemma2"), [(2, 3)])
    with pytest.raises(FoldError, match="layer 0"):
        check_foldable(build_tiny_model("llama"), [(0, 1)])


# --- a map shrunk toward the identity ----------------------------------------------------------


def test_a_fold_shrunk_all_the_way_to_the_identity_is_plain_removal():
    from linearize.fitting import shrink_toward_identity

    model = build_tiny_model("llama").double()
    reference = remove_layers(copy.deepcopy(model), [2, 3])
    folds = shrink_toward_identity({(2, 3): OutputFold(_random_map(0, bias=False))}, 1.0)
    fold_and_remove(model, folds)
    ids = _tokens()
    torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=1e-10, rtol=0)


def test_shrinking_moves_the_map_and_its_intercept_linearly_toward_the_identity():
    from linearize.fitting import shrink_toward_identity

    affine = _random_map(3, bias=True)
    eye = torch.eye(D, dtype=affine.weight.dtype)
    shrunk = shrink_toward_identity({(1, 1): affine, (4, 4): OutputFold(affine, affine)}, 0.25)
    for got in (shrunk[(1, 1)], shrunk[(4, 4)].mlp, shrunk[(4, 4)].attn):
        torch.testing.assert_close(got.weight, 0.75 * affine.weight + 0.25 * eye)
        torch.testing.assert_close(got.bias, 0.75 * affine.bias)
    x = torch.randn(5, D, dtype=affine.weight.dtype)
    torch.testing.assert_close(shrunk[(1, 1)].apply(x), 0.75 * affine.apply(x) + 0.25 * x)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_a_carrier_folded_in_blocks_equals_the_whole_product(layout, monkeypatch):
    """An expert stack folded a few columns (or rows) at a time, so that the float64 work stays
    small, gives exactly what one product over the whole stack gives: Tᵀ W or W T per expert."""
    from linearize import surgery
    from linearize.kinds import Carrier

    gen = torch.Generator().manual_seed(3)
    shape = (5, D, 48) if layout == "out_in" else (5, 48, D)
    weight = torch.nn.Parameter(torch.randn(*shape, generator=gen).to(torch.bfloat16))
    affine = _random_map(4, bias=False)
    t, w = affine.weight, weight.detach().to(torch.float64)
    expected = (t.T @ w if layout == "out_in" else w @ t).to(torch.bfloat16)
    monkeypatch.setattr(surgery, "FOLD_BLOCK_BYTES", 8 * D * 7)  # 7 columns or rows a block
    surgery.fold_into_carrier(Carrier("experts.down_proj", weight, None, layout, False), affine)
    assert torch.equal(weight.detach(), expected)
