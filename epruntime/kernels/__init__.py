"""Dispatch kernels behind one front: layout, permute, unpermute-combine and compaction.

    layout = dispatch_layout(routing_map_TE, rank_of_expert_E, num_ranks)
    rows_NH = permute(x_TH, layout)                       # one row per (token, rank), rank-major
    out_TH = unpermute_combine(rows_NH, layout, weight_TR, num_tokens)
    x_KH, index_K = compact(x_TH, keep_T)
    keep_BK = greedy_keep(sim_BPP, keep)                 # FastMMoE's token selection (optional op)
    slot_NM = row_slots(used_TGQ, token_N, group_N, m)   # a dedup row's expert slots (optional op)
    entry_K, per_slot = fan_out_order(slot_XM, L)        # received entries by slot (optional op)

Backends: "torch" (reference.py, the definition), "cpu" (C++ row copies loaded with ctypes),
"triton" (Triton kernels; on CPU only under TRITON_INTERPRET=1) and "cuda" (registered by
epruntime.kernels.cuda). Every backend matches the torch reference bit for bit. `backend=None`
picks "cuda" for CUDA tensors when available, else "cpu" when available, else "torch".

A backend is any object with the four functions `dispatch_layout(routing_map_TE,
rank_of_expert_E, num_ranks) -> Layout`, `permute(x_TH, layout)`, `unpermute_combine(rows_NH,
layout, weight_TR | None, num_tokens)` and `compact(x_TH, keep_T)`; the front checks shapes,
dtypes and devices before calling it, so backends may assume valid input. Register one with
`register_backend(name, obj, reason_fn)`, where `reason_fn()` returns None when it can run, else
why not.

`greedy_keep`, `row_slots` and `fan_out_order` are optional for a backend: one without them (or
a dtype it does not take) runs the torch reference; the "cpu" backend has all three
(greedy_keep for float32).

`permute_differentiable` / `unpermute_combine_differentiable` are the autograd wrappers.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(eq=False)
class Layout:
    """Where each token's rows go: one row per (token, destination rank)."""

    token_in_rank_TR: torch.Tensor  # [T, R] bool: token t has at least one expert on rank r
    position_TR: torch.Tensor  # [T, R] int64: row of t within rank r's block, -1 = not sent
    tokens_per_rank_R: torch.Tensor  # [R] int64: rows sent to each rank
    # [E] int64: tokens routed to each expert; None where the caller did not count them (a row
    # plan's layout: its rows carry their expert slots, permute and combine never read this)
    tokens_per_expert_E: torch.Tensor | None

    @property
    def num_tokens(self) -> int:
        return self.token_in_rank_TR.shape[0]

    @property
    def num_ranks(self) -> int:
        return self.token_in_rank_TR.shape[1]

    @functools.cached_property
    def offset_R(self) -> torch.Tensor:
        """[R] int64: first row of each rank's block (exclusive prefix sum)."""
        return self.tokens_per_rank_R.cumsum(0) - self.tokens_per_rank_R

    @functools.cached_property
    def num_rows(self) -> int:
        """N, the rows of the send buffer (a host sync on GPUs)."""
        return int(self.tokens_per_rank_R.sum())

    @functools.cached_property
    def token_N(self) -> torch.Tensor:
        """[N] int64: the token of each send row."""
        return self.token_in_rank_TR.t().nonzero(as_tuple=True)[1]

    @classmethod
    def of_rows(cls, token_in_rank_TR: torch.Tensor, tokens_per_rank_R: torch.Tensor,
                tokens_per_expert_E: torch.Tensor | None, num_rows: int | None = None,
                token_N: torch.Tensor | None = None) -> "Layout":
        """The layout of given rows (a row plan's hop, `epruntime.dispatch.plan`) with the
        reference's positions; `tokens_per_expert_E` as the caller counts them (a row plan: per
        physical expert), or None (the dedup dispatchers: not needed). `num_rows` and `token_N`, when the caller knows them already (from
        the host split counts), are kept so that reading them costs no host sync."""
        position_TR = torch.where(token_in_rank_TR, token_in_rank_TR.cumsum(0) - 1, -1)
        layout = cls(token_in_rank_TR, position_TR, tokens_per_rank_R, tokens_per_expert_E)
        if num_rows is not None:
            layout.__dict__["num_rows"] = int(num_rows)  # the cached_property's value
        if token_N is not None:
            layout.__dict__["token_N"] = token_N
        return layout

    def rows_of(self, x_TR: torch.Tensor) -> torch.Tensor:
        """A per-(token, rank) tensor [T, R] -> its values at the send rows [N], in row order."""
        return x_TR.t()[self.token_in_rank_TR.t()]


# ---- backend registry -------------------------------------------------------------------------
_BACKENDS: dict[str, tuple[Any, Callable[[], str | None]]] = {}
_BUILTIN = {"cpu": "epruntime.kernels.cpu", "triton": "epruntime.kernels.triton_backend",
            "cuda": "epruntime.kernels.cuda"}
_builtins_loaded = False


def register_backend(name: str, module_or_obj: Any,
                     available_reason_fn: Callable[[], str | None]) -> None:
    """Make `module_or_obj` (with the four op functions) selectable as `backend=name`."""
    missing = [op for op in ("dispatch_layout", "permute", "unpermute_combine", "compact")
               if not callable(getattr(module_or_obj, op, None))]
    if missing:
        raise TypeError(f"kernel backend {name!r} lacks {', '.join(missing)}")
    _BACKENDS[name] = (module_or_obj, available_reason_fn)
    _reason.cache_clear()


def _load_builtins() -> None:
    """Import the bundled backends once (each registers itself); a missing one is skipped."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for name, module in _BUILTIN.items():
        try:
            importlib.import_module(module)
        except Exception as err:  # a broken backend must not take the others down
            if isinstance(err, ModuleNotFoundError) and err.name == module:
                continue  # not shipped in this tree
            register_backend(name, _Unavailable(), lambda err=err: f"import failed: {err!r}")


class _Unavailable:
    """Stands in for a backend whose module failed to import (never selected: its reason_fn
    reports the failure)."""

    def __getattr__(self, op):
        return lambda *args, **kwargs: None


@functools.cache
def _reason(name: str) -> str | None:
    if name not in _BACKENDS:
        return "not registered (known: " + ", ".join(sorted(_BACKENDS)) + ")"
    try:
        return _BACKENDS[name][1]()
    except Exception as err:
        return f"availability check failed: {err!r}"


def available_backends() -> dict[str, str | None]:
    """Backend name -> None if it can run here, else the reason it cannot."""
    _load_builtins()
    return {name: _reason(name) for name in sorted(_BACKENDS)}


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that runs an op on tensors of `device`; ValueError if it cannot."""
    _load_builtins()
    if backend is None:
        if device.type == "cuda" and _reason("cuda") is None:
            return "cuda"
        if device.type == "cpu" and _reason("cpu") is None:
            return "cpu"
        return "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; known: "
                         + ", ".join(sorted(_BACKENDS)))
    reason = _reason(backend)
    if reason is not None:
        raise ValueError(f"kernel backend {backend!r} is unavailable: {reason}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"kernel backend 'cpu' runs on CPU tensors, got {device.type} tensors")
    return backend


def _impl(backend: str | None, device: torch.device):
    return _BACKENDS[resolve_backend(backend, device)][0]


def _optional(op: str, backend: str | None, device: torch.device):
    """The backend that runs optional op `op`: the resolved one if it has it, else the torch
    reference."""
    impl = _impl(backend, device)
    return impl if hasattr(impl, op) else _reference


# ---- checks -----------------------------------------------------------------------------------
def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _describe(x: Any) -> str:
    """What an error message says was given: a tensor's dtype, shape and device, else the type."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {list(x.shape)} on {x.device}"
    return type(x).__name__


def _check_layout(layout: Any, device: torch.device) -> None:
    _check(isinstance(layout, Layout), f"layout must be an epruntime.kernels.Layout, got "
           f"{type(layout).__name__}")
    _check(layout.token_in_rank_TR.device == device,
           f"layout is on {layout.token_in_rank_TR.device}, the tensors on {device}")


def _check_rows(name: str, x: torch.Tensor, rows: int | None, dtypes=None) -> None:
    _check(isinstance(x, torch.Tensor) and x.dim() == 2,
           f"{name} must be a 2-D tensor, got "
           + _describe(x))
    if rows is not None:
        _check(x.shape[0] == rows, f"{name} must have {rows} rows, got {_describe(x)}")
    if dtypes is not None:
        _check(x.dtype in dtypes, f"{name} must be one of "
               + ", ".join(str(d) for d in dtypes) + f", got {_describe(x)}")


# ---- the ops ----------------------------------------------------------------------------------
def dispatch_layout(routing_map_TE: torch.Tensor, rank_of_expert_E: torch.Tensor,
                    num_ranks: int, backend: str | None = None) -> Layout:
    """routing_map_TE bool [T, E], rank_of_expert_E int64 [E] in [0, num_ranks) -> Layout."""
    _check(isinstance(routing_map_TE, torch.Tensor) and routing_map_TE.dtype == torch.bool
           and routing_map_TE.dim() == 2, "routing_map_TE must be a bool [T, E] tensor, got "
           + _describe(routing_map_TE))
    e = routing_map_TE.shape[1]
    _check(isinstance(rank_of_expert_E, torch.Tensor) and rank_of_expert_E.dtype == torch.int64
           and rank_of_expert_E.shape == (e,), f"rank_of_expert_E must be an int64 [{e}] tensor "
           "(one rank per expert column of routing_map_TE), got "
           + _describe(rank_of_expert_E))
    _check(rank_of_expert_E.device == routing_map_TE.device,
           f"rank_of_expert_E is on {rank_of_expert_E.device}, routing_map_TE on "
           f"{routing_map_TE.device}")
    _check(isinstance(num_ranks, int) and num_ranks >= 1,
           f"num_ranks must be a positive int, got {num_ranks!r}")
    if e:
        lo, hi = rank_of_expert_E.min().item(), rank_of_expert_E.max().item()
        _check(lo >= 0 and hi < num_ranks, f"rank_of_expert_E must lie in [0, num_ranks="
               f"{num_ranks}), got values in [{lo}, {hi}]")
    impl = _impl(backend, routing_map_TE.device)
    return impl.dispatch_layout(routing_map_TE.contiguous(), rank_of_expert_E.contiguous(),
                                num_ranks)


def permute(x_TH: torch.Tensor, layout: Layout, backend: str | None = None) -> torch.Tensor:
    """x_TH [T, H] -> rows_NH [N, H], rank-major send buffer (each token once per rank)."""
    _check_rows("x_TH", x_TH, None)
    _check_layout(layout, x_TH.device)
    _check(x_TH.shape[0] == layout.num_tokens,
           f"x_TH must have {layout.num_tokens} rows (the layout's tokens), got {_describe(x_TH)}")
    return _impl(backend, x_TH.device).permute(x_TH.contiguous(), layout)


def unpermute_combine(rows_NH: torch.Tensor, layout: Layout, weight_TR: torch.Tensor | None,
                      num_tokens: int, backend: str | None = None) -> torch.Tensor:
    """rows_NH [N, H], weight_TR [T, R] float or None -> out_TH [T, H], the per-token sum over
    ranks (ascending) of weight * row: products in the row dtype, the sum in float32 rounded
    once to the row dtype (as torch's index_add; see reference.unpermute_combine)."""
    _check_rows("rows_NH", rows_NH, None, ROW_DTYPES)
    _check_layout(layout, rows_NH.device)
    _check(num_tokens == layout.num_tokens,
           f"num_tokens={num_tokens} does not match the layout's {layout.num_tokens} tokens")
    _check(rows_NH.shape[0] == layout.num_rows,
           f"rows_NH must have {layout.num_rows} rows (the layout's send rows), got "
           f"{_describe(rows_NH)}")
    if weight_TR is not None:
        _check(isinstance(weight_TR, torch.Tensor) and weight_TR.is_floating_point()
               and weight_TR.shape == (num_tokens, layout.num_ranks),
               f"weight_TR must be a float [{num_tokens}, {layout.num_ranks}] tensor, got "
               + _describe(weight_TR))
        _check(weight_TR.device == rows_NH.device,
               f"weight_TR is on {weight_TR.device}, rows_NH on {rows_NH.device}")
        weight_TR = weight_TR.contiguous()
    return _impl(backend, rows_NH.device).unpermute_combine(rows_NH.contiguous(), layout,
                                                            weight_TR, num_tokens)


def compact(x_TH: torch.Tensor, keep_T: torch.Tensor, backend: str | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x_TH [T, H], keep_T bool [T] -> (x_KH [K, H] kept rows in order, index_K int64 [K])."""
    _check_rows("x_TH", x_TH, None)
    _check(isinstance(keep_T, torch.Tensor) and keep_T.dtype == torch.bool
           and keep_T.shape == (x_TH.shape[0],),
           f"keep_T must be a bool [{x_TH.shape[0]}] tensor (one per row of x_TH), got "
           + _describe(keep_T))
    _check(keep_T.device == x_TH.device, f"keep_T is on {keep_T.device}, x_TH on {x_TH.device}")
    return _impl(backend, x_TH.device).compact(x_TH.contiguous(), keep_T.contiguous())


def greedy_keep(sim_BPP: torch.Tensor, keep: int, backend: str | None = None) -> torch.Tensor:
    """sim_BPP [B, P, P] pairwise similarity of each sample's tokens -> keep_BK [B, keep] int64
    ascending: the tokens that stay after repeatedly dropping the token most similar to another
    remaining one (its redundancy: max similarity to the others still there), first index on
    ties, until `keep` remain (FastMMoE's greedy selection, epruntime.fastmmoe.policies)."""
    _check(isinstance(sim_BPP, torch.Tensor) and sim_BPP.is_floating_point()
           and sim_BPP.dim() == 3 and sim_BPP.shape[1] == sim_BPP.shape[2],
           "sim_BPP must be a float [B, P, P] tensor, got "
           + _describe(sim_BPP))
    b, p, _ = sim_BPP.shape
    _check(isinstance(keep, int) and 0 <= keep, f"keep must be an int >= 0, got {keep!r}")
    if keep >= p:
        return torch.arange(p, device=sim_BPP.device).expand(b, p).clone()
    if keep == 0:
        return torch.empty(b, 0, dtype=torch.long, device=sim_BPP.device)
    impl = _optional("greedy_keep", backend, sim_BPP.device)
    if sim_BPP.dtype != torch.float32:  # the compiled backends take float32 only
        impl = _reference
    return impl.greedy_keep(sim_BPP.contiguous(), keep)


def row_slots(used_TGQ: torch.Tensor, token_N: torch.Tensor, group_N: torch.Tensor,
              max_entries: int, backend: str | None = None) -> torch.Tensor:
    """used_TGQ bool [T, G, Q] (slot q of destination group g serves token t), rows (token_N,
    group_N) int64 [N] -> slot_NM int64 [N, M]: each row's first `max_entries` used slots in
    ascending order, -1 padded (the dedup dispatchers' row entries, epruntime.dispatch.plan).
    Called per MoE layer: the checks build their messages only when they fail."""
    if not (isinstance(used_TGQ, torch.Tensor) and used_TGQ.dtype == torch.bool
            and used_TGQ.dim() == 3):
        raise ValueError("used_TGQ must be a bool [T, G, Q] tensor, got "
                         + _describe(used_TGQ))
    for name, x in (("token_N", token_N), ("group_N", group_N)):
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.int64 and x.dim() == 1
                and x.shape == token_N.shape and x.device == used_TGQ.device):
            raise ValueError(f"{name} must be an int64 [N] tensor on {used_TGQ.device} like "
                             "token_N, got "
                             + _describe(x))
    q = used_TGQ.shape[2]
    if not (isinstance(max_entries, int) and 0 <= max_entries <= q):
        raise ValueError(f"max_entries must be an int in [0, {q}] (the slots per group), got "
                         f"{max_entries!r}")
    return _optional("row_slots", backend, used_TGQ.device).row_slots(used_TGQ.contiguous(), token_N.contiguous(), group_N.contiguous(),
                          max_entries)


def fan_out_order(slot_XM: torch.Tensor, num_local: int, backend: str | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """slot_XM int64 [X, M] (local slots of received rows, -1 = unused) -> (entry_K int64 [K],
    the flat indices of the used entries grouped by slot, rows in arrival order within a slot;
    tokens_per_slot int64 [num_local]). An expert rank's fan-out (epruntime.dispatch.layout)."""
    if not (isinstance(slot_XM, torch.Tensor) and slot_XM.dtype == torch.int64
            and slot_XM.dim() == 2):
        raise ValueError("slot_XM must be an int64 [X, M] tensor, got "
                         + _describe(slot_XM))
    if not (isinstance(num_local, int) and num_local >= 1):
        raise ValueError(f"num_local must be a positive int, got {num_local!r}")
    return _optional("fan_out_order", backend, slot_XM.device).fan_out_order(slot_XM.contiguous(), num_local)


from epruntime.kernels import reference as _reference  # noqa: E402

register_backend("torch", _reference, lambda: None)

from epruntime.kernels.autograd import (  # noqa: E402
    permute_differentiable,
    unpermute_combine_differentiable,
)

__all__ = ["Layout", "available_backends", "compact", "dispatch_layout", "fan_out_order",
           "greedy_keep", "permute", "permute_differentiable", "register_backend",
           "resolve_backend", "row_slots", "unpermute_combine",
           "unpermute_combine_differentiable"]
