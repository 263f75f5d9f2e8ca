"""FastMMoE's greedy selection through epruntime.kernels.greedy_keep (the C++ "cpu" backend and
the vectorised torch reference) keeps exactly the tokens the original implementation kept: the
cached-nearest-neighbour loop below, as it was in epruntime/fastmmoe/policies.py before the
selection moved behind the kernels front."""

from __future__ import annotations

import pytest
import torch

from epruntime import kernels as K
from epruntime.fastmmoe.similarity import cosine_similarity, js_similarity


def _greedy_keep_original(sim_BPP: torch.Tensor, keep: int) -> torch.Tensor:
    b, p, _ = sim_BPP.shape
    device = sim_BPP.device
    if keep >= p:
        return torch.arange(p, device=device).expand(b, p).clone()
    if keep <= 0:
        return torch.empty(b, 0, dtype=torch.long, device=device)
    eye = torch.eye(p, dtype=torch.bool, device=device)
    work = sim_BPP.masked_fill(eye, float("-inf"))
    redundancy_BP, nearest_BP = work.max(dim=2)
    alive_BP = torch.ones(b, p, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)
    for _ in range(p - keep):
        drop_B = redundancy_BP.masked_fill(~alive_BP, float("-inf")).argmax(dim=1)
        alive_BP[rows, drop_B] = False
        work[rows, :, drop_B] = float("-inf")
        stale_b, stale_p = ((nearest_BP == drop_B[:, None]) & alive_BP).nonzero(as_tuple=True)
        if stale_b.numel():
            value, index = work[stale_b, stale_p].max(dim=1)
            redundancy_BP[stale_b, stale_p] = value
            nearest_BP[stale_b, stale_p] = index
    return alive_BP.nonzero()[:, 1].view(b, keep)


def _backends() -> list[str]:
    return [name for name, reason in K.available_backends().items()
            if reason is None and name in ("torch", "cpu")]


SHAPES = [(1, 2, 1), (3, 6, 3), (5, 16, 2), (5, 16, 8), (4, 64, 8), (4, 64, 32), (2, 64, 63),
          (7, 37, 5), (3, 9, 1)]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("similarity", [cosine_similarity, js_similarity])
def test_greedy_keep_equals_the_original_on_random_routings(backend, similarity):
    if backend not in _backends():
        pytest.skip(f"kernel backend {backend!r} unavailable here: "
                    f"{K.available_backends().get(backend)}")
    gen = torch.Generator().manual_seed(17)
    for b, p, keep in SHAPES:
        for sharpness in (0.5, 3.0):  # flat and peaked routing distributions
            probs = torch.softmax(torch.randn(b, p, 32, generator=gen) * sharpness, -1)
            sim = similarity(probs)
            got = K.greedy_keep(sim, keep, backend)
            want = _greedy_keep_original(sim, keep)
            assert got.dtype == torch.int64 and got.shape == (b, keep)
            assert torch.equal(got, want), (backend, b, p, keep, sharpness)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_greedy_keep_breaks_ties_like_the_original(backend):
    """Duplicated tokens and exactly tied similarities: the first index wins every tie."""
    if backend not in _backends():
        pytest.skip(f"kernel backend {backend!r} unavailable here")
    gen = torch.Generator().manual_seed(3)
    base = torch.softmax(torch.randn(6, 16, 8, generator=gen) * 2, -1)
    probs = base[:, torch.tensor([0, 1, 0, 2, 1, 3, 3, 3, 4, 5, 0, 6, 7, 7, 8, 9])]
    sim = cosine_similarity(probs)
    quantised = (cosine_similarity(base[:, :16]) * 4).round() / 4  # many equal values
    for s in (sim, quantised):
        for keep in (1, 4, 8, 15, 16, 0):
            assert torch.equal(K.greedy_keep(s, keep, backend), _greedy_keep_original(s, keep))


def test_greedy_keep_names_a_bad_tensor():
    with pytest.raises(ValueError, match="sim_BPP"):
        K.greedy_keep(torch.zeros(2, 3, 4), 1)
    with pytest.raises(ValueError, match="keep"):
        K.greedy_keep(torch.zeros(2, 3, 3), -1)
