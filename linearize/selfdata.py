"""Healing text sampled from the original model itself (`--heal-text generated[:N]`).

Self-data distillation heals a pruned model on what the original model writes, which keeps the
original's distribution wherever the user's text does not go. Each window starts from a short
prompt cut from the calibration fit windows and is continued by sampling (transformers'
`generate`, KV cache, batched) until the window is full; end-of-sequence cannot stop a row, so
every window is exactly seq_len tokens. Costly on a CPU (BENCHMARKS.md): the default there is the
calibration text, on a GPU the generated text.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)

PROMPT_TOKENS = 16
TOP_P = 0.95
BATCH = 16


def parse_heal_text(value: str | None, device_type: str, default_tokens: int) -> int | None:
    """Generated tokens asked for (None: heal on the calibration text). value None is the
    default: generated on a GPU, the calibration text elsewhere."""
    if value is None:
        value = "generated" if device_type == "cuda" else "calibration"
    if value == "calibration":
        return None
    _, _, count = value.partition(":")
    return int(count) if count else default_tokens


@torch.no_grad()
def generated_windows(model, prompts_from, n_windows: int, seq_len: int, *, seed: int = 0):
    """(n_windows, seq_len) token ids: prompts of PROMPT_TOKENS tokens from `prompts_from`
    (windows, in order, cycled), each continued by nucleus sampling to seq_len tokens.
    Returns (windows, tokens per second of generation)."""
    device = next(model.parameters()).device
    prompts = prompts_from[:, :PROMPT_TOKENS]
    picks = torch.arange(n_windows) % len(prompts)
    new = seq_len - PROMPT_TOKENS
    torch.manual_seed(seed)
    out, started = [], time.perf_counter()
    for start in range(0, n_windows, BATCH):
        ids = prompts[picks[start : start + BATCH]].to(device)
        rows = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_p=TOP_P,
            top_k=0,
            temperature=1.0,
            max_new_tokens=new,
            min_new_tokens=new,
            use_cache=True,
            pad_token_id=model.config.eos_token_id,
        )
        out.append(rows[:, :seq_len].cpu())
    seconds = time.perf_counter() - started
    windows = torch.cat(out)
    return windows, n_windows * new / max(seconds, 1e-9)
