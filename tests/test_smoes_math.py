"""SMoES math (arXiv 2604.23996): scorers, bins, losses and metrics against hand-worked numbers."""

from __future__ import annotations

import math

import pytest
import torch

from epruntime.config import SmoesConfig
from epruntime.smoes import (
    BALANCE_LOSSES,
    ExpertModalityCounts,
    GaussianModalityStats,
    assign_bins,
    attention_accumulate,
    balancedness,
    bin_balance_loss,
    bin_members,
    bin_scores,
    counts_from_routing,
    expert_balance_loss,
    hard_scores,
    mi_loss,
    msi,
    msi_from_routing,
    mutual_information,
    text_preference,
)

t = torch.tensor


# ---- scorers ---------------------------------------------------------------------------------

def test_hard_scores_one_hot():
    M = hard_scores(t([0, 1, 1]))
    assert torch.equal(M, t([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="modality_T"):
        hard_scores(t([0, 2]))


def test_attention_accumulate_hand_example():
    M = t([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    A = t([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.4, 0.4]]])
    attn_norm = t([[1.0, 1.0, 0.0]])
    res_norm = t([[1.0, 3.0, 0.0]])  # token 2: zero denominator keeps M
    out = attention_accumulate(M, A, attn_norm, res_norm)
    # token 0: (1*[1,0] + 1*[1,0]) / 2; token 1: (1*[.5,.5] + 3*[0,1]) / 4 = [.125, .875]
    assert torch.allclose(out, t([[[1.0, 0.0], [0.125, 0.875], [0.0, 1.0]]]))
    assert torch.allclose(out.sum(-1), torch.ones(1, 3))
    unbatched = attention_accumulate(M[0], A[0], attn_norm[0], res_norm[0])
    assert torch.allclose(unbatched, out[0])


def test_attention_accumulate_identity_returns_M():
    torch.manual_seed(0)
    M = torch.softmax(torch.randn(2, 5, 2), -1)
    out = attention_accumulate(M, torch.eye(5).expand(2, 5, 5), torch.rand(2, 5), torch.rand(2, 5))
    assert torch.allclose(out, M, atol=1e-6)


def test_gaussian_update_is_hand_ema():
    g = GaussianModalityStats(hidden_size=2, beta=0.5)
    x = t([[0.0, 0.0], [2.0, 2.0], [10.0, 10.0]])
    g.update(x, t([0, 0, 1]))  # first batch initialises: text mean [1,1] var [1,1]
    assert torch.allclose(g.mu, t([[1.0, 1.0], [10.0, 10.0]]))
    assert torch.allclose(g.var, t([[1.0, 1.0], [0.0, 0.0]]))
    g.update(t([[3.0, 1.0], [5.0, 3.0]]), t([0, 0]))  # text mean [4,2] var [1,1], delta [3,1]
    # mu = .5*[1,1] + .5*[4,2]; var = .5*1 + .5*1 + .25*[9,1]; vision untouched
    assert torch.allclose(g.mu, t([[2.5, 1.5], [10.0, 10.0]]))
    assert torch.allclose(g.var, t([[3.25, 1.25], [0.0, 0.0]]))
    assert g.initialized.tolist() == [True, True]


def test_gaussian_scores_hand_example_and_favour_closer():
    g = GaussianModalityStats(hidden_size=2)
    g.mu.copy_(t([[0.0, 0.0], [2.0, 2.0]]))
    g.var.copy_(t([[1.0, 1.0], [4.0, 4.0]]))
    g.initialized.fill_(True)
    # x = [1, 0], tau = 0.5 * 2 = 1: LL_text = -0.5, LL_vision = -0.5 (2 ln 4 + 1.25) = -2.0112944
    M = g.scores(t([[1.0, 0.0]]))
    assert torch.allclose(M, t([[0.8192529519, 1 - 0.8192529519]]), atol=1e-6)
    M = g.scores(t([[0.1, -0.1], [2.0, 2.5], [1.9, 2.1]]))
    assert torch.allclose(M.sum(-1), torch.ones(3))
    assert M[0, 0] > 0.5 and M[1, 1] > 0.5 and M[2, 1] > 0.5


def test_gaussian_unseen_modality_and_state_dict_round_trip():
    g = GaussianModalityStats(hidden_size=3)
    assert torch.allclose(g.scores(torch.randn(4, 3)), torch.full((4, 2), 0.5))
    g.update(torch.randn(6, 3), torch.zeros(6, dtype=torch.long))
    assert torch.equal(g.scores(torch.randn(4, 3)), t([[1.0, 0.0]] * 4))
    g.update(torch.randn(6, 3) + 3, torch.ones(6, dtype=torch.long))
    h = GaussianModalityStats(hidden_size=3)
    h.load_state_dict(g.state_dict())
    assert set(g.state_dict()) == {"mu", "var", "initialized"}
    for name in ("mu", "var", "initialized"):
        assert torch.equal(getattr(g, name), getattr(h, name))


def _sync_worker(rank: int, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    g = GaussianModalityStats(hidden_size=2, beta=0.5)
    x = t([[float(rank), 2.0 * rank], [float(rank), 2.0 * rank]])
    g.update(x, t([0, 0]) if rank == 0 else t([0, 1]))  # rank 0 has no vision stats
    g.sync_()
    assert torch.allclose(g.mu, t([[0.5, 1.0], [1.0, 2.0]])), g.mu
    assert torch.allclose(g.var, torch.zeros(2, 2))
    assert g.initialized.tolist() == [True, True]
    c = ExpertModalityCounts(2, beta=0.0)
    c.update(t([[2.0 * rank, 0.0], [0.0, 4.0]]))
    c.sync_()
    assert torch.allclose(c.C, t([[1.0, 0.0], [0.0, 4.0]]))
    dist.destroy_process_group()


def test_stats_sync_identical_across_ranks(tmp_path):
    # Plain gloo ranks (no megatron-core import in the children) keep this test to seconds.
    torch.multiprocessing.spawn(_sync_worker, args=(str(tmp_path / "init"),), nprocs=2)


# ---- bins ------------------------------------------------------------------------------------

def test_counts_ema_and_text_preference():
    c = ExpertModalityCounts(2, beta=0.5)
    c.update(t([[2.0, 0.0], [0.0, 4.0]]))
    c.update(t([[0.0, 2.0], [2.0, 0.0]]))
    assert torch.allclose(c.C, t([[0.5, 1.0], [1.0, 1.0]]))
    assert torch.allclose(text_preference(t([[3.0, 0.0, 1.0], [1.0, 0.0, 3.0]])),
                          t([0.75, 0.5, 0.25]))
    routing = t([[True, True, False], [False, True, True]])
    soft = counts_from_routing(routing, t([[0.75, 0.25], [0.0, 1.0]]))
    assert torch.allclose(soft, t([[0.75, 0.75, 0.0], [0.25, 1.25, 1.0]]))
    hard = counts_from_routing(routing, t([0, 1]))
    assert torch.allclose(hard, t([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))


def test_assign_bins_hand_example_with_tie_at_the_cut():
    f = t([0.9, 0.1, 0.5, 0.5, 0.2, 0.8, 0.3, 0.7])
    # ascending: e1 .1, e4 .2, e6 .3, e2 .5, e3 .5 (tie: lower id first), e7 .7, e5 .8, e0 .9
    bins = assign_bins(f, 2)
    assert bins.dtype == torch.int64
    assert bins.tolist() == [1, 0, 0, 1, 0, 1, 0, 1]
    assert bin_members(bins, 2).tolist() == [[1, 2, 4, 6], [0, 3, 5, 7]]
    assert assign_bins(f, 4).tolist() == [3, 0, 1, 2, 0, 3, 1, 2]


def test_assign_bins_rejects_non_divisor():
    with pytest.raises(ValueError, match=r"smoes\.num_bins \(3\).*\(8\)"):
        assign_bins(torch.rand(8), 3)
    with pytest.raises(ValueError, match="bin_of_expert_E"):
        bin_members(t([0, 0, 0, 1]), 2)


# ---- losses ----------------------------------------------------------------------------------

def test_mutual_information_of_known_joint():
    P = t([[[0.4, 0.1], [0.1, 0.4]]], dtype=torch.float64)
    expected = 2 * 0.4 * math.log(1.6) + 2 * 0.1 * math.log(0.4)
    assert math.isclose(float(mutual_information(P)[0]), expected, rel_tol=1e-12)
    assert math.isclose(float(mutual_information(P * 7)[0]), expected, rel_tol=1e-12)
    # 0 log 0 = 0: a perfectly separated joint has MI = ln 2
    sep = t([[[0.5, 0.0], [0.0, 0.5]]], dtype=torch.float64, requires_grad=True)
    mi = mutual_information(sep)
    assert math.isclose(float(mi[0].detach()), math.log(2), rel_tol=1e-9)
    mi.sum().backward()
    assert torch.isfinite(sep.grad).all()


def test_mi_loss_from_router_probs_matches_joint():
    M = t([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    probs = t([[[0.8, 0.2], [0.2, 0.8]]], dtype=torch.float64)
    # N_B = 1: S = [[.8, .2], [.2, .8]] -> P = [[.4, .1], [.1, .4]]
    S = bin_scores(M, probs, t([0, 1]), 2)
    assert torch.allclose(S, t([[[0.8, 0.2], [0.2, 0.8]]], dtype=torch.float64))
    expected = 2 * 0.4 * math.log(1.6) + 2 * 0.1 * math.log(0.4)
    assert math.isclose(float(mi_loss(M, probs, t([0, 1]), 2)), -expected, rel_tol=1e-12)


def test_bin_scores_hand_example_and_absent_modality():
    M = t([[[0.5, 0.5], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    probs = t([[[0.4, 0.2, 0.3, 0.1], [0.1, 0.1, 0.4, 0.4]],
               [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]])
    S = bin_scores(M, probs, t([0, 0, 1, 1]), 2)  # N_B = 2
    # sample 0 text: (.5*[.6,.4] + 1*[.2,.8]) / (2 * 1.5) = [.5, 1.0] / 3
    # sample 0 vision: .5*[.6,.4] / (2 * .5) = [.6, .4] / 2
    # sample 1 text: ([.5,.5] + [.8,.2]) / (2 * 2); sample 1 vision absent -> zeros
    expected = t([[[0.5 / 3, 1.0 / 3], [0.3, 0.2]], [[1.3 / 4, 0.7 / 4], [0.0, 0.0]]])
    assert torch.allclose(S, expected)
    assert float(mutual_information(S)[1]) == pytest.approx(0.0, abs=1e-7)


def test_mi_loss_zero_when_bins_independent_of_modality():
    q = torch.softmax(torch.randn(8, dtype=torch.float64), 0)
    probs = q.expand(1, 4, 8).clone()  # every token routes alike: S[m, k] is the same for m
    M = hard_scores(t([[0, 1, 0, 1]]), torch.float64)
    bins = assign_bins(torch.rand(8), 4)
    assert abs(float(mi_loss(M, probs, bins, 4))) < 1e-12


def test_mi_loss_gradcheck_wrt_router_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    M = torch.softmax(torch.randn(2, 5, 2, dtype=torch.float64), -1)
    M[1, :, 1] = 0.0  # sample 1 is text only
    M[1, :, 0] = 1.0
    bins = t([1, 0, 0, 1])
    assert torch.autograd.gradcheck(
        lambda z: mi_loss(M, torch.softmax(z, -1), bins, 2), (logits,))


# Two tokens, four experts, top-2: P_e = [.4, .2, .15, .25], f_e = [2, 1, 0, 1] / (2 * 2).
BAL_PROBS = t([[0.5, 0.3, 0.1, 0.1], [0.3, 0.1, 0.2, 0.4]])
BAL_ROUTING = t([[True, True, False, False], [True, False, False, True]])


@pytest.mark.parametrize("bins, expected", [
    # F_k = [.75, .25], P_k = [.6, .4]: N_B (F.P) = 2 (.45 + .10)
    ([0, 0, 1, 1], 1.1),
    # F_k = [.5, .5], P_k = [.55, .45]: 2 (.275 + .225)
    ([0, 1, 0, 1], 1.0),
    # F_k = [.75, .25], P_k = [.65, .35]: 2 (.4875 + .0875)
    ([0, 1, 1, 0], 1.15),
])
def test_bin_balance_loss_per_bin_hand_values_depend_on_the_bins(bins, expected):
    loss = bin_balance_loss(BAL_PROBS, BAL_ROUTING, t(bins), 2, topk=2)
    assert float(loss) == pytest.approx(expected)


@pytest.mark.parametrize("bins", [[0, 0, 1, 1], [0, 1, 0, 1], [0, 1, 1, 0]])
def test_expert_balance_loss_is_bin_independent(bins):
    # sum_e f_e P_e = .5*.4 + .25*.2 + 0 + .25*.25 = .3125, times N_B = 2, whatever the bins
    loss = expert_balance_loss(BAL_PROBS, BAL_ROUTING, t(bins), 2, topk=2)
    assert float(loss) == pytest.approx(0.625)


def test_bin_balance_loss_uniform_routing_value():
    # every expert equally likely and used: F_k = P_k = 1/K, so N_B * K / K^2 = N_B / K
    E, K, k, T = 8, 2, 2, 4
    probs = torch.full((T, E), 1 / E)
    routing = torch.zeros(T, E, dtype=torch.bool)
    for i in range(T):
        routing[i, [2 * i, 2 * i + 1]] = True
    bins = assign_bins(torch.rand(E, generator=torch.Generator().manual_seed(0)), K)
    assert float(bin_balance_loss(probs, routing, bins, K, topk=k)) == pytest.approx((E // K) / K)
    assert float(expert_balance_loss(probs, routing, bins, K, topk=k)) == pytest.approx(1 / K)


def test_balance_losses_selected_by_config():
    assert BALANCE_LOSSES == {"bin": bin_balance_loss, "expert": expert_balance_loss}
    assert SmoesConfig().bal_form == "bin"
    with pytest.raises(ValueError, match="bal_form"):
        SmoesConfig(bal_form="bins")


@pytest.mark.parametrize("loss_fn", [bin_balance_loss, expert_balance_loss])
def test_balance_losses_gradcheck_wrt_router_logits(loss_fn):
    torch.manual_seed(1)
    logits = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    routing = torch.zeros(6, 8, dtype=torch.bool).scatter_(1, logits.topk(2, -1).indices, True)
    bins = assign_bins(torch.rand(8), 2)
    assert torch.autograd.gradcheck(
        lambda z: loss_fn(torch.softmax(z, -1), routing, bins, 2, topk=2), (logits,))


# ---- metrics ---------------------------------------------------------------------------------

def test_msi_extremes_and_hand_value():
    assert msi(t([0, 0, 1, 1]), t([0, 1, 0, 1]), 2) == pytest.approx(0.0, abs=1e-12)
    assert msi(t([0, 0, 1, 1]), t([0, 0, 1, 1]), 2) == pytest.approx(1.0)
    assert msi(t([0, 0, 0]), t([0, 1, 1]), 2) == 0.0  # H(modality) = 0
    # joint counts [[3, 1], [0, 2]] / 6
    mod, grp = t([0, 0, 0, 0, 1, 1]), t([0, 0, 0, 1, 1, 1])
    mi = 0.5 * math.log(1.5) + (1 / 6) * math.log(0.5) + (1 / 3) * math.log(2)
    h = -(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)
    assert msi(mod, grp, 2) == pytest.approx(mi / h, rel=1e-12)


def test_msi_from_routing_counts_assignments():
    routing = t([[True, False, True], [True, True, False], [False, True, True]])
    modality = t([0, 0, 1])
    # assignments: text->e0, text->e2, text->e0, text->e1, vision->e1, vision->e2
    groups = t([0, 1, 1])  # experts 1, 2 share group 1: joint counts [[2, 2], [0, 2]]
    expected = msi(t([0, 0, 0, 0, 1, 1]), t([0, 1, 0, 1, 1, 1]), 2)
    assert msi_from_routing(routing, modality, groups, 2) == pytest.approx(expected)
    assert 0.0 < expected < 1.0


def test_balancedness():
    assert balancedness([1, 1, 1, 1]) == 1.0
    assert balancedness(t([1.0, 3.0])) == pytest.approx(2 / 3)
    assert balancedness([0, 4]) == 0.5
    assert balancedness([0, 0]) == 1.0
