"""The deduplicating dispatchers on real gloo ranks, as properties per variant: one megatron-core
MoE layer built with each dispatcher (alltoall = megatron-core's own, counted by the ledger;
dedup; dedup under a shuffled placement; dedup and dedup-hier on two nodes) gives megatron-core's
outputs and gradients; the ledger's bytes are the bytes handed to the collective (seen by a
recording transport); combine is dispatch transposed; dedup meets the floor. Then edge cases of
the dispatchers alone, and the fan-out helpers.

Ranks are spawned once per EP size (module-scoped fixtures); each test reads their results.
"""

from __future__ import annotations

import pytest
import torch

from epruntime.config import load_config
from epruntime.dispatch.layout import dedup_send_layout, entries_to_dense, fan_out
from epruntime.dispatch.plan import COUNT_BYTES
from epruntime.placement import Placement
from tests import configs
from tests.dist import spawn

GLOBAL_BATCH = 8
EXPERTS, TOPK, HIDDEN = 8, 3, 32
SEQ, VISION = 22, 16  # tokens per sample: 16 vision patches, then 6 text tokens
BATCH = 4  # samples per rank in the layer tests
# name: (dispatch kind, shuffled placement, two nodes)
VARIANTS = {"alltoall": ("alltoall", False, False), "dedup": ("dedup", False, False),
            "dedup+shuffled": ("dedup", True, False), "dedup@2nodes": ("dedup", False, True),
            "dedup-hier@2nodes": ("dedup-hier", False, True)}
DEDUP_VARIANTS = [v for v, (kind, _, _) in VARIANTS.items() if kind != "alltoall"]


def small_config(ep_size: int, kind: str, *extra: str):
    return configs.small_config(*extra, "model.moe_aux_loss_coeff=0", f"parallel.ep_size={ep_size}",
                                f"dispatch.kind={kind}")


class RecordingTransport:
    """The process group's all_to_all_single, counting the bytes handed to it (a transport as
    `epruntime.transport` defines it, given to the dispatcher through its LayerRuntime)."""

    def __init__(self, group):
        self.group, self.bytes, self.calls = group, 0, 0

    def all_to_all_single(self, out, x, recv_splits, send_splits) -> None:
        import torch.distributed as dist

        self.bytes += x.numel() * x.element_size()
        self.calls += 1
        dist.all_to_all_single(out, x, recv_splits, send_splits, group=self.group)

    def close(self) -> None:
        pass


def shuffled_placement(ep_size: int, ranks_per_node: int) -> Placement:
    """Every rank's contiguous experts scattered over the others."""
    order = torch.randperm(EXPERTS, generator=torch.Generator().manual_seed(1))
    return Placement.from_rank_lists(order.view(ep_size, -1).tolist(), ranks_per_node)


# ---- real ranks: one MoE layer per variant ------------------------------------------------------
def _layer_worker(rank: int, ep_size: int, out: str) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.spec_utils import build_module

    from epruntime import distributed
    from epruntime.dispatch import CommLedger, dispatcher_class
    from epruntime.model.spec import moe_layer_spec, transformer_config
    from epruntime.runtime import LayerRuntime, Observers, TokenStream

    cfg = small_config(ep_size, "alltoall")
    env = distributed.init_distributed(cfg)
    tc = transformer_config(cfg)
    group = ps.get_expert_model_parallel_group()
    gen = torch.Generator().manual_seed(100 + rank)
    x_SBH = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    modality_SB = (torch.arange(SEQ) >= VISION).logical_not().long()[:, None].expand(SEQ, BATCH)
    weight_SBH = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    results = {}
    for variant, (kind, shuffled, two_nodes) in VARIANTS.items():
        per_node = ep_size // 2 if two_nodes else ep_size
        placement = (shuffled_placement(ep_size, per_node) if shuffled
                     else Placement.contiguous(EXPERTS, ep_size, per_node))
        ledger = CommLedger(1, ep_size, env.ep_rank, per_node)
        transport, tokens = RecordingTransport(group), TokenStream()
        runtime = LayerRuntime(0, transport=transport, observers=Observers(ledger), tokens=tokens)
        spec = moe_layer_spec(cfg, dispatcher=dispatcher_class(kind))
        layer = build_module(spec.submodules.mlp, config=tc, layer_number=1, runtime=runtime)
        layer.token_dispatcher.set_placement(placement)
        experts = {}  # logical expert -> its local module (same weights in every variant)
        with torch.no_grad():
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape,
                                                  generator=torch.Generator().manual_seed(7)))
            for slot, module in enumerate(layer.experts.local_experts):
                e = placement.expert_at(env.ep_rank, slot)
                experts[e] = module
                seeded = torch.Generator().manual_seed(1000 + e)
                for p in (module.linear_fc1.weight, module.linear_fc2.weight):
                    p.copy_(torch.randn(p.shape, generator=seeded) * 0.2)
        # forward + backward
        x = x_SBH.clone().requires_grad_(True)
        tokens.enter(modality_SB)
        y, _ = layer(x)
        (y * weight_SBH).sum().backward()
        grads = {"input": x.grad.clone(), "router": layer.router.weight.grad.clone()}
        for e, module in experts.items():
            grads[f"expert{e}.fc1"] = module.linear_fc1.weight.grad.clone()
            grads[f"expert{e}.fc2"] = module.linear_fc2.weight.grad.clone()
        # forward only: what the ledger and the transport saw
        ledger.reset()
        transport.bytes = 0
        with torch.no_grad():
            y2, _ = layer(x_SBH)
        totals = ledger.totals(torch.distributed.group.WORLD)
        results[variant] = {
            "output": y.detach(), "output_no_grad": y2, "grads": grads,
            "transport_bytes": transport.bytes,
            "ledger_bytes": int(ledger.payload_bytes.sum() + ledger.meta_bytes.sum()),
            "control_bytes": int(ledger.control_bytes.sum()),
            "summary": ledger.summary(torch.distributed.group.WORLD),
            "rows": totals.rows, "modality_rows": totals.modality_rows,
        }
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda ep: f"ep{ep}")
def layer_runs(request, tmp_path_factory):
    """{"ep": EP size, "ranks": [per rank: {variant: results}]} of one spawn per EP size."""
    ep_size = request.param
    out = tmp_path_factory.mktemp(f"layers_ep{ep_size}")
    spawn(_layer_worker, ep_size, ep_size, str(out))
    return {"ep": ep_size, "ranks": [torch.load(out / f"rank{r}.pt", weights_only=False)
                                     for r in range(ep_size)]}


def _summary(runs, variant):
    return runs["ranks"][0][variant]["summary"]


@pytest.mark.parametrize("variant", DEDUP_VARIANTS)
def test_outputs_equal_megatron_cores(layer_runs, variant):
    for rank, res in enumerate(layer_runs["ranks"]):
        for key in ("output", "output_no_grad"):
            torch.testing.assert_close(res[variant][key], res["alltoall"][key], rtol=1e-5,
                                       atol=1e-6, msg=f"rank {rank} {key}")


@pytest.mark.parametrize("variant", DEDUP_VARIANTS)
def test_gradients_equal_megatron_cores(layer_runs, variant):
    def merged(v):  # every rank's gradients; experts by logical id, the rest per rank
        out = {}
        for rank, res in enumerate(layer_runs["ranks"]):
            for name, g in res[v]["grads"].items():
                out[name if name.startswith("expert") else f"rank{rank}.{name}"] = g
        return out

    got, want = merged(variant), merged("alltoall")
    assert got.keys() == want.keys() and len([n for n in want if n.startswith("expert")]) == \
        2 * EXPERTS
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", DEDUP_VARIANTS)
def test_ledger_bytes_are_the_bytes_handed_to_the_collective(layer_runs, variant):
    # the transport carries the rows with their metadata, and the split counts before them
    for rank, res in enumerate(layer_runs["ranks"]):
        r = res[variant]
        assert r["transport_bytes"] == r["ledger_bytes"] + r["control_bytes"], rank
        assert r["ledger_bytes"] > r["control_bytes"] > 0, rank


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_control_bytes_are_the_split_counts_exchanged(layer_runs, variant):
    ep = layer_runs["ep"]
    kind = VARIANTS[variant][0]
    # per rank and forward call: [E] int64 counts all-gathered by megatron-core, [R] int64
    # counts per dedup hop
    per_dst = {"alltoall": EXPERTS * COUNT_BYTES, "dedup": COUNT_BYTES,
               "dedup-hier": 2 * COUNT_BYTES}[kind]
    for res in layer_runs["ranks"]:
        assert res[variant]["control_bytes"] == per_dst * ep


def test_megatron_core_sends_one_row_per_remote_token_expert_pair(layer_runs):
    s = _summary(layer_runs, "alltoall")
    assert s["rows_sent"] == s["expert_rows"] > s["floor_rows"]


@pytest.mark.parametrize("variant", DEDUP_VARIANTS[:3])
def test_rank_dedup_sends_exactly_the_floor(layer_runs, variant):
    s, mega = _summary(layer_runs, variant), _summary(layer_runs, "alltoall")
    assert s["rows_sent"] == s["floor_rows"]
    if variant != "dedup+shuffled":  # same routing, same placement: the same floor
        assert s["floor_rows"] == mega["floor_rows"]
        assert s["payload_bytes"] < mega["payload_bytes"]


def test_placement_moves_the_load_and_the_floor(layer_runs):
    dedup, shuffled = _summary(layer_runs, "dedup"), _summary(layer_runs, "dedup+shuffled")
    assert dedup["load_per_rank"] == _summary(layer_runs, "alltoall")["load_per_rank"]
    assert shuffled["load_per_rank"] != dedup["load_per_rank"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_pair_is_computed_once_and_tokens_are_counted_by_modality(layer_runs, variant):
    s, ep = _summary(layer_runs, variant), layer_runs["ep"]
    assert sum(s["load_per_rank"]) == SEQ * BATCH * ep * TOPK
    assert 0 < s["balancedness"] <= 1
    assert s["tokens"] == {"text": (SEQ - VISION) * BATCH * ep, "vision": VISION * BATCH * ep}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_combine_is_dispatch_transposed_and_rows_add_up_by_modality(layer_runs, variant):
    res = layer_runs["ranks"][0][variant]
    rows, modality_rows = res["rows"], res["modality_rows"]
    assert torch.equal(rows[:, 1], rows[:, 0].transpose(1, 2))
    assert torch.equal(modality_rows[:, 1], modality_rows[:, 0].transpose(2, 3))
    assert torch.equal(modality_rows.sum(2), rows)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bytes_split_by_locality(layer_runs, variant):
    s = _summary(layer_runs, variant)
    assert s["inter_node_bytes"] + s["intra_node_bytes"] == s["cross_rank_bytes"]
    if not VARIANTS[variant][2]:
        assert s["inter_node_bytes"] == 0


def test_node_dedup_crosses_nodes_once_per_token_and_node(layer_runs):
    flat, hier = _summary(layer_runs, "dedup@2nodes"), _summary(layer_runs, "dedup-hier@2nodes")
    assert flat["rows_sent"] == flat["floor_rows"] == _summary(layer_runs, "dedup")["floor_rows"]
    if layer_runs["ep"] == 2:  # one rank per node: node dedup is rank dedup
        assert hier["inter_node_rows"] == flat["inter_node_rows"] == flat["rows_sent"]
    else:
        assert 0 < hier["inter_node_rows"] < flat["inter_node_rows"]
        assert hier["inter_node_bytes"] < flat["inter_node_bytes"]


# ---- real ranks: the dispatchers alone on edge cases ------------------------------------------
EDGE_CASES = ("random", "all_to_rank0", "all_local", "rank1_empty", "reversed")


def _edge_worker(rank: int, ep_size: int, out: str) -> None:
    from megatron.core.transformer.moe.moe_layer import get_default_pg_collection

    from epruntime import distributed
    from epruntime.dispatch import CommLedger, dispatcher_class
    from epruntime.model.spec import transformer_config
    from epruntime.runtime import LayerRuntime, Observers

    cfg = load_config(None, ["model.num_experts=8", "model.moe_topk=2", "model.hidden_size=16",
                             f"parallel.ep_size={ep_size}", "parallel.timeout_s=60",
                             "model.num_attention_heads=2"])
    env = distributed.init_distributed(cfg)
    n_local = 8 // ep_size
    own = list(range(rank * n_local, (rank + 1) * n_local))
    report = {}
    for kind in ("dedup", "dedup-hier"):
        per_node = ep_size // 2 if kind == "dedup-hier" else ep_size
        ledger = CommLedger(1, ep_size, env.ep_rank, per_node)
        d = dispatcher_class(kind)(n_local, own, config=transformer_config(cfg),
                                   pg_collection=get_default_pg_collection(),
                                   runtime=LayerRuntime(0, observers=Observers(ledger)))
        gen = torch.Generator().manual_seed(100 + rank)
        contiguous = Placement.contiguous(8, ep_size, per_node)
        cases = {
            "random": (13, None, contiguous),
            "all_to_rank0": (9, [0, 1], contiguous),  # ranks 1.. receive nothing
            "all_local": (7, own[:2], contiguous),  # nothing leaves any rank
            "rank1_empty": (0 if rank == 1 else 5, None, contiguous),
            "reversed": (11, None, Placement.from_rank_lists(
                [list(range(8))[::-1][r * n_local:(r + 1) * n_local] for r in range(ep_size)],
                per_node)),
        }
        for name, (t, experts, placement) in cases.items():
            d.set_placement(placement)
            ledger.reset()
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
            scale = torch.tensor([placement.expert_at(env.ep_rank, s) + 1.0
                                  for s in range(n_local)])
            y_K = x_K * torch.repeat_interleave(scale, per_slot)[:, None] * p_K[:, None]
            y = d.combine_postprocess(d.token_combine(d.combine_preprocess(y_K)))
            (y * torch.arange(16.0)).sum().backward()
            gx, gp = x.grad.clone(), probs.grad.clone()
            x.grad, probs.grad = None, None
            ref = (probs * routing * torch.arange(1.0, 9.0))[:, :, None] * x[:, None, :]
            (ref.sum(1) * torch.arange(16.0)).sum().backward()
            report[(kind, name)] = {
                "out_err": (y - ref.sum(1)).abs().max().item() if t else 0.0,
                "gx_err": (gx - x.grad).abs().max().item() if t else 0.0,
                "gp_err": ((gp - probs.grad) * routing).abs().max().item() if t else 0.0,
                "sent": ledger.rows[0, 0, env.ep_rank].tolist(),
                "inter_node_rows": int(ledger.summary()["inter_node_rows"]),
                "received": d._handle.num_received,
            }
    torch.save(report, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def edge_runs(tmp_path_factory):
    """[per rank: {(kind, case): report}] at EP 4 (dedup-hier on two nodes)."""
    out = tmp_path_factory.mktemp("edges")
    spawn(_edge_worker, 4, 4, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("kind", ["dedup", "dedup-hier"])
def test_edge_case_outputs_and_gradients_are_exact(edge_runs, kind, case):
    for rank, rep in enumerate(edge_runs):
        r = rep[(kind, case)]
        assert r["out_err"] < 1e-5 and r["gx_err"] < 1e-4 and r["gp_err"] < 1e-4, (rank, r)


@pytest.mark.parametrize("case", EDGE_CASES)
def test_every_row_sent_is_received(edge_runs, case):
    received = sum(rep[("dedup", case)]["received"] for rep in edge_runs)
    assert received == sum(sum(rep[("dedup", case)]["sent"]) for rep in edge_runs)


def test_dedup_edge_cases_at_ep4(edge_runs):
    for rank, rep in enumerate(edge_runs):
        if rank > 0:
            assert rep[("dedup", "all_to_rank0")]["received"] == 0
        assert rep[("dedup", "all_to_rank0")]["sent"] == [9, 0, 0, 0]
        # never leaves the rank
        assert rep[("dedup", "all_local")]["sent"] == [7 if r == rank else 0 for r in range(4)]
        assert sum(rep[("dedup", "random")]["sent"]) >= 13
    assert edge_runs[1][("dedup", "rank1_empty")]["sent"] == [0, 0, 0, 0]


def test_dedup_hier_edge_cases_at_ep4_on_two_nodes(edge_runs):
    for rep in edge_runs:
        assert rep[("dedup-hier", "all_local")]["inter_node_rows"] == 0
    # Experts 0 and 1 sit on rank 0: node 1's ranks reach them through one gateway each.
    assert edge_runs[2][("dedup-hier", "all_to_rank0")]["inter_node_rows"] == 9
    assert edge_runs[2][("dedup-hier", "all_to_rank0")]["sent"] == [9, 0, 0, 0]
    assert edge_runs[3][("dedup-hier", "all_to_rank0")]["sent"][1] == 9  # its gateway: rank 1


# ---- pure helpers ---------------------------------------------------------------------------
def test_send_layout_lists_the_plans_rows_and_conserves_pairs():
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


def test_fan_out_groups_entries_by_slot_in_arrival_order():
    slots = torch.tensor([[1, -1], [0, 1], [1, 0], [-1, -1]])
    fan = fan_out(slots, num_local=3)
    assert fan.tokens_per_slot.tolist() == [2, 3, 0]
    assert fan.row_K.tolist() == [1, 2, 0, 1, 2]
    assert fan.entry_K.tolist() == [2, 5, 0, 3, 4]


def test_entries_to_dense_keeps_used_slots_whatever_the_padding():
    slots = torch.tensor([[0, -1, -1], [2, 0, -1], [-1, -1, -1]])
    probs = torch.tensor([[0.5, 9.0, 9.0], [0.25, 0.75, 9.0], [9.0, 9.0, 9.0]])
    used, dense = entries_to_dense(slots, probs, 3)
    assert used.tolist() == [[True, False, False], [True, False, True], [False, False, False]]
    assert dense.tolist() == [[0.5, 0, 0], [0.75, 0, 0.25], [0, 0, 0]]
