"""The throughput measurement: the FLOPs arithmetic exactly, the flag on planted timings, and the
interleaved order of the timed forwards."""

import pytest
import torch
from tiny_models import build_tiny_model

from linearize.architectures import decoder_layers
from linearize.report import throughput_text
from linearize.surgery import LinearBlock
from linearize.throughput import forward_flops_per_token, throughput_from, time_forwards

# The tiny llama (tests/tiny_models.py): hidden 32, MLP 64, 4 heads of 8, 2 KV heads, vocab 260,
# untied LM head. Weight matrices of one layer: q, o 32x32; k, v 32x16; gate, up, down 32x64.
LAYER_MATRICES = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64
LM_HEAD = 260 * 32


def attention(seq_len: int) -> int:
    return 4 * 4 * 8 * seq_len  # scores and weighted sum: 4 heads x 8 dims x the window


@pytest.mark.parametrize("seq_len", [16, 128])
def test_count_forward_flops_tiny_llama_exactly(seq_len):
    model = build_tiny_model("llama")
    expected = 2 * 6 * LAYER_MATRICES + 2 * LM_HEAD + 6 * attention(seq_len)
    assert forward_flops_per_token(model, seq_len) == expected


def test_count_forward_flops_linear_block_as_one_matrix_without_attention():
    model = build_tiny_model("llama")
    layers = decoder_layers(model)
    layers[2] = LinearBlock(32, layer_idx=2)  # layers 2 and 3 replaced by one map
    del layers[3]
    expected = 2 * (4 * LAYER_MATRICES + 32 * 32) + 2 * LM_HEAD + 4 * attention(64)
    assert forward_flops_per_token(model, 64) == expected


def planted(before: list[float], after: list[float]):
    # 100 tokens per run; expected speed-up 1.5 from the FLOPs.
    return throughput_from(
        before, after, tokens=100, seq_len=100, flops_before=300, flops_after=200, device="cpu"
    )


def test_report_throughput_medians_of_planted_runs_with_each_run():
    t = planted([1.0, 0.1, 1.0, 10.0, 1.0], [0.8, 0.8, 5.0, 0.01, 0.8])
    assert t.tokens_per_s_before == pytest.approx(100)
    assert t.tokens_per_s_after == pytest.approx(125)
    assert t.runs_before == pytest.approx([100, 1000, 100, 10, 100])
    assert t.repeats == 5
    assert t.measured_speedup == pytest.approx(1.25)
    assert t.expected_speedup == pytest.approx(1.5)
    assert t.flag is None
    assert "1.25x measured, 1.50x expected" in throughput_text(t)


@pytest.mark.parametrize(
    ("after_seconds", "flagged"),
    [(1 / 1.64, False), (1 / 1.66, True), (1 / 2.5, True)],
)
def test_flag_speedup_beyond_the_arithmetic_bound(after_seconds, flagged):
    # 1.5x allowed, +10% for timing noise: 1.65x is the last figure reported as a result.
    t = planted([1.0] * 3, [after_seconds] * 3)
    assert (t.flag is not None) == flagged
    assert throughput_text(t).startswith("FLAGGED") == flagged


class Recorder:
    device = torch.device("cpu")

    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def __call__(self, input_ids):
        self.calls.append(self.name)


def test_time_forwards_warms_up_then_alternates_the_order():
    calls: list[str] = []
    models = {"a": Recorder("a", calls), "b": Recorder("b", calls)}
    seconds = time_forwards(models, torch.zeros(1, 4, dtype=torch.long), repeats=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(s) for s in seconds.values()] == [4, 4]
