"""Permute + unpermute-combine on one rank: megatron-core's unfused permute/unpermute (one row per
(token, expert)) against epruntime's kernel backends (one row per (token, rank)) and a plain
memcpy of the same bytes, float32 by default, one thread.

Per variant: median seconds of one permute plus one (weighted) combine; bytes = the permuted
buffer's bytes x 2 (written by the permute, read by the combine), so each variant's bandwidth is
on its own bytes (megatron moves more rows: compare time as well). The layout (routing map ->
rows) is timed separately for epruntime (`layout_seconds`); megatron's permute computes its
sorted indices inside the call.

`--device cuda` runs every variant on the GPU (the inputs are made on the CPU with the same seed,
then moved), each timed call between two `torch.cuda.synchronize()`; there, the caching
allocator keeps freed memory anyway, so only malloc=default runs. `--backends` picks the
variants (default: megatron-unfused,torch,cpu,triton,memcpy on cpu, megatron-unfused,torch,
cuda,triton,memcpy on cuda); a kernel backend that cannot run here is skipped with a note, as
triton is on CPU without a GPU (only the interpreter runs there, which is not a speed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from profiling.benchlib import BenchResult, BenchUsageError, collect_env, register, resolve

FULL = dict(tokens=8192, hidden=1024, experts=16, topk=4, ranks=4, dtype="float32", repeats=7,
            warmup=2, seed=0)
QUICK = dict(tokens=256, hidden=64, experts=8, topk=2, ranks=2, dtype="float32", repeats=3,
             warmup=1, seed=0)
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
VARIANTS = ("megatron-unfused", "torch", "cpu", "triton", "cuda", "memcpy")
KERNEL_BACKENDS = ("torch", "cpu", "triton", "cuda")  # epruntime.kernels backends, in run order
DEFAULT_BACKENDS = {"cpu": ("megatron-unfused", "torch", "cpu", "triton", "memcpy"),
                    "cuda": ("megatron-unfused", "torch", "cuda", "triton", "memcpy")}


def _variant_list(text: str) -> list[str]:
    """argparse type for "megatron-unfused,torch,cuda"."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated variants out of {','.join(VARIANTS)}, got {text!r}")
    return list(dict.fromkeys(names))


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, help=f"tokens (default {FULL['tokens']})")
    parser.add_argument("--hidden", type=int, help=f"hidden size (default {FULL['hidden']})")
    parser.add_argument("--experts", type=int, help=f"experts (default {FULL['experts']})")
    parser.add_argument("--topk", type=int, help=f"experts per token (default {FULL['topk']})")
    parser.add_argument("--ranks", type=int, help="ranks the experts are spread over, contiguous "
                        f"(default {FULL['ranks']})")
    parser.add_argument("--dtype", choices=DTYPES, help="row dtype (default float32)")
    parser.add_argument("--seed", type=int, help="routing seed")
    parser.add_argument("--device", choices=DEVICES, help="where the tensors live (default cpu)")
    parser.add_argument("--backends", type=_variant_list, metavar="LIST",
                        help="variants to time, comma-separated, out of " + ",".join(VARIANTS)
                        + " (default: " + ",".join(DEFAULT_BACKENDS["cpu"]) + " on cpu, "
                        + ",".join(DEFAULT_BACKENDS["cuda"]) + " on cuda)")


def _check(p: dict[str, Any]) -> None:
    for key in ("tokens", "hidden", "experts", "topk", "ranks"):
        if p[key] < 1:
            raise BenchUsageError(f"--{key} must be >= 1, got {p[key]}")
    if p["topk"] > p["experts"]:
        raise BenchUsageError(f"--topk={p['topk']} exceeds --experts={p['experts']}")
    if p["experts"] % p["ranks"]:
        raise BenchUsageError(f"--experts={p['experts']} is not divisible by --ranks={p['ranks']}")


def _row(variant: str, malloc: str, samples: list[float], nbytes: int, rows: int,
         **extra: Any) -> dict[str, Any]:
    seconds = statistics.median(samples)
    return {"variant": variant, "malloc": malloc, "seconds": seconds, "bytes": nbytes,
            "rows": rows, "gbytes_per_s": nbytes / seconds / 1e9, **extra, "samples": samples}


def _retain_freed_memory() -> str | None:
    """Make glibc keep freed memory (no mmap per large block, no trimming), so a repeated call
    reuses warm pages instead of faulting in fresh zeroed ones; None if done, else why not."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return "not glibc"
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        return "mallopt refused"
    return None


def _check_device(device: str, backends: list[str]) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise BenchUsageError("--device cuda needs a CUDA device (torch.cuda.is_available() is "
                              f"False; torch {torch.__version__}, CUDA {torch.version.cuda})")
    wrong = {"cpu": "cuda", "cuda": "cpu"}[device]
    if wrong in backends:
        raise BenchUsageError(f"--backends names {wrong!r}, which runs on {wrong} tensors only; "
                              f"--device is {device}")


def _time_round_robin(fns: dict[str, Any], repeats: int, warmup: int,
                      sync: Any = None) -> dict[str, list[float]]:
    """Seconds of each fn over `repeats` rounds (after `warmup`), one call of each per round, so
    load from other processes hits every variant alike. `sync` (torch.cuda.synchronize on a
    GPU) runs before the clock starts and before it stops, so a call's queued work counts."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            if sync is not None:
                sync()
            start = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                samples[name].append(elapsed)
    return samples


@register("permute", add_arguments=add_options)
def run(args: argparse.Namespace) -> BenchResult:
    """Permute + combine: megatron-core unfused vs epruntime kernel backends vs memcpy."""
    import torch
    from megatron.core.transformer.moe import moe_utils

    from epruntime import kernels
    from epruntime.kernels import triton_backend

    p = resolve(args, FULL, QUICK)
    _check(p)
    device = getattr(args, "device", None) or "cpu"
    selected = getattr(args, "backends", None) or list(DEFAULT_BACKENDS[device])
    _check_device(device, selected)
    on_gpu = device == "cuda"
    sync = torch.cuda.synchronize if on_gpu else None
    torch.set_num_threads(1)
    dtype = getattr(torch, p["dtype"])
    gen = torch.Generator().manual_seed(p["seed"])
    t, e, r, h = p["tokens"], p["experts"], p["ranks"], p["hidden"]
    scores_TE = torch.rand(t, e, generator=gen)
    top = scores_TE.topk(p["topk"], dim=1).indices
    routing_TE = torch.zeros(t, e, dtype=torch.bool).scatter_(1, top, True)
    probs_TE = (scores_TE * routing_TE).to(dtype)
    rank_of_expert_E = torch.arange(e) // (e // r)
    # The dedup weight of a (token, rank): the sum of the token's probs of that rank's experts.
    weight_TR = torch.zeros(t, r, dtype=dtype).index_add_(1, rank_of_expert_E, probs_TE)
    x_TH = torch.randn(t, h, generator=gen).to(dtype)
    # The reference result, on the CPU (the definition), before anything moves to the device.
    ref_layout = kernels.dispatch_layout(routing_TE, rank_of_expert_E, r, backend="torch")
    reference_out = kernels.unpermute_combine(kernels.permute(x_TH, ref_layout, backend="torch"),
                                              ref_layout, weight_TR, t, backend="torch")
    if on_gpu:
        routing_TE, probs_TE, rank_of_expert_E, weight_TR, x_TH = (
            v.to(device) for v in (routing_TE, probs_TE, rank_of_expert_E, weight_TR, x_TH))
    elem = x_TH.element_size()
    notes = [
        "bytes = permuted buffer bytes x 2 (permute writes it, combine reads it); megatron's "
        "buffer has one row per (token, expert), epruntime's one per (token, rank)",
        "seconds = one permute + one weighted combine, outputs allocated by each call; "
        "epruntime's layout is timed apart (layout_seconds); variants timed round-robin",
        "malloc=default: glibc returns big blocks to the OS, so every call faults in fresh "
        "pages; malloc=retain: freed memory is kept (mallopt), the steady state of a caching "
        "allocator; ratios are from malloc=retain",
    ]

    # megatron-core's own unfused permute / unpermute on the same routing map and weights.
    def megatron():
        permuted, _, sorted_indices = moe_utils.permute(x_TH, routing_TE, fused=False)
        return moe_utils.unpermute(permuted, sorted_indices, x_TH.shape, probs=probs_TE,
                                   routing_map=routing_TE, fused=False)

    fns, rows_of, layouts = {}, {}, {}
    if "megatron-unfused" in selected:
        fns["megatron-unfused"] = megatron
        rows_of["megatron-unfused"] = int(routing_TE.sum())
    backends = kernels.available_backends()
    for name in (b for b in KERNEL_BACKENDS if b in selected):
        if backends.get(name) is not None:
            notes.append(f"{name} skipped: {backends[name]}")
            continue
        if name == "triton" and triton_backend.INTERPRETED:
            notes.append("triton skipped: TRITON_INTERPRET=1 runs the interpreter (not a speed)"
                         if on_gpu else
                         "triton skipped: only the interpreter runs on CPU (not a speed)")
            continue
        layouts[name] = kernels.dispatch_layout(routing_TE, rank_of_expert_E, r, backend=name)

        def ours(layout=layouts[name], name=name):
            rows_NH = kernels.permute(x_TH, layout, backend=name)
            return kernels.unpermute_combine(rows_NH, layout, weight_TR, t, backend=name)

        fns[name] = ours
        rows_of[name] = layouts[name].num_rows
    matches = {name: bool(torch.equal(fns[name]().cpu(), reference_out)) for name in layouts}
    if "memcpy" in selected:
        # memcpy of the dedup buffer's bytes, once each way.
        src = torch.randn(ref_layout.num_rows, h, generator=gen).to(dtype).to(device)
        dst, back = torch.empty_like(src), torch.empty_like(src)

        def memcpy():
            dst.copy_(src)
            back.copy_(dst)

        fns["memcpy"] = memcpy
        rows_of["memcpy"] = ref_layout.num_rows
    if not fns:
        raise BenchUsageError("no variant can run here: " + "; ".join(notes[3:]))
    layout_fns = {name: (lambda name=name: kernels.dispatch_layout(
        routing_TE, rank_of_expert_E, r, backend=name)) for name in layouts}

    regimes, rows_out = ["default"], []
    for malloc in ("default", "retain"):
        if malloc == "retain" and on_gpu:
            notes.append("malloc=retain skipped: on cuda, torch's caching allocator already keeps "
                         "freed memory (malloc=default is that steady state)")
            break
        if malloc == "retain":
            why_not = _retain_freed_memory()
            if why_not is not None:
                notes.append(f"malloc=retain skipped: {why_not}")
                break
            regimes.append("retain")
        samples = _time_round_robin(fns, p["repeats"], p["warmup"], sync)
        layout_samples = _time_round_robin(layout_fns, p["repeats"], p["warmup"], sync)
        for name, fn_samples in samples.items():
            rows_out.append(_row(
                name, malloc, fn_samples, 2 * rows_of[name] * h * elem, rows_of[name],
                layout_seconds=(statistics.median(layout_samples[name])
                                if name in layout_samples else None),
                matches_reference=matches.get(name)))

    primary = regimes[-1]
    by = {row["variant"]: row for row in rows_out if row["malloc"] == primary}
    ratios = {}
    for name in (b for b in ("cpu", "torch", "cuda", "triton") if b in by):
        if "megatron-unfused" in by:
            ratios[f"{name}/megatron-unfused_gbytes_per_s"] = (
                by[name]["gbytes_per_s"] / by["megatron-unfused"]["gbytes_per_s"])
            ratios[f"megatron-unfused/{name}_seconds"] = (
                by["megatron-unfused"]["seconds"] / by[name]["seconds"])
        if "memcpy" in by:
            ratios[f"{name}/memcpy_gbytes_per_s"] = (
                by[name]["gbytes_per_s"] / by["memcpy"]["gbytes_per_s"])
    params = {**p, "quick": bool(getattr(args, "quick", False)), "threads": 1,
              "placement": "contiguous", "malloc_regimes": regimes, "ratios_from": primary,
              "device": device, "backends": selected}
    env = collect_env()
    if on_gpu:
        env.update(device_name=torch.cuda.get_device_name(), torch_cuda=torch.version.cuda)
    return BenchResult(name="permute", params=params, rows=rows_out, ratios=ratios, env=env,
                       notes=notes)
