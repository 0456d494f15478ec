"""Healing mechanics: the loss is the centred-logit MSE, the segment replay is exact, steps help."""

import pytest
import torch
from tiny_models import build_tiny_model

from linearize.architectures import decoder_layers
from linearize.healing import (
    capture_teacher,
    centred_logit_mse,
    decayed_lr,
    heal,
    healing_params,
    logit_metric,
    loss_curve,
)
from linearize.stack import LayerStack


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_segment_from_the_teachers_inputs_reproduces_the_full_model(arch):
    model = build_tiny_model(arch, initializer_range=0.2)
    ids = torch.randint(0, 256, (2, 24))
    cache = capture_teacher(model, ids, start=3)
    stack = LayerStack.of(model)
    with torch.no_grad():
        hidden = cache.inputs[0:2]
        for position in range(3, 6):
            hidden = stack.call(position, decoder_layers(model)[position], hidden)
        final = stack.finalize(hidden)
        full = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    assert torch.allclose(final, cache.targets[0:2], atol=1e-5)
    assert torch.allclose(final, full, atol=1e-5)
    assert len(decoder_layers(model)) == 6  # the stand-ins are gone


def test_metric_gives_the_mean_squared_centred_logit_difference():
    model = build_tiny_model("llama")
    h_s, h_t = torch.randn(5, 32), torch.randn(5, 32)
    head = model.get_output_embeddings()
    z = (head(h_s) - head(h_t)).double()
    z = z - z.mean(-1, keepdim=True)
    expected = z.pow(2).mean(-1).mean()
    got = centred_logit_mse(h_s, h_t, logit_metric(head.weight))
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


def test_healing_lowers_the_distillation_loss_of_a_damaged_block():
    teacher_ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    model = build_tiny_model("llama", initializer_range=0.2)
    cache = capture_teacher(model, teacher_ids, start=2)
    projection = decoder_layers(model)[2].mlp.down_proj
    before = {n: p.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        projection.weight.mul_(0.0)  # damage: the block's MLP output is gone
    result = heal(
        LayerStack.of(model),
        cache,
        teacher_ids,
        [projection.weight],
        last=5,
        max_steps=40,
        max_seconds=60,
        lr=1e-2,
        batch_size=4,
    )
    assert result.steps == 40
    assert result.train_loss_last < 0.7 * result.train_loss_first
    # Under the cap the curve is every step's loss.
    assert [step for step, _ in result.curve] == list(range(1, 41))
    assert result.curve[0][1] == result.train_loss_first
    assert result.as_dict()["curve"] == result.curve
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["model.layers.2.mlp.down_proj.weight"]  # everything else frozen
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize(
    ("steps", "points", "bucket"), [(150, 150, 1), (1000, 200, 5), (1001, 167, 6)]
)
def test_the_loss_curve_keeps_at_most_200_bucket_means_and_ends_at_the_last_step(
    steps, points, bucket
):
    losses = [float(step * 7 % 11) for step in range(1, steps + 1)]  # integers: exact sums
    curve = loss_curve(losses, max_points=200)
    assert len(curve) == points <= 200
    assert curve[0][0] == bucket and curve[-1][0] == steps
    covered = 0
    for step, mean in curve:  # consecutive buckets, each point the mean of its planted losses
        planted = losses[covered:step]
        assert 0 < len(planted) <= bucket
        assert mean == sum(planted) / len(planted)
        covered = step
    assert loss_curve([]) == []


def test_healing_trains_the_carriers_and_the_weight_matrices_of_the_next_layers_only():
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    model = build_tiny_model("llama", initializer_range=0.2)
    cache = capture_teacher(model, ids, start=1)
    layers = decoder_layers(model)
    carrier = layers[1].mlp.down_proj.weight
    with torch.no_grad():
        carrier.mul_(0.5)
    before = {n: p.clone() for n, p in model.named_parameters()}
    params = healing_params(model, [carrier], neighbours=2)
    assert sum(p is carrier for p in params) == 1  # listed once
    heal(LayerStack.of(model), cache, ids, params, last=5, max_steps=3, max_seconds=60)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expected = {
        f"model.layers.{i}.{name}.weight"
        for i in (1, 2)
        for name in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        )
    }  # fmt: skip
    assert changed == expected  # norms, other layers, embeddings frozen


def test_every_cut_gets_its_neighbours():
    model = build_tiny_model("llama")
    layers = decoder_layers(model)
    carriers = [layers[0].mlp.down_proj.weight, layers[3].mlp.down_proj.weight]
    chosen = {id(p) for p in healing_params(model, carriers, neighbours=2)}
    trained = [i for i, layer in enumerate(layers) if chosen & {id(p) for p in layer.parameters()}]
    assert trained == [0, 1, 3, 4]
    assert not any(id(p) in chosen for p in layers[0].input_layernorm.parameters())


def test_decay_follows_whichever_budget_runs_out_first():
    assert decayed_lr(1e-3, 0, 100, 0.0, 60.0) == 1e-3  # the first step at the full rate
    assert decayed_lr(1e-3, 25, 100, 6.0, 60.0) == pytest.approx(7.5e-4)  # steps lead
    assert decayed_lr(1e-3, 10, 100, 45.0, 60.0) == pytest.approx(2.5e-4)  # time leads
    assert decayed_lr(1e-3, 99, 100, 1.0, 60.0) == pytest.approx(1e-5)  # the last step
    assert decayed_lr(1e-3, 5, 100, 61.0, 60.0) == 0.0  # past the deadline: never negative
    assert decayed_lr(1e-3, 50, 100, 0.0, 60.0, tail=0.3) == 1e-3  # constant before the tail
    assert decayed_lr(1e-3, 85, 100, 0.0, 60.0, tail=0.3) == pytest.approx(5e-4)  # half-way down


def test_decayed_healing_moves_the_weights_less_late_than_early():
    """The same gradients at a falling rate: the last step changes the carrier least."""
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    model = build_tiny_model("llama", initializer_range=0.2)
    cache = capture_teacher(model, ids, start=1)
    carrier = decoder_layers(model)[1].mlp.down_proj.weight
    with torch.no_grad():
        carrier.mul_(0.5)
    trail = []
    heal(
        LayerStack.of(model), cache, ids, [carrier], last=5, max_steps=8, max_seconds=600,
        lr=1e-2, decay=1.0,
        on_step=lambda step, loss: trail.append(carrier.detach().clone()),
    )  # fmt: skip
    moves = [(b - a).abs().max().item() for a, b in zip(trail, trail[1:], strict=False)]
    assert moves[-1] < 0.4 * moves[0]  # Adam's step size ~ lr: 1/8 of the rate vs 7/8
    with pytest.raises(ValueError, match="fraction of the budget"):
        heal(
            LayerStack.of(model), cache, ids, [carrier], last=5, max_steps=1, max_seconds=60,
            decay=1.5,
        )  # fmt: skip


def test_teacher_states_of_many_healing_windows_spill_to_disk_heal_the_same_and_are_removed(
    tmp_path,
):
    from linearize.activations import CachePlanner, Spill
    from linearize.fitting import fit_pass

    ids = torch.randint(0, 256, (24, 16), generator=torch.Generator().manual_seed(2))
    model = build_tiny_model("llama", initializer_range=0.2)
    stack = LayerStack.of(model)
    in_memory = capture_teacher(model, ids, start=2)
    one_cache = 24 * 16 * 32 * 4  # windows x seq_len x hidden x float32
    with Spill(parent=tmp_path) as spill:
        # A budget smaller than one cache: the teacher's states go to files, read with pread.
        planner = CachePlanner(stack.device, one_cache - 1, spill)
        _, inputs, targets = fit_pass(stack, planner, [], "standard", ids, teacher_start=2)
        assert inputs.place == targets.place == "disk"
        files = list(spill.directory().iterdir())
        assert len(files) == 2 and all(f.stat().st_size == one_cache for f in files)
        assert torch.equal(inputs[0:24], in_memory.inputs[0:24])
        assert torch.equal(targets[0:24], in_memory.targets[0:24])

        def healed(teacher):
            trial = build_tiny_model("llama", initializer_range=0.2)
            trial.load_state_dict(model.state_dict())
            weight = decoder_layers(trial)[2].mlp.down_proj.weight
            with torch.no_grad():
                weight.mul_(0.5)
            heal(trial, teacher, ids, [weight], max_steps=5, max_seconds=60, lr=1e-2)
            return weight.detach().clone()

        spilled = type(in_memory)(2, inputs, targets, "final")
        assert torch.equal(healed(spilled), healed(in_memory))  # the same draws, the same steps
        planner.release(inputs)
        planner.release(targets)
        assert not any(spill.directory().iterdir())
