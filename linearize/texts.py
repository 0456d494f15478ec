"""Texts unlike the calibration text, measured before and after compression.

A model is used on far more than the text it was calibrated on, so the report measures other
texts beside the evaluation half: the user's (`--eval-data NAME=FILE`), else the general
mixture's held-out part (linearize.mixture) as "general". Each text is read whole (it calibrates
nothing, so there is no half to keep apart) and cut like the evaluation half: its first
eval_tokens tokens, or all of its whole windows when it is shorter.
"""

from __future__ import annotations

from dataclasses import dataclass

from api_schemas.report import TextPerplexity
from api_schemas.specs import GENERAL_TEXT
from linearize.errors import DataError

SET_PREFIX = "text:"  # window-set names in a perplexity pass, apart from eval/validation


@dataclass
class EvalText:
    name: str
    source: str
    windows: object  # LongTensor (n, seq_len)
    baseline: float | None = None


def eval_texts(spec, tokenizer, notes: list[str]) -> list[EvalText]:
    """The spec's eval_data texts, else the mixture's held-out part when it is built."""
    from linearize.data import read_text
    from linearize.mixture import is_built, part_path

    sources = {name: read_text(path) for name, path in spec.eval_data.items()}
    labels = {name: source.name for name, source in sources.items()}
    if not sources:
        if not is_built():
            notes.append(
                "no general text measured: the mixture is not built "
                "(`python -m linearize.mixture build`)"
            )
            return []
        sources = {GENERAL_TEXT: read_text(part_path("heldout"))}
        labels = {GENERAL_TEXT: "the general text mixture's held-out part (linearize.mixture)"}
    return [
        EvalText(name, labels[name], text_windows(tokenizer, source.text, spec, name))
        for name, source in sources.items()
    ]


def text_windows(tokenizer, text: str, spec, name: str):
    """The first eval_tokens tokens of `text` (at most), in whole seq_len windows."""
    import torch

    from linearize.data import _tokenize_prefix

    ids = _tokenize_prefix(tokenizer, text, spec.eval_tokens)[: spec.eval_tokens]
    n = len(ids) // spec.seq_len
    if n == 0:
        raise DataError(
            f"eval text {name!r} has {len(ids)} tokens, less than one window of "
            f"seq_len={spec.seq_len}"
        )
    return torch.tensor(ids[: n * spec.seq_len], dtype=torch.long).view(n, spec.seq_len)


def window_sets(texts: list[EvalText]) -> dict:
    return {SET_PREFIX + t.name: t.windows for t in texts}


def record_baselines(texts: list[EvalText], ppl: dict) -> None:
    for t in texts:
        t.baseline = ppl[SET_PREFIX + t.name]


def results(texts: list[EvalText], ppl: dict, eval_increase: float | None) -> list:
    """The report's rows: each text's perplexity before and after, and its ratio to the
    evaluation windows' increase."""
    rows = []
    for t in texts:
        after = ppl[SET_PREFIX + t.name]
        increase = 100 * (after / t.baseline - 1)
        ratio = increase / eval_increase if eval_increase and eval_increase > 0 else None
        rows.append(
            TextPerplexity(
                name=t.name,
                source=t.source,
                tokens=t.windows.numel(),
                baseline=t.baseline,
                compressed=after,
                increase_pct=increase,
                ratio_to_eval=ratio,
            )
        )
    return rows
