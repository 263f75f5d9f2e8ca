"""megatron-core's MoELayer (TopKRouter + MoEAlltoAllTokenDispatcher + SequentialMLP experts),
forward + backward, at several expert-parallel sizes; each size is its own world of real ranks
over gloo (world size = EP size, one intra-op thread per rank).

Per EP size: the median over repeats of the step time, where a repeat's time is the slowest
rank's forward + backward after a barrier; tokens/s counts every rank's tokens; the all-to-all
fraction is the share of each rank's step spent inside the EP all-to-alls, averaged over ranks.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from profiling.benchlib import (
    BenchResult,
    BenchUsageError,
    collect_env,
    int_list,
    median_of,
    register,
    resolve,
    spawn_ranks,
)

# The shape of DESIGN.md's performance section, and one small enough for a test.
FULL = dict(hidden=256, experts=8, topk=2, ffn=512, tokens=4096, ep=[1, 2, 4],
            repeats=5, warmup=2, seed=1234)
QUICK = dict(hidden=32, experts=8, topk=2, ffn=64, tokens=256, ep=[1, 2],
             repeats=2, warmup=1, seed=1234)
THREADS_PER_RANK = 1


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, help=f"hidden size (default {FULL['hidden']})")
    parser.add_argument("--experts", type=int, help=f"experts (default {FULL['experts']})")
    parser.add_argument("--topk", type=int, help=f"experts per token (default {FULL['topk']})")
    parser.add_argument("--ffn", type=int, help=f"expert FFN hidden size (default {FULL['ffn']})")
    parser.add_argument("--tokens", type=int,
                        help=f"tokens per rank (default {FULL['tokens']})")
    parser.add_argument("--ep", type=int_list, help="EP sizes, e.g. 1,2,4 (default 1,2,4)")
    parser.add_argument("--seed", type=int, help=f"seed (default {FULL['seed']})")


def _config(p: dict[str, Any], ep: int):
    """The epruntime Config of one EP world; raises ConfigError for shapes that cannot run."""
    from epruntime.config import load_config

    return load_config(None, [
        f"model.hidden_size={p['hidden']}", "model.num_attention_heads=1", "model.num_layers=1",
        f"model.num_experts={p['experts']}", f"model.moe_topk={p['topk']}",
        f"model.moe_ffn_hidden_size={p['ffn']}", f"parallel.ep_size={ep}",
        f"parallel.threads_per_rank={THREADS_PER_RANK}", "parallel.timeout_s=300",
        f"data.global_batch_size={ep}", f"train.seed={p['seed']}",
    ])


class AllToAllTimer:
    """Wall seconds one rank spends in a dispatcher's EP all-to-alls, forward and backward.

    Forward: `token_dispatch` (two all-to-alls: tokens and probs) and `token_combine` (one) are
    wrapped on the dispatcher instance. Backward: each output of those calls has megatron's
    `_AllToAll` autograd node as grad_fn, whose backward is the reverse all-to-all; hooks before
    and after that node time it. gloo's all-to-all is blocking, so both include waiting for the
    slowest peer, as the step time does.
    """

    def __init__(self, dispatcher: Any) -> None:
        self.fwd = 0.0
        self.bwd = 0.0
        self.backward_nodes = 0  # hooked per step; 3 when megatron-core is as expected
        for name in ("token_dispatch", "token_combine"):
            setattr(dispatcher, name, self._timed(getattr(dispatcher, name)))

    def reset(self) -> None:
        self.fwd = self.bwd = 0.0
        self.backward_nodes = 0

    def _timed(self, method: Any) -> Any:
        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = method(*args, **kwargs)
            self.fwd += time.perf_counter() - start
            for t in out if isinstance(out, tuple) else (out,):
                if t.grad_fn is not None and "AllToAll" in type(t.grad_fn).__name__:
                    self._time_backward(t.grad_fn)
            return out

        return timed

    def _time_backward(self, node: Any) -> None:
        started: list[float] = []

        def before(grad_outputs: Any) -> None:
            started.append(time.perf_counter())

        def after(grad_inputs: Any, grad_outputs: Any) -> None:
            self.bwd += time.perf_counter() - started.pop()

        node.register_prehook(before)
        node.register_hook(after)
        self.backward_nodes += 1


def _worker(rank: int, p: dict[str, Any], out_dir: str) -> None:
    """One rank: build the MoELayer, time forward+backward on [tokens, 1, hidden] inputs, write
    this rank's samples to out_dir/rank{rank}.json."""
    import torch
    import torch.distributed as dist
    from megatron.core.transformer.spec_utils import build_module

    from epruntime import distributed
    from epruntime.model.spec import moe_layer_spec, transformer_config

    ep = int(os.environ["WORLD_SIZE"])
    cfg = _config(p, ep)
    # Seeds megatron-core's RNG states with train.seed; spawn_local shuts the groups down.
    distributed.init_distributed(cfg)
    layer = build_module(moe_layer_spec(cfg).submodules.mlp, config=transformer_config(cfg))
    layer.train()
    # A group of one makes megatron's all_to_all return its input: nothing to time at EP=1.
    timer = AllToAllTimer(layer.token_dispatcher) if ep > 1 else None

    gen = torch.Generator().manual_seed(p["seed"] + 1 + rank)
    x = torch.randn(p["tokens"], 1, p["hidden"], generator=gen).requires_grad_()
    grad_out = torch.randn(p["tokens"], 1, p["hidden"], generator=gen)
    a2a_fwd: list[float] = []
    a2a_bwd: list[float] = []

    def setup() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        dist.barrier()

    def step() -> None:
        if timer is not None:
            timer.reset()
        out, _ = layer(x)
        out.backward(grad_out)
        if timer is not None:
            a2a_fwd.append(timer.fwd)
            a2a_bwd.append(timer.bwd)

    _, samples = median_of(step, p["repeats"], p["warmup"], setup=setup)
    record = {"samples": samples, "a2a_fwd": a2a_fwd[-p["repeats"]:],
              "a2a_bwd": a2a_bwd[-p["repeats"]:],
              "backward_a2a_nodes": timer.backward_nodes if timer else 0}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


def _row(ep: int, p: dict[str, Any], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the ranks of one EP world into a table row."""
    steps = [max(r["samples"][i] for r in ranks) for i in range(p["repeats"])]
    step_time = statistics.median(steps)

    def fraction(key: str) -> float:
        if ep == 1:
            return 0.0
        per_repeat = [statistics.mean(r[key][i] / r["samples"][i] for r in ranks)
                      for i in range(p["repeats"])]
        return statistics.median(per_repeat)

    fwd, bwd = fraction("a2a_fwd"), fraction("a2a_bwd")
    if ep > 1 and any(r["backward_a2a_nodes"] != 3 for r in ranks):
        raise RuntimeError("expected 3 backward all-to-all nodes per step (tokens, probs, "
                           "combine); megatron-core's dispatcher changed, fix AllToAllTimer")
    return {
        "variant": f"ep{ep}",
        "ep_size": ep,
        "step_time_s": step_time,
        "tokens_per_s": p["tokens"] * ep / step_time,
        "alltoall_fraction": fwd + bwd,
        "alltoall_fwd_fraction": fwd,
        "alltoall_bwd_fraction": bwd,
        "oversubscribed": ep * THREADS_PER_RANK > (os.cpu_count() or 1),
        "samples": steps,
    }


@register("moe_layer", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """megatron-core MoELayer forward+backward tokens/s and all-to-all share at EP=1,2,4 (gloo)."""
    from epruntime.config import ConfigError

    p = resolve(args, FULL, QUICK)
    if p["repeats"] < 1 or p["warmup"] < 0 or p["tokens"] < 1:
        raise BenchUsageError("need --repeats >= 1, --warmup >= 0 and --tokens >= 1")
    try:
        for ep in p["ep"]:
            _config(p, ep)
    except ConfigError as err:
        raise BenchUsageError(str(err)) from None

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_moe_layer_") as tmp:
        for ep in p["ep"]:
            print(f"moe_layer: ep{ep} on {ep} rank(s)...", file=sys.stderr, flush=True)
            out = Path(tmp, f"ep{ep}")
            out.mkdir()
            spawn_ranks(_worker, ep, p, str(out), threads=THREADS_PER_RANK)
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ep)]
            rows.append(_row(ep, p, ranks))

    base = next((r for r in rows if r["ep_size"] == 1), None)
    ratios = {f"{r['variant']}/ep1_tokens_per_s": r["tokens_per_s"] / base["tokens_per_s"]
              for r in rows if base is not None and r is not base}
    notes = ["alltoall_fraction = forward (token_dispatch + token_combine) + backward "
             "(_AllToAll nodes) all-to-all time over the step, mean over ranks"]
    over = [r["variant"] for r in rows if r["oversubscribed"]]
    if over:
        notes.append(f"{', '.join(over)} oversubscribed: more ranks than the {os.cpu_count()} "
                     "CPUs, so ranks time-share cores (expected on this host)")
    params = {"hidden": p["hidden"], "experts": p["experts"], "topk": p["topk"],
              "ffn": p["ffn"], "tokens_per_rank": p["tokens"], "ep_sizes": p["ep"],
              "repeats": p["repeats"], "warmup": p["warmup"], "seed": p["seed"],
              "threads_per_rank": THREADS_PER_RANK, "quick": bool(args.quick),
              "dispatcher": "MoEAlltoAllTokenDispatcher", "experts_impl": "SequentialMLP"}
    return BenchResult(name="moe_layer", params=params, rows=rows, ratios=ratios,
                       env=collect_env(), notes=notes)
