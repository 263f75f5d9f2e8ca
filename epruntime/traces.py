"""Routing traces: which experts each (sampled) token picked, per MoE layer, recorded on real ranks.

A forward hook on every router (megatron-core's TopKRouter or SMoES's, both return
(probs [T, E], routing_map [T, E] bool)) keeps, for a sample of the tokens of each forward call,
the token's index in that call, its top-k experts and weights, its modality and the EP rank it
came from. `epruntime.simulate` replays a trace under any EP size, node count, placement and
dispatcher.

On disk (format "epruntime-trace/1"): one `rank<global rank>.npz` per rank, arrays

    layer [N] uint8, call [N] int32, token [N] int32, rank [N] int16, modality [N] uint8
    (255 = unknown), experts [N, K] int16 (-1 = none), weights [N, K] float16,
    calls [L] int64 (forward calls per layer), tokens_seen [L] int64 (before sampling),
    header: uint8 bytes of a JSON `TraceHeader`.

Sampling decides per (rank, call, token), not per layer, so a sampled token is kept in every
layer; it is deterministic given the seed. A foreign JSONL trace (one object per token:
{"layer", "experts", "gating_probs"} and optional "modality", "rank") loads into the same
`RoutingTrace`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from epruntime.model.router_tap import moe_routers


FORMAT = "epruntime-trace/1"
UNKNOWN_MODALITY = 255


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file, line or field."""


class TraceHeader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    num_experts: int = Field(gt=0)
    topk: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    ep_size: int = Field(1, gt=0)  # EP ranks the trace was recorded on (source ranks)
    ranks_per_node: int = Field(1, gt=0)
    hidden: int = Field(gt=0)
    hidden_dtype_bytes: int = Field(4, gt=0)  # element size of the token rows
    prob_dtype_bytes: int = Field(4, gt=0)  # element size of the router probs (megatron meta)
    sample_rate: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    dispatch: str | None = None  # dispatch.kind of the recording run
    placements: list[dict] | None = None  # Placement.to_dict() per layer at save time
    source: str = "epruntime"


@dataclass
class RoutingTrace:
    """Routed tokens of all ranks, one row per (layer, sampled token)."""

    header: TraceHeader
    layer_N: torch.Tensor  # [N] int64
    call_N: torch.Tensor  # [N] int64: forward call of the recording rank
    token_N: torch.Tensor  # [N] int64: token index within that call
    rank_N: torch.Tensor  # [N] int64: source EP rank
    modality_N: torch.Tensor  # [N] int64: 0 text, 1 vision, 255 unknown
    experts_NK: torch.Tensor  # [N, K] int64, -1 = no expert
    weights_NK: torch.Tensor  # [N, K] float32
    calls_L: torch.Tensor  # [L] int64: forward calls per layer per rank (max over ranks)
    tokens_seen_L: torch.Tensor  # [L] int64: tokens routed before sampling, all ranks

    @property
    def num_records(self) -> int:
        return int(self.layer_N.numel())

    def layer(self, layer: int) -> "RoutingTrace":
        """The records of one layer (same header)."""
        keep = self.layer_N == layer
        return RoutingTrace(self.header, *(t[keep] for t in (
            self.layer_N, self.call_N, self.token_N, self.rank_N, self.modality_N,
            self.experts_NK, self.weights_NK)), self.calls_L, self.tokens_seen_L)


# ---- recording ---------------------------------------------------------------------------------
def sample_mask(num_tokens: int, rate: float, seed: int, rank: int, call: int) -> torch.Tensor:
    """[T] bool: which tokens of one (rank, call) are kept; the same in every layer."""
    if rate >= 1.0:
        return torch.ones(num_tokens, dtype=torch.bool)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + rank) * 1_000_033 + call)
    return torch.rand(num_tokens, generator=gen) < rate


class TraceRecorder:
    """Router forward hooks of one rank; `save` writes this rank's `.npz`."""

    def __init__(self, model, ep_rank: int, ep_size: int, ranks_per_node: int = 1,
                 sample_rate: float = 1.0, seed: int = 0, dispatch: str | None = None):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"trace.sample_rate={sample_rate} must be in (0, 1]")
        self.model = model
        self.routers = moe_routers(model)
        cfg = self.routers[0].config
        self.ep_rank, self.ep_size, self.ranks_per_node = ep_rank, ep_size, ranks_per_node
        self.sample_rate, self.seed, self.dispatch = sample_rate, seed, dispatch
        self.num_experts, self.topk = cfg.num_moe_experts, cfg.moe_router_topk
        self.hidden = cfg.hidden_size
        self.hidden_bytes = self.prob_bytes = 4
        L = len(self.routers)
        self.calls_L = [0] * L
        self.tokens_seen_L = [0] * L
        self._chunks: list[dict[str, np.ndarray]] = []
        self._tap = model.router_tap
        self._tap.add("traces", self.record)

    def record(self, event) -> None:
        """One router call (epruntime.model.router_tap.RouterEvent)."""
        layer, probs_TE, routing_TE = event.layer, event.probs_TE, event.routing_map_TE
        self.hidden_bytes = event.hidden_TH.element_size()
        self.prob_bytes = probs_TE.element_size()
        call = self.calls_L[layer]
        self.calls_L[layer] += 1
        t = routing_TE.shape[0]
        self.tokens_seen_L[layer] += t
        keep_T = sample_mask(t, self.sample_rate, self.seed, self.ep_rank, call)
        modality_T = None if event.modality_T is None else event.modality_T.cpu()
        # host sync: traces are written on the host, every sampled call
        self._chunks.append(self.compact(layer, call, routing_TE.cpu(), probs_TE.cpu(), keep_T,
                                         modality_T))

    def compact(self, layer: int, call: int, routing_TE: torch.Tensor, probs_TE: torch.Tensor,
                keep_T: torch.Tensor, modality_T: torch.Tensor | None = None
                ) -> dict[str, np.ndarray]:
        """Kept tokens of one router call -> compact arrays (experts in ascending id order)."""
        token = keep_T.nonzero(as_tuple=True)[0]
        used = routing_TE[token]
        k = self.topk
        # Stable sort puts the used expert ids first (ascending); pad with -1 past the used ones.
        order = torch.sort(used.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :k]
        valid = used.gather(1, order)
        experts = torch.where(valid, order, -1)
        weights = probs_TE[token].float().gather(1, order) * valid
        if modality_T is not None:
            modality = modality_T[token].to(torch.uint8)
        else:
            modality = torch.full((token.numel(),), UNKNOWN_MODALITY, dtype=torch.uint8)
        n = token.numel()
        return {"layer": np.full(n, layer, np.uint8), "call": np.full(n, call, np.int32),
                "token": token.numpy().astype(np.int32),
                "rank": np.full(n, self.ep_rank, np.int16), "modality": modality.numpy(),
                "experts": experts.numpy().astype(np.int16),
                "weights": weights.numpy().astype(np.float16)}

    @property
    def num_records(self) -> int:
        """Records (sampled token x layer) kept so far."""
        return sum(len(c["token"]) for c in self._chunks)

    def header(self) -> TraceHeader:
        placements = getattr(self.model, "placements", None)
        return TraceHeader(num_experts=self.num_experts, topk=self.topk,
                           num_layers=len(self.routers), ep_size=self.ep_size,
                           ranks_per_node=self.ranks_per_node, hidden=self.hidden,
                           hidden_dtype_bytes=self.hidden_bytes, prob_dtype_bytes=self.prob_bytes,
                           sample_rate=self.sample_rate, seed=self.seed, dispatch=self.dispatch,
                           placements=[p.to_dict() for p in placements] if placements else None)

    def arrays(self) -> dict[str, np.ndarray]:
        k = self.topk
        empty = {"layer": np.zeros(0, np.uint8), "call": np.zeros(0, np.int32),
                 "token": np.zeros(0, np.int32), "rank": np.zeros(0, np.int16),
                 "modality": np.zeros(0, np.uint8), "experts": np.zeros((0, k), np.int16),
                 "weights": np.zeros((0, k), np.float16)}
        chunks = self._chunks or [empty]
        out = {name: np.concatenate([c[name] for c in chunks]) for name in empty}
        out["calls"] = np.asarray(self.calls_L, np.int64)
        out["tokens_seen"] = np.asarray(self.tokens_seen_L, np.int64)
        return out

    def save(self, directory: str | Path, world_rank: int | None = None,
             fmt: str = "npz") -> Path:
        """Write `<directory>/rank<world rank>.npz` (or `.jsonl` in megatron-core's router-trace
        schema with fmt="megatron-jsonl"); returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rank = self.ep_rank if world_rank is None else world_rank
        if fmt == "megatron-jsonl":
            path = directory / f"rank{rank:05d}.jsonl"
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                for chunk in self._chunks:
                    for record in megatron_records(chunk, self.topk):
                        f.write(json.dumps(record, separators=(",", ":")) + "\n")
            tmp.replace(path)
            return path
        path = directory / f"rank{rank:05d}.npz"
        header = np.frombuffer(self.header().model_dump_json().encode(), dtype=np.uint8)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, header=header, **self.arrays())
        tmp.replace(path)
        return path

    def close(self) -> None:
        self._tap.remove("traces")


def start_recording(cfg, engine, env) -> TraceRecorder | None:
    """The trace recorder the config asks for (None when trace.enabled is false)."""
    if not cfg.trace.enabled:
        return None
    return TraceRecorder(engine.model, env.ep_rank, env.ep_size, engine.ranks_per_node,
                         cfg.trace.sample_rate, cfg.train.seed, cfg.dispatch.kind)


def finish_recording(recorder: TraceRecorder | None, cfg, env, output_dir) -> Path | None:
    """Unhook and write this rank's file to trace.path (default <output_dir>/traces); a named
    warning on stderr when the file holds no tokens (the simulator refuses such a trace)."""
    if recorder is None:
        return None
    recorder.close()
    path = recorder.save(cfg.trace.path or Path(output_dir) / "traces", env.rank,
                         getattr(cfg.trace, "format", "npz"))
    warning = empty_trace_warning(recorder, path)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    return path


def empty_trace_warning(recorder: TraceRecorder, path: str | Path) -> str | None:
    """One warning line when `recorder` kept no tokens (its file at `path` is empty), else None."""
    if recorder.num_records:
        return None
    calls, seen = max(recorder.calls_L, default=0), max(recorder.tokens_seen_L, default=0)
    if seen == 0:
        return (f"epruntime: warning: trace.enabled recorded no forward calls on this rank (no "
                f"steps ran while recording?); the trace {path} is empty")
    return (f"epruntime: warning: trace.sample_rate={recorder.sample_rate:g} sampled none of "
            f"the {seen} tokens routed in {calls} forward calls; the trace {path} is empty "
            "(raise trace.sample_rate)")


# ---- loading -----------------------------------------------------------------------------------
_ARRAYS = ("layer", "call", "token", "rank", "modality", "experts", "weights")


def load_trace(path: str | Path, jsonl: bool | None = None, **jsonl_options) -> RoutingTrace:
    """A trace directory (rank*.npz), one `.npz`, or a foreign JSON-lines file (detected by
    content: a file whose first non-blank byte is `{`, whatever its suffix)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("rank*.npz"))
        if not files:
            jsonl_files = sorted(path.glob("rank*.jsonl"))
            if jsonl_files:  # trace.format=megatron-jsonl
                return load_megatron_jsonl(jsonl_files, jsonl_options.get("num_experts"))
            raise TraceError(f"{path}: no rank*.npz or rank*.jsonl trace files")
    elif path.is_file() and (jsonl if jsonl is not None else _starts_with_brace(path)):
        if _first_record(path).get("top_indices") is not None:
            return load_megatron_jsonl([path], jsonl_options.get("num_experts"))
        return load_jsonl(path, **jsonl_options)
    elif path.is_file():
        files = [path]
    else:
        raise TraceError(f"{path}: no such trace file or directory")
    return _merge([_load_npz(f) for f in files], files)


def _starts_with_brace(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(64).lstrip().startswith(b"{")


def _first_record(path: Path) -> dict:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return {}
                return obj if isinstance(obj, dict) else {}
    return {}


def _load_npz(path: Path) -> tuple[TraceHeader, dict[str, np.ndarray]]:
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise TraceError(f"{path}: not a trace .npz (no zip header) nor a JSON-lines trace")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same error to the user
        raise TraceError(f"{path}: not a trace .npz ({err})") from None
    missing = [n for n in (*_ARRAYS, "calls", "tokens_seen", "header") if n not in data]
    if missing:
        raise TraceError(f"{path}: missing arrays {missing}")
    header = TraceHeader.model_validate_json(data.pop("header").tobytes())
    if header.format != FORMAT:
        raise TraceError(f"{path}: format {header.format!r}, expected {FORMAT!r}")
    return header, data


def _merge(parts: list[tuple[TraceHeader, dict]], files) -> RoutingTrace:
    header = parts[0][0]
    for (h, _), f in zip(parts, files):
        same = h.model_dump(exclude={"placements"}) == header.model_dump(exclude={"placements"})
        if not same:
            raise TraceError(f"{f}: header differs from {files[0]}'s (different runs?)")
    cat = {n: np.concatenate([d[n] for _, d in parts]) for n in _ARRAYS}
    return RoutingTrace(
        header=header,
        layer_N=torch.from_numpy(cat["layer"].astype(np.int64)),
        call_N=torch.from_numpy(cat["call"].astype(np.int64)),
        token_N=torch.from_numpy(cat["token"].astype(np.int64)),
        rank_N=torch.from_numpy(cat["rank"].astype(np.int64)),
        modality_N=torch.from_numpy(cat["modality"].astype(np.int64)),
        experts_NK=torch.from_numpy(cat["experts"].astype(np.int64)),
        weights_NK=torch.from_numpy(cat["weights"].astype(np.float32)),
        calls_L=torch.from_numpy(np.stack([d["calls"] for _, d in parts]).max(0)),
        tokens_seen_L=torch.from_numpy(np.stack([d["tokens_seen"] for _, d in parts]).sum(0)))


def _json_objects(path: Path):
    """("file:line", object) for each non-blank line of a JSONL file; a line that is not a
    JSON object is a TraceError naming the file and line."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TraceError(f"{path}: {err}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise TraceError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected an object, got {type(obj).__name__}")
        yield where, obj


def load_jsonl(path: str | Path, num_experts: int | None = None, hidden: int = 4096,
               hidden_dtype_bytes: int = 2, ranks_per_node: int = 1) -> RoutingTrace:
    """A foreign trace: one JSON object per routed token and layer,
    {"layer": int, "experts": [int], "gating_probs": [float], "modality"?: 0|1, "rank"?: int}.

    Tokens of a (layer, rank) are numbered in file order; everything is one forward call.
    `num_experts` defaults to the largest expert id + 1; `hidden` and its dtype size are what
    the simulator prices a row at (not in the file).
    """
    path = Path(path)
    rows: list[tuple[int, list[int], list[float], int, int]] = []
    for where, obj in _json_objects(path):
        for key in ("layer", "experts", "gating_probs"):
            if key not in obj:
                raise TraceError(f"{where}: missing field {key!r}")
        layer, experts, probs = obj["layer"], obj["experts"], obj["gating_probs"]
        if not _is_int(layer) or layer < 0:
            raise TraceError(f"{where}: field 'layer' must be an int >= 0, got {layer!r}")
        if not isinstance(experts, list) or not experts or not all(
                _is_int(e) and e >= 0 for e in experts):
            raise TraceError(f"{where}: field 'experts' must be a non-empty list of ints >= 0, "
                             f"got {experts!r}")
        if len(set(experts)) != len(experts):
            raise TraceError(f"{where}: field 'experts' repeats an expert: {experts!r}")
        if not isinstance(probs, list) or len(probs) != len(experts) or not all(
                isinstance(p, (int, float)) and not isinstance(p, bool) for p in probs):
            raise TraceError(f"{where}: field 'gating_probs' must be a list of {len(experts)} "
                             f"numbers (one per expert), got {probs!r}")
        modality = obj.get("modality", UNKNOWN_MODALITY)
        if modality not in (0, 1, UNKNOWN_MODALITY) or not _is_int(modality):
            raise TraceError(f"{where}: field 'modality' must be 0 (text) or 1 (vision), "
                             f"got {modality!r}")
        rank = obj.get("rank", 0)
        if not _is_int(rank) or rank < 0:
            raise TraceError(f"{where}: field 'rank' must be an int >= 0, got {rank!r}")
        rows.append((layer, experts, probs, modality, rank))
    if not rows:
        raise TraceError(f"{path}: no records")
    k = max(len(r[1]) for r in rows)
    max_expert = max(max(r[1]) for r in rows)
    e = num_experts if num_experts is not None else max_expert + 1
    if max_expert >= e:
        raise TraceError(f"{path}: expert id {max_expert} >= num_experts={e}")
    experts_NK = torch.full((len(rows), k), -1, dtype=torch.int64)
    weights_NK = torch.zeros(len(rows), k)
    for i, (_, ex, pr, _, _) in enumerate(rows):
        experts_NK[i, :len(ex)] = torch.tensor(ex)
        weights_NK[i, :len(pr)] = torch.tensor(pr, dtype=torch.float32)
    layer_N = torch.tensor([r[0] for r in rows])
    rank_N = torch.tensor([r[4] for r in rows])
    # token index: running count per (layer, rank), in file order
    key_N = layer_N * (int(rank_N.max()) + 1) + rank_N
    token_N = torch.zeros_like(key_N)
    counts: dict[int, int] = {}
    for i, key in enumerate(key_N.tolist()):
        token_N[i] = counts.get(key, 0)
        counts[key] = int(token_N[i]) + 1
    num_layers = int(layer_N.max()) + 1
    ep = int(rank_N.max()) + 1
    header = TraceHeader(num_experts=e, topk=k, num_layers=num_layers, ep_size=ep,
                         ranks_per_node=ranks_per_node if ep % ranks_per_node == 0 else ep,
                         hidden=hidden, hidden_dtype_bytes=hidden_dtype_bytes,
                         prob_dtype_bytes=4, source=f"jsonl:{path.name}")
    return RoutingTrace(header, layer_N, torch.zeros_like(layer_N), token_N, rank_N,
                        torch.tensor([r[3] for r in rows]), experts_NK, weights_NK,
                        torch.ones(num_layers, dtype=torch.int64),
                        torch.bincount(layer_N, minlength=num_layers))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ---- megatron-core router-trace schema -----------------------------------------------------------
MEGATRON_FIELDS = ("step", "stage", "block", "layer", "rank", "num_tokens", "topk", "top_indices")


def megatron_records(chunk: dict[str, np.ndarray], topk: int, stage: str = "forward"
                     ) -> list[dict]:
    """One recorder chunk (one router call of one layer) as megatron-core 0.19 router-trace
    records (`--moe-routing-trace-path` schema), plus `token_idx` (the kept tokens' index in
    the call, so sampled or dropped tokens keep their identity across layers) and `top_probs`.
    `step` is the forward call index, `block` 0."""
    n = len(chunk["token"])
    experts = chunk["experts"].astype(np.int64)
    if n == 0:
        return []
    return [{"step": int(chunk["call"][0]), "stage": stage, "block": 0,
             "layer": int(chunk["layer"][0]), "rank": int(chunk["rank"][0]), "num_tokens": n,
             "topk": topk, "top_indices": experts.tolist(),
             "token_idx": chunk["token"].astype(np.int64).tolist(),
             "top_probs": [[round(float(w), 5) for w in row] for row in chunk["weights"]]}]


def load_megatron_jsonl(paths, num_experts: int | None = None, hidden: int = 4096,
                        hidden_dtype_bytes: int = 2) -> RoutingTrace:
    """megatron-core router-trace JSONL files -> RoutingTrace.

    Each record is one (step, stage, block, layer, rank) router call with `num_tokens`, `topk`
    and `top_indices` [num_tokens][topk] (or flat). A token's identity is (step, stage, block,
    rank) + its `token_idx` (or `positions`) entry, else its row in the record: collectors that
    drop tokens must give token_idx, and then a token keeps its identity across layers."""
    rows_l, rows_c, rows_t, rows_r, rows_e, rows_w = [], [], [], [], [], []
    calls: dict[tuple, int] = {}
    k_max = 0
    for path in map(Path, paths):
        for where, obj in _json_objects(path):
            for key in ("step", "layer", "rank", "num_tokens", "topk", "top_indices"):
                if key not in obj:
                    raise TraceError(f"{where}: missing field {key!r}")
            for key in ("step", "layer", "rank", "num_tokens", "topk"):
                if not _is_int(obj[key]) or obj[key] < 0:
                    raise TraceError(f"{where}: field {key!r} must be an int >= 0, got "
                                     f"{obj[key]!r}")
            t, k, top = obj["num_tokens"], obj["topk"], obj["top_indices"]
            if isinstance(top, list) and len(top) == t * k and all(_is_int(x) for x in top):
                top = [top[i * k:(i + 1) * k] for i in range(t)]  # flat form
            if not isinstance(top, list) or len(top) != t or not all(
                    isinstance(r, list) and len(r) == k and all(_is_int(x) and x >= -1 for x in r)
                    for r in top):
                raise TraceError(f"{where}: field 'top_indices' must be num_tokens={t} lists of "
                                 f"topk={k} expert ids >= -1")
            name = "token_idx" if "token_idx" in obj else "positions"
            ident = obj.get(name)
            if ident is None:
                ident = list(range(t))
            elif not isinstance(ident, list) or len(ident) != t or not all(
                    _is_int(x) and x >= 0 for x in ident):
                raise TraceError(f"{where}: field {name!r} must be num_tokens={t} ints >= 0")
            if len(set(ident)) != t:
                raise TraceError(f"{where}: field {name!r} repeats a token")
            probs = obj.get("top_probs")
            if probs is not None and (not isinstance(probs, list) or len(probs) != t):
                raise TraceError(f"{where}: field 'top_probs' must be num_tokens={t} lists")
            key = (obj["step"], str(obj.get("stage", "")), obj.get("block", 0))
            call = calls.setdefault(key, len(calls))
            k_max = max(k_max, k)
            rows_l += [obj["layer"]] * t
            rows_c += [call] * t
            rows_t += ident
            rows_r += [obj["rank"]] * t
            rows_e += top
            rows_w += probs if probs is not None else [[1.0 / max(k, 1)] * k] * t
    if not rows_l:
        raise TraceError(f"{', '.join(map(str, paths))}: no records")
    N = len(rows_l)
    experts = torch.full((N, k_max), -1, dtype=torch.int64)
    weights = torch.zeros(N, k_max)
    for i, (e, w) in enumerate(zip(rows_e, rows_w)):
        experts[i, :len(e)] = torch.tensor(e, dtype=torch.int64)
        weights[i, :len(w)] = torch.tensor(w, dtype=torch.float32)
    top = int(experts.max())
    e = num_experts if num_experts is not None else top + 1
    if top >= e:
        raise TraceError(f"{paths[0]}: expert id {top} >= num_experts={e}")
    layer_N = torch.tensor(rows_l)
    num_layers = int(layer_N.max()) + 1
    rank_N = torch.tensor(rows_r)
    header = TraceHeader(num_experts=e, topk=max(k_max, 1), num_layers=num_layers,
                         ep_size=int(rank_N.max()) + 1, hidden=hidden,
                         hidden_dtype_bytes=hidden_dtype_bytes,
                         source=f"megatron-jsonl:{Path(paths[0]).name}")
    return RoutingTrace(header, layer_N, torch.tensor(rows_c), torch.tensor(rows_t), rank_N,
                        torch.full((N,), UNKNOWN_MODALITY), experts, weights,
                        torch.full((num_layers,), len(calls), dtype=torch.int64),
                        torch.bincount(layer_N, minlength=num_layers))
