"""Expert capacity side by side: megatron-core's alltoall dispatcher against the rank-dedup
dispatcher, dropless and under `model.moe_expert_capacity_factor` (with and without padding to
capacity), on the same weights and batch, EP over CPU ranks (gloo).

Each variant builds the MoE-VLM (tiny-vqa's model, fine-grained shape: 64 experts, top-6, the
seed's initial weights, so the router is far from balanced and capacity drops pairs) and times
forward+backward of one fixed batch, round-robin over the variants (median of repeats; a step
lasts as long as its slowest rank). Rows, bytes, dropped and padding pairs come from the
CommLedger of one forward pass over the same batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from profiling.benchlib import TINY_CONFIG, BenchResult, collect_env, register, resolve, spawn_ranks

SHAPES = {
    "fine": ["model.num_experts=64", "model.moe_topk=6", "model.moe_ffn_hidden_size=32"],
    "tiny": [],  # tiny-vqa's 32 experts, top-4
}
CAPACITY = {  # name: model overrides
    "dropless": [],
    "cf1.25": ["model.moe_expert_capacity_factor=1.25"],
    "cf1.0": ["model.moe_expert_capacity_factor=1.0"],
    "cf1.0+pad": ["model.moe_expert_capacity_factor=1.0",
                  "model.moe_pad_expert_input_to_capacity=true"],
}
KINDS = ("alltoall", "dedup")
FULL = dict(ep=4, shape="fine", samples=16, repeats=7, warmup=2)
QUICK = dict(ep=2, shape="tiny", samples=2, repeats=2, warmup=1)
LEDGER_KEYS = ("cross_rank_bytes", "rows_sent", "expert_rows", "dropped_pairs", "padded_pairs")


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ep", type=int, help="EP size = ranks (default 4)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="fine (64 experts top-6, "
                        "default) or tiny (32 experts top-4)")
    parser.add_argument("--samples", type=int, help="samples per rank in the timed batch")


def _config(p: dict[str, Any], capacity: str, kind: str):
    from epruntime.config import load_config

    return load_config(TINY_CONFIG, [*SHAPES[p["shape"]], *CAPACITY[capacity],
                                     f"parallel.ep_size={p['ep']}", f"dispatch.kind={kind}",
                                     "data.dataset=synthetic", "data.synthetic_items=256",
                                     "parallel.timeout_s=300", "debug_checks=false"])


def _worker(rank: int, p: dict[str, Any], out: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from epruntime import distributed
    from epruntime.data import SyntheticVQA
    from epruntime.engine import Engine

    variants = [(c, k) for c in CAPACITY for k in KINDS]
    env = distributed.init_distributed(_config(p, "dropless", "alltoall"))
    cfg0 = _config(p, "dropless", "alltoall")
    ds = SyntheticVQA(256, image_size=cfg0.model.image_size, question_len=8, seed=5)
    n = p["samples"]
    batch = ds.batch(torch.arange(env.rank * n, (env.rank + 1) * n))
    engines, ledgers = {}, {}
    for capacity, kind in variants:
        get_moe_layer_wise_logging_tracker().clear()
        engine = Engine(_config(p, capacity, kind), env, len(ds.vocab), ds.num_answers,
                        ds.max_question_len)
        engine.ledger.reset()
        with torch.no_grad():
            engine.local_loss(batch, n * env.world_size)  # one forward: the ledger's figures
        s = engine.comm_summary()
        tokens = sum(s["tokens"].values())
        ledgers[capacity, kind] = {**{k: s[k] for k in LEDGER_KEYS},
                                   "dropped_fraction": s["dropped_pairs"] / (
                                       tokens * engine.cfg.model.moe_topk)}
        engine.ledger.enabled = False  # not counted while timed
        engines[capacity, kind] = engine
    seconds: dict = {v: [] for v in variants}
    for i in range(p["warmup"] + p["repeats"]):
        for v in variants:  # round-robin: the machine's drift hits every variant alike
            engine = engines[v]
            dist.barrier()
            t = time.perf_counter()
            engine.forward_backward(batch, n * env.world_size)
            took = torch.tensor([time.perf_counter() - t])
            dist.all_reduce(took, op=dist.ReduceOp.MAX)  # the slowest rank's step
            if i >= p["warmup"]:
                seconds[v].append(float(took))
    if rank == 0:
        Path(out).write_text(json.dumps([
            {"variant": f"{k}/{c}", "kind": k, "capacity": c,
             "step_ms": 1e3 * statistics.median(seconds[c, k]), **ledgers[c, k]}
            for c, k in variants]))


@register("capacity", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """megatron-core alltoall vs dedup dispatch under expert capacity (drop, pad): step time,
    bytes, dropped pairs."""
    p = resolve(args, FULL, QUICK)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "rows.json")
        spawn_ranks(_worker, p["ep"], p, str(out))
        rows = json.loads(out.read_text())
    by = {r["variant"]: r for r in rows}
    ratios = {}
    for c in CAPACITY:
        a, d = by[f"alltoall/{c}"], by[f"dedup/{c}"]
        ratios[f"dedup_over_alltoall_bytes/{c}"] = d["cross_rank_bytes"] / a["cross_rank_bytes"]
        ratios[f"dedup_over_alltoall_step/{c}"] = d["step_ms"] / a["step_ms"]
    for k in KINDS:
        ratios[f"{k}_step_cf1.0_over_dropless"] = (by[f"{k}/cf1.0"]["step_ms"]
                                                   / by[f"{k}/dropless"]["step_ms"])
    return BenchResult(name="capacity", params=p, rows=rows, ratios=ratios, env=collect_env(),
                       notes=["step_ms: forward+backward of the MoE-VLM, slowest rank, median of "
                              "repeats, variants round-robin; bytes and pairs: one forward, "
                              "summed over ranks; initial (untrained) weights"])
