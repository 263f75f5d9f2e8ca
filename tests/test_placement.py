"""Placement strategies (epruntime.placement.strategies): SMoES bins -> ranks, co-activation
counts, traffic-aware placement on routing with planted structure, and the row counts of
`evaluate_placement` against hand-worked numbers."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from epruntime.placement import Placement, PlacementError
from epruntime.placement import strategies as S
from epruntime.placement.strategies import (
    coactivation_counts,
    evaluate_placement,
    placement_from_bins,
    traffic_aware_placement,
)
from epruntime.smoes.bins import assign_bins

E, GROUPS, K = 64, 4, 6


def planted_routing(tokens: int = 2048, group_weights=(1, 1, 1, 1), seed: int = 0):
    """Each token picks K distinct experts from one of GROUPS planted groups of E / GROUPS;
    tokens go to groups in proportion to `group_weights` (deterministic counts), and expert
    labels are shuffled so that contiguous placement does not see the groups.
    Returns (topk_idx_TK, group_of_expert_E)."""
    g = torch.Generator().manual_seed(seed)
    per = E // GROUPS
    w = torch.tensor(group_weights, dtype=torch.float64)
    counts = (w / w.sum() * tokens).round().long()
    group_T = torch.repeat_interleave(torch.arange(GROUPS), counts)
    local_TK = torch.rand(group_T.numel(), per, generator=g).argsort(dim=1)[:, :K]
    label = torch.randperm(E, generator=g)  # planted expert i is called label[i]
    topk = label[group_T[:, None] * per + local_TK]
    group_of_expert = torch.empty(E, dtype=torch.long)
    group_of_expert[label] = torch.arange(E) // per
    return topk, group_of_expert


def rank_loads(placement: Placement, load_E: torch.Tensor) -> torch.Tensor:
    return torch.zeros(placement.num_ranks, dtype=torch.float64).index_add_(
        0, placement.rank_E, load_E.double())


def assert_equal_counts(p: Placement):
    assert all(len(x) == p.num_local for x in p.experts_per_rank())
    assert sorted(e for x in p.experts_per_rank() for e in x) == list(range(p.num_experts))


# ---- placement_from_bins --------------------------------------------------------------------
def test_bins_one_node_rank_k_holds_bin_k():
    bins = torch.randperm(32, generator=torch.Generator().manual_seed(3)) // 8
    p = placement_from_bins(bins, 4)
    for k, experts in enumerate(p.experts_per_rank()):
        assert experts == sorted(torch.nonzero(bins == k).flatten().tolist())
    assert p.ranks_per_node == 4 and p.num_nodes == 1
    # One node: text preference has no say.
    f = torch.rand(32, generator=torch.Generator().manual_seed(4))
    assert placement_from_bins(bins, 4, text_pref_E=f) == p


def test_bins_multi_node_groups_text_preferring_bins():
    # Bins 0 and 3 are text-heavy, 1 and 2 vision-heavy: with 2 nodes of 2 ranks, the two
    # most text-preferring bins must share a node (and so must the vision ones).
    bins = torch.arange(16) // 4
    f = torch.tensor([0.9] * 4 + [0.1] * 4 + [0.2] * 4 + [0.8] * 4)
    p = placement_from_bins(bins, 4, ranks_per_node=2, text_pref_E=f)
    node_of_bin = {int(bins[e]): p.node_of_rank(p.rank_of_expert[e]) for e in range(16)}
    assert node_of_bin[0] == node_of_bin[3] != node_of_bin[1] == node_of_bin[2]
    # Each bin still fills exactly one rank, slots by expert id.
    for experts in p.experts_per_rank():
        assert experts == sorted(experts) and len({int(bins[e]) for e in experts}) == 1
    # Without a preference: bin k -> rank k.
    assert placement_from_bins(bins, 4, ranks_per_node=2).is_contiguous


def test_bins_from_assign_bins_stay_on_rank_k():
    # assign_bins numbers bins by ascending preference, so bin k stays on rank k.
    f = torch.rand(32, generator=torch.Generator().manual_seed(5))
    bins = assign_bins(f, 8)
    p = placement_from_bins(bins, 8, ranks_per_node=2, text_pref_E=f)
    assert [int(bins[e]) for e in range(32)] == list(p.rank_of_expert)


@pytest.mark.parametrize("kwargs, name", [
    (dict(bin_of_expert_E=torch.arange(8) % 5, num_ranks=4), "bin_of_expert_E"),  # 5 bins
    (dict(bin_of_expert_E=torch.tensor([0, 0, 0, 1, 1, 2, 3, 3]), num_ranks=4),
     "bin_of_expert_E"),  # uneven bins
    (dict(bin_of_expert_E=torch.arange(8).float() // 2, num_ranks=4), "bin_of_expert_E"),
    (dict(bin_of_expert_E=torch.arange(8)[None] // 2, num_ranks=4), "bin_of_expert_E"),
    (dict(bin_of_expert_E=torch.arange(9) // 3, num_ranks=4), "num_ranks"),
    (dict(bin_of_expert_E=torch.arange(8) // 2, num_ranks=4, ranks_per_node=3),
     "ranks_per_node"),
    (dict(bin_of_expert_E=torch.arange(8) // 2, num_ranks=4, ranks_per_node=2,
          text_pref_E=torch.rand(7)), "text_pref_E"),
    (dict(bin_of_expert_E=torch.arange(8) // 2, num_ranks=4, ranks_per_node=2,
          text_pref_E=torch.full((8,), 1.5)), "text_pref_E"),
])
def test_bins_bad_input_names_argument(kwargs, name):
    with pytest.raises(PlacementError, match=name):
        placement_from_bins(**kwargs)


# ---- coactivation_counts --------------------------------------------------------------------
def test_coactivation_matches_brute_force():
    g = torch.Generator().manual_seed(7)
    n_exp, T = 10, 300
    topk = torch.randint(-1, n_exp, (T, 4), generator=g)  # -1 padding and repeats included
    C = coactivation_counts(topk, n_exp)
    ref = np.zeros((n_exp, n_exp), dtype=np.int64)
    for row in topk.tolist():
        picked = {e for e in row if e >= 0}
        for a in picked:
            for b in picked:
                ref[a, b] += 1  # a == b: the token counts toward a's load
    assert C.dtype == torch.int64 and C.shape == (n_exp, n_exp)
    assert torch.equal(C, torch.from_numpy(ref))
    assert torch.equal(C, C.T)


def test_coactivation_empty_and_bad_input():
    assert torch.equal(coactivation_counts(torch.empty(0, 6, dtype=torch.long), 8),
                       torch.zeros(8, 8, dtype=torch.int64))
    with pytest.raises(PlacementError, match="topk_idx_TK"):
        coactivation_counts(torch.tensor([[0, 8]]), 8)
    with pytest.raises(PlacementError, match="topk_idx_TK"):
        coactivation_counts(torch.tensor([0, 1]), 8)
    with pytest.raises(PlacementError, match="num_experts"):
        coactivation_counts(torch.tensor([[0, 1]]), 0)


# ---- evaluate_placement ---------------------------------------------------------------------
def test_evaluate_two_ranks_by_hand():
    topk = torch.tensor([[0, 1], [2, 3], [0, 2], [3, -1], [-1, -1]])
    src = torch.tensor([0, 0, 1, 1, 0])
    # Ranks are nodes (ranks_per_node=1): rank 0 = {0, 1}, rank 1 = {2, 3}.
    got = evaluate_placement(topk, Placement.contiguous(4, 2, ranks_per_node=1), src)
    assert got == {
        "pairs": 7, "expert_rows": 3, "dedup_rows": 2, "dedup_ratio": pytest.approx(2 / 3),
        "inter_node_expert_rows": 3, "inter_node_dedup_rows": 2, "node_dedup_rows": 2,
        "load_per_rank": [3, 4], "balancedness": pytest.approx(0.875),
        "mean_ranks_per_token": pytest.approx(1.0),
    }
    # One node: nothing crosses a node boundary.
    one_node = evaluate_placement(topk, Placement.contiguous(4, 2), src)
    assert (one_node["inter_node_expert_rows"], one_node["inter_node_dedup_rows"],
            one_node["node_dedup_rows"]) == (0, 0, 0)
    assert one_node["dedup_rows"] == 2
    # No source ranks: every destination is remote.
    no_src = evaluate_placement(topk, Placement.contiguous(4, 2))
    assert (no_src["expert_rows"], no_src["dedup_rows"], no_src["node_dedup_rows"],
            no_src["inter_node_expert_rows"], no_src["inter_node_dedup_rows"]) == (7, 5, 4, 7, 5)


def test_evaluate_two_nodes_by_hand():
    # 8 experts on 4 ranks (rank r = {2r, 2r+1}), 2 ranks per node.
    topk = torch.tensor([[4, 6, 1], [0, 5, 4]])
    got = evaluate_placement(topk, Placement.contiguous(8, 4, ranks_per_node=2),
                             torch.tensor([0, 1]))
    assert (got["expert_rows"], got["dedup_rows"], got["inter_node_expert_rows"],
            got["inter_node_dedup_rows"], got["node_dedup_rows"]) == (5, 4, 4, 3, 2)
    assert got["load_per_rank"] == [2, 0, 3, 1]
    assert got["balancedness"] == pytest.approx(0.5)
    assert got["mean_ranks_per_token"] == pytest.approx(2.5)


def test_evaluate_local_and_empty():
    p = Placement.contiguous(4, 2)
    local = evaluate_placement(torch.tensor([[0, 1], [1, -1], [3, 2]]), p,
                               torch.tensor([0, 0, 1]))
    assert (local["expert_rows"], local["dedup_rows"], local["node_dedup_rows"]) == (0, 0, 0)
    assert local["dedup_ratio"] == 1.0 and local["load_per_rank"] == [3, 2]
    empty = evaluate_placement(torch.empty(0, 2, dtype=torch.long), p,
                               torch.empty(0, dtype=torch.long))
    assert empty["expert_rows"] == empty["dedup_rows"] == empty["pairs"] == 0
    assert empty["load_per_rank"] == [0, 0] and empty["balancedness"] == 1.0
    assert empty["mean_ranks_per_token"] == 0.0
    with pytest.raises(PlacementError, match="source_rank_T"):
        evaluate_placement(torch.tensor([[0, 1]]), p, torch.tensor([0, 0]))
    with pytest.raises(PlacementError, match="source_rank_T"):
        evaluate_placement(torch.tensor([[0, 1]]), p, torch.tensor([2]))
    with pytest.raises(PlacementError, match="topk_idx_TK"):
        evaluate_placement(torch.tensor([[0, 4]]), p)


def test_evaluate_load_matches_coactivation_diagonal():
    topk, _ = planted_routing(512)
    p = Placement.contiguous(E, 8)
    got = evaluate_placement(topk, p)
    loads = rank_loads(p, coactivation_counts(topk, E).diagonal())
    assert got["load_per_rank"] == loads.long().tolist()
    assert got["pairs"] == got["expert_rows"] == 512 * K


# ---- traffic_aware_placement ----------------------------------------------------------------
def test_traffic_aware_recovers_planted_groups():
    topk, group_of = planted_routing()
    C = coactivation_counts(topk, E)
    p = traffic_aware_placement(C, 4)
    assert_equal_counts(p)
    for experts in p.experts_per_rank():  # each rank = one planted group
        assert len({int(group_of[e]) for e in experts}) == 1
    got = evaluate_placement(topk, p)
    assert got["dedup_rows"] == topk.shape[0]  # the optimum: one rank per token
    contiguous = evaluate_placement(topk, Placement.contiguous(E, 4))
    assert got["dedup_rows"] * 3 < contiguous["dedup_rows"]
    loads = rank_loads(p, C.diagonal())
    assert float(loads.max()) <= 1.1 * float(loads.mean())


def test_traffic_aware_noisy_groups_reach_planted_placement():
    # 4 of a token's 6 experts from its group, 2 from anywhere else: the planted placement
    # (one group per rank) is the target; allow 0.5% slack.
    g = torch.Generator().manual_seed(2)
    T = 2048
    group_T = torch.arange(T) % GROUPS
    inside = torch.rand(T, 16, generator=g).argsort(dim=1)[:, :4] + group_T[:, None] * 16
    score = torch.rand(T, E, generator=g)
    score[torch.arange(T)[:, None], group_T[:, None] * 16 + torch.arange(16)] = 2.0
    label = torch.randperm(E, generator=g)
    topk = label[torch.cat([inside, score.argsort(dim=1)[:, :2]], dim=1)]
    planted = Placement.from_rank_lists([sorted(label[r * 16:(r + 1) * 16].tolist())
                                         for r in range(4)])
    target = evaluate_placement(topk, planted)["dedup_rows"]
    C = coactivation_counts(topk, E)
    for seed in (0, 1):
        got = evaluate_placement(topk, traffic_aware_placement(C, 4, seed=seed))["dedup_rows"]
        assert got <= 1.005 * target
    assert evaluate_placement(topk, Placement.contiguous(E, 4))["dedup_rows"] > 1.15 * target


def test_each_search_stage_on_its_own():
    # The pipeline is redundant on planted data (greedy or KL alone finds the groups), so
    # check each stage separately.
    topk, group_of = planted_routing()
    C = coactivation_counts(topk, E).double().numpy()
    load = C.diagonal().copy()
    W = C.copy()
    np.fill_diagonal(W, 0)
    planted = group_of.numpy()

    def same_partition(a, b):
        return len(set(zip(a.tolist(), b.tolist()))) == GROUPS

    cap = 1.1 * load.sum() / GROUPS
    assert same_partition(S._greedy_groups(W, load, GROUPS, cap), planted)
    start = torch.randperm(E, generator=torch.Generator().manual_seed(9)).numpy() // 16
    refined = S._kernighan_lin(W, load, start, GROUPS, cap)
    assert same_partition(refined, planted)
    assert S._intra_weight(W, refined) == S._intra_weight(W, planted)
    # Repair: put the 16 heaviest experts on one rank, then bring it under a tight cap.
    heavy = np.argsort(-load, kind="stable")
    overloaded = np.empty(E, dtype=np.int64)
    overloaded[heavy] = np.arange(E) // 16
    tight = 1.01 * load.sum() / GROUPS
    assert S._group_loads(overloaded, load, GROUPS).max() > tight
    repaired = S._repair_load(W, load, overloaded, GROUPS, tight)
    assert S._group_loads(repaired, load, GROUPS).max() <= tight
    assert (np.bincount(repaired, minlength=GROUPS) == 16).all()


def test_traffic_aware_eight_ranks_splits_groups():
    topk, group_of = planted_routing()
    p = traffic_aware_placement(coactivation_counts(topk, E), 8)
    assert_equal_counts(p)
    for experts in p.experts_per_rank():  # each rank = half of one planted group
        assert len({int(group_of[e]) for e in experts}) == 1
    # Planted optimum: a token's 6 experts fall in 1 or 2 halves of its group.
    got = evaluate_placement(topk, p)
    assert topk.shape[0] < got["dedup_rows"] <= 2 * topk.shape[0]


def test_traffic_aware_two_nodes_keeps_groups_in_nodes():
    topk, group_of = planted_routing()
    p = traffic_aware_placement(coactivation_counts(topk, E), 8, ranks_per_node=4)
    assert p.num_nodes == 2
    assert_equal_counts(p)
    for g in range(GROUPS):
        nodes = {p.node_of_rank(p.rank_of_expert[e]) for e in range(E) if group_of[e] == g}
        assert len(nodes) == 1
    got = evaluate_placement(topk, p)
    assert got["node_dedup_rows"] == topk.shape[0]  # every token reaches exactly one node
    contiguous = evaluate_placement(topk, Placement.contiguous(E, 8, ranks_per_node=4))
    assert got["node_dedup_rows"] * 1.5 < contiguous["node_dedup_rows"]


def test_traffic_aware_respects_load_cap_when_groups_are_unbalanced():
    # Group 0 carries 40% of the tokens: keeping it on one rank would put 1.6x the mean there,
    # so the cap forces it apart; every rank must still hold 16 experts.
    topk, group_of = planted_routing(group_weights=(4, 2, 2, 2))
    C = coactivation_counts(topk, E)
    contiguous_rows = evaluate_placement(topk, Placement.contiguous(E, 4))["dedup_rows"]
    for cap in (1.1, 1.02):
        p = traffic_aware_placement(C, 4, max_imbalance=cap)
        assert_equal_counts(p)
        loads = rank_loads(p, C.diagonal())
        assert float(loads.max()) <= cap * float(loads.mean()) + 1e-9
        assert evaluate_placement(topk, p)["dedup_rows"] < contiguous_rows
    # A loose cap keeps the groups whole again.
    loose = traffic_aware_placement(C, 4, max_imbalance=2.0)
    assert evaluate_placement(topk, loose)["dedup_rows"] == topk.shape[0]


def test_traffic_aware_explicit_load_and_unreachable_cap():
    topk, _ = planted_routing(1024)
    C = coactivation_counts(topk, E)
    # Explicit load: expert 0 alone is heavier than 1.1x the mean rank load, so the cap falls
    # back to the load-first reference; the result must meet that bound.
    load = torch.ones(E)
    load[0] = 40.0
    p = traffic_aware_placement(C, 4, load_E=load)
    assert_equal_counts(p)
    loads = rank_loads(p, load)
    W = C.double().numpy().copy()
    np.fill_diagonal(W, 0)
    _, bound = S._reference(W, load.double().numpy(), 4, 1.1 * float(load.sum()) / 4)
    assert float(loads.max()) <= bound + 1e-9
    assert float(loads.max()) == 40.0 + 15.0  # the hot expert with 15 light ones


def test_traffic_aware_deterministic_and_fast():
    g = torch.Generator().manual_seed(11)
    topk = torch.rand(2048, E, generator=g).argsort(dim=1)[:, :K]  # no structure
    C = coactivation_counts(topk, E)
    a = traffic_aware_placement(C, 16, seed=3)
    assert a == traffic_aware_placement(C, 16, seed=3)
    assert_equal_counts(a)
    for R, rpn in ((4, None), (16, None), (16, 4)):
        start = time.perf_counter()
        p = traffic_aware_placement(C, R, rpn, seed=1)
        assert time.perf_counter() - start < 1.0
        loads = rank_loads(p, C.diagonal())
        assert float(loads.max()) <= 1.1 * float(loads.mean())
    # Never worse than contiguous on intra-rank co-activation weight for random routing.
    p = traffic_aware_placement(C, 8)
    intra = lambda q: float((C * (q.rank_E[:, None] == q.rank_E[None, :])).sum()  # noqa: E731
                            - C.diagonal().sum())
    assert intra(p) >= intra(Placement.contiguous(E, 8))


@pytest.mark.parametrize("args, kwargs, name", [
    ((torch.zeros(8, 7), 4), {}, "coact_EE"),
    ((torch.zeros(8, 8), 3), {}, "num_ranks"),
    ((torch.zeros(8, 8), 4), dict(ranks_per_node=3), "ranks_per_node"),
    ((torch.zeros(8, 8), 4), dict(load_E=torch.ones(7)), "load_E"),
    ((torch.zeros(8, 8), 4), dict(max_imbalance=0.9), "max_imbalance"),
    ((-torch.ones(8, 8), 4), {}, "coact_EE"),
])
def test_traffic_aware_bad_input_names_argument(args, kwargs, name):
    with pytest.raises(PlacementError, match=name):
        traffic_aware_placement(*args, **kwargs)


def test_traffic_aware_trivial_shapes():
    C = torch.zeros(8, 8, dtype=torch.long)
    assert traffic_aware_placement(C, 1).experts_per_rank() == [list(range(8))]
    p = traffic_aware_placement(C, 8, ranks_per_node=2)  # one expert per rank
    assert_equal_counts(p)
    assert p.num_nodes == 4
