"""Forward throughput of the original and the compressed model, measured so a reader can trust it.

One timed pass on a shared host measures the host. Here both models are resident at once, each
is warmed up, then timed `repeats` times in interleaved order (original, compressed, then
compressed, original, ...) so a change in the host's load hits both alike; the report keeps the
median of each and every run.

Next to the measured ratio stands the one the arithmetic allows: FLOPs per token of each forward,
2 x every weight matrix of the decoder layers, 2 x the LM head (the embedding is a lookup), and
attention's scores and weighted sum over the whole window (4 x heads x head_dim x seq_len per
attention layer; the whole window is an upper bound, so the expected speed-up is one too). A
measured speed-up above it by more than TOLERANCE is flagged, not reported as a result.
Mixture-of-experts layers are counted with every expert, which overstates their work.
"""

from __future__ import annotations

import statistics
import time

import torch

from api_schemas.report import Throughput

REPEATS = 5
WARMUP = 1
TOLERANCE = 0.10  # what timing noise may add to the arithmetic before a figure is flagged


def forward_flops_per_token(model, seq_len: int) -> int:
    """Multiply-adds x 2 per token of a forward over seq_len-token windows, LM head included."""
    from linearize.architectures import decoder_layers
    from linearize.surgery import LinearBlock

    layers = decoder_layers(model)
    matrices = sum(p.numel() for p in layers.parameters() if p.dim() >= 2)
    attention_layers = sum(1 for layer in layers if not isinstance(layer, LinearBlock))
    head = model.get_output_embeddings().weight.numel()
    return 2 * matrices + 2 * head + attention_layers * attention_flops(model.config, seq_len)


def attention_flops(config, seq_len: int) -> int:
    """Scores (Q K^T) and weighted sum (A V) of one attention layer, per token, whole window.
    0 when the config names no heads: the bound then leaves attention out, which lowers it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    if not heads:
        return 0
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 4 * heads * head_dim * seq_len


def time_forwards(
    models: dict[str, torch.nn.Module], inputs: torch.Tensor, *, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per forward of each model on `inputs`, warmed up, in alternating order."""
    names = list(models)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names * warmup:
            models[name](input_ids=inputs.to(models[name].device))
        for run in range(repeats):
            for name in names if run % 2 == 0 else reversed(names):
                model = models[name]
                batch = inputs.to(model.device)
                _synchronize(model.device)
                started = time.perf_counter()
                model(input_ids=batch)
                _synchronize(model.device)
                seconds[name].append(time.perf_counter() - started)
    return seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput_from(
    seconds_before: list[float],
    seconds_after: list[float],
    *,
    tokens: int,
    seq_len: int,
    flops_before: int,
    flops_after: int,
    device: str,
    tolerance: float = TOLERANCE,
) -> Throughput:
    """The report's figures from timed runs: medians, each run, and the flag when the measured
    speed-up exceeds the expected one by more than `tolerance`."""
    runs_before = [tokens / s for s in seconds_before]
    runs_after = [tokens / s for s in seconds_after]
    before, after = statistics.median(runs_before), statistics.median(runs_after)
    measured, expected = after / before, flops_before / flops_after
    flag = None
    if measured > expected * (1 + tolerance):
        flag = (
            f"measured speed-up {measured:.2f}x exceeds the {expected:.2f}x that the removed "
            f"work allows (+{tolerance:.0%} for noise): the timing measured the host's load, not the model"
        )
    return Throughput(
        tokens_per_s_before=before,
        tokens_per_s_after=after,
        device=device,
        repeats=len(runs_before),
        runs_before=runs_before,
        runs_after=runs_after,
        seq_len=seq_len,
        flops_per_token_before=flops_before,
        flops_per_token_after=flops_after,
        measured_speedup=measured,
        expected_speedup=expected,
        flag=flag,
    )


def measure_throughput(
    original, compressed, windows: torch.Tensor, *, repeats: int = REPEATS, warmup: int = WARMUP
) -> Throughput:
    """Both resident models timed on the first evaluation window (batch 1, seq_len tokens)."""
    inputs = windows[:1]
    seq_len = inputs.shape[1]
    seconds = time_forwards(
        {"original": original, "compressed": compressed}, inputs, repeats=repeats, warmup=warmup
    )
    return throughput_from(
        seconds["original"],
        seconds["compressed"],
        tokens=inputs.numel(),
        seq_len=seq_len,
        flops_before=forward_flops_per_token(original, seq_len),
        flops_after=forward_flops_per_token(compressed, seq_len),
        device=str(original.device),
    )


def spread_pct(runs: list[float]) -> float:
    """(max - min) / median of the runs, in %."""
    return 100 * (max(runs) - min(runs)) / statistics.median(runs)


def time_against_original(job, report, compressed_stack, windows: torch.Tensor, whole: bool):
    """Set report.throughput: the job's original model reloaded next to the compressed one and
    both timed. A streamed job, or one whose two models would not fit the memory budget
    together, is not timed; the report's notes say so."""
    placement = job.placement
    if not whole or compressed_stack.streamed:
        report.notes.append("throughput not measured: the job streamed its layers")
        return
    if 2 * placement.weight_bytes > placement.budget_bytes:
        report.notes.append(
            "throughput not measured: the original and the compressed model together exceed "
            "the memory budget"
        )
        return
    original = job.load(job.spec.model).stack
    with job.timed("throughput"), job.progress.stage("throughput", total=1, message="timing"):
        report.throughput = measure_throughput(original.model, compressed_stack.model, windows)
