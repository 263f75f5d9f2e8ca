"""Live re-placement: move experts (weights and AdamW state) to a new `Placement`, between steps.

Collective over one EP group. Every rank of the group calls

    report = migrate_experts(engine.model, engine.optimizer, new_placements)

with the same placements (one per MoE layer). For every layer whose placement changes, each expert
whose (rank, slot) changes travels from its old to its new position with everything that makes it
that expert: its parameters, persistent buffers and optimizer state (AdamW's `step`, `exp_avg`,
`exp_avg_sq`; whatever the optimizer keeps), read from and installed into megatron-core's
optimizer through `epruntime.optim.ParamStates` (megatron-core keys its state by chained
optimizer and parameter). Replicated placements: a slot that gets a copy of an expert receives it
from one of the expert's current copies (adding a copy); a copy whose slot gets another expert is
dropped; the number of slots per rank stays the model's. Afterwards `model.set_placements(new_placements)`
records the layout, so global names (`model.sharding`) and dispatchers follow.

Exchange design: ONE `all_gather_object` of small metadata (placement digests, per-tensor layout
and checksums), then ONE `all_to_all_single` of bytes with variable splits.
- One uint8 buffer per destination makes the transfer bit-exact for any dtype (bf16, fp32, int,
  bool) and lets one collective carry every tensor, instead of a message per tensor.
- all_to_all_single rather than batched isend/irecv: gloo and NCCL both implement it with
  variable splits, there are no tags or per-peer ordering to get right, and a rank that sends or
  receives nothing simply has zero splits. A rank's moves to itself (slot swaps, cycles) ride in
  its own split, so every read of the old layout finishes before any slot is overwritten.
- Metadata goes through all_gather_object because the receiver cannot know the layout in
  advance (optimizer state may be absent for some experts) and the digest check needs every
  rank's view anyway. It is a few hundred bytes per moved tensor.

Checksums (CRC-32 of each tensor's bytes) are computed by the sender before packing and by the
receiver after writing into the destination parameter/state, so they cover the wire, the
unpacking offsets and the final write. A mismatch raises `MigrationError` naming layer, expert and
tensor. On GPUs the checksum costs a device-to-host copy of every moved tensor; migration is rare.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Iterable, NamedTuple, Sequence

import torch
import torch.distributed as dist

from epruntime.optim import ParamStates
from epruntime.placement.core import Placement, PlacementError

ALIGN = 16  # bytes: every tensor starts aligned so a uint8 slice can be viewed as any dtype


class MigrationError(RuntimeError):
    """Ranks disagree on the placements, the placements do not fit the model, or a moved tensor
    arrived different from what was sent."""


class Move(NamedTuple):
    layer: int
    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


@dataclass(frozen=True)
class TensorRecord:
    """One moved tensor (or non-tensor optimizer value) inside a per-destination byte chunk."""
    layer: int
    expert: int
    kind: str  # "param" | "buffer" | "state"
    name: str  # parameter/buffer name inside the expert module, e.g. "linear_fc1.weight"
    key: str | None = None  # optimizer-state key for kind == "state"
    dtype: str = ""
    shape: tuple[int, ...] = ()
    offset: int = 0  # into the chunk
    nbytes: int = 0
    checksum: int = 0
    value: Any = None  # non-tensor state values (e.g. a float `step`) travel in the metadata
    on_param_device: bool = True  # state tensors: param's device (exp_avg) or CPU (AdamW step)

    @property
    def label(self) -> str:
        what = self.name if self.key is None else f"{self.name}[{self.key}]"
        return f"layer {self.layer} expert {self.expert} {self.kind} {what}"


@dataclass
class MigrationReport:
    layers_changed: list[int] = field(default_factory=list)
    experts_moved: int = 0  # over the whole EP group, including moves within a rank
    tensors_sent: int = 0  # by this rank, to any rank including itself
    tensors_received: int = 0
    bytes_sent: int = 0  # by this rank to other ranks (wire bytes, incl. alignment padding)
    bytes_received: int = 0  # by this rank from other ranks
    bytes_local: int = 0  # staged through the buffer for moves within this rank
    checksums_verified: int = 0
    seconds: float = 0.0

    @property
    def all_verified(self) -> bool:
        return self.checksums_verified == self.tensors_received

    def to_dict(self) -> dict:
        return {**asdict(self), "all_verified": self.all_verified}


# ---- pure helpers ------------------------------------------------------------------------------
def plan_moves(old: Sequence[Placement], new: Sequence[Placement]) -> list[Move]:
    """Every physical slot of `new[l]` whose logical expert differs from `old[l]`'s there gets
    a copy of that expert from where `old[l]` has one (on the destination's own rank when it
    has one there, else its first copy in slot order), in (layer, expert, destination rank)
    order. Slots that keep their expert are not listed. Without copies this is every expert
    whose (rank, slot) changes. With copies it adds copies (an expert moved to more slots) and
    drops them (their slots get other experts); the slots per rank are fixed (the model's
    expert modules). Raises PlacementError if the two lists do not describe the same layers,
    experts, ranks and slots."""
    if len(old) != len(new):
        raise PlacementError(f"{len(new)} new placements for {len(old)} MoE layers")
    moves = []
    for layer, (a, b) in enumerate(zip(old, new)):
        if (a.num_experts, a.num_ranks) != (b.num_experts, b.num_ranks):
            raise PlacementError(f"layer {layer}: cannot move {a.num_experts} experts on "
                                 f"{a.num_ranks} ranks to {b.num_experts} on {b.num_ranks}")
        if a.num_local != b.num_local:
            raise PlacementError(f"layer {layer}: cannot move experts from {a.num_local} to "
                                 f"{b.num_local} slots per rank (the model's expert slots are "
                                 "fixed when it is built; copies move between them)")
        n, copies_of = a.num_local, a.log2phy_EC.tolist()
        layer_moves = []
        for p, e in enumerate(b.phy2log):
            if a.phy2log[p] == e:
                continue
            sources = [q for q in copies_of[e] if q >= 0]
            local = [q for q in sources if q // n == p // n]
            q = (local or sources)[0]
            layer_moves.append(Move(layer, e, q // n, q % n, p // n, p % n))
        moves += sorted(layer_moves, key=lambda m: (m.expert, m.dst_rank))
    return moves


def placements_digest(placements: Sequence[Placement]) -> str:
    """Short stable hash of a list of placements, for cheap cross-rank agreement checks."""
    text = json.dumps([p.to_dict() for p in placements], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """1-D uint8 view of a tensor's bytes (contiguous copy if needed): bit-exact for any dtype."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def checksum(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes."""
    return zlib.crc32(tensor_bytes(t).cpu().numpy())


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def layout(items: Iterable[tuple[TensorRecord, Any]]) -> tuple[list[TensorRecord], list, int]:
    """[(record stub, tensor or plain value)] -> (records with offset, size and checksum;
    [(offset, tensor)] to copy; chunk size). Plain values go into `record.value`, not bytes."""
    records, tensors, offset = [], [], 0
    for stub, value in items:
        if isinstance(value, torch.Tensor):
            n = value.numel() * value.element_size()
            rec = TensorRecord(**{**asdict(stub), "dtype": str(value.dtype),
                                  "shape": tuple(value.shape), "offset": offset, "nbytes": n,
                                  "checksum": checksum(value), "value": None})
            tensors.append((offset, value))
            offset += _aligned(n)
        else:
            rec = TensorRecord(**{**asdict(stub), "value": value, "nbytes": 0})
        records.append(rec)
    return records, tensors, offset


def _copy_into(chunk: torch.Tensor, tensors: list) -> None:
    for off, t in tensors:
        src = tensor_bytes(t)
        chunk[off:off + src.numel()].copy_(src)


def pack(items: Iterable[tuple[TensorRecord, Any]],
         device=None) -> tuple[torch.Tensor, list[TensorRecord]]:
    """[(record stub, tensor or plain value)] -> (one uint8 chunk, records)."""
    records, tensors, size = layout(items)
    chunk = torch.zeros(size, dtype=torch.uint8, device=device)
    _copy_into(chunk, tensors)
    return chunk, records


def unpack(chunk: torch.Tensor, rec: TensorRecord) -> torch.Tensor:
    """The tensor a record describes, as a view into `chunk` (copy it before the chunk goes)."""
    raw = chunk[rec.offset:rec.offset + rec.nbytes]
    return raw.view(_dtype(rec.dtype)).reshape(rec.shape)


def verify(rec: TensorRecord, written: torch.Tensor) -> None:
    """Raise MigrationError unless `written` (the destination after the copy) has the dtype,
    shape and checksum the sender recorded."""
    if str(written.dtype) != rec.dtype or tuple(written.shape) != tuple(rec.shape):
        raise MigrationError(f"{rec.label}: arrived as {written.dtype}{tuple(written.shape)}, "
                             f"sent as {rec.dtype}{tuple(rec.shape)}")
    got = checksum(written)
    if got != rec.checksum:
        raise MigrationError(f"{rec.label}: checksum {got:#010x} after the move, sender's "
                             f"{rec.checksum:#010x}")


# ---- the model side ----------------------------------------------------------------------------
def expert_module(model, layer: int, slot: int) -> torch.nn.Module:
    experts = model.moe_layers[layer].experts
    local = getattr(experts, "local_experts", None)
    if local is None:
        raise MigrationError(f"layer {layer}: {type(experts).__name__} keeps no per-slot "
                             "local_experts; only SequentialMLP experts can be migrated")
    return local[slot]


def _persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    params = {id(p) for p in module.parameters()}
    return [(n, v) for n, v in module.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor) and id(v) not in params]


def _expert_items(model, states: ParamStates, layer: int, expert: int, slot: int):
    """What makes expert `expert` (now in `slot`): params, buffers, optimizer state."""
    module = expert_module(model, layer, slot)
    for name, p in module.named_parameters():
        yield TensorRecord(layer, expert, "param", name), p
        for key, value in sorted(states.get(p, {}).items()):
            on_dev = not isinstance(value, torch.Tensor) or value.device == p.device
            yield TensorRecord(layer, expert, "state", name, key, on_param_device=on_dev), value
    for name, b in _persistent_buffers(module):
        yield TensorRecord(layer, expert, "buffer", name), b


def _install(model, states: ParamStates, chunk: torch.Tensor, records: list[TensorRecord],
             slot_of: dict[tuple[int, int], int]) -> int:
    """Write one source's records into their destination slots; returns checksums verified."""
    by_expert: dict[tuple[int, int], list[TensorRecord]] = {}
    for rec in records:
        by_expert.setdefault((rec.layer, rec.expert), []).append(rec)
    verified = 0
    for (layer, expert), recs in by_expert.items():
        module = expert_module(model, layer, slot_of[layer, expert])
        params = dict(module.named_parameters())
        buffers = dict(_persistent_buffers(module))
        sent = {r.name for r in recs if r.kind in ("param", "buffer")}
        if sent != set(params) | set(buffers):
            raise MigrationError(f"layer {layer} expert {expert}: sender has tensors "
                                 f"{sorted(sent)}, destination slot has "
                                 f"{sorted(set(params) | set(buffers))}")
        received: dict[str, dict] = {name: {} for name in params}
        for rec in recs:
            if not rec.dtype:  # a plain (non-tensor) state value
                received[rec.name][rec.key] = rec.value
                continue
            data = unpack(chunk, rec)
            if rec.kind == "param":
                dst = params[rec.name]
                with torch.no_grad():
                    dst.copy_(data)
                dst.grad = None  # a gradient of the expert that lived here before
            elif rec.kind == "buffer":
                dst = buffers[rec.name]
                dst.copy_(data)
            else:
                device = params[rec.name].device if rec.on_param_device else torch.device("cpu")
                dst = data.to(device, copy=True)
                received[rec.name][rec.key] = dst
            verify(rec, dst)
            verified += 1
        for name, p in params.items():
            if received[name]:
                states[p] = received[name]
            else:  # the expert had no optimizer state (never stepped): keep it absent
                states.pop(p, None)
    return verified


def _local_problems(model, new_placements: Sequence[Placement], world: int) -> str | None:
    """Why these placements cannot be applied here (None if they can); checked on every rank
    before anything moves, so that all ranks fail together instead of some hanging."""
    try:
        plan_moves(model.placements, new_placements)
    except PlacementError as err:
        return str(err)
    for layer, p in enumerate(new_placements):
        if p.num_ranks != world:
            return f"layer {layer}: placement for {p.num_ranks} ranks, EP group has {world}"
    return model.unsupported_placements(list(new_placements))


def migrate_experts(model, optimizer, new_placements: Sequence[Placement],
                    group=None, timeout: float | timedelta | None = None) -> MigrationReport:
    """Move experts to `new_placements` on every rank of the EP `group` (default megatron-core's
    expert-model-parallel group). Collective: every rank of the group calls it with the same
    placements, between optimizer steps. `optimizer`: megatron-core's (or a torch optimizer);
    its per-parameter state is read and installed through `epruntime.optim.ParamStates`.
    `timeout` bounds the byte exchange (default: the group's own timeout). Returns this rank's
    `MigrationReport`."""
    start = time.perf_counter()
    states = ParamStates(optimizer)
    if group is None:
        from megatron.core import parallel_state as ps
        group = ps.get_expert_model_parallel_group()
    world, me = dist.get_world_size(group), dist.get_rank(group)
    new_placements = list(new_placements)
    old_placements = list(model.placements)

    problem = _local_problems(model, new_placements, world)
    moves = [] if problem else plan_moves(old_placements, new_placements)
    # What this rank sends: per destination rank, (record stub, value) of every moved expert.
    outgoing: list[list] = [[] for _ in range(world)]
    for mv in moves:
        if mv.src_rank == me:
            outgoing[mv.dst_rank].extend(
                _expert_items(model, states, mv.layer, mv.expert, mv.src_slot))
    device = next(model.parameters()).device
    # Lay out every destination's chunk, then pack straight into one send buffer (no second
    # copy). Peak extra memory is this rank's moved bytes sent + received; callers that must bound
    # it migrate a few layers per call.
    records, copies, send_splits = zip(*(layout(items) for items in outgoing))
    send = torch.zeros(sum(send_splits), dtype=torch.uint8, device=device)
    base = 0
    for size, tensors in zip(send_splits, copies):
        _copy_into(send[base:base + size], tensors)
        base += size
    del copies

    # One metadata round: agreement on old/new placements, problems, and the records.
    mine = {"old": placements_digest(old_placements), "new": placements_digest(new_placements),
            "problem": problem, "records": list(records),
            "sizes": list(send_splits)}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    problems = [f"EP rank {r}: {x['problem']}" for r, x in enumerate(everyone) if x["problem"]]
    if problems:
        raise MigrationError("cannot migrate experts: " + "; ".join(problems))
    for what in ("old", "new"):
        digests = [x[what] for x in everyone]
        if len(set(digests)) > 1:
            raise MigrationError(f"EP ranks disagree on the {what} placements (digest per rank: "
                                 f"{digests}); every rank must call migrate_experts with the "
                                 "same placements")

    report = MigrationReport(layers_changed=sorted({m.layer for m in moves}),
                             experts_moved=len(moves))
    if moves:
        send_splits = list(send_splits)
        recv_splits = [x["sizes"][me] for x in everyone]
        recv = torch.empty(sum(recv_splits), dtype=torch.uint8, device=device)
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group,
                                      async_op=True)
        if timeout is None:
            work.wait()
        else:
            seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
            try:
                work.wait(timeout=timedelta(seconds=seconds))
            except RuntimeError as err:
                raise MigrationError(f"expert exchange did not finish in {seconds} s: "
                                     f"{err}") from err

        slot_of = {(m.layer, m.expert): m.dst_slot for m in moves if m.dst_rank == me}
        offset = 0
        for src, size in enumerate(recv_splits):
            recs = everyone[src]["records"][me]
            report.checksums_verified += _install(model, states, recv[offset:offset + size],
                                                  recs, slot_of)
            report.tensors_received += sum(1 for r in recs if r.dtype)
            offset += size
        report.tensors_sent = sum(1 for rs in records for r in rs if r.dtype)
        report.bytes_sent = sum(s for r, s in enumerate(send_splits) if r != me)
        report.bytes_received = sum(s for r, s in enumerate(recv_splits) if r != me)
        report.bytes_local = send_splits[me]
    model.set_placements(new_placements)
    report.seconds = time.perf_counter() - start
    return report
