"""The "cuda" kernel backend: csrc/cuda's kernels in libepruntime_cuda.so, loaded with ctypes.

Same four ops and semantics as `epruntime.kernels.reference` (bit for bit). The library is
`build/csrc/libepruntime_cuda.so` (build it with `make -C csrc`) or the path in
`EPRUNTIME_CUDA_LIB`; it is only loaded on a host where `torch.cuda.is_available()`. Kernels run
on the tensors' device, on torch's current stream, without host synchronisation except where a
result's shape depends on device data (`permute` needs N, `compact` needs K).

`ENTRY_POINTS` lists every C entry point used here with its ctypes signature; tests/test_csrc.py
checks the built library exports each of them, so the Python side cannot drift from the sources.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LIB = ROOT / "build" / "csrc" / "libepruntime_cuda.so"
ABI_VERSION = 1  # ep_abi_version() of the sources this file matches

_p, _i64, _u64, _int, _size = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int,
                               ctypes.c_size_t)
ENTRY_POINTS: dict[str, tuple[object, list]] = {
    "ep_last_error_string": (ctypes.c_char_p, []),
    "ep_abi_version": (_int, []),
    "ep_runtime_check": (_int, [ctypes.POINTER(_int)]),
    "ep_dispatch_layout": (_int, [_p, _p, _i64, _i64, _i64, _p, _p, _p, _p, _p]),
    "ep_permute": (_int, [_p, _p, _p, _p, _i64, _i64, _i64, _p, _p]),
    "ep_unpermute_combine": (_int, [_p, _p, _p, _p, _p, _i64, _i64, _i64, _int, _p, _p]),
    "ep_compact_workspace_bytes": (_int, [_i64, ctypes.POINTER(_size)]),
    "ep_compact_index": (_int, [_p, _i64, _p, _p, _p, _size, _p]),
    "ep_gather_rows": (_int, [_p, _p, _i64, _i64, _p, _p]),
    "ep_ipc_handle_bytes": (_int, []),
    "ep_ipc_header_bytes": (_i64, [_i64]),
    "ep_ipc_alloc": (_int, [_i64, _i64, ctypes.POINTER(_p), _p]),
    "ep_ipc_free": (_int, [_p]),
    "ep_ipc_open": (_int, [_p, ctypes.POINTER(_p)]),
    "ep_ipc_close": (_int, [_p]),
    "ep_ipc_send": (_int, [_p, _i64, _p, _p, _i64, _i64, _i64, _i64, _u64, _i64, _p]),
    "ep_ipc_wait": (_int, [_p, _i64, _u64, _i64, _p]),
    "ep_ipc_finish": (_int, [_p, _i64, _p, _i64, _u64, _p]),
}

# enum ep_dtype of epruntime_cuda.h
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class CudaKernelError(RuntimeError):
    """A CUDA entry point returned an error; the message is the library's description."""


def library_path() -> Path:
    return Path(os.environ.get("EPRUNTIME_CUDA_LIB", DEFAULT_LIB))


def unavailable_reason() -> str | None:
    """None if the backend can run here, else why not."""
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    path = library_path()
    if not path.is_file():
        return f"library not built: run make -C csrc (looked for {path})"
    try:
        lib = load_library()
    except (OSError, AttributeError, CudaKernelError) as err:
        return f"cannot load {path}: {err}"
    count = ctypes.c_int(0)
    if lib.ep_runtime_check(ctypes.byref(count)) != 0:  # e.g. a driver older than the toolkit
        return "the library's CUDA runtime cannot run here: " + lib.ep_last_error_string().decode()
    return None


@functools.cache
def load_library(path: str | None = None) -> ctypes.CDLL:
    """The library with every ENTRY_POINTS signature set; raises if it is missing or stale."""
    lib = ctypes.CDLL(str(path or library_path()))
    for name, (restype, argtypes) in ENTRY_POINTS.items():
        fn = getattr(lib, name)  # AttributeError names a missing export
        fn.restype, fn.argtypes = restype, argtypes
    if lib.ep_abi_version() != ABI_VERSION:
        raise CudaKernelError(f"library ABI version {lib.ep_abi_version()} != {ABI_VERSION}: "
                              "rebuild with make -C csrc")
    return lib


def _lib() -> ctypes.CDLL:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"kernel backend 'cuda' is unavailable: {reason}")
    return load_library()


def call(name: str, *args) -> None:
    """Calls entry point `name`; raises CudaKernelError with the library's message on failure."""
    lib = load_library()
    code = getattr(lib, name)(*args)
    if code != 0:
        raise CudaKernelError(f"{name} failed (cudaError {code}): "
                              + lib.ep_last_error_string().decode(errors="replace"))


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _row_bytes(x: torch.Tensor) -> int:
    return x.shape[1] * x.element_size()


# ---- the ops (inputs already checked and made contiguous by the front) --------------------------
def dispatch_layout(routing_map_TE: torch.Tensor, rank_of_expert_E: torch.Tensor,
                    num_ranks: int):
    """routing_map_TE bool [T, E], rank_of_expert_E int64 [E] -> Layout."""
    from epruntime.kernels import Layout

    _lib()
    dev = routing_map_TE.device
    t, e = routing_map_TE.shape
    token_in_rank_TR = torch.empty(t, num_ranks, dtype=torch.bool, device=dev)
    position_TR = torch.empty(t, num_ranks, dtype=torch.int64, device=dev)
    tokens_per_rank_R = torch.empty(num_ranks, dtype=torch.int64, device=dev)
    tokens_per_expert_E = torch.empty(e, dtype=torch.int64, device=dev)
    with torch.cuda.device(dev):
        call("ep_dispatch_layout", _ptr(routing_map_TE), _ptr(rank_of_expert_E), t, e, num_ranks,
             _ptr(token_in_rank_TR), _ptr(position_TR), _ptr(tokens_per_rank_R),
             _ptr(tokens_per_expert_E), _stream(dev))
    return Layout(token_in_rank_TR=token_in_rank_TR, position_TR=position_TR,
                  tokens_per_rank_R=tokens_per_rank_R, tokens_per_expert_E=tokens_per_expert_E)


def permute(x_TH: torch.Tensor, layout) -> torch.Tensor:
    """x_TH [T, H] (any dtype) -> rows_NH [N, H]: row offset(r) + position_TR[t, r] is x[t]."""
    _lib()
    dev = x_TH.device
    rows_NH = x_TH.new_empty(layout.num_rows, x_TH.shape[1])
    with torch.cuda.device(dev):
        call("ep_permute", _ptr(x_TH), _ptr(layout.token_in_rank_TR), _ptr(layout.position_TR),
             _ptr(layout.tokens_per_rank_R), x_TH.shape[0], layout.num_ranks, _row_bytes(x_TH),
             _ptr(rows_NH), _stream(dev))
    return rows_NH


def unpermute_combine(rows_NH: torch.Tensor, layout, weight_TR: torch.Tensor | None,
                      num_tokens: int) -> torch.Tensor:
    """rows_NH [N, H] -> out_TH [T, H] = sum over ranks ascending of w[t, r] * row(t, r), every
    step rounded to the row dtype as in the reference."""
    _lib()
    dev = rows_NH.device
    if weight_TR is not None:
        # The reference casts the weight to the row dtype; float32 holds that value exactly.
        weight_TR = weight_TR.to(rows_NH.dtype).to(torch.float32).contiguous()
    out_TH = rows_NH.new_empty(num_tokens, rows_NH.shape[1])
    with torch.cuda.device(dev):
        call("ep_unpermute_combine", _ptr(rows_NH), _ptr(layout.token_in_rank_TR),
             _ptr(layout.position_TR), _ptr(layout.tokens_per_rank_R), _ptr(weight_TR),
             num_tokens, layout.num_ranks, rows_NH.shape[1], DTYPE_CODES[rows_NH.dtype],
             _ptr(out_TH), _stream(dev))
    return out_TH


def compact(x_TH: torch.Tensor, keep_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_TH [T, H] (any dtype), keep_T bool [T] -> (x_KH [K, H], index_K int64 [K])."""
    _lib()
    dev = x_TH.device
    t = x_TH.shape[0]
    need = ctypes.c_size_t(0)
    call("ep_compact_workspace_bytes", t, ctypes.byref(need))
    workspace = torch.empty(max(need.value, 1), dtype=torch.uint8, device=dev)
    index_T = torch.empty(t, dtype=torch.int64, device=dev)
    count_1 = torch.empty(1, dtype=torch.int64, device=dev)
    with torch.cuda.device(dev):
        call("ep_compact_index", _ptr(keep_T), t, _ptr(index_T), _ptr(count_1),
             _ptr(workspace), need.value, _stream(dev))
        k = int(count_1.item())  # the output shape: one host sync
        index_K = index_T[:k].clone()
        x_KH = x_TH.new_empty(k, x_TH.shape[1])
        call("ep_gather_rows", _ptr(x_TH), _ptr(index_K), k, _row_bytes(x_TH), _ptr(x_KH),
             _stream(dev))
    return x_KH, index_K


def _register() -> None:
    try:
        from epruntime.kernels import register_backend
    except ImportError:  # the front is not there: the module still works on its own
        return
    register_backend("cuda", sys.modules[__name__], unavailable_reason)


_register()
