"""EP load balance (epruntime.balance): the pure function, the same number from the planner's
placement evaluation, the exporter's all-reduced gauges on real ranks, and summary.json of a real
2-rank training run."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest
import torch

from epruntime.balance import layer_balance, over_layers, rank_balance
from epruntime.placement import Placement
from epruntime.placement.strategies import evaluate_placement
from tests.configs import SMALL
from tests.dist import spawn
from tests.launch import check, run, summary, torchrun_cmd
from tests.test_metrics import fake_engine, samples, two_free_ports


def test_rank_balance_of_a_hand_built_load_matrix():
    load_LR = torch.tensor([[4, 4, 4, 4],    # even
                            [8, 0, 0, 0],    # all on one rank
                            [6, 2, 2, 2],    # mean 3, max 6
                            [0, 0, 0, 0]])   # no load: balanced
    b, o = rank_balance(load_LR)
    assert b.tolist() == [1.0, 0.25, 0.5, 1.0]
    assert o.tolist() == [1.0, 4.0, 2.0, 1.0]
    assert layer_balance([6, 2, 2, 2]) == (0.5, 2.0)
    s = over_layers(b, o)
    assert s["balancedness_min"] == 0.25 and s["overload_max"] == 4.0
    assert s["balancedness_mean"] == pytest.approx(2.75 / 4)
    # Linear interpolation over the sorted layers [0.25, 0.5, 1, 1], as numpy's percentile.
    for k, q in (("p5", 5), ("p50", 50), ("p95", 95)):
        assert s[f"balancedness_{k}"] == pytest.approx(np.percentile(b.numpy(), q))
    assert s["balancedness_p50"] == 0.75 and s["overload_p50"] == 1.5
    with pytest.raises(ValueError, match="nonnegative"):
        rank_balance([[1, -1]])


def test_planner_evaluation_reports_the_same_balancedness():
    """evaluate_placement (planner, simulator) and the runtime's function agree on one routing."""
    torch.manual_seed(0)
    idx_TK = torch.stack([torch.randperm(8)[:2] for _ in range(64)])
    p = Placement.from_rank_lists([[0, 5], [1, 2], [3, 7], [4, 6]])
    ev = evaluate_placement(idx_TK, p, torch.arange(64) % 4)
    load_R = torch.bincount(torch.tensor(p.rank_of_expert)[idx_TK.flatten()], minlength=4)
    assert ev["load_per_rank"] == load_R.tolist()
    assert ev["balancedness"] == layer_balance(load_R)[0] < 1


# ---- the exporter's gauges: every rank's routing, one all-reduce per step -------------------

# Rank r's (token, expert) rows to EP ranks 0, 1 in layer 0 and layer 1.
SENT = {0: [[5, 1], [2, 2]], 1: [[3, 1], [0, 4]]}  # sums: L0 [8, 2], L1 [2, 6]


def _exporter_rank(rank: int) -> None:
    import torch.distributed as dist

    from epruntime.dispatch.ledger import CommLedger
    from epruntime.engine import StepResult
    from epruntime.metrics import MetricsExporter

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    engine, _ = fake_engine()
    engine.ledger = CommLedger(2, 2, rank, 1)
    engine.env.rank = rank
    mx = MetricsExporter(engine, serve=False)
    try:
        for layer, rows in enumerate(SENT[rank]):
            engine.ledger.record_routing(layer, torch.tensor(rows), torch.tensor(rows), None, 4)
        mx.on_step(0, StepResult(1.0, 1.0, 1e-3, 4, {}), 0.1)
        s = samples(mx.exposition().decode())
    finally:
        mx.close()
    r = f'rank="{rank}"'
    # L0: mean 5 / max 8; L1: mean 4 / max 6. Every rank exports the global figures.
    assert s[f'epruntime_ep_balancedness_ratio{{layer="0",{r}}}'] == pytest.approx(5 / 8)
    assert s[f'epruntime_ep_balancedness_ratio{{layer="1",{r}}}'] == pytest.approx(4 / 6)
    assert s[f'epruntime_ep_overload_ratio{{layer="0",{r}}}'] == pytest.approx(8 / 5)
    assert s[f'epruntime_ep_overload_ratio{{layer="1",{r}}}'] == pytest.approx(6 / 4)
    stat = "epruntime_ep_balancedness_over_layers_ratio"
    assert s[f'{stat}{{{r},stat="min"}}'] == pytest.approx(5 / 8)
    assert s[f'{stat}{{{r},stat="p50"}}'] == pytest.approx((5 / 8 + 4 / 6) / 2)
    assert s[f'{stat}{{{r},stat="p95"}}'] == pytest.approx(5 / 8 + 0.95 * (4 / 6 - 5 / 8))
    # This rank's own view (router hooks, none fired here) is untouched by the global one.
    assert s[f'epruntime_expert_balancedness_ratio{{layer="0",{r}}}'] == 1.0


def test_exporter_balance_gauges_sum_every_ranks_routing():
    spawn(_exporter_rank, 2)


# ---- summary.json of a real 2-rank training run --------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("balance")
    args = [a for kv in SMALL for a in ("--set", kv)]
    args += ["--set", f"train.output_dir={out}", "--set", "train.max_steps=3",
             "--set", "train.progress=false", "--set", "train.checkpoint_interval=100",
             "--set", "train.eval_at_end=false", "--set", "dispatch.kind=dedup",
             "--set", "parallel.ep_size=2",
             # the exporter's per-step all-reduce runs on both ranks of the real job
             "--set", "metrics.enabled=true", "--set", f"metrics.port={two_free_ports()}"]
    check(run(torchrun_cmd("epruntime.train", 2, *args)))
    return out


def test_summary_has_balance_consistent_with_the_ledger_rows(trained):
    comm = summary(trained)["comm"]
    layers = comm["per_layer"]
    assert len(layers) == 2
    topk = 3  # tests/configs.py: model.moe_topk=3
    # The rank loads are the ledger's (token, expert) rows: top-k of every token, all layers.
    assert sum(sum(p["load_per_rank"]) for p in layers) == topk * sum(comm["tokens"].values())
    balancedness = []
    for p in layers:
        load = np.asarray(p["load_per_rank"], dtype=float)
        assert len(load) == 2 and load.max() > 0
        assert p["balancedness"] == pytest.approx(load.mean() / load.max())
        assert p["overload"] == pytest.approx(load.max() / load.mean())
        balancedness.append(p["balancedness"])
    assert comm["balancedness"] == pytest.approx(np.mean(balancedness))
    for k, q in (("p5", 5), ("p50", 50), ("p95", 95)):
        assert comm[f"balancedness_{k}"] == pytest.approx(np.percentile(balancedness, q))
    assert comm["balancedness_min"] == pytest.approx(min(balancedness))
    assert comm["overload_max"] == pytest.approx(max(p["overload"] for p in layers))
    json.dumps(comm)  # plain JSON numbers
