"""The host-sync budget of the dedup path: device-to-host transfers per MoE layer per forward.

Counted on real gloo ranks (EP 2) by wrapping the tensor methods that bring a value to the host
(`item`, `tolist`, `cpu`, `numpy`, `__bool__`, `__int__`, `__float__`, `__index__`) while one
dispatcher's dispatch and combine run, with the ledger recording and the modality known. The
budget is the one each dispatcher's module documents (`HOST_SYNCS_PER_DISPATCH`): the split
counts, once per hop, in token_dispatch; nothing in pre- or post-processing, in combine, in the
row plan or in the ledger.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch

from epruntime.placement import Placement
from tests.dist import spawn_reports, write_report

EP = 2
HOST_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__",
                "__index__")
# (name, dispatch kind, ranks per node, kernels backend: None = automatic)
CONFIGS = [("dedup", "dedup", EP, None), ("dedup/torch-kernels", "dedup", EP, "torch"),
           ("dedup-hier", "dedup-hier", 1, None)]
PHASES = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "combine_preprocess",
          "token_combine", "combine_postprocess")


@contextlib.contextmanager
def counting_host_syncs():
    """Count calls of the tensor methods that copy a value to the host (outermost calls only)
    into the yielded Counter, by method name; restores torch.Tensor on exit."""
    counts: Counter = Counter()
    depth = [0]
    saved = {name: torch.Tensor.__dict__.get(name) for name in HOST_METHODS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if depth[0] == 0:
                counts[name] += 1
            depth[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
        return counted

    for name in HOST_METHODS:
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    try:
        yield counts
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)  # inherited from torch._C.TensorBase
            else:
                setattr(torch.Tensor, name, original)


def test_the_counter_sees_each_kind_of_host_transfer():
    x = torch.arange(3)
    with counting_host_syncs() as counts:
        x.sum().item(), x.tolist(), x.cpu(), x.numpy(), bool(x[0]), int(x[1]), float(x[2])
        [0, 1, 2][x[1]]
        if x.any():
            pass
    assert counts == Counter({"item": 1, "tolist": 1, "cpu": 1, "numpy": 1, "__bool__": 2,
                              "__int__": 1, "__float__": 1, "__index__": 1})
    assert "item" not in torch.Tensor.__dict__ or torch.Tensor.item is torch.Tensor.__dict__["item"]
    assert x.sum().item() == 3  # restored


def test_the_row_plan_needs_no_host_sync_unless_debug_checks_ask():
    from epruntime.dispatch.plan import row_plan

    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(64, 16, generator=gen)
    routing = torch.zeros(64, 16, dtype=torch.bool).scatter_(1, scores.topk(4, 1).indices, True)
    placement = Placement.contiguous(16, 4, 2)
    for kind in ("expert", "rank", "node"):
        with counting_host_syncs() as counts:
            plan = row_plan(routing, scores * routing, placement, kind, source_rank=1, topk=4,
                            hidden_size=8, modality_column=True)
            for hop in plan.hops:
                hop.rows_RR, hop.modality_rows(torch.zeros(64, dtype=torch.long))
            plan.control_bytes_RR, plan.expert_rows_RR, plan.floor_rows_RR
            if kind != "expert":
                n = 5  # a known count (host split counts) avoids the sync of a dynamic size
                plan.hops[0].entries(*plan.hops[0].rows(num_rows=n))
        assert sum(counts.values()) == 0, (kind, counts)
    with counting_host_syncs() as counts:
        row_plan(routing, scores, placement, "rank", source_rank=0, topk=4, debug_checks=True)
    assert sum(counts.values()) >= 1


def _sync_worker(rank: int, out: str) -> None:
    from megatron.core.transformer.moe.moe_layer import get_default_pg_collection

    from epruntime import distributed
    from epruntime.config import load_config
    from epruntime.dispatch import CommLedger, dedup, dispatcher_class, hier
    from epruntime.model.spec import transformer_config
    from epruntime.runtime import LayerRuntime, Observers, TokenStream

    cfg = load_config(None, ["model.num_experts=8", "model.moe_topk=3", "model.hidden_size=16",
                             f"parallel.ep_size={EP}", "parallel.timeout_s=60",
                             "model.num_attention_heads=2"])
    env = distributed.init_distributed(cfg)
    n_local = 8 // EP
    report = {}
    budgets = {"dedup": dedup.HOST_SYNCS_PER_DISPATCH, "dedup-hier": hier.HOST_SYNCS_PER_DISPATCH}
    for name, kind, per_node, backend in CONFIGS:
        tokens = TokenStream()
        runtime = LayerRuntime(0, kernels=backend, tokens=tokens,
                               observers=Observers(CommLedger(1, EP, env.ep_rank, per_node)))
        d = dispatcher_class(kind)(n_local, list(range(rank * n_local, (rank + 1) * n_local)),
                                   config=transformer_config(cfg),
                                   pg_collection=get_default_pg_collection(), runtime=runtime)
        d.set_placement(Placement.contiguous(8, EP, per_node))
        gen = torch.Generator().manual_seed(rank)
        per_call = []
        for _ in range(3):  # the first call also loads the kernels backend
            t = 24
            x = torch.randn(t, 1, 16, generator=gen, requires_grad=True)
            logits = torch.randn(t, 8, generator=gen)
            routing = torch.zeros(t, 8, dtype=torch.bool).scatter_(1, logits.topk(3, 1).indices,
                                                                   True)
            probs = torch.softmax(logits, 1) * routing
            tokens.enter(torch.randint(0, 2, (t, 1), generator=gen))
            counts = {}
            value = x
            args = (routing, probs)
            for phase in PHASES:
                with counting_host_syncs() as c:
                    if phase == "dispatch_preprocess":
                        value = d.dispatch_preprocess(value, *args)
                    elif phase == "dispatch_postprocess":
                        value = d.dispatch_postprocess(*value)
                    elif phase == "combine_preprocess":
                        x_K, per_slot, p_K = value
                        value = d.combine_preprocess(x_K * p_K[:, None])  # "experts"
                    elif phase == "token_dispatch":
                        value = d.token_dispatch(*value)
                    else:
                        value = getattr(d, phase)(value)
                counts[phase] = dict(c)
            value.sum().backward()
            per_call.append(counts)
        report[name] = {"per_call": per_call[1:],
                        "ledger_rows": int(runtime.ledger.rows.sum()),
                        "budget": budgets[kind]}
    write_report(out, rank, report)


@pytest.fixture(scope="module")
def sync_counts(tmp_path_factory):
    return spawn_reports(_sync_worker, EP, tmp_path_factory.mktemp("host_syncs"))


@pytest.mark.parametrize("rank", range(EP))
@pytest.mark.parametrize("name, budget", [("dedup", 1), ("dedup/torch-kernels", 1),
                                          ("dedup-hier", 2)])
def test_dispatch_and_combine_stay_within_the_documented_budget(sync_counts, name, budget, rank):
    report = sync_counts[rank][name]
    assert report["budget"] == budget  # what the dispatcher's module documents
    assert report["ledger_rows"] > 0  # the ledger was recording
    for counts in report["per_call"]:
        total = sum(n for phase in counts.values() for n in phase.values())
        assert total == budget, counts


@pytest.mark.parametrize("rank", range(EP))
@pytest.mark.parametrize("name", [config[0] for config in CONFIGS])
def test_the_one_named_sync_is_the_split_counts_in_token_dispatch(sync_counts, name, rank):
    for counts in sync_counts[rank][name]["per_call"]:
        assert {phase: c for phase, c in counts.items() if c} == {
            "token_dispatch": {"tolist": sync_counts[rank][name]["budget"]}}
