"""The "cpu" backend: C++ row-copy kernels (csrc/cpu/*.cpp) built with the system compiler and
loaded with ctypes.

The library is built once into `$EPRUNTIME_CACHE` (default `~/.cache/epruntime`) under a name
keyed by a hash of the sources and flags, so an edited source rebuilds; it is compiled to a
temporary file and renamed into place, so ranks starting together never load a half-written
library. No compiler -> the backend reports itself unavailable and automatic selection falls
back to the torch backend.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

# The repository's csrc/ (editable installs), or $EPRUNTIME_CSRC where an installed package has
# them beside it (the docker images copy csrc/ there).
SOURCE_DIR = Path(os.environ.get("EPRUNTIME_CSRC")
                  or Path(__file__).resolve().parents[2] / "csrc") / "cpu"
# -ffp-contract=off: no fused multiply-add, so products round like torch's (bit-exact combine).
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math",
         "-Wall", "-Wextra"]
ABI_VERSION = 3
# Outputs larger than this are written with non-temporal stores (they would not stay in cache).
STREAM_BYTES = 4 << 20

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "ep_cpu_abi_version": ([], ctypes.c_int),
    "ep_cpu_dispatch_layout": ([_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _ptr], None),
    "ep_cpu_permute": ([_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, ctypes.c_int], None),
    "ep_cpu_combine_f32": ([_ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, ctypes.c_int], None),
    "ep_cpu_combine_bf16": ([_ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr], None),
    "ep_cpu_combine_f16": ([_ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr], None),
    "ep_cpu_compact": ([_ptr, _i64, _i64, _ptr, _ptr, _ptr], _i64),
    "ep_cpu_greedy_keep": ([_ptr, _i64, _i64, _i64, _ptr], None),
    "ep_cpu_row_slots": ([_ptr, _i64, _i64, _i64, _ptr, _ptr, _i64, _i64, _ptr], _i64),
    "ep_cpu_fan_out": ([_ptr, _i64, _i64, _ptr, _ptr], _i64),
}
_COMBINE = {torch.float32: "ep_cpu_combine_f32", torch.bfloat16: "ep_cpu_combine_bf16",
            torch.float16: "ep_cpu_combine_f16"}


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("EPRUNTIME_CACHE") or Path.home() / ".cache" / "epruntime")


def compiler() -> str | None:
    """$CXX if set (None when it does not exist), else c++ or g++ on PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return shutil.which("c++") or shutil.which("g++")


def _sources() -> list[Path]:
    sources = sorted(SOURCE_DIR.glob("*.cpp"))
    if not sources:
        raise BuildError(f"no C++ sources in {SOURCE_DIR}")
    return sources


def library_path(directory: Path | None = None) -> Path:
    """Where the library of the current sources and flags lives (built or not)."""
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for src in _sources():
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    return (directory or cache_dir()) / f"epruntime_cpu_{digest.hexdigest()[:16]}.so"


def build(directory: Path | None = None) -> Path:
    """Compile the sources into `directory` (the cache by default) unless already there."""
    target = library_path(directory)
    if target.is_file():
        return target
    cxx = compiler()
    if cxx is None:
        wanted = f"CXX={os.environ['CXX']!r} not found" if os.environ.get("CXX") else \
            "no C++ compiler found (c++ or g++ on PATH, or set CXX)"
        raise BuildError(wanted)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, *map(str, _sources()), "-o", tmp],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"{cxx} failed building {SOURCE_DIR}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent rank sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if lib.ep_cpu_abi_version() != ABI_VERSION:
        raise BuildError(f"{path} has ABI {lib.ep_cpu_abi_version()}, expected {ABI_VERSION}")
    return lib


@functools.cache
def _library() -> ctypes.CDLL:
    return load(build())


def unavailable_reason() -> str | None:
    try:
        _library()
    except (BuildError, OSError) as err:
        return str(err)
    return None


def _p(x: torch.Tensor) -> int:
    return x.data_ptr()


# ---- the ops (inputs checked and made contiguous by the front) -------------------------------
def dispatch_layout(routing_map_TE, rank_of_expert_E, num_ranks):
    from epruntime.kernels import Layout

    t, e = routing_map_TE.shape
    token_in_rank_TR = torch.empty(t, num_ranks, dtype=torch.bool)
    position_TR = torch.empty(t, num_ranks, dtype=torch.int64)
    tokens_per_rank_R = torch.empty(num_ranks, dtype=torch.int64)
    tokens_per_expert_E = torch.empty(e, dtype=torch.int64)
    _library().ep_cpu_dispatch_layout(_p(routing_map_TE), t, e, _p(rank_of_expert_E), num_ranks,
                                      _p(token_in_rank_TR), _p(position_TR),
                                      _p(tokens_per_rank_R), _p(tokens_per_expert_E))
    return Layout(token_in_rank_TR, position_TR, tokens_per_rank_R, tokens_per_expert_E)


def permute(x_TH, layout):
    out = x_TH.new_empty(layout.num_rows, x_TH.shape[1])
    _library().ep_cpu_permute(_p(x_TH), x_TH.shape[0], x_TH.shape[1] * x_TH.element_size(),
                              _p(layout.position_TR.contiguous()), _p(layout.offset_R.contiguous()),
                              layout.num_ranks, _p(out), out.nbytes > STREAM_BYTES)
    return out


def unpermute_combine(rows_NH, layout, weight_TR, num_tokens):
    out = rows_NH.new_empty(num_tokens, rows_NH.shape[1])
    # The reference multiplies by the weight cast to the row dtype.
    weight = None if weight_TR is None else weight_TR.to(rows_NH.dtype).contiguous()
    args = [_p(rows_NH), _p(layout.position_TR.contiguous()), _p(layout.offset_R.contiguous()),
            num_tokens, layout.num_ranks, rows_NH.shape[1], None if weight is None else _p(weight),
            _p(out)]
    if rows_NH.dtype == torch.float32:
        args.append(out.nbytes > STREAM_BYTES)
    getattr(_library(), _COMBINE[rows_NH.dtype])(*args)
    return out


def compact(x_TH, keep_T):
    k = int(keep_T.sum())
    out = x_TH.new_empty(k, x_TH.shape[1])
    index_K = torch.empty(k, dtype=torch.int64)
    _library().ep_cpu_compact(_p(x_TH), x_TH.shape[0], x_TH.shape[1] * x_TH.element_size(),
                              _p(keep_T), _p(out), _p(index_K))
    return out, index_K


def greedy_keep(sim_BPP, keep):
    """FastMMoE's greedy selection (csrc/cpu/greedy_select.cpp); float32 only (the front
    falls back to the torch reference for other dtypes)."""
    b, p, _ = sim_BPP.shape
    keep_BK = torch.empty(b, keep, dtype=torch.int64)
    _library().ep_cpu_greedy_keep(_p(sim_BPP), b, p, keep, _p(keep_BK))
    return keep_BK


def _register() -> None:
    import sys

    from epruntime.kernels import register_backend

    register_backend("cpu", sys.modules[__name__], unavailable_reason)


_register()


def row_slots(used_TGQ, token_N, group_N, max_entries):
    """The rows' first used slots (csrc/cpu/row_entries.cpp)."""
    t, g, q = used_TGQ.shape
    n = token_N.shape[0]
    slot_NM = torch.empty(n, max_entries, dtype=torch.int64)
    bad = _library().ep_cpu_row_slots(_p(used_TGQ), t, g, q, _p(token_N), _p(group_N), n,
                                      max_entries, _p(slot_NM))
    if bad:
        raise IndexError(f"row {bad - 1}: (token {int(token_N[bad - 1])}, group "
                         f"{int(group_N[bad - 1])}) is outside used_TGQ's [{t}, {g}]")
    return slot_NM


def fan_out_order(slot_XM, num_local):
    """Received entries by slot: a counting sort (csrc/cpu/row_entries.cpp)."""
    entry_K = torch.empty(slot_XM.numel(), dtype=torch.int64)
    counts = torch.empty(num_local, dtype=torch.int64)
    k = _library().ep_cpu_fan_out(_p(slot_XM), slot_XM.numel(), num_local, _p(entry_K),
                                  _p(counts))
    if k < 0:
        raise ValueError(f"slot_XM has a slot >= num_local={num_local}")
    return entry_K[:k], counts
