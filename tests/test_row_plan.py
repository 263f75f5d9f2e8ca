"""The row plan (epruntime.dispatch.plan) as properties of pure tensors, no process group: under
any placement, rank dedup sends one row per distinct (token, rank), per-expert dispatch one per
routed (token, expert), node dedup one per distinct (token, node) then one per (token, rank)
from the gateway; bytes are rows x row bytes plus control; and the placement evaluation and the
simulator count the same rows."""

from __future__ import annotations

import pytest
import torch

from epruntime.dispatch.ledger import CommLedger
from epruntime.dispatch.plan import (COUNT_BYTES, META_BYTES, row_plan, routing_map_from_topk,
                                     to_physical)
from epruntime.placement import Placement
from epruntime.placement.strategies import evaluate_placement

# (tokens, experts, ranks, ranks per node, top-k)
SHAPES = [(0, 8, 2, 1, 2), (1, 8, 4, 2, 3), (37, 16, 4, 2, 4), (64, 64, 8, 4, 6),
          (50, 8, 1, 1, 2)]
CASES = [(seed, shape) for seed in range(3) for shape in SHAPES]


def random_case(seed: int, shape):
    t, e, r, per_node, k = shape
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(t, e, generator=gen)
    routing = torch.zeros(t, e, dtype=torch.bool).scatter_(1, scores.topk(k, 1).indices, True)
    probs = torch.softmax(scores, 1) * routing
    placement = Placement.from_rank_lists(
        torch.randperm(e, generator=gen).view(r, e // r).tolist(), per_node)
    src_T = torch.randint(0, r, (t,), generator=gen)
    modality_T = torch.randint(0, 2, (t,), generator=gen)
    return routing, probs, placement, src_T, modality_T, k


def plan(routing, probs, placement, kind, source, k, **kw):
    return row_plan(routing, probs, placement, kind, source_rank=source, topk=k, **kw)


def pairs(routing, placement):
    """[(token, logical expert)] of the routing."""
    return [(t, e) for t, e in routing.nonzero().tolist()]


def matrix(cells, r) -> torch.Tensor:
    out = torch.zeros(r, r, dtype=torch.int64)
    for src, dst in cells:
        out[src, dst] += 1
    return out


def ids(case):
    seed, (t, e, r, n, k) = case
    return f"s{seed}-T{t}-E{e}-R{r}x{n}-k{k}"


# ---- which rows go where ----------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_rank_dedup_rows_are_the_distinct_token_rank_pairs(case):
    routing, probs, p, src_T, _, k = random_case(*case)
    rank_E = p.rank_E.tolist()
    distinct = {(t, rank_E[e]) for t, e in pairs(routing, p)}
    got = plan(routing, probs, p, "rank", src_T, k)
    assert torch.equal(got.hops[0].rows_RR,
                       matrix([(int(src_T[t]), d) for t, d in distinct], p.num_ranks))
    assert torch.equal(got.floor_rows_RR, got.hops[0].rows_RR)
    token_N, dest_N = got.hops[0].rows()
    assert sorted(zip(token_N.tolist(), dest_N.tolist())) == sorted(distinct)
    # rank-major, tokens ascending within a rank (the send buffer's order)
    assert list(zip(dest_N.tolist(), token_N.tolist())) == sorted(zip(dest_N.tolist(),
                                                                       token_N.tolist()))


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_per_expert_rows_are_the_routed_pairs(case):
    routing, probs, p, src_T, _, k = random_case(*case)
    rank_E = p.rank_E.tolist()
    want = matrix([(int(src_T[t]), rank_E[e]) for t, e in pairs(routing, p)], p.num_ranks)
    got = plan(routing, probs, p, "expert", src_T, k)
    assert torch.equal(got.hops[0].rows_RR, want)
    assert torch.equal(got.expert_rows_RR, want)
    with pytest.raises(ValueError, match="per-expert"):
        got.hops[0].rows()


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_node_dedup_rows_are_the_distinct_token_node_pairs_then_token_rank_from_the_gateway(case):
    routing, probs, p, src_T, _, k = random_case(*case)
    per_node, rank_E = p.ranks_per_node, p.rank_E.tolist()
    token_nodes = {(t, rank_E[e] // per_node) for t, e in pairs(routing, p)}
    token_ranks = {(t, rank_E[e]) for t, e in pairs(routing, p)}

    def gateway(node, t):
        return node * per_node + int(src_T[t]) % per_node

    got = plan(routing, probs, p, "node", src_T, k)
    hop1, hop2 = got.hops
    assert torch.equal(hop1.rows_RR, matrix([(int(src_T[t]), gateway(n, t))
                                             for t, n in token_nodes], p.num_ranks))
    assert torch.equal(hop2.rows_RR, matrix([(gateway(d // per_node, t), d)
                                             for t, d in token_ranks], p.num_ranks))
    # across nodes, hop 1 carries exactly the distinct (token, remote node) pairs
    node_of = torch.arange(p.num_ranks) // per_node
    inter = node_of[:, None] != node_of[None, :]
    assert int(hop1.rows_RR[inter].sum()) == sum(
        1 for t, n in token_nodes if n != int(src_T[t]) // per_node)
    assert int(hop2.rows_RR[inter].sum()) == 0  # hop 2 stays inside the node


@pytest.mark.parametrize("kind", ["rank", "node"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_every_routed_pair_rides_exactly_one_entry_with_its_weight(case, kind):
    routing, probs, p, src_T, _, k = random_case(*case)
    hop = plan(routing, probs, p, kind, 0, k).hops[0]
    token_N, dest_N = hop.rows()
    slot_NM, prob_NM = hop.entries(token_N, dest_N)
    assert slot_NM.shape[1] == hop.max_entries == min(k, hop.used_TGQ.shape[2])
    carried = {}
    physical_to_logical = torch.argsort(p.physical_E).tolist()
    for n in range(token_N.numel()):
        group = int(dest_N[n]) // hop.group_size
        for slot, prob in zip(slot_NM[n].tolist(), prob_NM[n].tolist()):
            if slot < 0:
                assert prob == 0.0
                continue
            expert = physical_to_logical[group * hop.used_TGQ.shape[2] + slot]
            assert (int(token_N[n]), expert) not in carried
            carried[(int(token_N[n]), expert)] = prob
        assert slot_NM[n][slot_NM[n] >= 0].tolist() == sorted(slot_NM[n][slot_NM[n] >= 0].tolist())
    assert carried.keys() == set(pairs(routing, p))
    for (t, e), prob in carried.items():
        assert prob == probs[t, e].item()


@pytest.mark.parametrize("kind", ["expert", "rank", "node"])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_a_ranks_own_plan_is_its_row_of_the_groups_plan(case, kind):
    """What a dispatcher plans for its tokens is what the simulator plans for that rank."""
    routing, probs, p, src_T, modality_T, k = random_case(*case)
    group = plan(routing, probs, p, kind, src_T, k, hidden_size=8)
    for rank in range(p.num_ranks):
        mine = src_T == rank
        own = plan(routing[mine], probs[mine], p, kind, rank, k, hidden_size=8)
        assert torch.equal(own.hops[0].splits_R, group.hops[0].rows_RR[rank])
        assert torch.equal(own.hops[0].rows_RR[rank], group.hops[0].rows_RR[rank])
        assert own.hops[0].rows_RR.sum() == own.hops[0].rows_RR[rank].sum()
        assert torch.equal(own.expert_rows_RR[rank], group.expert_rows_RR[rank])
        assert torch.equal(own.floor_rows_RR[rank], group.floor_rows_RR[rank])
        assert torch.equal(own.hops[0].modality_rows(modality_T[mine])[:, rank],
                           group.hops[0].modality_rows(modality_T)[:, rank])


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_rows_with_a_known_count_equal_rows_without(case):
    routing, probs, p, src_T, _, k = random_case(*case)
    hop = plan(routing, probs, p, "rank", 0, k).hops[0]
    n = int(hop.splits_R.sum())
    for a, b in zip(hop.rows(), hop.rows(num_rows=n)):
        assert torch.equal(a, b)


def test_rows_follow_the_placement_by_hand():
    # 3 tokens, 8 experts on 4 ranks (2 each, contiguous), top-3.
    routing = torch.zeros(3, 8, dtype=torch.bool)
    routing[0, [0, 1, 5]] = True  # ranks 0 (two experts) and 2
    routing[1, [6, 7, 2]] = True  # ranks 3 (two) and 1
    routing[2, [4, 5, 3]] = True  # ranks 2 (two) and 1
    probs = torch.rand(3, 8) * routing
    got = plan(routing, probs, Placement.contiguous(8, 4), "rank", 0, 3)
    hop = got.hops[0]
    token_N, dest_N = hop.rows()
    slot_NM, prob_NM = hop.entries(token_N, dest_N)
    assert hop.splits_R.tolist() == [1, 2, 2, 1]
    assert dest_N.tolist() == [0, 1, 1, 2, 2, 3] and token_N.tolist() == [0, 1, 2, 0, 2, 1]
    assert got.expert_rows_RR[0].tolist() == [2, 2, 3, 2]
    assert slot_NM.tolist() == [[0, 1], [0, -1], [1, -1], [1, -1], [0, 1], [0, 1]]
    assert prob_NM[0].tolist() == probs[0, [0, 1]].tolist()
    assert prob_NM[1].tolist() == [probs[1, 2].item(), 0.0]
    # Experts 0 and 5 share rank 1 under this placement: token 0 sends one row, not two.
    shuffled = Placement.from_rank_lists([[1, 2], [0, 5], [3, 4], [6, 7]])
    one = torch.zeros(1, 8, dtype=torch.bool)
    one[0, [0, 5]] = True
    hop = plan(one, one.float() * 0.5, shuffled, "rank", 0, 2).hops[0]
    assert hop.splits_R.tolist() == [0, 1, 0, 0]
    assert hop.entries(*hop.rows())[0].tolist() == [[0, 1]]
    assert to_physical(torch.arange(8)[None], shuffled).tolist() == [[1, 2, 0, 5, 3, 4, 6, 7]]


# ---- what every byte costs --------------------------------------------------------------------
@pytest.mark.parametrize("hidden_bytes", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_bytes_are_rows_times_row_bytes_plus_control(case, hidden_bytes):
    routing, probs, p, src_T, _, k = random_case(*case)
    e, r, n_local = p.num_experts, p.num_ranks, p.num_local
    h = 24
    m, m1 = min(k, n_local), min(k, p.ranks_per_node * n_local)
    meta = {"expert": [2], "rank": [2 * m * META_BYTES],
            "node": [(2 * m1 + 1) * META_BYTES, 2 * m * META_BYTES]}
    control = {"expert": [e * COUNT_BYTES if r > 1 else 0], "rank": [COUNT_BYTES],
               "node": [COUNT_BYTES, COUNT_BYTES]}
    for kind in ("expert", "rank", "node"):
        got = plan(routing, probs, p, kind, src_T, k, hidden_size=h, hidden_bytes=hidden_bytes,
                   prob_bytes=2, modality_column=True)
        assert [hop.meta_row_bytes for hop in got.hops] == meta[kind]
        assert all(hop.payload_row_bytes == h * hidden_bytes for hop in got.hops)
        dispatch = sum(hop.rows_RR * (h * hidden_bytes + mb) for hop, mb in zip(got.hops,
                                                                                meta[kind]))
        assert torch.equal(got.dispatch_bytes_RR, dispatch)
        assert torch.equal(got.combine_bytes_RR,
                           sum(hop.rows_RR.t() * h * hidden_bytes for hop in got.hops))
        assert torch.equal(got.control_bytes_RR,
                           torch.full((r, r), sum(control[kind]), dtype=torch.int64))
        # a rank's own plan pays control from its own row only
        own = plan(routing, probs, p, kind, r - 1, k)
        assert own.control_bytes_RR[r - 1].tolist() == [sum(control[kind])] * r
        assert int(own.control_bytes_RR.sum()) == sum(control[kind]) * r
        # rows and metadata travel packed exactly when both are float32 (and never for
        # megatron-core, which sends its probs on their own)
        messages = [len(hop.messages()) for hop in got.hops]
        assert messages == [1 if hidden_bytes == META_BYTES and kind != "expert" else 2] * len(
            got.hops)
        assert sum(b for hop in got.hops for _, b in hop.messages()).equal(dispatch)
    # the modality column travels only while the ledger records
    assert plan(routing, probs, p, "node", src_T, k).hops[0].meta_row_bytes == 2 * m1 * META_BYTES


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_rows_by_modality_add_up_and_leave_unknown_out(case):
    routing, probs, p, src_T, modality_T, k = random_case(*case)
    for kind in ("expert", "rank", "node"):
        for hop in plan(routing, probs, p, kind, src_T, k).hops:
            assert torch.equal(hop.modality_rows(modality_T).sum(0), hop.rows_RR)
            unknown = torch.full_like(modality_T, 255)
            assert int(hop.modality_rows(unknown).sum()) == 0


def test_debug_checks_name_a_routing_with_more_than_top_k_experts():
    routing = torch.ones(2, 8, dtype=torch.bool)  # every expert: more than top-2
    p = Placement.contiguous(8, 2)
    plan(routing, routing.float(), p, "rank", 0, 2)  # no check, no sync: planned as given
    with pytest.raises(ValueError, match="max_entries=2"):
        plan(routing, routing.float(), p, "rank", 0, 2, debug_checks=True)


def test_routing_map_from_topk_ignores_padding():
    got = routing_map_from_topk(torch.tensor([[0, 3], [-1, 2], [-1, -1]]), 4)
    assert got.tolist() == [[True, False, False, True], [False, False, True, False],
                            [False] * 4]


# ---- the same rows for the ledger, the placement evaluation and the simulator -----------------
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_evaluate_placement_counts_the_plans_rows(case):
    routing, probs, p, src_T, _, k = random_case(*case)
    topk_TK = torch.stack([row.nonzero().squeeze(1) for row in routing]) if routing.shape[0] \
        else torch.empty(0, k, dtype=torch.long)
    r = p.num_ranks
    node_of = torch.arange(r) // p.ranks_per_node
    remote = torch.arange(r)[:, None] != torch.arange(r)[None, :]
    inter = node_of[:, None] != node_of[None, :]
    got = evaluate_placement(topk_TK, p, src_T)
    expert = plan(routing, probs, p, "expert", src_T, k).hops[0].rows_RR
    dedup = plan(routing, probs, p, "rank", src_T, k).hops[0].rows_RR
    node = plan(routing, probs, p, "node", src_T, k).hops[0].rows_RR
    assert got["expert_rows"] == int(expert[remote].sum())
    assert got["dedup_rows"] == int(dedup[remote].sum())
    assert got["inter_node_expert_rows"] == int(expert[inter].sum())
    assert got["inter_node_dedup_rows"] == int(dedup[inter].sum())
    assert got["node_dedup_rows"] == int(node[inter].sum())
    assert got["load_per_rank"] == expert.sum(0).tolist()


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_the_simulator_counts_the_plans_rows(case):
    from epruntime.simulate import layer_exchanges

    routing, probs, p, src_T, modality_T, k = random_case(*case)
    topk_TK = torch.where(routing, torch.arange(routing.shape[1]), -1)  # padded [T, E] ids
    for sim_kind, kind in (("alltoall", "expert"), ("dedup", "rank"), ("dedup-hier", "node")):
        ledger = CommLedger(1, p.num_ranks, 0, p.ranks_per_node)
        exchanges = layer_exchanges(sim_kind, topk_TK, src_T, modality_T, p, k, 16, 4, 4, 3,
                                    ledger, 0)
        want = plan(routing, probs, p, kind, src_T, k, hidden_size=16, modality_column=True)
        assert torch.equal(ledger.rows[0, 0], sum(hop.rows_RR for hop in want.hops))
        assert torch.equal(ledger.rows[0, 1], ledger.rows[0, 0].t())
        assert torch.equal(ledger.payload_bytes[0, 0] + ledger.meta_bytes[0, 0],
                           want.dispatch_bytes_RR)
        assert torch.equal(ledger.floor_rows[0], want.floor_rows_RR)
        assert torch.equal(ledger.expert_rows[0], want.expert_rows_RR)
        assert torch.equal(ledger.control_bytes[0], want.control_bytes_RR * 3)  # per call
        sent = sum(x.bytes_RR for x in exchanges if x.phase == "dispatch" and x.scales_with_tokens)
        assert torch.equal(sent, want.dispatch_bytes_RR)


def test_the_ledger_records_a_plan_where_its_tensors_are():
    """A dispatcher's plan on an accelerator: the ledger's counters move there on the first
    record and are only added to there ("meta" stands in for the device here)."""
    routing, probs, p, _, modality_T, k = random_case(0, (37, 16, 4, 2, 4))
    dev = torch.device("meta")
    own = plan(routing.to(dev), probs.to(dev), p, "node", 1, k, hidden_size=8)
    ledger = CommLedger(2, p.num_ranks, 1, p.ranks_per_node)
    ledger.record_routing(1, own.expert_rows_RR, own.floor_rows_RR, modality_T.to(dev),
                          own.num_tokens)
    ledger.record_control(1, own.control_bytes_RR)
    hop = own.hops[0]
    ledger.record_rows(1, "dispatch", hop.rows_RR, hop.payload_row_bytes, hop.meta_row_bytes,
                       hop.modality_rows(modality_T.to(dev)))
    ledger.record_rows(1, "combine", [1, 2, 3, 4], hop.payload_row_bytes)  # host counts
    ledger.record_combine_modality(1, hop.modality_rows(modality_T.to(dev)))
    assert ledger.device == dev
    assert {getattr(ledger, name).device for name in ("payload_bytes", "meta_bytes", "rows",
            "modality_rows", "expert_rows", "floor_rows", "tokens", "control_bytes")} == {dev}
