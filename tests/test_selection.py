"""Layer selection on planted scores: windows of adjacent layers, budgets, the ppl search."""

import pytest

from linearize.errors import BudgetError
from linearize.selection import (
    contiguous_spans,
    search_largest_budget,
    select_least_influential,
    select_window,
)


def test_window_beats_scattered_top_layers():
    #         0    1    2    3    4    5    6    7    8    9
    scores = [0.1, 0.5, 0.6, 0.9, 0.2, 0.8, 0.8, 0.85, 0.3, 0.1]
    # The top two (3 and 7) are apart; the best adjacent pair is 6, 7 (1.65 > 1.6 > 1.5).
    assert select_window(scores, 2, 10) == [6, 7]
    assert select_window(scores, 3, 10) == [5, 6, 7]
    assert select_window(scores, 1, 10) == [3]


def test_a_removal_takes_the_least_influential_layers_wherever_they_are():
    #          0     1     2     3     4     5     6     7     8     9
    cosines = [0.99, 0.5, 0.6, 0.95, 0.2, 0.8, 0.8, 0.85, 0.3, 0.99]
    # The highest cos(in, out) among 1..8: 3, then 7, then 5 and 6 (tie: the earlier first).
    assert select_least_influential(cosines, 1, 10) == [3]
    assert select_least_influential(cosines, 2, 10) == [3, 7]
    assert select_least_influential(cosines, 3, 10) == [3, 5, 7]
    with pytest.raises(BudgetError, match="at most L - 2 = 8"):
        select_least_influential(cosines, 9, 10)


def test_window_ties_go_to_the_earliest():
    assert select_window([0.0, 0.5, 0.5, 0.5, 0.5, 0.0], 2, 6) == [1, 2]


def test_window_never_takes_the_first_or_last_layer():
    scores = [9.0, 0.1, 0.2, 0.3, 9.0]
    assert select_window(scores, 1, 5) == [3]
    assert select_window(scores, 3, 5) == [1, 2, 3]


@pytest.mark.parametrize("k", [0, 4, -1])
def test_window_refuses_budgets_outside_one_to_l_minus_2(k):
    with pytest.raises(BudgetError, match="at most L - 2 = 3"):
        select_window([0.5] * 5, k, 5)


def test_contiguous_spans_groups_adjacent_indices():
    assert contiguous_spans([9, 3, 4, 5]) == [(3, 5), (9, 9)]


def test_search_returns_the_largest_passing_budget_and_its_trace():
    choices = [[5], [5, 6], [4, 5, 6], [4, 5, 6, 7], [3, 4, 5, 6, 7]]
    increase = {1: 2.0, 2: 4.0, 3: 9.0, 4: 12.0, 5: 30.0}
    best, trace = search_largest_budget(choices, 10.0, lambda idx: increase[len(idx)])
    assert best == [4, 5, 6]
    assert [(t["k"], t["passed"]) for t in trace] == [(3, True), (4, False)]
    assert trace[0]["indices"] == [4, 5, 6]


def test_search_finds_nothing_when_one_layer_already_fails():
    best, trace = search_largest_budget([[1], [1, 2]], 1.0, lambda idx: 5.0)
    assert best == [] and [t["k"] for t in trace] == [1]
