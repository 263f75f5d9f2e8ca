"""Load balance of expert parallelism: how evenly a layer's (token, expert) rows fall on EP ranks.

One definition for the planner (`epruntime.plan`), the simulator and the runtime (summary.json's
`comm`, the Prometheus gauges), so they report the same number:

- rank load: (token, expert) rows the experts of an EP rank receive in a layer;
- balancedness = mean / max of the rank loads (vLLM's and DeepSeek EPLB's figure; 1 is even);
- overload = max / mean (the busiest rank's load over the mean: what the slowest rank costs a
  step, since every rank waits for it).

A layer without load counts as balanced (1.0 for both).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Percentiles of per-layer balancedness over layers (linear interpolation, as numpy's default);
# p5 is the planner's column, p50 / p95 / min the runtime's.
PERCENTILES = {"p5": 0.05, "p50": 0.5, "p95": 0.95}


def rank_balance(load_LR: torch.Tensor | Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """(balancedness_L, overload_L) float64 on the host from rank loads [L, R] (or [R]: one
    layer, giving [1]-shaped results)."""
    load = torch.as_tensor(load_LR).detach().to("cpu", torch.float64)
    if load.dim() == 1:
        load = load[None]
    if load.dim() != 2 or load.shape[1] == 0:
        raise ValueError(f"rank loads must be [layers, ranks], got {tuple(load.shape)}")
    if bool((load < 0).any()):
        raise ValueError("rank loads must be nonnegative")
    peak, mean = load.max(dim=1).values, load.mean(dim=1)
    busy = peak > 0
    one = torch.ones_like(peak)
    balancedness = torch.where(busy, mean / peak.clamp(min=1e-300), one)
    overload = torch.where(busy, peak / mean.clamp(min=1e-300), one)
    return balancedness, overload


def layer_balance(load_R: torch.Tensor | Sequence) -> tuple[float, float]:
    """(balancedness, overload) of one layer's rank loads [R]."""
    b, o = rank_balance(load_R)
    return float(b[0]), float(o[0])


def over_layers(balancedness_L: torch.Tensor, overload_L: torch.Tensor) -> dict[str, float]:
    """Balancedness mean, p5 / p50 / p95 and min over layers; overload max and p50."""
    b, o = balancedness_L.double(), overload_L.double()
    if b.numel() == 0:
        return {"balancedness_mean": 1.0, **{f"balancedness_{k}": 1.0 for k in PERCENTILES},
                "balancedness_min": 1.0, "overload_max": 1.0, "overload_p50": 1.0}
    out = {"balancedness_mean": float(b.mean())}
    for name, q in PERCENTILES.items():
        out[f"balancedness_{name}"] = float(torch.quantile(b, q))
    out["balancedness_min"] = float(b.min())
    out["overload_max"] = float(o.max())
    out["overload_p50"] = float(torch.quantile(o, 0.5))
    return out
