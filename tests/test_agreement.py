"""Agreement with the original: exact KL / top-1 / top-5 on planted logits and on a tiny model."""

import pytest
import torch
from tiny_models import build_tiny_model

from linearize.agreement import AgreementMeter, Reference

V = 50


def measure(original: torch.Tensor, compressed: torch.Tensor, *, top_k: int, chunk: int = 7):
    reference = Reference(top_k=top_k)
    for start in range(0, len(original), chunk):
        reference.update(original[start : start + chunk])
    meter = AgreementMeter(reference)
    for start in range(0, len(compressed), chunk):
        meter.update(compressed[start : start + chunk])
    return meter.result()


def full_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    log_p = torch.log_softmax(p_logits.double(), 1)
    log_q = torch.log_softmax(q_logits.double(), 1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def test_measure_model_against_itself_gives_zero_kl_and_full_agreement():
    model = build_tiny_model("llama")
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.reshape(-1, model.config.vocab_size)
    result = measure(logits, logits.clone(), top_k=16)
    assert result.kl == 0.0
    assert result.top1_agreement == 1.0
    assert result.top5_contains_top1 == 1.0
    assert result.positions == 120 and result.top_k == 16


def test_measure_planted_difference_gives_bucketed_kl_computed_directly():
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(20, V, generator=gen) * 3
    q = p + torch.randn(20, V, generator=gen)
    k = 4
    # Direct: keep p's top-4 tokens, lump the other 46 of each side into one bucket.
    log_p, log_q = torch.log_softmax(p.double(), 1), torch.log_softmax(q.double(), 1)
    top = log_p.topk(k, 1).indices
    mask = torch.zeros_like(log_p, dtype=torch.bool).scatter(1, top, True)
    p_top, q_top = log_p.exp().gather(1, top), log_q.exp().gather(1, top)
    p_rest, q_rest = (log_p.exp() * ~mask).sum(1), (log_q.exp() * ~mask).sum(1)
    expected = (p_top * (p_top / q_top).log()).sum(1) + p_rest * (p_rest / q_rest).log()
    result = measure(p, q, top_k=k)
    assert result.kl == pytest.approx(float(expected.mean()), rel=1e-5)
    # The bucketed KL is a lower bound of the full KL (log-sum inequality).
    assert result.kl < float(full_kl(p, q).mean())


def test_measure_top_k_equal_to_vocabulary_gives_the_full_kl():
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(30, V, generator=gen) * 2
    q = torch.randn(30, V, generator=gen) * 2
    result = measure(p, q, top_k=V)
    assert result.kl == pytest.approx(float(full_kl(p, q).mean()), rel=1e-5)


def test_measure_planted_argmax_changes_count_top1_and_top5():
    p = torch.zeros(4, V)
    p[:, 0] = 10.0  # the original's top-1 is token 0 everywhere
    q = torch.zeros(4, V)
    q[0, 0] = 10.0  # agrees
    q[1, 1], q[1, 0] = 10.0, 9.0  # token 0 is second: top-5 but not top-1
    q[2, 1:6] = 10.0  # token 0 is sixth: outside the top-5
    q[3, 0], q[3, 2] = 5.0, 6.0  # second again
    result = measure(p, q, top_k=8, chunk=3)
    assert result.top1_agreement == 0.25
    assert result.top5_contains_top1 == 0.75


def test_meter_refuses_positions_that_do_not_line_up():
    reference = Reference(top_k=4)
    reference.update(torch.randn(5, V))
    meter = AgreementMeter(reference)
    with pytest.raises(ValueError, match="more positions than the reference"):
        meter.update(torch.randn(6, V))
    meter.update(torch.randn(3, V))
    with pytest.raises(ValueError, match="measured on 3 positions, the reference has 5"):
        meter.result()
