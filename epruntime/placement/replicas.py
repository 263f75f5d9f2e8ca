"""Replicated experts: how many copies, where they go, which copy a token uses, what it costs.

Pure functions, arrays in, `Placement` / arrays out. Shapes: E logical experts, P physical slots
(E + redundant), R ranks, T tokens, K experts per token.

- `replicate`: copies per logical expert; each redundant slot goes to the expert whose per-copy
  load is largest (DeepSeek EPLB's rule).
- `eplb_placement`: DeepSeek's EPLB (github deepseek-ai/EPLB, README "hierarchical load
  balancing" / "global load balancing"), written from its description: expert groups packed
  onto nodes, experts replicated within a node, copies packed onto the node's GPUs, each packing
  heaviest first onto the lightest bin with room. Loads only: it never sees co-activation.
- `traffic_replica_placement`: replicate as EPLB does, then place the copies with the
  traffic-aware partition (co-activated experts share a rank, loads within a cap).
- `resolve_copies`: which copy each (token, expert) pair is sent to: one on the token's own
  rank, else on its node, else spread evenly over the copies (deterministic in the token index);
  or, when the placement has a `local_share`, each source rank balancing its own batch over the
  ranks (`balance_own_batch`), so that balance holds on batches the placement was not fitted on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from epruntime.placement.core import Placement, PlacementError
from epruntime.placement.strategies import partition_items


def check_slots(num_experts: int, num_ranks: int, redundant: int) -> int:
    """Physical slots per rank for E experts + `redundant` copies over R ranks."""
    if not isinstance(redundant, int) or redundant < 0:
        raise PlacementError(f"redundant must be an int >= 0, got {redundant!r}")
    total = num_experts + redundant
    if total % num_ranks:
        fits = [x for x in range(redundant, redundant + num_ranks + 1)
                if (num_experts + x) % num_ranks == 0][0]
        raise PlacementError(f"redundant={redundant}: {num_experts} experts + {redundant} copies "
                             f"= {total} physical slots do not split evenly over EP={num_ranks} "
                             f"ranks (try redundant={fits})")
    if total // num_ranks > num_experts:
        raise PlacementError(f"redundant={redundant}: {total // num_ranks} slots per rank but "
                             f"only {num_experts} experts (at most one copy of each per rank)")
    if redundant > num_experts * (num_ranks - 1):
        raise PlacementError(f"redundant={redundant}: more copies than ranks to hold them")
    return total // num_ranks


def replicate(load_E: np.ndarray, num_physical: int, max_copies: int | None = None
              ) -> np.ndarray:
    """[E] copies per expert (>= 1, sum = num_physical): each extra slot to the expert with the
    largest load per copy (ties: lower id), never more than `max_copies` (one per rank)."""
    load = np.asarray(load_E, dtype=np.float64)
    count = np.ones(load.size, dtype=np.int64)
    cap = max_copies or num_physical
    for _ in range(num_physical - load.size):
        per_copy = np.where(count < cap, load / count, -np.inf)
        count[int(np.argmax(per_copy))] += 1
    return count


def balanced_packing(weight_I: np.ndarray, label_I: np.ndarray, bins: int) -> np.ndarray:
    """[I] bin of each item: heaviest first onto the lightest bin with room (I / bins items per
    bin) that does not yet hold an item of the same label (no two copies on one rank)."""
    I = weight_I.size
    size = I // bins
    bin_I = np.full(I, -1, dtype=np.int64)
    loads, counts = np.zeros(bins), np.zeros(bins, dtype=np.int64)
    held = [set() for _ in range(bins)]
    for i in np.argsort(-weight_I, kind="stable"):
        ok = np.array([counts[b] < size and label_I[i] not in held[b] for b in range(bins)])
        if not ok.any():  # only bins holding this label have room: take one, fixed below
            ok = counts < size
        b = int(np.argmin(np.where(ok, loads, np.inf)))
        bin_I[i] = b
        loads[b] += weight_I[i]
        counts[b] += 1
        held[b].add(int(label_I[i]))
    return bin_I


def _separate_copies(bin_I: np.ndarray, label_I: np.ndarray, weight_I: np.ndarray) -> np.ndarray:
    """Swap items so that no bin holds two items of one label; each swap takes the partner of
    closest weight (least change to loads)."""
    bin_I = bin_I.copy()
    for _ in range(bin_I.size):
        clash = None
        for b in np.unique(bin_I):
            members = np.flatnonzero(bin_I == b)
            labels, first = np.unique(label_I[members], return_index=True)
            if labels.size < members.size:
                dup = np.setdiff1d(np.arange(members.size), first)[0]
                clash = int(members[dup])
                break
        if clash is None:
            return bin_I
        b, lab = bin_I[clash], label_I[clash]
        here = set(label_I[bin_I == b].tolist())
        cands = [j for j in range(bin_I.size) if bin_I[j] != b and label_I[j] not in here
                 and lab not in set(label_I[bin_I == bin_I[j]].tolist())]
        if not cands:
            raise PlacementError(f"cannot keep the copies of expert {lab} on different ranks")
        j = min(cands, key=lambda j: abs(weight_I[j] - weight_I[clash]))
        bin_I[clash], bin_I[j] = bin_I[j], b
    return bin_I


def _assemble(rank_I: np.ndarray, label_I: np.ndarray, num_ranks: int, rpn: int) -> Placement:
    """Placement from each physical item's rank and logical expert (slots by expert id)."""
    per_rank = [sorted(label_I[rank_I == r].tolist()) for r in range(num_ranks)]
    return Placement.from_rank_lists(per_rank, rpn)


def eplb_placement(load_E, num_ranks: int, ranks_per_node: int | None = None,
                   redundant: int = 0, num_groups: int | None = None) -> Placement:
    """DeepSeek EPLB's placement from per-expert loads [E] (the baseline).

    Hierarchical (when `num_groups` experts groups, contiguous in id, divide evenly over the
    nodes): groups -> nodes by balanced packing of group loads; within each node, its experts
    get (E + redundant) / nodes slots by `replicate`; the node's copies -> its ranks by balanced
    packing of per-copy loads. Otherwise global: replicate over all slots, pack onto all ranks,
    ranks r*rpn .. (r+1)*rpn - 1 form node r."""
    load = np.asarray(load_E.cpu() if isinstance(load_E, Tensor) else load_E, dtype=np.float64)
    E = load.size
    rpn = ranks_per_node or num_ranks
    if num_ranks % rpn:
        raise PlacementError(f"ranks_per_node={rpn} must divide num_ranks={num_ranks}")
    check_slots(E, num_ranks, redundant)
    nodes = num_ranks // rpn
    P = E + redundant
    if num_groups and nodes > 1 and num_groups % nodes == 0 and E % num_groups == 0 \
            and P % nodes == 0 and (P // nodes) >= E // nodes:
        group_E = np.arange(E) // (E // num_groups)
        group_load = np.bincount(group_E, weights=load, minlength=num_groups)
        node_G = balanced_packing(group_load, np.arange(num_groups), nodes)
        rank_I, label_I = [], []
        for n in range(nodes):
            experts = np.flatnonzero(node_G[group_E] == n)
            count = replicate(load[experts], P // nodes, rpn)
            label = np.repeat(experts, count)
            weight = np.repeat(load[experts] / count, count)
            bins = _separate_copies(balanced_packing(weight, label, rpn), label, weight)
            rank_I.append(n * rpn + bins)
            label_I.append(label)
        return _assemble(np.concatenate(rank_I), np.concatenate(label_I), num_ranks, rpn)
    count = replicate(load, P, num_ranks)
    label = np.repeat(np.arange(E), count)
    weight = np.repeat(load / count, count)
    rank_I = _separate_copies(balanced_packing(weight, label, num_ranks), label, weight)
    return _assemble(rank_I, label, num_ranks, rpn)


def traffic_replica_placement(coact_EE, load_E, num_ranks: int,
                              ranks_per_node: int | None = None, redundant: int = 0,
                              max_imbalance: float = 1.05, seed: int = 0) -> Placement:
    """Copies as EPLB makes them, placed for traffic: co-activation [E, E] (diagonal ignored)
    between copies is split evenly over their copy pairs, copies of one expert repel (so they
    land on different ranks), and every rank's load stays within max_imbalance x mean (or the
    load-first reference where that is out of reach). Loads only (zero off-diagonal): best
    balance. See `strategies.partition_items`."""
    load = np.asarray(load_E.cpu() if isinstance(load_E, Tensor) else load_E, dtype=np.float64)
    E = load.size
    rpn = ranks_per_node or num_ranks
    check_slots(E, num_ranks, redundant)
    if not float(max_imbalance) >= 1.0:
        raise PlacementError(f"max_imbalance must be >= 1.0, got {max_imbalance!r}")
    count = replicate(load, E + redundant, num_ranks)
    label = np.repeat(np.arange(E), count)
    weight = np.repeat(load / count, count)
    C = np.zeros((E, E)) if coact_EE is None else np.asarray(
        coact_EE.cpu() if isinstance(coact_EE, Tensor) else coact_EE, dtype=np.float64)
    W = (C + C.T) / 2
    np.fill_diagonal(W, 0.0)
    W_II = W[np.ix_(label, label)] / np.outer(count[label], count[label])
    if W_II.any():
        same = label[:, None] == label[None, :]
        W_II[same] = -W.sum() / max(E, 1)  # stronger than any affinity: copies apart
    np.fill_diagonal(W_II, 0.0)
    rank_I, _ = partition_items(W_II, weight, num_ranks, rpn, float(max_imbalance), seed)
    rank_I = _separate_copies(rank_I, label, weight)
    placed = _assemble(rank_I, label, num_ranks, rpn)
    if W_II.any():
        return placed
    # Loads only: nothing to trade balance for, so never less balanced than EPLB's packing.
    baseline = eplb_placement(load, num_ranks, rpn, redundant)
    worst = [rank_loads_from_expert_loads(load, p).max() for p in (placed, baseline)]
    return placed if worst[0] <= worst[1] else baseline


# ---- routing over copies ---------------------------------------------------------------------
def resolve_copies(topk_idx_TK: Tensor, placement: Placement,
                   source_rank_T: Tensor | None = None) -> Tensor:
    """[T, K] physical slot each (token, logical expert) pair is sent to (-1 stays -1).

    `placement.local_share` None: the copy on the token's source rank, else one on its node,
    else any copy; among the eligible copies the (t mod n)-th in slot order, so a token's picks
    are reproducible and tokens spread evenly over copies.

    `placement.local_share` a: each source rank balances its own batch (the tokens of this call
    with that source rank), knowing nothing of the other ranks': it keeps a share a of its pairs
    on its own rank and sends (1 - a) / (R - 1) to every other rank (`balance_own_batch`). Every
    source's sends then follow the same pattern, so every rank receives the same load whatever
    the batch's expert mix: balance no longer rests on the loads the placement was fitted on.
    A source whose own-rank copies cannot take a share a sends the rest evenly.

    `source_rank_T` None: tokens come from outside the EP group, every copy is eligible (the
    first rule). Deterministic: the same inputs give the same slots; no communication."""
    idx = topk_idx_TK.to(torch.long)
    if placement.local_share is not None and source_rank_T is not None:
        return _balanced(idx, placement, source_rank_T)
    T, K = idx.shape
    valid = idx >= 0
    # the placement's maps live on the host: index them on the routing's device (CUDA routing)
    cand_TKC = placement.log2phy_EC.to(idx.device)[idx.clamp(min=0)]  # [T, K, C]
    ok = cand_TKC >= 0
    if source_rank_T is not None:
        rank_TKC = torch.div(cand_TKC, placement.num_local, rounding_mode="floor")
        src = source_rank_T.to(idx.device, torch.long)[:, None, None]
        local = ok & (rank_TKC == src)
        rpn = placement.ranks_per_node
        node = ok & (torch.div(rank_TKC, rpn, rounding_mode="floor")
                     == torch.div(src, rpn, rounding_mode="floor"))
        ok = torch.where(local.any(-1, keepdim=True), local,
                         torch.where(node.any(-1, keepdim=True), node, ok))
    n_TK = ok.sum(-1).clamp(min=1)
    pick_TK = torch.arange(T, device=idx.device)[:, None] % n_TK
    rank_in = ok.long().cumsum(-1) - 1  # position among eligible copies
    chosen = ok & (rank_in == pick_TK[..., None])
    phys = (cand_TKC * chosen).sum(-1)
    return torch.where(valid, phys, -1)


def _balanced(idx_TK: Tensor, placement: Placement, source_rank_T: Tensor) -> Tensor:
    """resolve_copies with a local share: each source rank's tokens balanced on their own."""
    device = idx_TK.device
    # host sync: the copy choice loops over a few rounds of small counts, on the host
    idx = idx_TK.detach().to("cpu", torch.long)
    src_T = source_rank_T.detach().to("cpu", torch.long)
    out = torch.full_like(idx, -1)
    for s in torch.unique(src_T).tolist():
        rows = torch.nonzero(src_T == s).flatten()
        out[rows] = balance_own_batch(idx[rows], placement, int(s), float(placement.local_share))
    return out.to(device)


def balance_own_batch(idx_TK: Tensor, placement: Placement, source_rank: int,
                      local_share: float, tolerance: float = 0.005) -> Tensor:
    """[T, K] physical slot of each (token, expert) pair of one source rank's batch, such that
    the source's pairs per destination rank meet its targets: `local_share` x pairs on its own
    rank, (1 - local_share) / (R - 1) x pairs on each other rank (each within `tolerance` x
    pairs / R, where the copies allow it).

    Start: the local copy where there is one, else the copy on the rank most of the token's
    experts can reach (fewest rows; ties in turn by token index). Then, while a rank is over
    its target: the shortest path of ranks over->...->under along which pairs have copies;
    move pairs hop by hop, cheapest first (a move onto a rank the token already visits costs
    no row; leaving a rank the token visits only for this pair saves one), one pair per token
    per hop, ties by token index. Deterministic; only this batch is read."""
    idx = idx_TK.to(torch.long)
    T, K = idx.shape
    R = placement.num_ranks
    s = source_rank
    valid = idx >= 0
    cand = placement.log2phy_EC[idx.clamp(min=0)]  # [T, K, C]
    ok = (cand >= 0) & valid[..., None]
    crank = torch.where(ok, torch.div(cand, placement.num_local, rounding_mode="floor"), -1)
    C = cand.shape[-1]
    flat = crank.clamp(min=0).reshape(T, K * C)
    reach_TR = torch.zeros(T, R, dtype=torch.long).scatter_add_(1, flat, ok.reshape(T, -1).long())
    score = torch.where(ok, reach_TR.gather(1, flat).reshape(T, K, C), -1)
    score = torch.where(ok & (crank == s), K * C + 1, score)  # own rank first
    turn = (torch.arange(C)[None, None, :] - torch.arange(T)[:, None, None]) % C
    choice = (score * C + (C - 1 - turn)).argmax(-1)  # [T, K]
    dest = crank.gather(-1, choice[..., None])[..., 0]  # [T, K] rank, -1 for padding
    pairs = int(valid.sum())
    if pairs == 0 or R == 1:
        return _slots(dest, cand, crank, valid)
    target = torch.full((R,), (1.0 - local_share) / (R - 1) * pairs, dtype=torch.float64)
    target[s] = local_share * pairs
    slack = max(tolerance * pairs / R, 0.5)
    for _ in range(max(8 * R, 64)):  # a round empties a rank's excess or a path's capacity
        over = torch.bincount(dest[valid], minlength=R).double() - target
        worst = int(over.argmax())
        if over[worst] <= slack:
            break
        path = _path(dest, crank, valid, over, worst, R)
        if path is None:
            break  # the copies allow no better
        m = int(min(float(over[worst]), float(-over[path[-1]])))
        for a, b in reversed(list(zip(path[:-1], path[1:]))):  # last hop first
            _move(dest, crank, valid, s, a, b, max(m, 1), R)
    return _slots(dest, cand, crank, valid)


def _path(dest, crank, valid, over, start: int, R: int) -> list[int] | None:
    """Ranks start -> ... -> a rank under its target, each hop holding pairs (now on the hop's
    first rank) with a copy on its second; breadth first, roomiest neighbours first."""
    ok = crank >= 0
    cell = (dest.clamp(min=0)[..., None] * R + crank.clamp(min=0))[ok & valid[..., None]]
    movable = torch.bincount(cell, minlength=R * R).reshape(R, R)  # [from, to]
    prev, queue = {start: start}, [start]
    order = torch.argsort(over, stable=True).tolist()
    for a in queue:
        if a != start and over[a] < 0:
            path = [a]
            while path[-1] != start:
                path.append(prev[path[-1]])
            return path[::-1]
        for b in order:
            if b not in prev and b != a and movable[a, b] > 0:
                prev[b] = a
                queue.append(b)
    return None


def _move(dest, crank, valid, s: int, a: int, b: int, m: int, R: int) -> None:
    """Move up to m pairs from rank a to rank b (in place), fewest added rows first."""
    T = dest.shape[0]
    on_TR = torch.zeros(T, R, dtype=torch.long).scatter_add_(1, dest.clamp(min=0), valid.long())
    t, k = torch.nonzero((crank == b).any(-1) & (dest == a) & valid, as_tuple=True)
    if t.numel() == 0:
        return
    cost = ((on_TR[t, b] == 0) & (b != s)).long() - ((on_TR[t, a] == 1) & (a != s)).long()
    order = torch.argsort(cost * (T + 1) + t, stable=True)
    t, k = t[order], k[order]
    _, inverse = torch.unique(t, return_inverse=True)
    head = torch.full((int(inverse.max()) + 1,), t.numel()).scatter_reduce(
        0, inverse, torch.arange(t.numel()), "amin")  # each token's cheapest pair
    keep = torch.zeros(t.numel(), dtype=torch.bool)
    keep[head] = True
    t, k = t[keep][:m], k[keep][:m]
    dest[t, k] = b


def _slots(dest_TK, cand, crank, valid) -> Tensor:
    """[T, K] physical slot of the copy on each pair's chosen rank (-1 for padding)."""
    chosen = (crank == dest_TK[..., None]) & (cand >= 0)
    return torch.where(valid, (cand * chosen).sum(-1), -1)


def physical_view(placement: Placement) -> Placement:
    """The placement seen slot by slot: physical slot p as its own expert on rank p // num_local
    (what `resolve_copies`' output is routed by)."""
    return Placement.contiguous(placement.num_physical, placement.num_ranks,
                                placement.ranks_per_node)


def rank_loads_from_expert_loads(load_E, placement: Placement) -> np.ndarray:
    """[R] load per rank when each expert's load splits evenly over its copies."""
    load = np.asarray(load_E, dtype=np.float64)
    cnt = placement.logcnt_E.numpy()
    phy = placement.phy2log_P.numpy()
    per_slot = load[phy] / cnt[phy]
    return per_slot.reshape(placement.num_ranks, placement.num_local).sum(1)
