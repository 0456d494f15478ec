"""Shared pieces of the healing benchmarks (bench/quality.py, bench/fold_vs_removal.py).

Healing is driven through the engine's public functions (`linearize.healing.heal`,
`capture_teacher`, `healing_params`) with a budget counted in steps, so rows are comparable
across hosts. What the engine does not have lives here: the cut of a plain removal (the layer
whose `down_proj` a fold would have changed), snapshots of the trained weights at given steps,
the out-of-domain texts, and the two anchors that train by design (Lu et al. 2024, "Reassessing
Layer Pruning"; Chen et al. 2024, LLM-Streamline).
"""

from __future__ import annotations

import argparse
import copy
import sys
import sysconfig
from pathlib import Path

import torch
from torch import nn

from linearize import healing
from linearize.architectures import decoder_layers, get_architecture
from linearize.capture import hooked, iterate_batches, layer_io, run_decoder
from linearize.evaluation import evaluate_perplexity
from linearize.stack import LayerStack
from linearize.surgery import remove_layers

NO_TIME_LIMIT = 1e9  # seconds: the step count is the budget

LICENSES = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-3", "Artistic", "GFDL-1.3", "CC0-1.0")
# Python source with its docstrings and comments: code, not prose; every Python install has it.
STDLIB_FILES = ("argparse.py", "textwrap.py", "shutil.py", "tarfile.py", "subprocess.py")
# The sealed text (technical release notes): looked at once per change, never tuned on.
RELNOTES = Path("/usr/share/doc/git/RelNotes")


def licence_text() -> str:
    return "\n\n".join((LICENSES / name).read_text() for name in LICENSE_FILES)


def python_source_text() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((stdlib / name).read_text() for name in STDLIB_FILES)


def relnotes_text() -> str:
    files = sorted(RELNOTES.glob("2.*.txt"), key=lambda p: [int(x) for x in p.stem.split(".")])
    if not files:
        sys.exit(f"--sealed needs git's release notes in {RELNOTES} (apt-get install git)")
    return "\n\n".join(p.read_text() for p in reversed(files))


OOD_TEXTS = {"licences": licence_text, "python": python_source_text}
SEALED_TEXTS = {"relnotes": relnotes_text}


WIKITEXT = Path("../shared/data/wikitext-2-raw/wiki.test.raw")


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: described by its docstring's first line, with --data (wikitext)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--data", type=Path, default=WIKITEXT)
    return parser


def add_text_arguments(parser, *, ood_tokens: int) -> None:
    """The out-of-domain texts and measurement sizes, shared by the healing benchmarks."""
    parser.add_argument("--ood", default=",".join(OOD_TEXTS))
    parser.add_argument("--ood-tokens", type=int, default=ood_tokens)
    parser.add_argument(
        "--measure-tokens",
        type=int,
        default=None,
        help="measure on only the first N evaluation tokens (the windows, and so the analysis "
        "cache entry, stay those of --eval-tokens)",
    )


def token_windows(tokenizer, text: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text)["input_ids"][:n_tokens]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def eval_sets(
    tokenizer, windows, names, n_ood_tokens: int, measure_tokens: int | None = None
) -> dict[str, torch.Tensor]:
    """{'eval': wikitext evaluation windows (the first `measure_tokens` of them if given), name:
    out-of-domain windows, ...}."""
    texts = {**OOD_TEXTS, **SEALED_TEXTS}
    n_eval = len(windows.eval) if measure_tokens is None else measure_tokens // windows.seq_len
    sets = {"eval": windows.eval[:n_eval]}
    for name in names:
        sets[name] = token_windows(tokenizer, texts[name](), n_ood_tokens, windows.seq_len)
    return sets


def perplexities(model, sets: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: evaluate_perplexity(model, w) for name, w in sets.items()}


def increases(ppl: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    return {name: 100 * (ppl[name] / baseline[name] - 1) for name in ppl}


# --- removal + healing -------------------------------------------------------------------------


def runs_of(indices) -> list[tuple[int, int]]:
    """Sorted indices -> maximal runs of adjacent ones, as (first, last)."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [tuple(r) for r in runs]


def remove_with_carriers(model, removed) -> tuple[nn.Module, list]:
    """Remove `removed` (original indices) from `model` in place; returns the model and the
    parameters a fold of each run would have changed (the `down_proj` of the layer before the
    run, layer 0's for a run starting at 0), so `healing.healing_params` picks the same layers
    as for a fold of the same span: removal = the fold with its map set to the identity."""
    arch, layers = get_architecture(model), decoder_layers(model)
    before = [layers[max(first - 1, 0)] for first, _ in runs_of(removed)]
    remove_layers(model, removed)
    return model, [p for layer in before for p in layer.get_submodule(arch.mlp_out).parameters()]


def injection_start(model, carriers) -> int:
    """The first position holding a carrier: where healing starts running the model."""
    ids = {id(p) for p in carriers}
    return next(
        i
        for i, layer in enumerate(decoder_layers(model))
        if ids & {id(p) for p in layer.parameters()}
    )


class TeacherCaches:
    """healing.capture_teacher on the original model, once per injection position."""

    def __init__(self, model, fit_windows):
        self.model, self.fit = model, fit_windows
        self.by_start: dict[int, healing.TeacherCache] = {}

    def __call__(self, start: int) -> healing.TeacherCache:
        if start not in self.by_start:
            self.by_start[start] = healing.capture_teacher(self.model, self.fit, start)
        return self.by_start[start]


def heal_counted(model, teacher, fit, params, steps: int, *, snapshot_at=(), loss_fn=None):
    """The engine's healing recipe for exactly `steps` steps (no time limit); returns the
    HealingResult and {step: copies of `params`} at each step of `snapshot_at`."""
    snaps: dict[int, list[torch.Tensor]] = {}
    if 0 in snapshot_at:
        snaps[0] = healing.snapshot(params)

    def on_step(step, _loss):
        if step in snapshot_at:
            snaps[step] = healing.snapshot(params)

    result = healing.heal(
        model,
        teacher,
        fit,
        params,
        max_steps=steps,
        max_seconds=NO_TIME_LIMIT,
        loss_fn=loss_fn,
        on_step=on_step,
    )
    return result, snaps


# --- Lu et al. 2024: reverse-order pruning, then lm_head + the last three layers -------------


def untie_head(model) -> nn.Linear:
    """Give the model its own trainable copy of the output embedding (it may be tied to the
    input embedding, which must stay as it is)."""
    head = model.get_output_embeddings()
    own = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    own.to(head.weight.device, head.weight.dtype)
    with torch.no_grad():
        own.weight.copy_(head.weight)
        if head.bias is not None:
            own.bias.copy_(head.bias)
    model.set_output_embeddings(own)
    return own


def full_logit_mse(student_head: nn.Module, teacher_head: nn.Module):
    """Our loss (the centred-logit MSE) computed through the heads, because the student's head
    trains: mean over tokens of ||centre(z_s - z_t)||^2 / V."""

    def loss(h_student, h_teacher):
        with torch.autocast(h_student.device.type, dtype=torch.bfloat16):
            z_s = student_head(h_student)
            with torch.no_grad():
                z_t = teacher_head(h_teacher)
        diff = z_s.float() - z_t.float()
        return (diff - diff.mean(-1, keepdim=True)).pow(2).mean()

    return loss


def lu_reverse_order(model, teachers: TeacherCaches, fit, k: int, steps: int):
    """Remove the k layers before the final one; train lm_head and the last three layers."""
    n = len(decoder_layers(model))
    removed = list(range(n - 1 - k, n - 1))
    trial = remove_layers(copy.deepcopy(model), removed)
    head = untie_head(trial)
    layers = decoder_layers(trial)
    start = len(layers) - 3
    params = [head.weight, *(p for layer in layers[start:] for p in layer.parameters())]
    loss_fn = full_logit_mse(head, model.get_output_embeddings())
    result, _ = heal_counted(trial, teachers(start), fit, params, steps, loss_fn=loss_fn)
    return trial, removed, result


# --- LLM-Streamline (Chen et al. 2024): one trained layer for the span -----------------------


@torch.no_grad()
def span_cosines(model, windows, length: int) -> torch.Tensor:
    """Mean over all tokens of cos(input of layer s, output of layer s + length - 1), per s."""
    layers = decoder_layers(model)
    n = len(layers)
    states: dict[int, torch.Tensor] = {}

    def on_layer(index, args, kwargs, output):
        x, y = layer_io(args, kwargs, output)
        if index == 0:
            states[0] = x.float()
        states[index + 1] = y.float()

    sums = torch.zeros(n - length + 1, dtype=torch.float64)
    count = 0
    with hooked(dict(enumerate(layers)), on_layer):
        for _, batch in iterate_batches(windows, 4):
            run_decoder(model, batch)
            for s in range(n - length + 1):
                cos = torch.nn.functional.cosine_similarity(states[s], states[s + length], dim=-1)
                sums[s] += cos.double().sum()
            count += batch.numel()
    return sums / count


@torch.no_grad()
def span_io(model, windows, first: int, last: int):
    """(inputs of layer `first`, outputs of layer `last`) on every window, float32."""
    layers = decoder_layers(model)
    xs, ys = [], []

    def on_layer(index, args, kwargs, output):
        x, y = layer_io(args, kwargs, output)
        if index == first:
            xs.append(x.float())
        if index == last:
            ys.append(y.float())

    with hooked({first: layers[first], last: layers[last]}, on_layer):
        for _, batch in iterate_batches(windows, 4):
            run_decoder(model, batch)
    return torch.cat(xs), torch.cat(ys)


def streamline(model, fit, k: int, steps: int, *, lr: float = healing.DEFAULT_LR, seed: int = 0):
    """Replace the k + 1 adjacent layers whose input and output are most alike (mean cosine,
    all tokens) by one decoder layer of the model's shape, initialised from the span's first
    layer and trained (MSE, Adam, one window per step) to reproduce the span's output from its
    input: L - k layers remain, as for every other row."""
    start = int(span_cosines(model, fit, k + 1).argmax())
    inputs, targets = span_io(model, fit, start, start + k)
    trial = remove_layers(copy.deepcopy(model), range(start + 1, start + k + 1))
    layer = decoder_layers(trial)[start]
    frozen = [p for p in trial.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    params = list(layer.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    stack = LayerStack.of(trial)
    try:
        for _ in range(steps):
            pick = torch.randint(0, len(fit), (1,), generator=generator)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = stack.call(start, layer, inputs[pick])  # the layer alone, as position start
            loss = torch.nn.functional.mse_loss(out.float(), targets[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
        trial.eval()
    return trial, list(range(start, start + k + 1)), loss.item()
