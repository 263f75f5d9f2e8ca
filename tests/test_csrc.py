"""csrc/cuda: the nvcc build (sm_80 + sm_90a cubins, warnings as errors, the exported C ABI
matching epruntime/kernels/cuda.py and the header), the loader backend on a host without a GPU,
and, on CUDA hosts, every kernel against the torch reference and the CUDA-IPC all-to-all
against torch.distributed.all_to_all_single."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epruntime.kernels import cuda as cuda_backend

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HEADER = CSRC / "cuda" / "epruntime_cuda.h"
LIB_NAME = "libepruntime_cuda.so"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


def _tool(name: str) -> str | None:
    """`name` from PATH, $CUDA_HOME/bin, or the bin/ of an installed nvidia-* wheel."""
    found = shutil.which(name) or (str(CUDA_HOME / "bin" / name)
                                   if (CUDA_HOME / "bin" / name).is_file() else None)
    if found:
        return found
    for site in map(Path, sys.path):
        for cand in site.glob(f"nvidia/*/bin/{name}"):
            return str(cand)
    return None


NVCC = _tool("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _make(build_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NVCC=NVCC or "nvcc")
    return subprocess.run(["make", "-C", str(CSRC), "-j2", f"BUILD_DIR={build_dir}", *extra],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Compiles csrc/cuda once for this module into a fresh directory."""
    if NVCC is None:
        pytest.skip("needs nvcc (the CUDA toolkit)")
    out = tmp_path_factory.mktemp("csrc")
    proc = _make(out)
    assert proc.returncode == 0, f"make -C csrc failed:\n{proc.stdout}{proc.stderr}"
    return out / LIB_NAME, proc


# ---- fatbin reading (cuobjdump is not part of every toolkit install) -----------------------------
_FATBIN_MAGIC = 0xBA55ED50
_ARCH_SPECIFIC = 0x100000  # fatbin entry flag of "a" targets (sm_90a)


def fatbin_cubins(path: Path) -> list[str]:
    """The cubin targets ("sm_80", "sm_90a", ...) embedded in a shared library's fatbins.

    Fatbin layout: header {u32 magic, u16 version, u16 header_size, u64 body_size}, then
    entries {u16 kind (1 PTX, 2 ELF), u16, u32 header_size, u64 payload_size, ..., u32 arch at
    +28, u64 flags at +40}, each followed by its payload."""
    data = path.read_bytes()
    magic = struct.pack("<I", _FATBIN_MAGIC)
    found, i = [], data.find(magic)
    while i >= 0:
        _, header, body = struct.unpack_from("<HHQ", data, i + 4)
        j, end = i + header, i + header + body
        while j < end:
            kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, j)
            arch = struct.unpack_from("<I", data, j + 28)[0]
            flags = struct.unpack_from("<Q", data, j + 40)[0]
            payload = data[j + entry_header: j + entry_header + 4]
            if kind == 2:
                assert payload == b"\x7fELF", f"fatbin ELF entry at {j} is not an ELF file"
                found.append(f"sm_{arch}" + ("a" if flags & _ARCH_SPECIFIC else ""))
            j += entry_header + size
        i = data.find(magic, end)
    return found


def header_functions() -> dict[str, int]:
    """Entry point name -> number of parameters, from epruntime_cuda.h."""
    text = re.sub(r"//[^\n]*", "", HEADER.read_text())
    decls = re.findall(r"^(?:const\s+)?\w+\**\s+\**(ep_\w+)\(([^)]*)\);", text, re.M)
    return {name: 0 if params.strip() in ("", "void") else params.count(",") + 1
            for name, params in decls}


# ---- the build -----------------------------------------------------------------------------------
@needs_nvcc
def test_build_has_sm80_and_sm90a_cubins_and_no_warnings(build):
    lib, proc = build
    assert lib.is_file()
    assert "warning" not in proc.stderr.lower(), proc.stderr  # the compilers' diagnostics
    # The flags that make any warning an error are really on the compile lines.
    compile_lines = [ln for ln in proc.stdout.splitlines() if " -c " in ln]
    assert len(compile_lines) == len(list((CSRC / "cuda").glob("*.cu")))
    for line in compile_lines:
        for flag in ("-Werror all-warnings", "-Wall,-Wextra,-Werror", "-O3", "-std=c++17",
                     "arch=compute_80,code=sm_80", "arch=compute_90a,code=sm_90a"):
            assert flag in line, f"{flag!r} missing from: {line}"
    cubins = fatbin_cubins(lib)
    assert set(cubins) == {"sm_80", "sm_90a"}, cubins
    assert cubins.count("sm_80") == cubins.count("sm_90a")  # every kernel file for both
    cuobjdump = _tool("cuobjdump")
    if cuobjdump:  # the toolkit's own view agrees with the fatbin reader
        listed = subprocess.run([cuobjdump, "--list-elf", str(lib)], capture_output=True,
                                text=True, check=True).stdout
        assert sorted(re.findall(r"\.(sm_\w+)\.cubin", listed)) == sorted(cubins)


@needs_nvcc
def test_exports_match_cuda_py_and_the_header(build):
    lib, _ = build
    nm = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                        check=True).stdout
    exported = set(re.findall(r"\sT\s(ep_\w+)$", nm, re.M))
    declared = header_functions()
    assert set(cuda_backend.ENTRY_POINTS) == exported == set(declared)
    for name, (_, argtypes) in cuda_backend.ENTRY_POINTS.items():
        assert len(argtypes) == declared[name], f"{name}: cuda.py and the header disagree"


@needs_nvcc
def test_warnings_fail_the_build(tmp_path):
    """A warning of g++ (host code) and one of nvcc's front end (device code) each stop the
    build: the Makefile's flags on sources that are otherwise fine."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "host_warn.cu").write_text("int host_fn(int a, int b) { return a; }\n")
    (src / "device_warn.cu").write_text(
        "__global__ void k(int* p) { int never_used; p[0] = 1; }\n")
    proc = _make(tmp_path / "out", "-k", f"SRC_DIR={src}")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert not (tmp_path / "out" / "host_warn.o").exists(), log
    assert not (tmp_path / "out" / "device_warn.o").exists(), log
    assert "-Werror=unused-parameter" in log, log  # g++ via -Xcompiler -Werror
    assert re.search(r'error #177-D: variable "never_used"', log), log  # -Werror all-warnings


@needs_nvcc
def test_library_checks_arguments_without_a_gpu(build):
    """The real library through ctypes, on calls that fail before touching a device."""
    lib = cuda_backend.load_library(str(build[0]))  # sets every ENTRY_POINTS signature
    assert lib.ep_abi_version() == cuda_backend.ABI_VERSION
    assert lib.ep_ipc_handle_bytes() == 64
    assert [lib.ep_ipc_header_bytes(r) for r in (1, 15, 16)] == [256, 256, 512]
    need = ctypes.c_size_t()
    assert lib.ep_compact_workspace_bytes(3000, ctypes.byref(need)) == 0
    assert need.value == 3 * 8  # one int64 per 1024-flag tile
    assert lib.ep_dispatch_layout(None, None, 4, 4, 0, None, None, None, None, None) != 0
    assert b"num_ranks > 0" in lib.ep_last_error_string()
    assert lib.ep_unpermute_combine(None, None, None, None, None, 1, 2, 4, 7, None, None) != 0
    assert b"unknown dtype code 7" in lib.ep_last_error_string()
    assert lib.ep_permute(None, None, None, None, 0, 2, 16, None, None) == 0  # nothing to do
    assert lib.ep_last_error_string() == b""
    count = ctypes.c_int(-1)
    code = lib.ep_runtime_check(ctypes.byref(count))
    if torch.cuda.is_available():
        assert code == 0 and count.value == torch.cuda.device_count()
    else:  # the runtime's own error comes back, with the call site
        assert code != 0 and count.value == 0
        assert lib.ep_last_error_string().startswith(b"ep_runtime_check cudaGetDeviceCount: ")
        assert lib.ep_gather_rows(None, None, 1, 16, None, None) != 0
        assert lib.ep_last_error_string().startswith(b"ep_gather_rows launch: ")


# ---- the loader backend --------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour of CPU-only hosts")
def test_backend_unavailable_without_a_cuda_device():
    import epruntime.kernels as K

    assert cuda_backend.unavailable_reason() == "needs a CUDA device"
    assert K.available_backends()["cuda"] == "needs a CUDA device"
    routing = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="'cuda' is unavailable: needs a CUDA device"):
        K.dispatch_layout(routing, torch.tensor([0, 0, 1, 1]), 2, backend="cuda")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        cuda_backend.compact(torch.zeros(2, 3), torch.ones(2, dtype=torch.bool))
    # CPU tensors never pick it by default.
    assert K.resolve_backend(None, torch.device("cpu")) != "cuda"
    from epruntime.transport.cuda_ipc import CudaIpcError, CudaIpcTransport

    with pytest.raises(CudaIpcError, match="unavailable: needs a CUDA device"):
        CudaIpcTransport()


def test_missing_library_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("EPRUNTIME_CUDA_LIB", str(tmp_path / "nope.so"))
    reason = cuda_backend.unavailable_reason()
    if torch.cuda.is_available():
        assert reason.startswith("library not built: run make -C csrc")
    else:
        assert reason == "needs a CUDA device"


def test_ipc_call_checks_agree_on_every_rank():
    """The per-call checks run on the all-gathered (send, recv, row_bytes, error) of all ranks,
    so every rank raises the same error before any byte moves (no GPU needed for this part)."""
    from epruntime.transport.cuda_ipc import (CudaIpcError, CudaIpcOverflowError,
                                              CudaIpcTransport)

    t = CudaIpcTransport.__new__(CudaIpcTransport)  # the checks only; no buffers
    t.size, t.capacity = 2, 1000
    t._check([([1, 2], [1, 4], 100, None), ([4, 0], [2, 0], 100, None)])  # consistent: fine
    with pytest.raises(CudaIpcError, match=r"rank 1's recv_splits \[2, 1\] disagree .* \[2, 0\]"):
        t._check([([1, 2], [1, 4], 100, None), ([4, 0], [2, 1], 100, None)])
    with pytest.raises(CudaIpcOverflowError, match="rank 0 would receive 1100 bytes"):
        t._check([([7, 0], [7, 4], 100, None), ([4, 0], [0, 0], 100, None)])
    with pytest.raises(CudaIpcError, match="rank 1: out must be contiguous"):
        t._check([([0, 0], [0, 0], 8, None), ([0, 0], [0, 0], None, "out must be contiguous")])
    with pytest.raises(CudaIpcError, match="disagree on the row size"):
        t._check([([0, 0], [0, 0], 8, None), ([0, 0], [0, 0], 16, None)])


# ---- GPU: every op against the torch reference ---------------------------------------------------
def _routing(t: int, e: int, k: int, gen: torch.Generator) -> torch.Tensor:
    scores = torch.rand(t, e, generator=gen)
    return torch.zeros(t, e, dtype=torch.bool).scatter_(1, scores.topk(k, 1).indices, True)


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(0)
    contiguous = torch.arange(8) // 2  # 8 experts on 4 ranks
    return [
        ("random", _routing(300, 8, 2, gen), contiguous, 4),
        ("many tokens", _routing(2500, 8, 3, gen), contiguous, 4),  # several scan tiles
        ("no tokens", torch.zeros(0, 8, dtype=torch.bool), contiguous, 4),
        ("one rank gets everything", _routing(40, 8, 2, gen), torch.zeros(8, dtype=torch.int64),
         4),
        ("all pruned", torch.zeros(33, 8, dtype=torch.bool), contiguous, 4),
        ("duplicate experts on one rank", torch.ones(17, 8, dtype=torch.bool),
         torch.tensor([0, 0, 0, 1, 1, 2, 2, 0]), 3),
        ("unsorted placement", _routing(64, 8, 4, gen), torch.tensor([3, 1, 0, 2, 2, 0, 1, 3]),
         4),
    ]


@needs_cuda
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_cuda_ops_match_reference(case):
    import epruntime.kernels as K
    from epruntime.kernels import reference

    assert cuda_backend.unavailable_reason() is None, cuda_backend.unavailable_reason()
    _, routing, rank_of, num_ranks = case
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(1)
    ref = reference.dispatch_layout(routing, rank_of, num_ranks)
    lay = K.dispatch_layout(routing.to(dev), rank_of.to(dev), num_ranks, backend="cuda")
    for field in ("token_in_rank_TR", "position_TR", "tokens_per_rank_R", "tokens_per_expert_E"):
        assert torch.equal(getattr(lay, field).cpu(), getattr(ref, field)), field
    t = routing.shape[0]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for h in (64, 7):  # 16-byte vector path and the unaligned path
            x = torch.randn(t, h, generator=gen).to(dtype)
            rows = K.permute(x.to(dev), lay, backend="cuda")
            rows_ref = reference.permute(x, ref)
            assert torch.equal(rows.cpu(), rows_ref), (dtype, h)
            weight = torch.rand(t, num_ranks, generator=gen)
            for w in (weight, None, weight.double()):
                out = K.unpermute_combine(rows, lay, None if w is None else w.to(dev), t,
                                          backend="cuda")
                out_ref = reference.unpermute_combine(rows_ref, ref, w, t)
                assert torch.equal(out.cpu(), out_ref), (dtype, h, None if w is None else w.dtype)
            for keep in (torch.rand(t, generator=gen) < 0.5, torch.zeros(t, dtype=torch.bool),
                         torch.ones(t, dtype=torch.bool)):
                x_k, idx = K.compact(x.to(dev), keep.to(dev), backend="cuda")
                x_k_ref, idx_ref = reference.compact(x, keep)
                assert torch.equal(idx.cpu(), idx_ref) and torch.equal(x_k.cpu(), x_k_ref)


@needs_cuda
def test_cuda_permute_copies_any_dtype_and_runs_on_the_current_stream():
    import epruntime.kernels as K

    dev = torch.device("cuda")
    routing = torch.ones(5, 4, dtype=torch.bool, device=dev)
    lay = K.dispatch_layout(routing, torch.tensor([0, 1, 1, 0], device=dev), 2, backend="cuda")
    x = torch.arange(15, device=dev, dtype=torch.int64).view(5, 3)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        rows = K.permute(x, lay, backend="cuda")
    stream.synchronize()
    assert torch.equal(rows, torch.cat([x, x]))


# ---- GPU: the CUDA-IPC all-to-all at 2 ranks -----------------------------------------------------
def _ipc_worker(rank: int) -> None:
    import torch.distributed as dist

    from epruntime.transport.cuda_ipc import CudaIpcOverflowError, CudaIpcTransport

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    dev = torch.device("cuda", rank)
    transport = CudaIpcTransport(capacity_mib=1, timeout_s=60)
    gen = torch.Generator().manual_seed(10 + rank)
    plans = [([3, 5], [3, 2]), ([0, 4], [0, 1]), ([2, 0], [2, 6]), ([0, 0], [0, 0]),
             ([7, 1], [7, 3])]  # rows to (rank 0, rank 1) from rank 0 / from rank 1
    for call, (from0, from1) in enumerate(plans * 2):
        send = from0 if rank == 0 else from1
        recv = [from0[rank], from1[rank]]
        dtype = (torch.float32, torch.bfloat16, torch.int64)[call % 3]
        x = (torch.randn(sum(send), 5, 3, generator=gen) * 100).to(dtype).to(dev)
        out = torch.full((sum(recv), 5, 3), -1, dtype=dtype, device=dev)
        want = torch.empty_like(out)
        transport.all_to_all_single(out, x, recv, send)
        dist.all_to_all_single(want, x, recv, send)
        torch.cuda.synchronize()
        assert torch.equal(out, want), (rank, call)
    # A message larger than the receiver's 1 MiB: the same error on both ranks, nothing hangs.
    big = 2**20 // 4 // 64 + 1
    send = [0, big] if rank == 0 else [0, 0]
    recv = [big, 0] if rank == 1 else [0, 0]
    x = torch.zeros(sum(send), 64, device=dev)
    with pytest.raises(CudaIpcOverflowError, match="rank 1 would receive"):
        transport.all_to_all_single(x.new_empty(sum(recv), 64), x, recv, send)
    transport.close()
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices on one node")
def test_cuda_ipc_alltoall_matches_all_to_all_single():
    from tests.dist import spawn

    assert cuda_backend.unavailable_reason() is None, cuda_backend.unavailable_reason()
    spawn(_ipc_worker, 2)
