"""Generation check: greedy continuations of the same prompts by the original and the compressed
model, compared token by token.

Prompts are PROMPT_TOKENS-token slices of the evaluation token stream, spread evenly over it, so
every prompt has the same length (one batch, no padding). A continuation is NEW_TOKENS greedy
tokens (argmax at every step, KV cache); end-of-sequence tokens do not stop it, so both models'
continuations always have the same length and are compared position by position. This needs a
resident model; the pipeline decides when to call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_PROMPTS = 16
PROMPT_TOKENS = 32
NEW_TOKENS = 64
PAIRS_SHOWN = 3

DEFINITION = (
    f"{NUM_PROMPTS} prompts of {PROMPT_TOKENS} tokens spread evenly over the evaluation tokens; "
    f"each model continues every prompt greedily for {NEW_TOKENS} tokens (end-of-sequence does "
    "not stop it); exact match = share of prompts whose continuations are identical; common "
    "prefix = mean number of leading tokens the two continuations share."
)


def evaluation_prompts(
    eval_windows: torch.Tensor, count: int = NUM_PROMPTS, length: int = PROMPT_TOKENS
) -> torch.Tensor:
    """(count, length) token prompts spread evenly over the evaluation windows' token stream."""
    stream = eval_windows.reshape(-1)
    if len(stream) < length:
        raise ValueError(f"{len(stream)} evaluation tokens cannot make a {length}-token prompt")
    count = min(count, len(stream) // length)
    stride = len(stream) // count
    return torch.stack([stream[i * stride : i * stride + length] for i in range(count)])


@torch.no_grad()
def greedy_continuations(
    model, prompts: torch.Tensor, new_tokens: int = NEW_TOKENS, batch_size: int = 16
) -> torch.Tensor:
    """(n, new_tokens) greedy continuation tokens of each prompt row."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = prompts[start : start + batch_size].to(device)
        result = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        tokens = []
        for step in range(new_tokens):
            next_ids = result.logits[:, -1].argmax(-1, keepdim=True)  # (b, 1)
            tokens.append(next_ids)
            if step + 1 < new_tokens:
                result = model(input_ids=next_ids, cache=result.cache, use_cache=True)
        out.append(torch.cat(tokens, dim=1).cpu())
    return torch.cat(out)


@dataclass
class GenerationComparison:
    exact_match: float
    mean_common_prefix: float
    prompts: int
    new_tokens: int
    pairs: list[dict]  # the first few: prompt, original and compressed continuation as text


def common_prefix_lengths(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Leading equal tokens per row of two (n, T) token tensors."""
    same = (a == b).long()
    return same.cumprod(dim=1).sum(dim=1)


def compare_continuations(
    prompts: torch.Tensor,
    original: torch.Tensor,
    compressed: torch.Tensor,
    tokenizer=None,
    pairs_shown: int = PAIRS_SHOWN,
) -> GenerationComparison:
    prefix = common_prefix_lengths(original, compressed)
    n, length = original.shape

    def text(ids: torch.Tensor) -> str:
        return tokenizer.decode(ids.tolist()) if tokenizer is not None else str(ids.tolist())

    pairs = [
        {
            "prompt": text(prompts[i]),
            "original": text(original[i]),
            "compressed": text(compressed[i]),
            "common_prefix": int(prefix[i]),
        }
        for i in range(min(pairs_shown, n))
    ]
    return GenerationComparison(
        exact_match=int((prefix == length).sum()) / n,
        mean_common_prefix=int(prefix.sum()) / n,
        prompts=n,
        new_tokens=length,
        pairs=pairs,
    )
