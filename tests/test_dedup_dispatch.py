"""The rank-deduplicating dispatcher: layout math, exactness against megatron-core's alltoall
dispatcher on real gloo ranks, edge cases, and the CommLedger's byte conservation."""

from __future__ import annotations

import itertools

import pytest
import torch

from epruntime.config import load_config
from epruntime.dispatch.layout import dedup_send_layout, entries_to_dense, fan_out, to_physical
from epruntime.placement import Placement
from tests.dist import spawn

GLOBAL_BATCH = 8


# ---- pure layout ---------------------------------------------------------------------------
def test_send_layout_one_row_per_token_and_rank():
    # 3 tokens, 8 experts on 4 ranks (2 each, contiguous), top-3.
    routing = torch.zeros(3, 8, dtype=torch.bool)
    routing[0, [0, 1, 5]] = True  # ranks 0 (two experts) and 2
    routing[1, [6, 7, 2]] = True  # ranks 3 (two) and 1
    routing[2, [4, 5, 3]] = True  # ranks 2 (two) and 1
    probs = torch.rand(3, 8) * routing
    lay = dedup_send_layout(routing, probs, Placement.contiguous(8, 4), max_entries=2)
    assert lay.splits_R.tolist() == [1, 2, 2, 1]
    assert lay.rank_N.tolist() == [0, 1, 1, 2, 2, 3]
    assert lay.token_N.tolist() == [0, 1, 2, 0, 2, 1]
    assert lay.expert_rows_R.tolist() == [2, 2, 3, 2]
    assert lay.slot_NM.tolist() == [[0, 1], [0, -1], [1, -1], [1, -1], [0, 1], [0, 1]]
    assert lay.prob_NM[0].tolist() == probs[0, [0, 1]].tolist()
    assert lay.prob_NM[1].tolist() == [probs[1, 2].item(), 0.0]


def test_send_layout_follows_the_placement():
    # Experts 0 and 5 share rank 1 under this placement: token 0 sends one row, not two.
    placement = Placement.from_rank_lists([[1, 2], [0, 5], [3, 4], [6, 7]])
    routing = torch.zeros(1, 8, dtype=torch.bool)
    routing[0, [0, 5]] = True
    lay = dedup_send_layout(routing, routing.float() * 0.5, placement, max_entries=2)
    assert lay.splits_R.tolist() == [0, 1, 0, 0] and lay.slot_NM.tolist() == [[0, 1]]
    assert to_physical(torch.arange(8)[None], placement).tolist() == [[1, 2, 0, 5, 3, 4, 6, 7]]


def test_fan_out_groups_entries_by_slot_in_arrival_order():
    slots = torch.tensor([[1, -1], [0, 1], [1, 0], [-1, -1]])
    fan = fan_out(slots, num_local=3)
    assert fan.tokens_per_slot.tolist() == [2, 3, 0]
    assert fan.row_K.tolist() == [1, 2, 0, 1, 2]
    assert fan.entry_K.tolist() == [2, 5, 0, 3, 4]


def test_layout_conserves_pairs_on_random_routing():
    gen = torch.Generator().manual_seed(0)
    for t, e, r, k in [(0, 8, 2, 2), (50, 16, 4, 4), (64, 64, 4, 6)]:
        scores = torch.rand(t, e, generator=gen)
        routing = torch.zeros(t, e, dtype=torch.bool).scatter_(1, scores.topk(k, 1).indices, True)
        placement = Placement.from_rank_lists(
            torch.randperm(e, generator=gen).view(r, e // r).tolist())
        lay = dedup_send_layout(routing, scores * routing, placement, min(k, e // r))
        # every (token, expert) pair is carried by exactly one row entry
        assert int((lay.slot_NM >= 0).sum()) == int(routing.sum())
        ranks_per_token = placement.rank_E[None].expand(t, e)[routing].view(t, k)
        distinct = sum(len(set(row.tolist())) for row in ranks_per_token)
        assert lay.token_N.numel() == distinct == int(lay.splits_R.sum())
        assert int(lay.expert_rows_R.sum()) == t * k


# ---- real ranks ----------------------------------------------------------------------------
def small_config(ep_size: int, kind: str, *extra: str):
    return load_config(None, [*extra,
        "data.dataset=synthetic", f"data.global_batch_size={GLOBAL_BATCH}",
        "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=2",
        "model.num_experts=8", "model.moe_topk=3", "model.moe_ffn_hidden_size=16",
        "model.image_size=16", "model.patch_size=4", "model.moe_aux_loss_coeff=0",
        f"parallel.ep_size={ep_size}", "parallel.timeout_s=60", f"dispatch.kind={kind}",
    ])


class _Spy:
    """Counts the bytes every all_to_all_single is handed, then runs the real collective."""

    def __init__(self):
        import torch.distributed as dist
        self.real, self.bytes = dist.all_to_all_single, 0
        dist.all_to_all_single = self

    def __call__(self, output, input, *args, **kwargs):
        self.bytes += input.numel() * input.element_size()
        return self.real(output, input, *args, **kwargs)

    def close(self):
        import torch.distributed as dist
        dist.all_to_all_single = self.real


def _engine_worker(rank: int, ep_size: int, out: str) -> None:
    from epruntime import distributed
    from epruntime.data import SyntheticVQA, shard_slice
    from epruntime.engine import Engine

    results = {}
    env = distributed.init_distributed(small_config(ep_size, "alltoall"))
    ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
    local = ds.batch(torch.arange(GLOBAL_BATCH)[shard_slice(GLOBAL_BATCH, env.dp_rank, env.dp_size)])
    reference_state = None
    # A placement that scatters every rank's contiguous experts over the others.
    shuffled = Placement.from_rank_lists(
        torch.randperm(8, generator=torch.Generator().manual_seed(1)).view(ep_size, -1).tolist())
    two_nodes = f"dispatch.ranks_per_node={ep_size // 2}"
    variants = {"alltoall": ("alltoall", None, ()), "dedup": ("dedup", None, ()),
                "dedup+shuffled": ("dedup", shuffled, ()),
                "dedup@2nodes": ("dedup", None, (two_nodes,)),
                "dedup-hier@2nodes": ("dedup-hier", None, (two_nodes,))}
    for variant, (kind, placement, extra) in variants.items():
        distributed.seed_all(0)
        engine = Engine(small_config(ep_size, kind, *extra), env, len(ds.vocab), ds.num_answers,
                        ds.max_question_len)
        if placement is not None:
            engine.model.set_placements([placement] * 2)
            with torch.no_grad():  # same logical weights, now in other slots and ranks
                for name, p in engine.model.global_named_parameters(env.ep_rank):
                    p.copy_(reference_state[name])
        if reference_state is None:  # every rank's tensors, under global names
            gathered = [None] * ep_size
            torch.distributed.all_gather_object(gathered, {
                n: p.detach().clone() for n, p in engine.model.global_named_parameters(env.ep_rank)})
            reference_state = {k: v for part in gathered for k, v in part.items()}
        loss = engine.forward_backward(local, GLOBAL_BATCH)
        grads = {n: p.grad.clone() for n, p in engine.model.global_named_parameters(env.ep_rank)}
        # Forward-only pass with the spy: the ledger saw exactly the bytes the collective moved.
        engine.ledger.reset()
        spy = _Spy()
        with torch.no_grad():
            logits = engine.model(local.images, local.question_ids, local.question_lens)
        spy.close()
        mine = engine.ledger
        counted = int(mine.payload_bytes.sum() + mine.meta_bytes.sum())
        if kind != "alltoall":  # their split counts travel by all_to_all_single too
            counted += int(mine.control_bytes.sum())
        summary = engine.ledger.summary(torch.distributed.group.WORLD)
        totals = engine.ledger.totals(torch.distributed.group.WORLD)
        results[variant] = {
            "loss": loss, "grads": grads, "logits": logits, "spy_bytes": spy.bytes,
            "ledger_bytes": counted, "summary": summary,
            "rows": totals.rows, "modality_rows": totals.modality_rows,
        }
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("ep_size", [2, 4])
def test_dedup_equals_megatron_alltoall_and_ledger_conserves(tmp_path, ep_size):
    spawn(_engine_worker, ep_size, ep_size, str(tmp_path))
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(ep_size)]
    grads = {v: {n: g for res in per_rank for n, g in res[v]["grads"].items()} for v in per_rank[0]}
    assert len(grads["alltoall"]) > len(per_rank[0]["alltoall"]["grads"])  # experts are sharded
    for variant in grads:
        assert grads[variant].keys() == grads["alltoall"].keys()
        for name, g in grads["alltoall"].items():
            torch.testing.assert_close(grads[variant][name], g, rtol=1e-4, atol=1e-6,
                                       msg=f"{variant} {name}")
    for rank, res in enumerate(per_rank):
        ref = res["alltoall"]
        for variant, got in res.items():
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
            torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-6)
        for variant, res_v in res.items():
            assert res_v["spy_bytes"] == res_v["ledger_bytes"] > 0, (rank, variant)
    s = {k: v["summary"] for k, v in per_rank[0].items()}
    # megatron-core sends one row per remote (token, expert); dedup exactly its floor.
    assert s["alltoall"]["rows_sent"] == s["alltoall"]["expert_rows"] > s["alltoall"]["floor_rows"]
    assert s["dedup"]["rows_sent"] == s["dedup"]["floor_rows"] == s["alltoall"]["floor_rows"]
    assert s["dedup"]["payload_bytes"] < s["alltoall"]["payload_bytes"]
    # Load per rank: every (token, expert) pair of the batch is computed somewhere, once.
    tokens = (6 + 16) * GLOBAL_BATCH
    for summary in s.values():
        assert sum(summary["load_per_rank"]) == 2 * tokens * 3  # 2 layers, top-3
        assert 0 < summary["balancedness"] <= 1
    assert s["dedup"]["load_per_rank"] == s["alltoall"]["load_per_rank"]
    assert s["dedup+shuffled"]["load_per_rank"] != s["dedup"]["load_per_rank"]
    # The same routing under another placement has another floor, and dedup meets it.
    assert s["dedup+shuffled"]["rows_sent"] == s["dedup+shuffled"]["floor_rows"]
    for variant, summary in s.items():
        rows, modality_rows = per_rank[0][variant]["rows"], per_rank[0][variant]["modality_rows"]
        # every row that goes out comes back exactly once: combine is dispatch transposed
        assert torch.equal(rows[:, 1], rows[:, 0].transpose(1, 2)), variant
        assert torch.equal(modality_rows[:, 1], modality_rows[:, 0].transpose(2, 3)), variant
        assert torch.equal(modality_rows.sum(2), rows), variant
        assert summary["tokens"] == {"text": 6 * GLOBAL_BATCH * 2, "vision": 16 * GLOBAL_BATCH * 2}
        if "2nodes" not in variant:
            assert summary["inter_node_bytes"] == 0
            assert summary["intra_node_bytes"] == summary["cross_rank_bytes"]
    # Same routing, two nodes: the hierarchical dispatcher crosses nodes once per (token, node).
    flat, hier = s["dedup@2nodes"], s["dedup-hier@2nodes"]
    assert flat["rows_sent"] == flat["floor_rows"] == s["dedup"]["floor_rows"]
    if ep_size == 2:  # one rank per node: node dedup is rank dedup
        assert hier["inter_node_rows"] == flat["inter_node_rows"] == flat["rows_sent"]
    else:
        assert 0 < hier["inter_node_rows"] < flat["inter_node_rows"]
        assert hier["inter_node_bytes"] < flat["inter_node_bytes"]
    assert flat["inter_node_bytes"] + flat["intra_node_bytes"] == flat["cross_rank_bytes"]


def _edge_worker(rank: int, ep_size: int, out: str, kind: str = "dedup") -> None:
    from megatron.core.transformer.moe.moe_layer import get_default_pg_collection

    from epruntime import distributed
    from epruntime.dispatch import CommLedger, dispatcher_class
    from epruntime.model.spec import transformer_config

    cfg = load_config(None, ["model.num_experts=8", "model.moe_topk=2", "model.hidden_size=16",
                             f"parallel.ep_size={ep_size}", "parallel.timeout_s=60",
                             "model.num_attention_heads=2"])
    env = distributed.init_distributed(cfg)
    n_local = 8 // ep_size
    per_node = ep_size // 2 if kind == "dedup-hier" else ep_size
    d = dispatcher_class(kind)(n_local, list(range(rank * n_local, (rank + 1) * n_local)),
                             config=transformer_config(cfg), pg_collection=get_default_pg_collection())
    d.ledger = CommLedger(1, ep_size, env.ep_rank, per_node)
    gen = torch.Generator().manual_seed(100 + rank)
    contiguous = Placement.contiguous(8, ep_size, per_node)
    own = list(range(rank * n_local, (rank + 1) * n_local))
    cases = {
        "random": (13, None, contiguous),
        "all_to_rank0": (9, [0, 1], contiguous),  # ranks 1.. receive nothing
        "all_local": (7, own[:2], contiguous),  # nothing leaves any rank
        "rank1_empty": (0 if rank == 1 else 5, None, contiguous),
        "reversed": (11, None, Placement.from_rank_lists(
            [list(range(8))[::-1][r * n_local:(r + 1) * n_local] for r in range(ep_size)], per_node)),
    }
    report = {}
    for name, (t, experts, placement) in cases.items():
        d.set_placement(placement)
        d.ledger.reset()
        x = torch.randn(t, 16, generator=gen, requires_grad=True)
        logits = torch.randn(t, 8, generator=gen)
        if experts is not None:
            logits[:, experts] += 100.0
        top = logits.topk(2, dim=1).indices
        routing = torch.zeros(t, 8, dtype=torch.bool).scatter_(1, top, True)
        probs = (torch.softmax(logits, 1) * routing).requires_grad_(True)
        rows, meta = d.dispatch_preprocess(x, routing, probs)
        rows, meta = d.token_dispatch(rows, meta)
        x_K, per_slot, p_K = d.dispatch_postprocess(rows, meta)
        # "Experts": slot s holds logical expert e and multiplies by (e + 1), weighted by p.
        scale = torch.tensor([placement.expert_at(env.ep_rank, s) + 1.0 for s in range(n_local)])
        y_K = x_K * torch.repeat_interleave(scale, per_slot)[:, None] * p_K[:, None]
        y = d.combine_postprocess(d.token_combine(d.combine_preprocess(y_K)))
        (y * torch.arange(16.0)).sum().backward()
        gx, gp = x.grad.clone(), probs.grad.clone()
        x.grad, probs.grad = None, None
        ref = (probs * routing * torch.arange(1.0, 9.0))[:, :, None] * x[:, None, :]
        (ref.sum(1) * torch.arange(16.0)).sum().backward()
        report[name] = {
            "out_err": (y - ref.sum(1)).abs().max().item() if t else 0.0,
            "gx_err": (gx - x.grad).abs().max().item() if t else 0.0,
            "gp_err": ((gp - probs.grad) * routing).abs().max().item() if t else 0.0,
            "sent": d.ledger.rows[0, 0, env.ep_rank].tolist(),
            "inter_node_rows": int(d.ledger.summary()["inter_node_rows"]),
            "received": d.num_recv,
        }
    torch.save(report, f"{out}/rank{rank}.pt")


def test_dedup_edge_cases_at_ep4(tmp_path):
    spawn(_edge_worker, 4, 4, str(tmp_path))
    reports = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for rank, rep in enumerate(reports):
        for name, r in rep.items():
            assert r["out_err"] < 1e-5 and r["gx_err"] < 1e-4 and r["gp_err"] < 1e-4, (rank, name, r)
        if rank > 0:
            assert rep["all_to_rank0"]["received"] == 0
        assert rep["all_to_rank0"]["sent"] == [9, 0, 0, 0]
        expected_local = [7 if r == rank else 0 for r in range(4)]
        assert rep["all_local"]["sent"] == expected_local  # never leaves the rank
    assert reports[1]["rank1_empty"]["sent"] == [0, 0, 0, 0]
    assert sum(rep["rank1_empty"]["received"] for rep in reports) == sum(
        sum(rep["rank1_empty"]["sent"]) for rep in reports)
    assert all(sum(rep["random"]["sent"]) >= 13 for rep in reports)
    assert list(itertools.chain.from_iterable(rep["all_to_rank0"]["sent"][1:] for rep in reports)) == [0] * 12


def test_dedup_hier_edge_cases_at_ep4_on_two_nodes(tmp_path):
    spawn(_edge_worker, 4, 4, str(tmp_path), "dedup-hier")
    reports = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    for rank, rep in enumerate(reports):
        for name, r in rep.items():
            assert r["out_err"] < 1e-5 and r["gx_err"] < 1e-4 and r["gp_err"] < 1e-4, (rank, name, r)
        assert rep["all_local"]["inter_node_rows"] == 0
    # Experts 0 and 1 sit on rank 0: node 1's ranks reach them through one gateway each.
    assert reports[2]["all_to_rank0"]["inter_node_rows"] == 9
    assert reports[2]["all_to_rank0"]["sent"] == [9, 0, 0, 0]
    assert reports[3]["all_to_rank0"]["sent"][1] == 9  # rank 3's gateway in node 0 is rank 1


def test_entries_to_dense_keeps_used_slots_whatever_the_padding():
    slots = torch.tensor([[0, -1, -1], [2, 0, -1], [-1, -1, -1]])
    probs = torch.tensor([[0.5, 9.0, 9.0], [0.25, 0.75, 9.0], [9.0, 9.0, 9.0]])
    used, dense = entries_to_dense(slots, probs, 3)
    assert used.tolist() == [[True, False, False], [True, False, True], [False, False, False]]
    assert dense.tolist() == [[0.5, 0, 0], [0.75, 0, 0.25], [0, 0, 0]]
