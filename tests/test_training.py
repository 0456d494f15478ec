"""The cosine regularizer: its value, its gradient, its owned hooks, and its documented sign."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_model

from linearize.architectures import decoder_layers
from linearize.capture import collect_layer_stats
from linearize.errors import InputError
from linearize.training import CosineRegularizer, train


def _ids(seed: int = 0, batch: int = 2, seq: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq), generator=generator)


def _measured_mean_cos(model, ids: torch.Tensor) -> float:
    """Mean cos(h_l, h_{l+1}) over layers and tokens, measured independently (capture.py)."""
    model.eval()
    capture = collect_layer_stats(model, decoder_layers(model), ids)
    return sum(s.cos_sum / s.n for s in capture.stats) / len(capture.stats)


def test_regularizer_term_equals_weight_times_mean_cosine():
    model = build_tiny_model("llama", seed=0)
    ids = _ids()
    reg = CosineRegularizer(weight=0.5)
    with reg.attach(model), torch.no_grad():
        model(input_ids=ids, use_cache=False)
        term = reg.pop()
    assert float(term) == pytest.approx(0.5 * _measured_mean_cos(model, ids), abs=1e-5)


def test_regularizer_term_is_differentiable():
    model = build_tiny_model("llama", seed=0)
    reg = CosineRegularizer(weight=1.0)
    with reg.attach(model):
        model(input_ids=_ids(), use_cache=False)
        term = reg.pop()
    assert term.requires_grad
    term.backward()
    grads = [p.grad for p in decoder_layers(model).parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_regularizer_removes_its_hooks_even_on_error():
    model = build_tiny_model("llama", seed=0)
    layers = decoder_layers(model)
    with pytest.raises(RuntimeError), CosineRegularizer(weight=1.0).attach(model):
        assert all(len(m._forward_hooks) == 1 for m in layers)
        raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in layers)


def test_regularizer_refuses_a_second_forward_before_pop_and_bad_layers():
    model = build_tiny_model("llama", seed=0)
    reg = CosineRegularizer(weight=1.0)
    with reg.attach(model), torch.no_grad(), pytest.raises(InputError):
        model(input_ids=_ids(), use_cache=False)
        model(input_ids=_ids(), use_cache=False)
    with pytest.raises(InputError), CosineRegularizer(1.0, layers=[99]).attach(model):
        pass


def test_regularizer_mask_ignores_masked_tokens():
    model = build_tiny_model("llama", seed=0)
    ids = _ids(batch=1)
    mask = torch.zeros_like(ids)
    mask[:, :8] = 1
    reg = CosineRegularizer(weight=1.0)
    with reg.attach(model), torch.no_grad():
        model(input_ids=ids, use_cache=False)
        masked = float(reg.pop(mask))
        model(input_ids=ids[:, :8], use_cache=False)  # causal: the prefix sees the same context
        prefix = float(reg.pop())
    assert masked == pytest.approx(prefix, abs=1e-5)


@pytest.mark.parametrize("weight, direction", [(1.0, -1), (-1.0, +1)])
def test_training_on_the_regularizer_alone_moves_cosine_in_documented_direction(weight, direction):
    """weight > 0 pushes consecutive hidden states apart (cos down); weight < 0 together."""
    model = build_tiny_model("llama", seed=0)
    batches = [_ids(seed=s) for s in range(4)]
    probe = _ids(seed=123, batch=4)
    before = _measured_mean_cos(model, probe)
    history = train(
        model, batches, steps=10, lr=3e-3, regularizer=CosineRegularizer(weight), lm_weight=0.0
    )
    after = _measured_mean_cos(model, probe)
    assert len(history) == 10 and history[0].lm_loss is None
    if direction < 0:
        assert after < before - 0.1, (before, after)
    else:  # cos is bounded by 1: ask for a smaller distance to it
        assert 1 - after < 0.75 * (1 - before), (before, after)
    assert not model.training  # mode restored


def test_train_lowers_lm_loss_with_and_without_regularizer():
    for reg in (None, CosineRegularizer(0.1)):
        model = build_tiny_model("llama", seed=0)
        batch = [_ids(seed=1)]  # one batch, memorised
        history = train(model, batch, steps=10, lr=3e-3, regularizer=reg)
        assert history[-1].lm_loss < history[0].lm_loss - 0.5
        assert (history[-1].reg is None) == (reg is None)


def test_train_refuses_nothing_to_train():
    model = build_tiny_model("llama", seed=0)
    with pytest.raises(InputError):
        train(model, [_ids()], steps=1, lr=1e-3, lm_weight=0.0)
    with pytest.raises(InputError):
        train(model, [_ids()], steps=0, lr=1e-3)
