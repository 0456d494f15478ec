"""Which layers to replace for a budget: a count, explicit indices, or a quality limit.

Rankings use held-out numbers only (the validation slice of calibration); evaluation windows
never choose anything. The first and last layers stay unless named explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from api_schemas.specs import MAX_LAYER_FRACTION_NOTE
from linearize.errors import BudgetError

Span = tuple[int, int]


def max_budget(n_layers: int) -> int:
    return n_layers - 2


def check_layer_budget(k: int, n_layers: int) -> None:
    if not 1 <= k <= max_budget(n_layers):
        raise BudgetError(
            f"cannot replace {k} layers of {n_layers}: {MAX_LAYER_FRACTION_NOTE}, "
            f"so at most L - 2 = {max_budget(n_layers)} here"
        )


def check_indices(indices: Sequence[int], n_layers: int) -> list[int]:
    bad = [i for i in indices if not 0 <= i < n_layers]
    if bad:
        raise BudgetError(f"layer indices {bad} out of range 0..{n_layers - 1}")
    check_layer_budget(len(indices), n_layers)
    return sorted(indices)


def rank_layers(scores: Sequence[float], n_layers: int) -> list[int]:
    """Candidate layers (all but the first and last), most replaceable first."""
    candidates = range(1, n_layers - 1)
    return sorted(candidates, key=lambda i: scores[i], reverse=True)


def select_window(scores: Sequence[float], k: int, n_layers: int) -> list[int]:
    """The k adjacent layers among 1..L-2 with the highest total score (the earliest on a tie).

    Adjacent layers become one span: one map, one carrier, one cut for healing. On the bundled
    model, after healing, this beat the same budget scattered over two or more spans at both
    budgets measured (BENCHMARKS.md: k=2 [14, 15] +9.6% vs [12, 15] +10.7%, OOD +16.1% vs
    +20.3%; k=4 [12..15] +24.1% vs [12, 13, 16, 17] +31.0%).
    """
    check_layer_budget(k, n_layers)
    first = max(range(1, n_layers - k), key=lambda start: sum(scores[start : start + k]))
    return list(range(first, first + k))


def select_least_influential(cosines: Sequence[float], k: int, n_layers: int) -> list[int]:
    """The k layers among 1..L-2 whose output is most like their input (highest mean
    cos(input, output), i.e. lowest block influence), adjacent or not: ShortGPT's choice, for a
    removal. Removed and healed the same way, these beat removing the fit's window at k = 4 on
    the bundled model, in domain and out of domain (BENCHMARKS.md, issue 16)."""
    check_layer_budget(k, n_layers)
    return sorted(rank_layers(cosines, n_layers)[:k])


def contiguous_spans(indices: Sequence[int]) -> list[Span]:
    """[3, 4, 5, 9] -> [(3, 5), (9, 9)]."""
    spans: list[Span] = []
    for i in sorted(indices):
        if spans and spans[-1][1] == i - 1:
            spans[-1] = (spans[-1][0], i)
        else:
            spans.append((i, i))
    return spans


def search_largest_budget(
    choices: Sequence[list[int]], limit_pct: float, increase_for: Callable[[list[int]], float]
) -> tuple[list[int], list[dict]]:
    """Largest k whose validation increase (%) stays <= limit_pct, by binary search on k;
    `choices[k - 1]` is the selection for budget k.

    Assumes the increase grows with k (checked points are reported, so a violation is visible).
    Returns the chosen indices and the trace of evaluated budgets.
    """
    trace: list[dict] = []
    lo, hi = 0, len(choices)  # invariant: k = lo passes (k = 0 trivially), k > hi unknown/fails
    best: list[int] = []
    while lo < hi:
        k = (lo + hi + 1) // 2
        indices = sorted(choices[k - 1])
        increase = increase_for(indices)
        passed = increase <= limit_pct
        trace.append(
            {"k": k, "indices": indices, "validation_increase_pct": increase, "passed": passed}
        )
        if passed:
            lo, best = k, indices
        else:
            hi = k - 1
    return best, trace


def selection_rule(spec, analysis, n_layers: int):
    """(k -> the layers to replace, the report's description of the ranking and the rule).

    A fit replaces the window its maps fit best; a removal, which has no map, drops the layers
    that change their input least (ShortGPT's block influence), wherever they are."""
    if spec.method == "remove":
        cosines = [row["cosine_in_out"] for row in analysis.layers]
        info = {
            "ranking_signal": "mean token cos(layer input, output) on the fit windows "
            "(ShortGPT's block influence is 1 - cos)",
            "ranking": rank_layers(cosines, n_layers),
            "rule": "the k layers with the highest cos(input, output), adjacent or not",
        }
        return (lambda k: select_least_influential(cosines, k, n_layers)), info
    # Held-out ranking: 1 - validation error of each layer's own affine map.
    scores = [1 - row["validation_error"] for row in analysis.layers]
    info = {
        "ranking_signal": "held-out R^2 of the per-layer affine map (validation slice)",
        "ranking": rank_layers(scores, n_layers),
        "rule": "the k adjacent layers with the highest total ranking signal (one span)",
    }
    return (lambda k: select_window(scores, k, n_layers)), info
