"""The same model, weights and global batch give the same loss and gradients at EP=1, 2, 4:
real megatron-core expert parallelism over gloo, not a single-process stand-in."""

from __future__ import annotations

import pytest
import torch

from tests import configs
from tests.dist import spawn

GLOBAL_BATCH = 8


def small_config(ep_size: int, aux: float):
    return configs.small_config(f"model.moe_aux_loss_coeff={aux}", f"parallel.ep_size={ep_size}")


def _grads_worker(rank: int, ep_size: int, aux: float, out: str) -> None:
    from epruntime import distributed
    from epruntime.data import SyntheticVQA, shard_slice
    from epruntime.engine import Engine
    from epruntime.model.sharding import split_params

    cfg = small_config(ep_size, aux)
    env = distributed.init_distributed(cfg)
    ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
    engine = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len)
    local = torch.arange(GLOBAL_BATCH)[shard_slice(GLOBAL_BATCH, env.dp_rank, env.dp_size)]
    loss = engine.forward_backward(ds.batch(local), GLOBAL_BATCH)
    _, expert = split_params(engine.model)
    grads = {n: p.grad.clone() for n, p in engine.model.global_named_parameters(env.ep_rank)}
    torch.save({"loss": loss, "grads": grads, "num_expert_params": len(expert)},
               f"{out}/rank{rank}.pt")


def run_world(tmp_path, world: int, ep_size: int, aux: float) -> tuple[float, dict]:
    out = tmp_path / f"w{world}_ep{ep_size}"
    out.mkdir()
    spawn(_grads_worker, world, ep_size, aux, str(out))
    losses, merged = set(), {}
    for rank in range(world):
        r = torch.load(out / f"rank{rank}.pt")
        losses.add(r["loss"])
        assert r["num_expert_params"] > 0
        for name, g in r["grads"].items():
            if name in merged:  # replicated parameter: every holder has the same reduced grad
                torch.testing.assert_close(g, merged[name], rtol=0, atol=0, msg=name)
            merged[name] = g
    assert len(losses) == 1, f"ranks report different global losses: {losses}"
    return losses.pop(), merged


def assert_same(reference: tuple[float, dict], other: tuple[float, dict]) -> None:
    (ref_loss, ref), (loss, grads) = reference, other
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_loss_and_grads_equal_at_ep_1_2_4(tmp_path):
    """World = EP: the global batch is split over ranks and experts over the same ranks.
    The aux loss is per micro-batch by megatron-core's definition, so it is off here."""
    ref = run_world(tmp_path, 1, 1, aux=0.0)
    # every expert's weight got a gradient: all of them were used by the reference batch
    assert sum(1 for n, g in ref[1].items() if "local_experts" in n and g.abs().sum() > 0) > 8
    assert_same(ref, run_world(tmp_path, 2, 2, aux=0.0))
    assert_same(ref, run_world(tmp_path, 4, 4, aux=0.0))


def test_ep_size_does_not_change_the_math_with_aux_loss(tmp_path):
    """Four ranks with the same micro-batches: EP=1 (pure DP), EP=2 and EP=4 agree, aux loss on."""
    ref = run_world(tmp_path, 4, 1, aux=0.01)
    assert_same(ref, run_world(tmp_path, 4, 2, aux=0.01))
    assert_same(ref, run_world(tmp_path, 4, 4, aux=0.01))
