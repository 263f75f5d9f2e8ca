"""The dedup dispatchers' row entries through epruntime.kernels (`row_slots`, `fan_out_order`):
every backend that has them (the C++ "cpu" one) equals the torch reference exactly, the
reference means what its docstring says, and bad input names the tensor."""

from __future__ import annotations

import pytest
import torch

from epruntime import kernels
from epruntime.dispatch.layout import fan_out
from epruntime.dispatch.plan import row_plan
from epruntime.placement import Placement

WITH_OPS = [b for b, why in kernels.available_backends().items()
            if why is None and b != "torch" and b != "triton"
            and hasattr(kernels._BACKENDS[b][0], "row_slots")]


def _used(gen, t, g, q, density):
    return torch.rand(t, g, q, generator=gen) < density


def _rows(gen, t, g, n):
    return torch.randint(0, t, (n,), generator=gen), torch.randint(0, g, (n,), generator=gen)


def test_row_slots_reference_by_hand():
    used = torch.tensor([[[0, 1, 0, 1, 1], [0, 0, 0, 0, 0]],
                         [[1, 1, 1, 1, 1], [0, 0, 1, 0, 0]]], dtype=torch.bool)
    token, group = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    got = kernels.row_slots(used, token, group, 3, backend="torch")
    assert got.tolist() == [[1, 3, 4], [-1, -1, -1], [0, 1, 2], [2, -1, -1]]


def test_fan_out_order_reference_by_hand():
    slot = torch.tensor([[2, 0], [-1, -1], [0, 2], [1, -1]])
    entry, counts = kernels.fan_out_order(slot, 4, backend="torch")
    # slot 0: entries 1 (row 0), 4 (row 2); slot 1: 6 (row 3); slot 2: 0 (row 0), 5 (row 2)
    assert entry.tolist() == [1, 4, 6, 0, 5] and counts.tolist() == [2, 1, 2, 0]


@pytest.mark.parametrize("backend", WITH_OPS)
@pytest.mark.parametrize("seed", range(3))
def test_backend_row_slots_match_the_reference(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    for t, g, q, m, n, density in [(50, 2, 32, 6, 80, 0.2), (37, 4, 8, 4, 60, 0.5),
                                   (10, 1, 5, 5, 10, 0.9), (8, 3, 4, 2, 0, 0.5),
                                   (6, 2, 7, 0, 5, 0.5), (9, 2, 6, 3, 12, 0.0)]:
        used = _used(gen, t, g, q, density)
        token, group = _rows(gen, t, g, n)
        ref = kernels.row_slots(used, token, group, m, backend="torch")
        got = kernels.row_slots(used, token, group, m, backend=backend)
        assert got.dtype == torch.int64 and got.shape == (n, m) and torch.equal(got, ref)


@pytest.mark.parametrize("backend", WITH_OPS)
@pytest.mark.parametrize("seed", range(3))
def test_backend_fan_out_order_matches_the_reference(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    for x, m, local in [(200, 6, 32), (17, 3, 4), (0, 4, 8), (5, 1, 1), (90, 8, 80)]:
        slot = torch.randint(-1, local, (x, m), generator=gen)
        ref = kernels.fan_out_order(slot, local, backend="torch")
        got = kernels.fan_out_order(slot, local, backend=backend)
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(ref, got))
    empty = torch.full((4, 3), -1)
    entry, counts = kernels.fan_out_order(empty, 5, backend=backend)
    assert entry.numel() == 0 and counts.tolist() == [0] * 5


@pytest.mark.parametrize("backend", ["torch", *WITH_OPS])
def test_bad_input_names_the_tensor(backend):
    used = torch.zeros(4, 2, 3, dtype=torch.bool)
    token, group = torch.tensor([0, 1]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="used_TGQ"):
        kernels.row_slots(used.int(), token, group, 2, backend=backend)
    with pytest.raises(ValueError, match="group_N"):
        kernels.row_slots(used, token, group[:1], 2, backend=backend)
    with pytest.raises(ValueError, match="max_entries"):
        kernels.row_slots(used, token, group, 4, backend=backend)
    with pytest.raises(IndexError):
        kernels.row_slots(used, torch.tensor([0, 4]), group, 2, backend=backend)
    with pytest.raises(ValueError, match="slot_XM"):
        kernels.fan_out_order(torch.zeros(3, 2), 4, backend=backend)
    with pytest.raises(ValueError, match="num_local"):
        kernels.fan_out_order(torch.tensor([[0, 5]]), 4, backend=backend)


@pytest.mark.parametrize("kind", ["rank", "node"])
def test_entries_and_fan_out_equal_on_every_backend_with_gradients(kind):
    """A row plan's entries (weights differentiable) and the fan-out of them are the same, and
    give the same gradients, whichever backend picks the slots."""
    gen = torch.Generator().manual_seed(7)
    t, e, k = 64, 32, 6
    scores = torch.rand(t, e, generator=gen)
    top = scores.topk(k, 1)
    placement = Placement.from_phy2log(torch.randperm(e, generator=gen).tolist(), 4,
                                       ranks_per_node=2)
    results = []
    for backend in ["torch", *WITH_OPS]:
        probs = torch.zeros(t, e).scatter(1, top.indices, top.values).requires_grad_()
        plan = row_plan(probs.detach() > 0, probs, placement, kind, source_rank=1, topk=k)
        hop = plan.hops[0]
        token_N, dest_N = hop.rows()
        slot_NM, prob_NM = hop.entries(token_N, dest_N, backend)
        fan = fan_out(slot_NM, hop.used_TGQ.shape[2], backend)
        (prob_NM.reshape(-1)[fan.entry_K] * torch.arange(fan.entry_K.numel())).sum().backward()
        results.append((slot_NM, prob_NM.detach(), fan.row_K, fan.entry_K,
                        fan.tokens_per_slot, probs.grad))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    slot_NM, prob_NM = results[0][:2]
    assert (prob_NM > 0).sum() == (slot_NM >= 0).sum() == t * k  # every pair on one entry
