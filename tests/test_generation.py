"""Generation check: greedy continuations match a step-by-step argmax; exact match and prefixes."""

import torch
from tiny_models import build_tiny_model, build_tiny_tokenizer

from linearize.generation import (
    common_prefix_lengths,
    compare_continuations,
    evaluation_prompts,
    greedy_continuations,
)


def test_greedy_continuations_equal_argmax_without_cache():
    model = build_tiny_model("llama", initializer_range=0.3)
    prompts = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(0))
    got = greedy_continuations(model, prompts, new_tokens=6, batch_size=2)
    ids = prompts
    with torch.no_grad():
        for _ in range(6):  # the slow way: the whole sequence every step, no KV cache
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, ids[:, 8:])


def test_compare_model_against_itself_matches_exactly_and_differs_from_another():
    model, other = build_tiny_model("llama", seed=0), build_tiny_model("llama", seed=1)
    prompts = evaluation_prompts(torch.arange(600).remainder(256).view(3, 200), count=4, length=10)
    original = greedy_continuations(model, prompts, new_tokens=12)
    same = compare_continuations(prompts, original, greedy_continuations(model, prompts, 12))
    assert same.exact_match == 1.0 and same.mean_common_prefix == 12.0
    different = compare_continuations(prompts, original, greedy_continuations(other, prompts, 12))
    assert different.exact_match < 1.0


def test_compare_planted_continuations_counts_prefixes_and_keeps_pairs_as_text():
    tokenizer = build_tiny_tokenizer()

    def ids(*texts):
        return torch.tensor([tokenizer.encode(t, add_special_tokens=False) for t in texts])

    prompts = ids("ab", "cd", "ef")
    original = ids("xyzw", "xyzw", "xyzw")
    compressed = ids("xyzw", "xyqw", "qyzw")
    assert common_prefix_lengths(original, compressed).tolist() == [4, 2, 0]
    result = compare_continuations(prompts, original, compressed, tokenizer, pairs_shown=2)
    assert result.exact_match == 1 / 3
    assert result.mean_common_prefix == 2.0
    assert result.pairs == [
        {"prompt": "ab", "original": "xyzw", "compressed": "xyzw", "common_prefix": 4},
        {"prompt": "cd", "original": "xyzw", "compressed": "xyqw", "common_prefix": 2},
    ]


def test_evaluation_prompts_spread_evenly_over_the_stream():
    windows = torch.arange(100).view(4, 25)
    prompts = evaluation_prompts(windows, count=4, length=5)
    assert prompts[:, 0].tolist() == [0, 25, 50, 75]
    assert prompts[1].tolist() == [25, 26, 27, 28, 29]
    assert len(evaluation_prompts(windows, count=50, length=5)) == 20  # no overlap
