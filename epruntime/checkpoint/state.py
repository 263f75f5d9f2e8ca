"""One rank's training state as a flat {key: tensor} dict for torch.distributed.checkpoint.

Keys name what a tensor IS, never where it lives:
    model/<global name>                 parameters and persistent buffers (SMoES counts, bins,
                                        Gaussian statistics); experts under their logical id
    optim/<global name>/<exp_avg|exp_avg_sq|step>   AdamW state of that parameter
    rng/rank<R>/torch, rng/rank<R>/tracker/<name>   RNG states of global rank R

Every rank puts in what it holds: all dense tensors and the experts placed on it. DCP writes a
key once however many ranks hold it (its planner deduplicates replicated keys and spreads them
over the ranks' shard files), and on load each rank asks for exactly the keys it holds now, so
it reads its own experts and the dense tensors, never another rank's experts.

Replicated experts (several physical copies of one logical expert, issue 15): every copy has the
same global name, so the logical expert is one key, written once; `holdings` maps that key to
all of this rank's copies, loading fills the first and copies it into the others, and a rank
that holds a copy on another rank's behalf reads the same key. Copies stay identical in training
(their gradients are summed), so which copy DCP writes does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.tensor_parallel import random as mrandom
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from epruntime.checkpoint.layout import CheckpointError

MODEL, OPTIM, RNG = "model/", "optim/", "rng/"


def rng_prefix(rank: int) -> str:
    return f"{RNG}rank{rank:05d}/"


def holdings(model, ep_rank: int) -> dict[str, list[torch.Tensor]]:
    """global name -> this rank's tensors holding it (parameters, then persistent buffers)."""
    out: dict[str, list[torch.Tensor]] = {}
    for name, t in (*model.global_named_parameters(ep_rank),
                    *model.global_named_buffers(ep_rank)):
        out.setdefault(name, []).append(t)
    return out


def rng_state() -> dict[str, torch.Tensor]:
    return {"torch": torch.get_rng_state(),
            **{f"tracker/{k}": v for k, v in
               mrandom.get_cuda_rng_tracker().get_states().items()}}


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    mrandom.get_cuda_rng_tracker().set_states(
        {k.removeprefix("tracker/"): v for k, v in states.items() if k.startswith("tracker/")})


def save_state(engine, rank: int, snapshot: bool) -> dict[str, torch.Tensor]:
    """This rank's flat state dict. `snapshot`: copies on the host that training may not change
    (an asynchronous save writes them while training goes on); else the live tensors."""
    keep = (lambda t: t.detach().to("cpu", copy=True)) if snapshot else (lambda t: t.detach())
    state = {}
    optimizer_state = engine.optimizer_state  # megatron-core's optimizer state, keyed by parameter
    for name, copies in holdings(engine.model, engine.env.ep_rank).items():
        state[MODEL + name] = keep(copies[0])
        for k, v in optimizer_state.get(copies[0], {}).items():
            state[f"{OPTIM}{name}/{k}"] = keep(v if torch.is_tensor(v) else torch.tensor(v))
    for k, v in rng_state().items():
        state[rng_prefix(rank) + k] = keep(v)
    return state


@dataclass
class LoadTargets:
    """The state dict DCP fills in place, and what to do with it afterwards."""

    state: dict[str, torch.Tensor] = field(default_factory=dict)
    copies: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # key -> other copies
    optim: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {state k: key}
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> parameter
    rng: dict[str, str] = field(default_factory=dict)  # rng state name -> key


def _meta(metadata: Metadata, key: str) -> TensorStorageMetadata | None:
    md = metadata.state_dict_metadata.get(key)
    return md if isinstance(md, TensorStorageMetadata) else None


def load_targets(engine, metadata: Metadata, path, restore_training_state: bool,
                 rng_rank: int | None) -> LoadTargets:
    """What this rank reads: its tensors (loaded in place), their AdamW state when
    `restore_training_state` (fresh tensors), and global rank `rng_rank`'s RNG (None: not)."""
    t = LoadTargets()
    params = {id(p) for p in engine.model.parameters()}
    for name, copies in holdings(engine.model, engine.env.ep_rank).items():
        key, first = MODEL + name, copies[0]
        md = _meta(metadata, key)
        if md is None:
            raise CheckpointError(f"{path}: {name} is missing")
        if tuple(md.size) != tuple(first.shape) or md.properties.dtype != first.dtype:
            raise CheckpointError(f"{path}: {name} has shape {tuple(md.size)} "
                                  f"({md.properties.dtype}), model expects {tuple(first.shape)} "
                                  f"({first.dtype})")
        t.state[key] = first.data  # DCP copies into it: the model is loaded in place
        t.copies[key] = copies[1:]
        if restore_training_state and id(first) in params:
            t.params[name] = first
            t.optim[name] = {}
            prefix = f"{OPTIM}{name}/"
            for k, md in metadata.state_dict_metadata.items():
                if k.startswith(prefix) and isinstance(md, TensorStorageMetadata):
                    t.state[k] = torch.empty(md.size, dtype=md.properties.dtype)
                    t.optim[name][k[len(prefix):]] = k
    if rng_rank is not None:
        prefix = rng_prefix(rng_rank)
        for k, md in metadata.state_dict_metadata.items():
            if k.startswith(prefix) and isinstance(md, TensorStorageMetadata):
                t.state[k] = torch.empty(md.size, dtype=md.properties.dtype)
                t.rng[k[len(prefix):]] = k
        if "torch" not in t.rng:
            raise CheckpointError(f"{path}: holds no RNG state for rank {rng_rank}")
    return t


@torch.no_grad()
def apply_loaded(engine, t: LoadTargets) -> None:
    """After DCP filled `t.state`: copy into replicas, install AdamW state, restore RNG."""
    for key, others in t.copies.items():
        for other in others:
            other.copy_(t.state[key])
    for name, param in t.params.items():
        # AdamW keeps `step` on the host unless capturable; its moments live with the parameter
        saved = {k: t.state[key] if k == "step" else t.state[key].to(param.device)
                 for k, key in t.optim[name].items()}
        if saved:
            engine.optimizer_state[param] = saved
        else:  # saved before its first update: no state from what was here before
            engine.optimizer_state.pop(param, None)
    if t.rng:
        set_rng_state({k: t.state[key] for k, key in t.rng.items()})
