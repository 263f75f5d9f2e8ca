"""Frontier searches over the (text, vision) threshold grid (MoDES, arXiv 2511.15690).

Raising either threshold skips more pairs and moves the output further from the full model's:
both the skip ratio and the KL divergence are (nearly) non-decreasing in each threshold. MoDES's
frontier search uses that to walk the boundary of the feasible region in O(N + M) evaluations
instead of the N x M of a full grid: for text index i going up, the best vision index can only
go down. Every point returned was evaluated, so it satisfies its constraint on the calibration
data even where monotonicity does not hold exactly (then the search may miss a better point).

`evaluate(i, j) -> (kl, skip_ratio)` runs the calibration samples at (text_grid[i],
vision_grid[j]); it is called at most once per point (cached here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Evaluate = Callable[[int, int], tuple[float, float]]


@dataclass(frozen=True)
class SearchResult:
    i: int | None  # text grid index (None: no grid point meets the constraint)
    j: int | None  # vision grid index
    kl: float | None
    skip_ratio: float | None
    evaluated: dict[tuple[int, int], tuple[float, float]]  # every (i, j) -> (kl, skip) run


def threshold_grid(top: float, points: int) -> list[float]:
    """`points` thresholds from 0 to `top`, quadratically spaced (denser near 0, where most
    scores are: a top-k weight times a layer's share of importance)."""
    if points < 2:
        raise ValueError(f"grid of {points} points: need at least 2")
    return [top * (n / (points - 1)) ** 2 for n in range(points)]


def _cached(evaluate: Evaluate) -> tuple[Evaluate, dict]:
    seen: dict[tuple[int, int], tuple[float, float]] = {}

    def run(i: int, j: int) -> tuple[float, float]:
        if (i, j) not in seen:
            seen[i, j] = tuple(float(v) for v in evaluate(i, j))
        return seen[i, j]
    return run, seen


def max_skip_within_kl(evaluate: Evaluate, n_text: int, n_vision: int,
                       kl_bound: float) -> SearchResult:
    """The grid point with the highest skip ratio whose KL is <= `kl_bound` (ties: lower KL,
    then the lower text index). (0, 0) skips nothing and has KL 0, so it is always feasible."""
    run, seen = _cached(evaluate)
    best = None
    j = n_vision - 1
    for i in range(n_text):
        while j >= 0 and run(i, j)[0] > kl_bound:
            j -= 1  # with a higher text threshold, this vision threshold stays infeasible
        if j < 0:
            break
        kl, skip = run(i, j)
        if best is None or (skip, -kl) > (best[3], -best[2]):
            best = (i, j, kl, skip)
    if best is None:
        return SearchResult(None, None, None, None, seen)
    return SearchResult(*best, seen)


def min_kl_at_skip(evaluate: Evaluate, n_text: int, n_vision: int,
                   target: float) -> SearchResult:
    """The grid point with the lowest KL whose skip ratio is >= `target` (the paper's form:
    a target skip ratio; ties: higher skip, then the lower text index)."""
    run, seen = _cached(evaluate)
    if run(n_text - 1, n_vision - 1)[1] < target:
        return SearchResult(None, None, None, None, seen)
    best = None
    j = n_vision - 1
    for i in range(n_text):
        while j >= 0 and run(i, j)[1] >= target:
            j -= 1  # the smallest vision threshold that still reaches the target is j + 1
        if j + 1 < n_vision:
            kl, skip = run(i, j + 1)
            if skip >= target and (best is None or (-kl, skip) > (-best[2], best[3])):
                best = (i, j + 1, kl, skip)
    if best is None:
        return SearchResult(None, None, None, None, seen)
    return SearchResult(*best, seen)
