"""How to choose a placement, and how to score one against recorded routing.

Pure functions, tensors in, `Placement` / plain dict out:

- `placement_from_bins`: SMoES (arXiv 2604.23996) bins -> EP ranks (bin k on rank k; across
  nodes, bins of similar text preference share a node).
- `coactivation_counts`: [E, E] how often two experts are picked by the same token.
- `traffic_aware_placement`: put experts that the same tokens pick on the same rank (node), so a
  rank-deduplicating dispatcher sends fewer rows, with every rank's load kept under a cap.
- `evaluate_placement`: rows a per-expert / rank-dedup / node-dedup dispatcher would send for a
  placement and a recorded routing, plus load balance.

Shapes: T tokens, K experts per token, E experts, R ranks, N nodes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from epruntime.balance import layer_balance
from epruntime.dispatch.plan import routing_map_from_topk, row_plan
from epruntime.placement.core import Placement, PlacementError

__all__ = [
    "coactivation_counts",
    "evaluate_placement",
    "placement_from_bins",
    "traffic_aware_placement",
]

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# ---- input checks ---------------------------------------------------------------------------
def _check_ranks(num_ranks: int, ranks_per_node: int | None, num_experts: int) -> int:
    """Validate (num_ranks, ranks_per_node) against E; returns ranks_per_node (default R)."""
    if not isinstance(num_ranks, int) or num_ranks < 1:
        raise PlacementError(f"num_ranks must be a positive int, got {num_ranks!r}")
    if num_experts % num_ranks:
        raise PlacementError(f"num_ranks={num_ranks} must divide the number of experts "
                             f"({num_experts})")
    rpn = num_ranks if ranks_per_node is None else ranks_per_node
    if not isinstance(rpn, int) or rpn < 1 or num_ranks % rpn:
        raise PlacementError(f"ranks_per_node={ranks_per_node!r} must be a positive divisor of "
                             f"num_ranks={num_ranks}")
    return rpn


def _check_topk(topk_idx_TK: Tensor, num_experts: int, name: str = "topk_idx_TK") -> Tensor:
    if not isinstance(topk_idx_TK, Tensor) or topk_idx_TK.dim() != 2:
        raise PlacementError(f"{name} must be a 2-D [T, K] tensor of expert ids, got "
                             f"{getattr(topk_idx_TK, 'shape', type(topk_idx_TK))}")
    if topk_idx_TK.dtype not in _INTEGER_DTYPES:
        raise PlacementError(f"{name} must hold integer expert ids, got dtype {topk_idx_TK.dtype}")
    idx = topk_idx_TK.to(torch.long)
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= num_experts):
        raise PlacementError(f"{name} ids must lie in [-1, {num_experts}) (-1 = no expert), got "
                             f"range [{int(idx.min())}, {int(idx.max())}]")
    return idx


# ---- SMoES bins -> ranks --------------------------------------------------------------------
def placement_from_bins(bin_of_expert_E: Tensor, num_ranks: int, ranks_per_node: int | None = None,
                        text_pref_E: Tensor | None = None) -> Placement:
    """SMoES bins on EP ranks (arXiv 2604.23996: N_bins = number of EP ranks, bin k on rank k).

    bin_of_expert_E: [E] int, bin of each logical expert, E / num_ranks experts per bin.
    text_pref_E: optional [E] float in [0, 1], the SMoES text preference f(e).

    One node (or no `text_pref_E`): bin k -> rank k. Several nodes with `text_pref_E`: bins are
    ordered by mean text preference (stable, so ties keep bin order) and the i-th bin goes to
    rank i; consecutive ranks share a node, so the bins a modality's tokens mostly visit sit on
    one node and that traffic stays off the inter-node link. Bins from `smoes.bins.assign_bins`
    are already in preference order, so for them this is still bin k -> rank k.
    Slots within a rank follow expert id.
    """
    if not isinstance(bin_of_expert_E, Tensor) or bin_of_expert_E.dim() != 1:
        raise PlacementError("bin_of_expert_E must be a 1-D [E] tensor of bin ids, got "
                             f"{getattr(bin_of_expert_E, 'shape', type(bin_of_expert_E))}")
    if bin_of_expert_E.dtype not in _INTEGER_DTYPES:
        raise PlacementError(f"bin_of_expert_E must hold integer bin ids, got dtype "
                             f"{bin_of_expert_E.dtype}")
    E = bin_of_expert_E.numel()
    if E == 0:
        raise PlacementError("bin_of_expert_E is empty")
    rpn = _check_ranks(num_ranks, ranks_per_node, E)
    bins_E = bin_of_expert_E.detach().to("cpu", torch.long)
    if int(bins_E.min()) < 0 or int(bins_E.max()) >= num_ranks:
        raise PlacementError(f"bin_of_expert_E ids must lie in [0, num_ranks={num_ranks}) "
                             f"(one bin per EP rank), got range [{int(bins_E.min())}, "
                             f"{int(bins_E.max())}]")
    sizes = torch.bincount(bins_E, minlength=num_ranks)
    if bool((sizes != E // num_ranks).any()):
        raise PlacementError(f"bin_of_expert_E must put E / num_ranks = {E // num_ranks} experts "
                             f"in each of {num_ranks} bins, got sizes {sizes.tolist()}")

    rank_of_bin = torch.arange(num_ranks)
    if text_pref_E is not None and num_ranks // rpn > 1:
        if not isinstance(text_pref_E, Tensor) or tuple(text_pref_E.shape) != (E,):
            raise PlacementError(f"text_pref_E must be a [{E}] tensor, got "
                                 f"{getattr(text_pref_E, 'shape', type(text_pref_E))}")
        f_E = text_pref_E.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(f_E).all()) or bool(((f_E < 0) | (f_E > 1)).any()):
            raise PlacementError("text_pref_E must be finite and in [0, 1]")
        mean_f = torch.zeros(num_ranks, dtype=torch.float64).index_add_(0, bins_E, f_E)
        mean_f /= sizes.to(torch.float64)
        order = torch.sort(mean_f, stable=True).indices  # order[i] = bin placed on rank i
        rank_of_bin[order] = torch.arange(num_ranks)
    rank_E = rank_of_bin[bins_E]
    return Placement.from_rank_lists(
        [torch.nonzero(rank_E == r).flatten().tolist() for r in range(num_ranks)], rpn)


# ---- co-activation --------------------------------------------------------------------------
def coactivation_counts(topk_idx_TK: Tensor, num_experts: int) -> Tensor:
    """[E, E] int64 symmetric: C[a, b] = tokens that picked both a and b (a != b); C[e, e] =
    tokens that picked e (its load). topk_idx_TK: [T, K] expert ids, -1 = no expert; an expert
    repeated within a token's row counts once."""
    if not isinstance(num_experts, int) or num_experts < 1:
        raise PlacementError(f"num_experts must be a positive int, got {num_experts!r}")
    idx_TK = _check_topk(topk_idx_TK, num_experts).cpu()
    T = idx_TK.shape[0]
    # Token x expert membership, then M^T M counts tokens per pair; float64 is exact for
    # counts below 2^53 and keeps the product on the fast BLAS path.
    member_TE = torch.zeros(T, num_experts + 1, dtype=torch.float64)
    member_TE.scatter_(1, torch.where(idx_TK < 0, num_experts, idx_TK), 1.0)  # column E = pad
    member_TE = member_TE[:, :num_experts]
    return (member_TE.T @ member_TE).round().to(torch.int64)


# ---- traffic-aware placement ----------------------------------------------------------------
# The search runs on small dense numpy arrays (E <= a few hundred): thousands of tiny steps,
# where torch's per-op overhead would dominate. W_EE: symmetric co-activation, zero diagonal;
# load_E: float64 loads; group_E: int64 group (rank or node) of each expert.
_TOL = 1 + 1e-12  # float slack on load caps
_KL_FULL = 128  # up to this many items, Kernighan-Lin runs full passes from both starts


def _group_loads(group_E: np.ndarray, load_E: np.ndarray, parts: int) -> np.ndarray:
    return np.bincount(group_E, weights=load_E, minlength=parts)


def _affinity(W_EE: np.ndarray, group_E: np.ndarray, parts: int) -> np.ndarray:
    """[E, P]: A[e, g] = co-activation of e with the members of group g (e itself excluded)."""
    return W_EE @ np.eye(parts)[group_E]


def _intra_weight(W_EE: np.ndarray, group_E: np.ndarray) -> float:
    """Sum of W[a, b] over unordered pairs a != b in the same group."""
    return float((W_EE * (group_E[:, None] == group_E[None, :])).sum()) / 2


def _balanced_reference(load_E: np.ndarray, parts: int) -> np.ndarray:
    """Load-only placement (LPT with equal group sizes): heaviest expert first onto the lightest
    group that still has a free slot."""
    E = load_E.size
    size = E // parts
    group_E = np.empty(E, dtype=np.int64)
    loads, counts = np.zeros(parts), np.zeros(parts, dtype=np.int64)
    for e in np.argsort(-load_E, kind="stable"):
        g = int(np.argmin(np.where(counts < size, loads, np.inf)))  # first lightest open group
        group_E[e] = g
        loads[g] += load_E[e]
        counts[g] += 1
    return group_E


def _greedy_groups(W_EE: np.ndarray, load_E: np.ndarray, parts: int, cap: float) -> np.ndarray:
    """Seeded clustering: each group starts at the heaviest unassigned expert and grows by the
    expert with the largest co-activation with the group, preferring ones that can still keep
    the group under `cap` (with the cheapest free experts filling its remaining slots)."""
    E = load_E.size
    size = E // parts
    group_E = np.full(E, -1, dtype=np.int64)
    free = np.ones(E, dtype=bool)
    for g in range(parts - 1):
        seed = int(np.argmax(np.where(free, load_E, -np.inf)))
        group_E[seed], free[seed] = g, False
        group_load, affinity_E = load_E[seed], W_EE[seed].copy()
        for filled in range(1, size):
            # Lightest possible group load if e joins and the cheapest others fill the rest.
            left = size - filled - 1  # slots still empty after this pick
            free_loads = np.sort(load_E[free])
            s_left, s_left1 = free_loads[:left].sum(), free_loads[:left + 1].sum()
            best_E = np.where(load_E <= free_loads[left], s_left1, load_E + s_left)
            fits = free & (group_load + best_E <= cap * _TOL)
            if fits.any():
                e = int(np.argmax(np.where(fits, affinity_E, -np.inf)))
            else:  # nothing fits: take the lightest, the least damage to the cap
                e = int(np.argmin(np.where(free, load_E, np.inf)))
            group_E[e], free[e] = g, False
            group_load += load_E[e]
            affinity_E += W_EE[e]
    group_E[free] = parts - 1
    return group_E


def _swap(group_E, A_EP, L_P, W_EE, load_E, a: int, b: int) -> None:
    """Exchange experts a and b between their groups, updating affinities A and loads L."""
    p, q = group_E[a], group_E[b]
    A_EP[:, p] += W_EE[:, b] - W_EE[:, a]
    A_EP[:, q] += W_EE[:, a] - W_EE[:, b]
    L_P[p] += load_E[b] - load_E[a]
    L_P[q] += load_E[a] - load_E[b]
    group_E[a], group_E[b] = q, p


def _swap_gains(group_E, A_EP, W_EE) -> np.ndarray:
    """[E, E] change of intra-group weight if a and b traded groups:
    A[a, g_b] - A[a, g_a] + A[b, g_a] - A[b, g_b] - 2 W[a, b] (a no longer pairs with b)."""
    D_EE = A_EP[:, group_E] - A_EP[np.arange(group_E.size), group_E][:, None]
    return D_EE + D_EE.T - 2 * W_EE


def _repair_load(W_EE, load_E, group_E, parts: int, cap: float) -> np.ndarray:
    """Swap experts out of the heaviest group until every group is within cap. Each swap lowers
    the heaviest group without lifting the other to its old level, so the sorted load vector
    falls and this ends; it may stop above cap (the caller then falls back)."""
    E = load_E.size
    group_E = group_E.copy()
    A_EP, L_P = _affinity(W_EE, group_E, parts), _group_loads(group_E, load_E, parts)
    d_EE = load_E[:, None] - load_E[None, :]  # load a (in the heavy group) hands to b's group
    for _ in range(E * E):
        h = int(np.argmax(L_P))
        if L_P[h] <= cap * _TOL:
            break
        other_after = L_P[group_E][None, :] + d_EE
        ok = ((group_E == h)[:, None] & (group_E != h)[None, :] & (d_EE > 0)
              & (other_after < L_P[h]))
        if not ok.any():
            break
        within = ok & (other_after <= cap * _TOL)
        ok = within if within.any() else ok
        flat = int(np.argmax(np.where(ok, _swap_gains(group_E, A_EP, W_EE), -np.inf)))
        _swap(group_E, A_EP, L_P, W_EE, load_E, flat // E, flat % E)
    return group_E


def _kernighan_lin(W_EE, load_E, group_E, parts: int, cap: float,
                   max_passes: int = 20) -> np.ndarray:
    """Kernighan-Lin pairwise-swap refinement of intra-group co-activation weight. A pass
    makes the best feasible swap of two unlocked experts, locks them, repeats (taking losing
    swaps too, to climb out of local optima), then keeps the best prefix of the pass. Every
    intermediate state respects the cap, so the result does."""
    E = load_E.size
    group_E = group_E.copy()
    A_EP, L_P = _affinity(W_EE, group_E, parts), _group_loads(group_E, load_E, parts)
    d_EE = load_E[None, :] - load_E[:, None]  # load change of a's group if a and b swap
    eps = 1e-9 * max(1.0, float(W_EE.sum()))
    steps = E // 2
    if E > _KL_FULL:  # each step is O(E^2): bound the search for hundreds of items
        steps, max_passes = min(steps, 24), min(max_passes, 6)
    for _ in range(max_passes):
        unlocked = np.ones(E, dtype=bool)
        done, total, best, best_len = [], 0.0, 0.0, 0
        for _ in range(steps):
            La_E = L_P[group_E]
            ok = ((group_E[:, None] != group_E[None, :]) & unlocked[:, None] & unlocked[None, :]
                  & (La_E[:, None] + d_EE <= cap * _TOL) & (La_E[None, :] - d_EE <= cap * _TOL))
            if not ok.any():
                break
            gains = np.where(ok, _swap_gains(group_E, A_EP, W_EE), -np.inf)
            flat = int(np.argmax(gains))
            a, b = flat // E, flat % E
            total += gains.flat[flat]
            _swap(group_E, A_EP, L_P, W_EE, load_E, a, b)
            unlocked[a] = unlocked[b] = False
            done.append((a, b))
            if total > best + eps:
                best, best_len = total, len(done)
        for a, b in reversed(done[best_len:]):  # undo the tail after the best prefix
            _swap(group_E, A_EP, L_P, W_EE, load_E, a, b)
        if best_len == 0:
            break
    return group_E


def _reference(W_EE: np.ndarray, load_E: np.ndarray, parts: int,
               cap: float) -> tuple[np.ndarray, float]:
    """A load-first placement (LPT, then swaps off the heaviest group toward `cap`) and the cap
    actually enforced: max(cap, its heaviest group). LPT alone is weak with equal group sizes
    (one hot expert drags a full group of mid-weight ones along), hence the repair."""
    reference = _balanced_reference(load_E, parts)
    reference = _repair_load(W_EE, load_E, reference, parts, cap)
    return reference, max(cap, float(_group_loads(reference, load_E, parts).max()))


def _partition(W_EE: np.ndarray, load_E: np.ndarray, parts: int, cap: float) -> np.ndarray:
    """[E] group of each expert: `parts` groups of E / parts, each group's load within
    max(cap, heaviest group of `_reference`), intra-group weight W made large."""
    if parts == 1:
        return np.zeros(load_E.size, dtype=np.int64)
    reference, cap = _reference(W_EE, load_E, parts, cap)
    greedy = _repair_load(W_EE, load_E, _greedy_groups(W_EE, load_E, parts, cap), parts, cap)
    starts = [reference]
    if _group_loads(greedy, load_E, parts).max() <= cap * _TOL:
        starts.insert(0, greedy)
    # Refine both starts (cheap at E = 64) and keep the better; ties go to the greedy one.
    # Beyond _KL_FULL items only the start with more intra-group weight is refined.
    if load_E.size > _KL_FULL:
        starts = [max(starts, key=lambda g: _intra_weight(W_EE, g))]
    results = [_kernighan_lin(W_EE, load_E, g, parts, cap) for g in starts]
    return max(results, key=lambda g: _intra_weight(W_EE, g))


def traffic_aware_placement(coact_EE: Tensor, num_ranks: int, ranks_per_node: int | None = None,
                            load_E: Tensor | None = None, seed: int = 0,
                            max_imbalance: float = 1.1,
                            num_groups: int | None = None) -> Placement:
    """Placement that keeps experts picked by the same tokens on the same rank, so a
    rank-deduplicating dispatcher (one row per token and destination rank) sends fewer rows.

    coact_EE: [E, E] co-activation counts (`coactivation_counts`); only the off-diagonal part is
    the objective. load_E: [E] tokens per expert, default the diagonal of coact_EE.

    Objective: maximise the co-activation weight inside ranks (sum of C[a, b] over expert pairs
    sharing a rank), a pairwise proxy for the dedup row count.
    Constraints: every rank holds exactly E / num_ranks experts, and every rank's load is at most
    cap = max(max_imbalance * mean rank load, L_ref), where L_ref is the heaviest rank of a
    load-first placement (LPT, then swaps that relieve the heaviest rank); L_ref only matters
    when max_imbalance cannot be met (e.g. one expert alone is heavier than the cap).

    Method: greedy seeded clustering (grow each rank by co-activation with its group), a repair
    step for the load cap, then Kernighan-Lin pairwise swaps that never break the cap; the load
    reference is refined too and the better of the two kept. With several nodes the same routine
    first splits experts into nodes (cap factor max_imbalance on node loads), then each node into
    its ranks, so heavy co-activation stays on the fast intra-node links; if that misses the rank
    cap it falls back to a flat rank partition whose ranks are then grouped into nodes.

    `seed` relabels experts by a seeded permutation before the search (it decides ties);
    the result is deterministic per seed. Ranks and nodes are numbered by their smallest expert
    id and slots follow expert id, so equal partitions give equal placements.

    `num_groups`: the router's group-limited routing (model.moe_router_num_groups); whole groups
    are placed (`epruntime.placement.groups.traffic_aware_group_placement`).
    """
    if not isinstance(coact_EE, Tensor) or coact_EE.dim() != 2 \
            or coact_EE.shape[0] != coact_EE.shape[1] or coact_EE.shape[0] == 0:
        raise PlacementError("coact_EE must be a square non-empty [E, E] tensor, got "
                             f"{getattr(coact_EE, 'shape', type(coact_EE))}")
    E = coact_EE.shape[0]
    rpn = _check_ranks(num_ranks, ranks_per_node, E)
    C = coact_EE.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(C).all() or (C < 0).any():
        raise PlacementError("coact_EE must be finite and non-negative")
    if load_E is None:
        load = C.diagonal().copy()
    else:
        if not isinstance(load_E, Tensor) or tuple(load_E.shape) != (E,):
            raise PlacementError(f"load_E must be a [{E}] tensor, got "
                                 f"{getattr(load_E, 'shape', type(load_E))}")
        load = load_E.detach().to("cpu", torch.float64).numpy()
        if not np.isfinite(load).all() or (load < 0).any():
            raise PlacementError("load_E must be finite and non-negative")
    if not float(max_imbalance) >= 1.0:
        raise PlacementError(f"max_imbalance must be >= 1.0 (a factor over the mean rank load), "
                             f"got {max_imbalance!r}")

    if num_groups is not None:
        from epruntime.placement.groups import traffic_aware_group_placement

        return traffic_aware_group_placement(coact_EE, num_groups, num_ranks, rpn,
                                             torch.as_tensor(load), seed, max_imbalance)
    W = (C + C.T) / 2
    np.fill_diagonal(W, 0.0)
    rank_E, node_E = partition_items(W, load, num_ranks, rpn, max_imbalance, seed)
    # Canonical numbering: ranks and nodes by their smallest expert id, slots by expert id.
    ranks = [np.flatnonzero(rank_E == r).tolist() for r in range(num_ranks)]
    experts_per_rank = []
    for n in sorted(range(num_ranks // rpn), key=lambda n: int(np.flatnonzero(node_E == n)[0])):
        experts_per_rank += sorted((x for x in ranks if node_E[x[0]] == n), key=min)
    return Placement.from_rank_lists(experts_per_rank, rpn)


def partition_items(W_II: np.ndarray, load_I: np.ndarray, num_ranks: int, ranks_per_node: int,
                    max_imbalance: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """([I] rank, [I] node) of I items (experts, or physical copies of experts) in equal-size
    rank groups: intra-rank weight W (symmetric, zero diagonal; negative = keep apart) made
    large, every rank's load within max(max_imbalance * mean, the load-first reference's
    heaviest rank), and heavy weight kept inside nodes. See `traffic_aware_placement`.

    Without any weight (loads only) there is nothing to trade balance for: the load-first
    reference is polished toward the mean instead of stopping at the cap."""
    I = load_I.size
    rpn = ranks_per_node
    perm = torch.randperm(I, generator=torch.Generator().manual_seed(int(seed))).numpy()
    Wp, lp = W_II[np.ix_(perm, perm)], load_I[perm]
    num_nodes = num_ranks // rpn
    if not Wp.any():  # loads only: best balance, then nodes by the same rule
        rank_p = _reference(Wp, lp, num_ranks, lp.sum() / num_ranks)[0]
        L_R = _group_loads(rank_p, lp, num_ranks)
        node_R = (_reference(np.zeros((num_ranks, num_ranks)), L_R, num_nodes,
                             L_R.sum() / num_nodes)[0] if num_nodes > 1
                  else np.zeros(num_ranks, dtype=np.int64))
        node_p = node_R[rank_p]
    else:
        rank_cap = _reference(Wp, lp, num_ranks, max_imbalance * lp.sum() / num_ranks)[1]
        if num_nodes == 1:
            rank_p = _partition(Wp, lp, num_ranks, rank_cap)
            node_p = np.zeros(I, dtype=np.int64)
        else:
            node_p = _partition(Wp, lp, num_nodes, max_imbalance * lp.sum() / num_nodes)
            rank_p = np.empty(I, dtype=np.int64)
            for n in range(num_nodes):
                idx = np.flatnonzero(node_p == n)
                rank_p[idx] = n * rpn + _partition(Wp[np.ix_(idx, idx)], lp[idx], rpn, rank_cap)
            if _group_loads(rank_p, lp, num_ranks).max() > rank_cap * _TOL:
                # Flat fallback: ranks first (meets rank_cap), then ranks -> nodes by the
                # weight between ranks; equal-size ranks, so any grouping has equal counts.
                rank_p = _partition(Wp, lp, num_ranks, rank_cap)
                onehot = np.eye(num_ranks)[rank_p]
                W_RR = onehot.T @ Wp @ onehot
                np.fill_diagonal(W_RR, 0.0)
                L_R = _group_loads(rank_p, lp, num_ranks)
                node_p = _partition(W_RR, L_R, num_nodes,
                                    max_imbalance * L_R.sum() / num_nodes)[rank_p]
    # Node labels must be consistent with ranks: rank r on node r // rpn. Renumber ranks so
    # each node's ranks are consecutive.
    rank_I, node_I = np.empty(I, dtype=np.int64), np.empty(I, dtype=np.int64)
    rank_I[perm], node_I[perm] = rank_p, node_p
    node_of_rank = np.zeros(num_ranks, dtype=np.int64)
    node_of_rank[rank_I] = node_I
    order = np.argsort(node_of_rank, kind="stable")  # new rank i = old rank order[i]
    new_of_old = np.empty(num_ranks, dtype=np.int64)
    new_of_old[order] = np.arange(num_ranks)
    rank_I = new_of_old[rank_I]
    return rank_I, rank_I // rpn


# ---- evaluation -----------------------------------------------------------------------------
def evaluate_placement(topk_idx_TK: Tensor, placement: Placement,
                       source_rank_T: Tensor | None = None) -> dict:
    """Rows each dispatcher would send for `placement` under a recorded routing, counted with
    the dispatchers' own row plan (`epruntime.dispatch.plan`).

    topk_idx_TK: [T, K] logical expert ids, -1 = no expert (padding, ignored).
    source_rank_T: [T] EP rank each token starts on. None = every token comes from outside the
    EP group: every destination rank and node counts as remote, so cross-rank rows are all rows
    (the placement-only view: what dedup alone saves).

    Returns plain python numbers:
      pairs                   valid (token, expert) pairs
      expert_rows             (token, expert) pairs whose expert's rank != source rank
                              (megatron-core's per-expert all-to-all)
      dedup_rows              distinct (token, rank) pairs, rank != source rank (rank dedup)
      dedup_ratio             dedup_rows / expert_rows (1.0 when expert_rows == 0)
      inter_node_expert_rows  expert_rows whose destination node != source node
      inter_node_dedup_rows   dedup_rows whose destination node != source node
      node_dedup_rows         distinct (token, node) pairs, node != source node (what a
                              hierarchical dispatcher sends across nodes)
      load_per_rank           [R] list: (token, expert) pairs landing on each rank
      balancedness            mean / max of load_per_rank (1.0 = perfect, 1.0 if max is 0;
                              vLLM's EPLB definition)
      mean_ranks_per_token    distinct ranks per token (source included), mean over T (0 if T=0)
    """
    if not isinstance(placement, Placement):
        raise PlacementError(f"placement must be a Placement, got {type(placement).__name__}")
    idx_TK = _check_topk(topk_idx_TK, placement.num_experts).cpu()
    T, K = idx_TK.shape
    R = placement.num_ranks
    if source_rank_T is None:
        src_T = torch.zeros(T, dtype=torch.long)
    else:
        if not isinstance(source_rank_T, Tensor) or tuple(source_rank_T.shape) != (T,) \
                or source_rank_T.dtype not in _INTEGER_DTYPES:
            raise PlacementError(f"source_rank_T must be an integer [{T}] tensor, got "
                                 f"{getattr(source_rank_T, 'shape', type(source_rank_T))}")
        src_T = source_rank_T.detach().to("cpu", torch.long)
        if T and (int(src_T.min()) < 0 or int(src_T.max()) >= R):
            raise PlacementError(f"source_rank_T must lie in [0, num_ranks={R})")
    # The node-dedup plan holds all three dispatchers' rows: its routing counts are the
    # per-expert rows and the rank-dedup floor, its hop 1 the (token, node) rows.
    plan = row_plan(routing_map_from_topk(idx_TK, placement.num_experts), None, placement,
                    "node", source_rank=src_T, topk=max(K, 1))
    r = torch.arange(R)
    node = r // placement.ranks_per_node
    if source_rank_T is None:  # every destination is remote
        remote = inter_node = torch.ones(R, R, dtype=torch.bool)
    else:
        remote, inter_node = r[:, None] != r[None, :], node[:, None] != node[None, :]
    expert_RR, floor_RR = plan.expert_rows_RR, plan.floor_rows_RR
    expert_rows = int(expert_RR[remote].sum())
    dedup_rows = int(floor_RR[remote].sum())
    load = expert_RR.sum(0)
    return {
        "pairs": int(expert_RR.sum()),
        "expert_rows": expert_rows,
        "dedup_rows": dedup_rows,
        "dedup_ratio": dedup_rows / expert_rows if expert_rows else 1.0,
        "inter_node_expert_rows": int(expert_RR[inter_node].sum()),
        "inter_node_dedup_rows": int(floor_RR[inter_node].sum()),
        "node_dedup_rows": int(plan.hops[0].rows_RR[inter_node].sum()),
        "load_per_rank": load.tolist(),
        "balancedness": layer_balance(load)[0],
        "mean_ranks_per_token": float(floor_RR.sum()) / T if T else 0.0,
    }
