"""Placement files: what `python -m epruntime.plan` writes and `dispatch.placement=file:PATH`,
the simulator and the planner read.

    {"format": "epruntime-placement/1",
     "num_experts": 64, "num_ranks": 8, "ranks_per_node": 8,
     "trace_sha256": "<hash of the routing data it was fitted on, or null>",
     "strategy": "traffic+load+replicas",        # free-form provenance
     "layers": [{"layer": 0, "phy2log": [..P ints..], "local_share": 0.7}, ...]}

`phy2log[p]` is the logical expert in physical slot p; rank r holds slots
r * P / num_ranks ... (r + 1) * P / num_ranks - 1. One entry per MoE layer, in layer order.
`local_share` (optional; absent or null = the copy on the token's rank, else node, else in
turn) is the copy-choice rule of `Placement.local_share`: files without it load as before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from epruntime.placement.core import Placement, PlacementError

FORMAT = "epruntime-placement/1"


def save_placements(path: str | Path, placements: Sequence[Placement], trace_sha256: str | None,
                    strategy: str = "", extra: dict | None = None) -> Path:
    """Write `placements` (one per MoE layer) to `path` as JSON; returns the path."""
    if not placements:
        raise PlacementError("no placements to save")
    first = placements[0]
    for layer, p in enumerate(placements):
        if (p.num_experts, p.num_ranks, p.ranks_per_node) != \
                (first.num_experts, first.num_ranks, first.ranks_per_node):
            raise PlacementError(f"layer {layer}: placement has {p.num_experts} experts on "
                                 f"{p.num_ranks} ranks, layer 0 {first.num_experts} on "
                                 f"{first.num_ranks}")
    doc = {"format": FORMAT, "num_experts": first.num_experts, "num_ranks": first.num_ranks,
           "ranks_per_node": first.ranks_per_node, "trace_sha256": trace_sha256,
           "strategy": strategy, **(extra or {}),
           "layers": [{"layer": i, "phy2log": list(p.phy2log),
                       **({} if p.local_share is None else {"local_share": p.local_share})}
                      for i, p in enumerate(placements)]}
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_placements(path: str | Path, ranks_per_node: int | None = None) -> tuple[list[Placement],
                                                                                 dict]:
    """(one Placement per layer, the file's header fields) from a placement file. Every error
    is a PlacementError naming the file and the field. `ranks_per_node` overrides the file's
    node size (the run's own topology wins)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise PlacementError(f"placement file {path}: {err.strerror or err}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise PlacementError(f"placement file {path}: not JSON ({err.msg} at line {err.lineno})"
                             ) from None
    if not isinstance(doc, dict):
        raise PlacementError(f"placement file {path}: expected a JSON object")
    if doc.get("format") != FORMAT:
        raise PlacementError(f"placement file {path}: field 'format' is {doc.get('format')!r}, "
                             f"expected {FORMAT!r}")
    for key in ("num_experts", "num_ranks", "ranks_per_node"):
        v = doc.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlacementError(f"placement file {path}: field {key!r} must be an int >= 1, "
                                 f"got {v!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not layers:
        raise PlacementError(f"placement file {path}: field 'layers' must be a non-empty list")
    rpn = ranks_per_node or doc["ranks_per_node"]
    out = []
    for i, entry in enumerate(layers):
        where = f"placement file {path}: layers[{i}]"
        if not isinstance(entry, dict) or entry.get("layer") != i:
            raise PlacementError(f"{where}: field 'layer' must be {i} (one entry per layer, in "
                                 "order)")
        phy = entry.get("phy2log")
        if not isinstance(phy, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in phy):
            raise PlacementError(f"{where}: field 'phy2log' must be a list of ints")
        if any(not 0 <= x < doc["num_experts"] for x in phy):
            bad = next(x for x in phy if not 0 <= x < doc["num_experts"])
            raise PlacementError(f"{where}: field 'phy2log' holds expert {bad}, outside "
                                 f"[0, num_experts={doc['num_experts']})")
        share = entry.get("local_share")
        if share is not None and (not isinstance(share, (int, float)) or isinstance(share, bool)
                                  or not 1.0 / doc["num_ranks"] <= share <= 1.0):
            raise PlacementError(f"{where}: field 'local_share' must be null or a number in "
                                 f"[1/num_ranks, 1] = [{1.0 / doc['num_ranks']:.4g}, 1], got "
                                 f"{share!r}")
        try:
            p = Placement.from_phy2log(phy, doc["num_ranks"], rpn).with_local_share(share)
        except PlacementError as err:
            raise PlacementError(f"{where}: {err}") from None
        if p.num_experts != doc["num_experts"]:
            raise PlacementError(f"{where}: field 'phy2log' places {p.num_experts} logical "
                                 f"experts, the file says num_experts={doc['num_experts']}")
        out.append(p)
    header = {k: v for k, v in doc.items() if k != "layers"}
    return out, header


def file_spec_path(spec: str) -> Path | None:
    """The PATH of a `file:PATH` placement spec, None for any other spec."""
    if isinstance(spec, str) and spec.startswith("file:"):
        return Path(spec[len("file:"):])
    return None


def check_fits(placements: Sequence[Placement], num_layers: int, num_experts: int,
               num_ranks: int, source: str) -> None:
    """PlacementError unless `placements` cover `num_layers` layers of `num_experts` experts
    over `num_ranks` ranks."""
    if len(placements) != num_layers:
        raise PlacementError(f"{source}: {len(placements)} layers, the model has {num_layers} "
                             "MoE layers")
    p = placements[0]
    if p.num_experts != num_experts:
        raise PlacementError(f"{source}: num_experts={p.num_experts}, the model has "
                             f"{num_experts} experts")
    if p.num_ranks != num_ranks:
        raise PlacementError(f"{source}: num_ranks={p.num_ranks}, the run's EP size is "
                             f"{num_ranks}")


def sha256_of(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()
