"""Start-up agreement between real ranks, and global expert names."""

from __future__ import annotations

from pathlib import Path

from epruntime.placement import Placement
from epruntime.model.sharding import is_expert_param, to_global_name, to_local_name
from tests.dist import spawn


def _mismatch_worker(rank: int, out: str, differs: str = "config") -> None:
    """Rank 1 differs from rank 0 in its config (another --set) or its epruntime sources;
    every rank writes the ConfigMismatchError it gets to rank<r>.txt."""
    from epruntime import distributed
    from epruntime.config import load_config

    lr = "1e-3" if rank == 1 and differs == "config" else "3e-3"
    if rank == 1 and differs == "code":  # as if rank 1's host had other epruntime sources
        distributed.source_hash = lambda: "f" * 64
    cfg = load_config(None, [f"train.lr={lr}", "parallel.ep_size=2", "parallel.timeout_s=30",
                             "data.global_batch_size=8"])
    try:
        distributed.init_distributed(cfg)
    except distributed.ConfigMismatchError as err:
        Path(out, f"rank{rank}.txt").write_text(str(err))


def test_config_mismatch_is_a_named_error_on_every_rank(tmp_path):
    spawn(_mismatch_worker, 2, str(tmp_path))
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "ranks disagree on the config" in message and "rank 1:" in message


def test_global_expert_names_round_trip():
    contiguous = [Placement.contiguous(32, 4)] * 2
    local = "gpt.decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    assert is_expert_param(local)
    assert to_global_name(local, 2, contiguous) == local.replace(".3.", ".19.")
    glob = local.replace(".3.", ".19.")
    assert to_local_name(glob, 2, contiguous) == local
    assert to_local_name(glob, 1, contiguous) is None
    dense = "gpt.decoder.layers.1.mlp.router.weight"
    assert not is_expert_param(dense) and to_global_name(dense, 3, contiguous) == dense


def test_global_expert_names_follow_each_layers_placement():
    # Layer 1 reversed: rank 0 holds experts 7..4, rank 1 holds 3..0.
    placements = [Placement.contiguous(8, 2), Placement.from_rank_lists([[7, 6, 5, 4], [3, 2, 1, 0]])]
    l0 = "gpt.decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"
    l1 = "gpt.decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight"
    assert to_global_name(l0, 1, placements) == l0.replace(".1.linear", ".5.linear")
    assert to_global_name(l1, 1, placements) == l1.replace(".1.linear", ".2.linear")
    assert to_local_name(l1.replace(".1.linear", ".2.linear"), 1, placements) == l1
    assert to_local_name(l1.replace(".1.linear", ".2.linear"), 0, placements) is None


def _spec_classes():
    from megatron.core.transformer.moe.router import TopKRouter

    from epruntime.compat.dispatcher import CpuAlltoAllTokenDispatcher as MoEAlltoAllTokenDispatcher

    class Router(TopKRouter):
        calls = 0

        def forward(self, *args, **kwargs):
            Router.calls += 1  # the model builds a hooked subclass of it (routing_hooks)
            return super().forward(*args, **kwargs)

    class Dispatcher(MoEAlltoAllTokenDispatcher):
        calls = 0

        def token_dispatch(self, *args, **kwargs):
            type(self).calls += 1
            return super().token_dispatch(*args, **kwargs)

    return Router, Dispatcher


def _spec_worker(rank: int, out: str) -> None:
    import torch

    from epruntime import distributed
    from epruntime.data import SyntheticVQA
    from epruntime.engine import Engine
    from tests.test_ep_equivalence import small_config

    cfg = small_config(ep_size=2, aux=0.0)
    env = distributed.init_distributed(cfg)
    ds = SyntheticVQA(16, image_size=16, question_len=6, seed=5)
    batch = ds.batch(torch.arange(4) + 4 * rank)
    router, dispatcher = _spec_classes()
    outputs = []
    for kwargs in ({}, {"router_cls": router, "dispatcher_cls": dispatcher}):
        engine = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len, **kwargs)
        outputs.append(engine.model(batch.images, batch.question_ids, batch.question_lens))
    layer = engine.model.gpt.decoder.layers[0].mlp
    torch.save({"same": torch.equal(*outputs), "router_calls": router.calls,
                "dispatch_calls": dispatcher.calls, "router": type(layer.router).__name__,
                "dispatcher": type(layer.token_dispatcher).__name__}, f"{out}/rank{rank}.pt")


def test_router_and_dispatcher_swap_by_spec(tmp_path):
    import torch

    spawn(_spec_worker, 2, str(tmp_path))
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["router"] == "Router" and r["dispatcher"] == "Dispatcher"
        assert r["router_calls"] == 2 and r["dispatch_calls"] == 2  # one per MoE layer
        assert r["same"]  # subclasses that only count change nothing
