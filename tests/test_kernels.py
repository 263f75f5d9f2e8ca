"""epruntime.kernels: every available backend against the torch reference, bit for bit (random
and edge inputs, float32 / bfloat16 / float16, gradients of the autograd wrappers), the Triton
kernels under TRITON_INTERPRET=1 in a subprocess, bad input, the C++ build from a clean cache,
unavailable backends, the dedup dispatcher's row order, and `bench.py permute --quick`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap

import pytest
import torch

from epruntime import kernels
from epruntime.dispatch.layout import dedup_send_layout
from epruntime.placement import Placement
from tests.conftest import ROOT, python_bin
from tests.test_bench import bench

LAYOUT_FIELDS = ("token_in_rank_TR", "position_TR", "tokens_per_rank_R", "tokens_per_expert_E")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Backends tested in this process (triton needs the interpreter: its own subprocess below).
FAST = [b for b, why in kernels.available_backends().items()
        if why is None and b not in ("torch", "triton")]


def routing(gen, t, e, k):
    """[T, E] bool, k distinct experts per token."""
    scores = torch.rand(t, e, generator=gen)
    return torch.zeros(t, e, dtype=torch.bool).scatter_(1, scores.topk(k, 1).indices, True)


def device_for(backend):
    return "cuda" if backend == "cuda" else "cpu"


def check_case(backend, routing_TE, rank_of_expert_E, num_ranks, h, dtype, gen, keep_T=None):
    """Every op of `backend` equals the torch reference on one case (forward only)."""
    dev = device_for(backend)
    routing_TE, rank_of_expert_E = routing_TE.to(dev), rank_of_expert_E.to(dev)
    t = routing_TE.shape[0]
    ref = kernels.dispatch_layout(routing_TE, rank_of_expert_E, num_ranks, backend="torch")
    got = kernels.dispatch_layout(routing_TE, rank_of_expert_E, num_ranks, backend=backend)
    for field in LAYOUT_FIELDS:
        a, b = getattr(ref, field), getattr(got, field)
        assert a.dtype == b.dtype and torch.equal(a, b), (backend, field)
    x_TH = torch.randn(t, h, generator=gen).to(dtype).to(dev)
    rows_ref = kernels.permute(x_TH, ref, backend="torch")
    rows = kernels.permute(x_TH, got, backend=backend)
    assert rows.shape == (int(ref.tokens_per_rank_R.sum()), h) and torch.equal(rows, rows_ref)
    rows_NH = torch.randn(rows.shape, generator=gen).to(dtype).to(dev)
    weight_TR = torch.rand(t, num_ranks, generator=gen).to(dev)
    for w in (None, weight_TR):
        out_ref = kernels.unpermute_combine(rows_NH, ref, w, t, backend="torch")
        out = kernels.unpermute_combine(rows_NH, got, w, t, backend=backend)
        assert out.dtype == dtype and torch.equal(out, out_ref), (backend, dtype, w is None)
    if keep_T is None:
        keep_T = torch.rand(t, generator=gen) < 0.5
    keep_T = keep_T.to(dev)
    (x_ref, i_ref), (x_got, i_got) = (kernels.compact(x_TH, keep_T, backend=b)
                                      for b in ("torch", backend))
    assert torch.equal(x_got, x_ref) and torch.equal(i_got, i_ref) and i_got.dtype == torch.int64


def random_cases(shapes, dtypes, seeds):
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        for t, e, r, k, h in shapes:
            rank_of_expert = torch.randint(0, r, (e,), generator=gen)  # any placement
            for dtype in dtypes:
                yield gen, routing(gen, t, e, k), rank_of_expert, r, h, dtype


def edge_cases(gen):
    """(name, routing_TE, rank_of_expert_E, num_ranks, h, keep_T or None)."""
    yield "no tokens", torch.zeros(0, 8, dtype=torch.bool), torch.arange(8) // 2, 4, 16, None
    yield ("one rank gets everything", routing(gen, 12, 8, 3), torch.full((8,), 2), 4, 16, None)
    yield ("all pruned", routing(gen, 10, 8, 2), torch.arange(8) // 2, 4, 8,
           torch.zeros(10, dtype=torch.bool))
    yield ("none pruned", routing(gen, 10, 8, 2), torch.arange(8) // 2, 4, 8,
           torch.ones(10, dtype=torch.bool))
    # All of each token's experts on one rank (experts 0-3 on rank 0): one row per token.
    dup = torch.zeros(6, 8, dtype=torch.bool)
    dup[:, :4] = True
    yield "duplicate experts on one rank", dup, torch.arange(8) // 4, 2, 8, None
    for h in (0, 1, 3, 5, 7, 13, 33):  # not multiples of any vector width (0: empty rows)
        yield f"hidden {h}", routing(gen, 9, 8, 2), torch.arange(8) % 4, 4, h, None
    yield "no experts routed", torch.zeros(5, 8, dtype=torch.bool), torch.arange(8) // 2, 4, 8, None


# ---- the reference itself ------------------------------------------------------------------
def test_reference_layout_by_hand():
    # 3 tokens, 4 experts on 2 ranks (0,1 -> rank 0; 2,3 -> rank 1).
    routing_TE = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    lay = kernels.dispatch_layout(routing_TE, torch.tensor([0, 0, 1, 1]), 2, backend="torch")
    assert lay.token_in_rank_TR.tolist() == [[True, False], [True, True], [False, True]]
    assert lay.position_TR.tolist() == [[0, -1], [1, 0], [-1, 1]]
    assert lay.tokens_per_rank_R.tolist() == [2, 2]
    assert lay.tokens_per_expert_E.tolist() == [1, 2, 2, 1]
    x_TH = torch.tensor([[1.0], [2.0], [3.0]])
    rows_NH = kernels.permute(x_TH, lay, backend="torch")
    assert rows_NH.flatten().tolist() == [1.0, 2.0, 2.0, 3.0]  # token 0 once, not twice
    w = torch.tensor([[0.5, 9.0], [0.25, 2.0], [9.0, 1.0]])
    out = kernels.unpermute_combine(rows_NH, lay, w, 3, backend="torch")
    assert out.flatten().tolist() == [0.5, 0.25 * 2 + 2 * 2, 3.0]
    kept, index = kernels.compact(x_TH, torch.tensor([True, False, True]), backend="torch")
    assert kept.flatten().tolist() == [1.0, 3.0] and index.tolist() == [0, 2]


def test_layout_rows_match_the_dedup_dispatchers_order():
    gen = torch.Generator().manual_seed(3)
    for t, e, r, k in [(0, 8, 2, 2), (40, 16, 4, 4), (33, 12, 3, 5)]:
        placement = Placement.from_rank_lists(
            torch.randperm(e, generator=gen).view(r, e // r).tolist())
        routing_TE = routing(gen, t, e, k)
        send = dedup_send_layout(routing_TE, routing_TE.float(), placement, min(k, e // r))
        lay = kernels.dispatch_layout(routing_TE, placement.rank_E, r)
        assert torch.equal(lay.token_N, send.token_N)
        assert torch.equal(lay.tokens_per_rank_R, send.splits_R)


# ---- fast backends vs the reference --------------------------------------------------------
@pytest.mark.parametrize("backend", FAST)
def test_backend_matches_reference_on_random_inputs(backend):
    shapes = [(1, 4, 1, 1, 8), (37, 16, 4, 4, 24), (64, 8, 2, 3, 17), (50, 32, 8, 6, 64)]
    for gen, routing_TE, rank_of_expert, r, h, dtype in random_cases(shapes, DTYPES, (0, 1, 2)):
        check_case(backend, routing_TE, rank_of_expert, r, h, dtype, gen)


@pytest.mark.parametrize("backend", FAST)
def test_backend_matches_reference_on_edge_cases(backend):
    gen = torch.Generator().manual_seed(7)
    for name, routing_TE, rank_of_expert, r, h, keep_T in edge_cases(gen):
        for dtype in (torch.float32, torch.bfloat16):
            check_case(backend, routing_TE, rank_of_expert, r, h, dtype, gen, keep_T)
    dev = device_for(backend)
    dup = kernels.dispatch_layout(torch.ones(6, 8, dtype=torch.bool, device=dev),
                                  torch.arange(8, device=dev) // 4, 2, backend=backend)
    assert dup.tokens_per_rank_R.tolist() == [6, 6]  # 4 experts per rank, one row each


def test_combine_is_not_just_any_order():
    # Summing in another order than ascending rank changes float32 results here, so the
    # bit-exact comparisons above do check the order.
    big, small = torch.tensor([[1e8]]), torch.tensor([[1.0]])
    lay = kernels.dispatch_layout(torch.ones(1, 3, dtype=torch.bool), torch.arange(3), 3,
                                  backend="torch")
    rows = torch.cat([small, big, -big])
    out = kernels.unpermute_combine(rows, lay, None, 1, backend="torch")
    assert out.item() == 0.0  # (1 + 1e8) rounds to 1e8 in float32; another order gives 1
    for backend in FAST:  # each backend's own layout, on its device
        dev = device_for(backend)
        lay_b = kernels.dispatch_layout(torch.ones(1, 3, dtype=torch.bool, device=dev),
                                        torch.arange(3, device=dev), 3, backend=backend)
        got = kernels.unpermute_combine(rows.to(dev), lay_b, None, 1, backend=backend)
        assert torch.equal(got.cpu(), out), backend


def grads(backend, x_TH, rows_NH, weight_TR, lay, ref: bool):
    """Gradients of a loss through permute and unpermute_combine: the wrappers, or autograd
    through the reference ops."""
    x_TH, rows_NH, weight_TR = (v.detach().requires_grad_() for v in (x_TH, rows_NH, weight_TR))
    t = x_TH.shape[0]
    if ref:
        from epruntime.kernels import reference as R
        sent = R.permute(x_TH, lay)
        out = R.unpermute_combine(rows_NH, lay, weight_TR, t)
        out_unweighted = R.unpermute_combine(sent, lay, None, t)
    else:
        sent = kernels.permute_differentiable(x_TH, lay, backend=backend)
        out = kernels.unpermute_combine_differentiable(rows_NH, lay, weight_TR, backend=backend)
        out_unweighted = kernels.unpermute_combine_differentiable(sent, lay, backend=backend)
    gen = torch.Generator().manual_seed(11)
    probe_N, probe_T = (torch.randn(v.shape, generator=gen).to(v.dtype).to(v.device)
                        for v in (sent, out))
    loss = (sent * probe_N).sum() + (out * probe_T).sum() + (out_unweighted * probe_T).sum()
    loss.backward()
    return x_TH.grad, rows_NH.grad, weight_TR.grad


@pytest.mark.parametrize("backend", ["torch", *FAST])
def test_gradients_match_reference_autograd(backend):
    gen = torch.Generator().manual_seed(5)
    dev = device_for(backend)
    for t, e, r, k, h in [(0, 8, 2, 2, 4), (29, 16, 4, 4, 12), (40, 8, 2, 3, 33)]:
        for dtype in (torch.float32, torch.bfloat16):
            # The reference runs on the CPU, where autograd's scatter-adds sum in index order;
            # on CUDA they use atomics, whose order (and float32 result) varies.
            routing_TE = routing(gen, t, e, k)
            lay = kernels.dispatch_layout(routing_TE, torch.arange(e) % r, r, backend="torch")
            lay_dev = kernels.dispatch_layout(routing_TE.to(dev), torch.arange(e, device=dev) % r,
                                              r, backend="torch")
            x_TH = torch.randn(t, h, generator=gen).to(dtype)
            rows_NH = torch.randn(lay.num_rows, h, generator=gen).to(dtype)
            weight_TR = torch.rand(t, r, generator=gen)
            want = grads(backend, x_TH, rows_NH, weight_TR, lay, ref=True)
            got = grads(backend, x_TH.to(dev), rows_NH.to(dev), weight_TR.to(dev), lay_dev,
                        ref=False)
            for name, a, b in zip(("x", "rows", "weight"), want, got):
                assert b.dtype == a.dtype, (backend, dtype, name)
                if name == "weight" and dev == "cuda":
                    # a dot product over the hidden size: a GPU reduces it in a tree, the CPU
                    # reference in order, so the float results differ by rounding only
                    torch.testing.assert_close(b.cpu(), a, msg=f"{backend} {dtype} {name}")
                else:  # copies and in-order sums: bit-identical everywhere
                    assert torch.equal(a, b.cpu()), (backend, dtype, name)


# ---- Triton under the interpreter ------------------------------------------------------------
TRITON_SCRIPT = textwrap.dedent("""
    import torch
    from epruntime import kernels
    from tests import test_kernels as tk
    assert kernels.available_backends()["triton"] is None, kernels.available_backends()
    shapes = [(1, 4, 1, 1, 8), (9, 8, 4, 3, 13)]
    for gen, routing_TE, roe, r, h, dtype in tk.random_cases(shapes, tk.DTYPES, (0,)):
        tk.check_case("triton", routing_TE, roe, r, h, dtype, gen)
    gen = torch.Generator().manual_seed(7)
    for name, routing_TE, roe, r, h, keep in tk.edge_cases(gen):
        if routing_TE.shape[0] <= 12:
            tk.check_case("triton", routing_TE, roe, r, min(h, 8), torch.bfloat16, gen, keep)
    lay = kernels.dispatch_layout(tk.routing(gen, 7, 8, 3), torch.arange(8) // 2, 4)
    x, rows, w = torch.randn(7, 5), torch.randn(lay.num_rows, 5), torch.rand(7, 4)
    for a, b in zip(tk.grads("torch", x, rows, w, lay, ref=True),
                    tk.grads("triton", x, rows, w, lay, ref=False)):
        assert torch.equal(a, b)
    print("TRITON_OK")
""")


def test_triton_interpreter_matches_reference(python_env):
    pytest.importorskip("triton", reason="needs triton installed")
    env = {**python_env, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([python_bin(), "-c", TRITON_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "TRITON_OK" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="triton runs natively on CUDA or under the interpreter")
def test_triton_unavailable_on_cpu_without_interpreter():
    reason = kernels.available_backends()["triton"]
    assert reason is not None and ("TRITON_INTERPRET" in reason or "triton" in reason)
    with pytest.raises(ValueError, match="'triton' is unavailable"):
        kernels.permute(torch.zeros(1, 1), kernels.dispatch_layout(
            torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.int64), 1),
            backend="triton")


# ---- bad input and unavailable backends -------------------------------------------------------
def test_bad_input_names_the_tensor():
    routing_TE = torch.ones(4, 4, dtype=torch.bool)
    roe = torch.arange(4) // 2
    lay = kernels.dispatch_layout(routing_TE, roe, 2)
    x_TH = torch.zeros(4, 3)
    bad = [
        (lambda: kernels.dispatch_layout(routing_TE.float(), roe, 2), "routing_map_TE"),
        (lambda: kernels.dispatch_layout(routing_TE, roe.int(), 2), "rank_of_expert_E"),
        (lambda: kernels.dispatch_layout(routing_TE, roe[:3], 2), "rank_of_expert_E"),
        (lambda: kernels.dispatch_layout(routing_TE, torch.tensor([0, 1, 2, 0]), 2),
         r"rank_of_expert_E must lie in \[0, num_ranks=2\)"),
        (lambda: kernels.dispatch_layout(routing_TE, torch.tensor([0, -1, 0, 0]), 2),
         "rank_of_expert_E"),
        (lambda: kernels.dispatch_layout(routing_TE, roe, 0), "num_ranks"),
        (lambda: kernels.permute(x_TH[:3], lay), "x_TH must have 4 rows"),
        (lambda: kernels.permute(x_TH[0], lay), "x_TH must be a 2-D"),
        (lambda: kernels.permute(x_TH, "layout"), "layout must be"),
        (lambda: kernels.unpermute_combine(torch.zeros(7, 3), lay, None, 4), "rows_NH must have 8"),
        (lambda: kernels.unpermute_combine(torch.zeros(8, 3).long(), lay, None, 4), "rows_NH"),
        (lambda: kernels.unpermute_combine(torch.zeros(8, 3), lay, torch.ones(4, 3), 4),
         "weight_TR"),
        (lambda: kernels.unpermute_combine(torch.zeros(8, 3), lay, None, 5), "num_tokens"),
        (lambda: kernels.compact(x_TH, torch.ones(4)), "keep_T"),
        (lambda: kernels.compact(x_TH, torch.ones(3, dtype=torch.bool)), "keep_T"),
        (lambda: kernels.permute(x_TH, lay, backend="nope"), "unknown kernel backend 'nope'"),
    ]
    for call, match in bad:
        with pytest.raises(ValueError, match=match):
            call()


BUILD_SCRIPT = textwrap.dedent("""
    import os, pathlib, torch
    from epruntime import kernels
    from epruntime.kernels import cpu
    cache = pathlib.Path(os.environ["EPRUNTIME_CACHE"])
    print("REASON", kernels.available_backends()["cpu"])
    print("AUTO", kernels.resolve_backend(None, torch.device("cpu")))
    print("LIBS", sorted(p.name for p in cache.glob("*.so")))
    try:
        kernels.compact(torch.zeros(2, 2), torch.ones(2, dtype=torch.bool), backend="cpu")
    except ValueError as err:
        print("ERROR", err)
""")


def run_build_script(python_env, **env):
    proc = subprocess.run([python_bin(), "-c", BUILD_SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**python_env, **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="needs a C++ compiler")
def test_cpu_backend_builds_from_a_clean_cache_and_rebuilds_on_edit(python_env, tmp_path,
                                                                    monkeypatch):
    # Two processes (ranks) start on an empty cache at once: both load one whole library.
    env = {**python_env, "EPRUNTIME_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([python_bin(), "-c", BUILD_SCRIPT], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-4000:]
        assert "REASON None" in out and "AUTO cpu" in out and "ERROR" not in out
    assert len(list((tmp_path / "cache").glob("epruntime_cpu_*.so"))) == 1
    # An edited source gets a new library (hash of the sources), built next to the old one.
    from epruntime.kernels import cpu
    src = tmp_path / "src"
    shutil.copytree(cpu.SOURCE_DIR, src)
    monkeypatch.setattr(cpu, "SOURCE_DIR", src)
    first = cpu.build(tmp_path / "cache")
    assert first.is_file() and cpu.load(first).ep_cpu_abi_version() == cpu.ABI_VERSION
    (src / "dispatch_kernels.cpp").write_text((src / "dispatch_kernels.cpp").read_text()
                                             + "\n// edited\n")
    second = cpu.build(tmp_path / "cache")
    assert second != first and second.is_file() and first.is_file()
    assert not list((tmp_path / "cache").glob("*.tmp"))  # temporaries renamed or removed


def test_cpu_backend_unavailable_without_a_compiler(python_env, tmp_path):
    out = run_build_script(python_env, EPRUNTIME_CACHE=str(tmp_path / "empty"),
                           CXX=str(tmp_path / "no-such-c++"))
    assert "REASON CXX=" in out and "not found" in out
    assert "AUTO torch" in out  # automatic selection falls back to the reference
    assert "ERROR kernel backend 'cpu' is unavailable: CXX=" in out
    assert "LIBS []" in out


# ---- the benchmark ---------------------------------------------------------------------------
def test_permute_bench_quick_writes_the_schema(python_env, tmp_path):
    out = tmp_path / "permute.json"
    proc = bench("permute", "--quick", "--json", str(out), env=python_env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "megatron-unfused" in proc.stdout  # the human table
    result = json.loads(out.read_text())
    assert result["name"] == "permute" and result["params"]["quick"] is True
    assert set(result) == {"name", "params", "rows", "ratios", "env", "notes"}
    regimes = result["params"]["malloc_regimes"]
    assert regimes[0] == "default" and result["params"]["ratios_from"] == regimes[-1]
    assert len(result["rows"]) == len({(r["variant"], r["malloc"]) for r in result["rows"]})
    for regime in regimes:
        rows = {row["variant"]: row for row in result["rows"] if row["malloc"] == regime}
        assert {"megatron-unfused", "torch", "memcpy"} <= set(rows)
        for row in rows.values():
            assert row["seconds"] > 0 and row["bytes"] > 0 and row["gbytes_per_s"] > 0
            assert len(row["samples"]) == result["params"]["repeats"]
            assert row["gbytes_per_s"] == pytest.approx(row["bytes"] / row["seconds"] / 1e9)
        # megatron moves one row per (token, expert), dedup one per (token, rank): never more.
        assert rows["torch"]["rows"] <= rows["megatron-unfused"]["rows"]
        assert rows["memcpy"]["bytes"] == rows["torch"]["bytes"]
        assert rows["torch"]["layout_seconds"] > 0 and rows["torch"]["matches_reference"] is True
        if "cpu" in rows:
            assert rows["cpu"]["matches_reference"] is True
    if "cpu" in rows:
        assert result["ratios"]["cpu/megatron-unfused_gbytes_per_s"] == pytest.approx(
            rows["cpu"]["gbytes_per_s"] / rows["megatron-unfused"]["gbytes_per_s"])
        assert result["ratios"]["cpu/memcpy_gbytes_per_s"] == pytest.approx(
            rows["cpu"]["gbytes_per_s"] / rows["memcpy"]["gbytes_per_s"])


def test_kernel_path_equals_the_index_ops_it_replaced_in_the_dedup_dispatcher():
    # The dispatcher used x.index_select(0, token_N) and zeros.index_add(0, token_N, rows): the
    # automatic backend through the autograd wrappers gives the same values and gradients.
    gen = torch.Generator().manual_seed(9)
    placement = Placement.from_rank_lists(torch.randperm(16, generator=gen).view(4, 4).tolist())
    routing_TE = routing(gen, 45, 16, 4)
    token_N = dedup_send_layout(routing_TE, routing_TE.float(), placement, 4).token_N
    lay = kernels.dispatch_layout(routing_TE, placement.rank_E, 4)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x_TH = torch.randn(45, 20, generator=gen).to(dtype)
        back_NH = torch.randn(token_N.numel(), 20, generator=gen).to(dtype)
        probe_NH = torch.randn(back_NH.shape, generator=gen).to(dtype)
        probe_TH = torch.randn(x_TH.shape, generator=gen).to(dtype)
        results = []
        for new in (False, True):
            x, back = x_TH.clone().requires_grad_(), back_NH.clone().requires_grad_()
            if new:
                rows = kernels.permute_differentiable(x, lay)
                out = kernels.unpermute_combine_differentiable(back, lay)
            else:
                rows = x.index_select(0, token_N)
                out = back.new_zeros(x_TH.shape).index_add(0, token_N, back)
            ((rows * probe_NH).sum() + (out * probe_TH).sum()).backward()
            results.append((rows, out, x.grad, back.grad))
        for old, new in zip(*results):
            assert torch.equal(old, new), dtype


# ---- dispatch.kernels selects the dispatcher's backend ----------------------------------------
def _engines_worker(rank: int) -> None:
    from epruntime import distributed
    from epruntime.config import ConfigError
    from epruntime.data import SyntheticVQA, shard_slice
    from epruntime.engine import Engine
    from tests.test_dedup_dispatch import GLOBAL_BATCH, small_config

    env = distributed.init_distributed(small_config(2, "dedup"))
    ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
    batch = ds.batch(torch.arange(GLOBAL_BATCH)[shard_slice(GLOBAL_BATCH, env.dp_rank,
                                                            env.dp_size)])
    results = {}
    for backend in ("torch", "cpu"):
        distributed.seed_all(0)
        engine = Engine(small_config(2, "dedup", f"dispatch.kernels={backend}"), env,
                        len(ds.vocab), ds.num_answers, ds.max_question_len)
        assert engine.model.moe_layers[0].token_dispatcher.runtime.kernels == backend
        loss = engine.forward_backward(batch, GLOBAL_BATCH)
        results[backend] = (loss, [p.grad.clone() for p in engine.model.parameters()])
    assert results["torch"][0] == results["cpu"][0]
    for a, b in zip(results["torch"][1], results["cpu"][1]):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="dispatch.kernels=cuda"):
        Engine(small_config(2, "dedup", "dispatch.kernels=cuda"), env, len(ds.vocab),
               ds.num_answers, ds.max_question_len)


def test_dispatch_kernels_config_picks_the_backend_and_results_do_not_change():
    from tests.dist import spawn

    spawn(_engines_worker, 2)
