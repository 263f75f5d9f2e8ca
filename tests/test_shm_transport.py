"""The shared-memory all-to-all (dispatch.transport=shm) on real gloo ranks: bit-identical to
all_to_all_single, overflow and timeout errors on every rank, no segment left in /dev/shm, the
dedup dispatcher trains the same through it, and the alltoall benchmark's --quick schema."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from epruntime.config import ConfigError, load_config
from tests.test_bench import bench
from tests.dist import spawn

SHM = Path("/dev/shm")


def _leftovers(token: str, group_ranks=None) -> list[str]:
    """Names in /dev/shm of transport `token` (of these group ranks only, if given)."""
    names = [p.name for p in SHM.iterdir() if token in p.name]
    if group_ranks is not None:
        names = [n for n in names if any(n.endswith(f"-g{g}") for g in group_ranks)]
    return names


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


# One world of 4 real ranks (each spawn costs seconds of imports) runs every section below on
# its own transports; each rank records per section "ok" or the traceback, and the tests read it.
WORLD = 4


def _cases(world: int, region: int):
    """(counts [R, R] rows src -> dst, dtype, row shape) for every call; the same on every rank."""
    gen = torch.Generator().manual_seed(7)
    dtypes, shapes = [torch.float32, torch.bfloat16, torch.int64], [(), (5,), (3, 4)]
    for i in range(45):
        counts = torch.randint(0, 7, (world, world), generator=gen)
        counts[counts < 3] = 0  # plenty of zero-row messages
        kind = i % 5
        if kind == 1:
            counts[0] = 0  # rank 0 sends nothing
        elif kind == 2:
            counts.zero_()[:, world - 1] = torch.randint(1, 9, (world,), generator=gen)  # one sink
        elif kind == 3 and i < 10:
            counts.zero_()  # nobody sends anything
        elif kind == 4:
            counts *= 30  # bigger messages back to back with small ones
        yield counts, dtypes[i % 3], shapes[(i // 3) % 3]
    for i in range(120):  # many calls of up to ~40 KB per message: regions get reused a lot
        counts = torch.randint(0, 40 if i % 2 else 2, (world, world), generator=gen)
        yield counts, torch.float32, (256,)
    # A message that exactly fills a region.
    yield torch.ones(world, world, dtype=torch.long), torch.uint8, (region,)


def _random(shape, dtype, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-2**62, 2**62, shape, generator=gen, dtype=torch.int64).to(dtype)


def _check_equivalence(group, per_node: int) -> None:
    import torch.distributed as dist

    from epruntime.dispatch.collective import all_to_all
    from epruntime.transport.shm import ShmTransport

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    t = ShmTransport(group, per_node, shm_mib=1, timeout_s=30)
    assert not _leftovers(t.token, t.local), "names must be unlinked once the node attached"
    gen = torch.Generator().manual_seed(1000 * per_node + dist.get_rank())
    # Every shm call back to back (no gloo call between them to line the ranks up, so a fast
    # rank runs ahead into the next call), then the references.
    calls = []
    for counts, dtype, row in _cases(world, t.region or 64):
        send, recv = counts[rank].tolist(), counts[:, rank].tolist()
        x = _random((sum(send), *row), dtype, gen)
        got = torch.full((sum(recv), *row), 3, dtype=dtype)
        t.all_to_all_single(got, x, recv, send)
        calls.append((x, got, send, recv))
    assert t.calls == len(calls)
    wrong = []  # asserted after the loop, so every rank makes the same collective calls
    for i, (x, got, send, recv) in enumerate(calls):
        want = torch.empty_like(got)
        dist.all_to_all_single(want, x, recv, send, group=group)
        if not torch.equal(_bits(got), _bits(want)):
            wrong.append((i, send, recv, x.dtype, tuple(x.shape)))
    assert not wrong, f"{len(wrong)} of {len(calls)} calls differ from gloo: {wrong[:3]}"
    calls = len(calls)
    # Through the dispatchers' autograd entry point: the backward goes the reverse way.
    counts = torch.randint(0, 5, (world, world), generator=torch.Generator().manual_seed(3))
    send, recv = counts[rank].tolist(), counts[:, rank].tolist()
    x = torch.randn(sum(send), 6, generator=gen)
    w = torch.randn(sum(recv), 6, generator=gen)
    grads = []
    for transport in (t, None):
        xg = x.clone().requires_grad_()
        y = all_to_all(xg, send, recv, group, transport)
        (y * w).sum().backward()
        grads.append((y.detach(), xg.grad))
    assert t.calls == calls + 2  # forward and backward both took the shm path
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    t.close()
    with pytest.raises(RuntimeError, match="closed"):
        t.all_to_all_single(got, x, recv, send)
    dist.barrier(group)
    assert not _leftovers(t.token)


def _check_overflow(rank: int) -> dict:
    import torch.distributed as dist

    from epruntime.transport.shm import ShmOverflowError, ShmTransport

    t = ShmTransport(dist.group.WORLD, 4, shm_mib=1, timeout_s=60)
    ok = torch.arange(8.0)
    t.all_to_all_single(torch.empty(8), ok, [2] * 4, [2] * 4)  # a normal call first
    # Rank 0 sends rank 1 one row more than a region holds; ranks 2 and 3 are not involved.
    rows = t.region // 4 + 1
    send = [0, rows, 0, 0] if rank == 0 else [0] * 4
    recv = [rows, 0, 0, 0] if rank == 1 else [0] * 4
    start = time.monotonic()
    with pytest.raises(ShmOverflowError) as err:
        t.all_to_all_single(torch.empty(sum(recv)), torch.zeros(sum(send)), recv, send)
    elapsed = time.monotonic() - start
    with pytest.raises(RuntimeError) as after:
        t.all_to_all_single(torch.empty(8), ok, [2] * 4, [2] * 4)
    dist.barrier()
    return {"error": str(err.value), "after": str(after.value), "elapsed": elapsed,
            "rows": rows, "region": t.region}


def _check_timeout(rank: int) -> dict:
    import torch.distributed as dist

    from epruntime.transport.shm import ShmTimeoutError, ShmTransport

    t = ShmTransport(dist.group.WORLD, 4, shm_mib=1, timeout_s=1.5)
    res = {}
    if rank != 3:  # rank 3 is alive but never calls
        start = time.monotonic()
        with pytest.raises(ShmTimeoutError) as err:
            t.all_to_all_single(torch.empty(4), torch.arange(4.0), [1] * 4, [1] * 4)
        res = {"error": str(err.value), "elapsed": time.monotonic() - start}
    dist.barrier()  # rank 3 stays alive until the others gave up
    return res


def _check_setup_failure(rank: int) -> dict:
    import torch.distributed as dist

    from epruntime.transport import shm

    # Rank 2 sizes its segment differently: every rank must refuse, and no name may stay behind.
    token = "5e7f00d0badc0de5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shm.secrets, "token_hex", lambda n: token)
        with pytest.raises(shm.ShmTransportError, match="attaching") as err:
            shm.ShmTransport(dist.group.WORLD, 4, shm_mib=2 if rank == 2 else 1, timeout_s=30)
    dist.barrier()
    return {"error": str(err.value), "pending": sorted(shm._pending_unlink),
            "leftovers": _leftovers(token)}


def _check_engines(env) -> dict:
    from megatron.core import parallel_state as ps

    from epruntime import distributed
    from epruntime.data import SyntheticVQA, shard_slice
    from epruntime.engine import Engine
    from epruntime.transport.shm import ShmTransport
    from tests.test_dedup_dispatch import GLOBAL_BATCH, small_config

    ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
    mine = shard_slice(GLOBAL_BATCH, env.dp_rank, env.dp_size)
    batch = ds.batch(torch.arange(GLOBAL_BATCH)[mine])
    results = {}
    variants = {"dedup/pg": ("dedup", "pg"), "dedup/shm": ("dedup", "shm"),
                "dedup-hier/shm": ("dedup-hier", "shm"),
                # one rank per node: every row goes point-to-point over the process group
                "dedup-hier/shm@2nodes": ("dedup-hier", "shm", "dispatch.ranks_per_node=1")}
    for variant, (kind, transport, *extra) in variants.items():
        distributed.seed_all(0)
        engine = Engine(small_config(2, kind, f"dispatch.transport={transport}", *extra), env,
                        len(ds.vocab), ds.num_answers, ds.max_question_len)
        loss = engine.forward_backward(batch, GLOBAL_BATCH)
        t = engine.transport
        assert all(moe.token_dispatcher.runtime.transport is t for moe in engine.model.moe_layers)
        assert (transport == "shm") == isinstance(t, ShmTransport)
        if t is not None:
            assert t.group is ps.get_expert_model_parallel_group()
        results[variant] = {
            "loss": loss, "calls": t.calls if t is not None else 0,
            "local": len(t.local) if t is not None else 0,
            "grads": {n: p.grad.clone()
                      for n, p in engine.model.global_named_parameters(env.ep_rank)}}
    return results


def _world_worker(rank: int, out: str) -> None:
    import traceback

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from epruntime import distributed
    from tests.test_dedup_dispatch import small_config

    env = distributed.init_distributed(small_config(2, "dedup"))  # EP groups {0, 1}, {2, 3}
    sections = {
        "equivalence/ep4": lambda: _check_equivalence(dist.group.WORLD, 4),
        "equivalence/ep4@2nodes": lambda: _check_equivalence(dist.group.WORLD, 2),
        "equivalence/ep2": lambda: _check_equivalence(ps.get_expert_model_parallel_group(), 2),
        "overflow": lambda: _check_overflow(rank),
        "timeout": lambda: _check_timeout(rank),
        "setup_failure": lambda: _check_setup_failure(rank),
        "engines": lambda: _check_engines(env),
    }
    results, seconds = {}, {}
    for name, fn in sections.items():
        start = time.monotonic()
        try:
            results[name] = fn()
        except BaseException:  # noqa: BLE001  recorded, and the test of that section fails
            results[name] = {"failed": traceback.format_exc()}
        seconds[name] = round(time.monotonic() - start, 2)
        mine, failed = results[name], [None] * WORLD
        dist.all_gather_object(failed, isinstance(mine, dict) and "failed" in mine)
        if any(failed):  # the ranks may no longer agree on the collectives: stop here
            for later in list(sections)[list(sections).index(name) + 1:]:
                results[later] = {"failed": f"not run: section {name} failed on ranks "
                                            f"{[r for r, f in enumerate(failed) if f]}"}
            break
    if rank == 0:
        print(f"shm test sections (s): {seconds}", flush=True)
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("shm_world4")
    spawn(_world_worker, WORLD, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _section(world4: list[dict], name: str) -> list:
    per_rank = [res[name] for res in world4]
    for rank, res in enumerate(per_rank):
        failed = isinstance(res, dict) and "failed" in res
        assert not failed, f"rank {rank}:\n{res['failed']}"
    return per_rank


@pytest.mark.parametrize("layout", ["ep4", "ep4@2nodes", "ep2"])
def test_shm_all_to_all_is_bit_identical_to_gloo(world4, layout):
    # ep4: 4 ranks of one node; @2nodes: 2 + 2, rows to the other node go point-to-point; ep2:
    # megatron's EP groups {0, 1} and {2, 3} (group ranks differ from global ranks).
    _section(world4, f"equivalence/{layout}")


def test_overflow_raises_the_named_error_on_every_rank(world4):
    for rank, res in enumerate(_section(world4, "overflow")):
        assert "dispatch.shm_mib=1" in res["error"], res["error"]
        assert f"{res['rows'] * 4} bytes" in res["error"] and str(res["region"]) in res["error"]
        assert res["elapsed"] < 20, "peers must learn of the abort, not wait for the timeout"
        assert "unusable after an earlier error" in res["after"]


def test_timeout_names_the_peer_that_never_called(world4):
    for res in _section(world4, "timeout")[:3]:
        assert 1.4 < res["elapsed"] < 15, res
        assert "group rank 3" in res["error"] and "parallel.timeout_s=1.5" in res["error"], res


def test_failed_setup_raises_everywhere_and_unlinks(world4):
    for res in _section(world4, "setup_failure"):
        assert "group rank 2's segment has" in res["error"] and "shm_mib" in res["error"], res
        assert res["pending"] == [] and res["leftovers"] == [], res


def test_dedup_dispatchers_train_the_same_over_shm(world4):
    for rank, res in enumerate(_section(world4, "engines")):
        ref = res["dedup/pg"]
        assert ref["calls"] == 0
        for variant in ("dedup/shm", "dedup-hier/shm", "dedup-hier/shm@2nodes"):
            got = res[variant]
            # 2 layers x (dispatch + combine) forward, the same backward: all through shm
            assert got["calls"] >= 8, (variant, got["calls"])
            assert got["local"] == (1 if "2nodes" in variant else 2)
            assert got["loss"] == ref["loss"], variant
            assert got["grads"].keys() == ref["grads"].keys()
            for name, g in ref["grads"].items():
                assert torch.equal(got["grads"][name], g), (rank, variant, name)


# ---- a killed rank ---------------------------------------------------------------------------
def _killed_entry(rank: int, port: int, out: str) -> None:
    """A rank outside tests.dist.spawn (which would tear every rank down when one dies)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from epruntime.transport.shm import ShmTimeoutError, ShmTransport

    dist.init_process_group("gloo")
    t = ShmTransport(dist.group.WORLD, 2, shm_mib=1, timeout_s=60)
    Path(out, "token").write_text(t.token)
    t.all_to_all_single(torch.empty(2), torch.arange(2.0), [1, 1], [1, 1])
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        t.all_to_all_single(torch.empty(2), torch.arange(2.0), [1, 1], [1, 1])
        error = "no error"
    except ShmTimeoutError as err:
        error = str(err)
    Path(out, "rank0.json").write_text(json.dumps({"error": error,
                                                   "elapsed": time.monotonic() - start}))
    os._exit(0)  # skip tearing down a process group whose peer is gone


def test_killed_rank_is_named_and_leaves_no_segment(tmp_path):
    from epruntime.distributed import free_port

    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_killed_entry, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert procs[1].exitcode == -signal.SIGKILL
    assert procs[0].exitcode == 0
    res = json.loads((tmp_path / "rank0.json").read_text())
    assert "group rank 1" in res["error"] and "exited" in res["error"], res
    assert res["elapsed"] < 10, res  # noticed by liveness, not by the 60 s timeout
    token = (tmp_path / "token").read_text()
    assert len(token) == 16 and not _leftovers(token)


def test_config_rejects_shm_with_megatron_alltoall():
    with pytest.raises(ConfigError, match="dispatch.transport=shm needs dispatch.kind"):
        load_config(None, ["dispatch.transport=shm"])
    cfg = load_config(None, ["dispatch.kind=dedup-hier", "dispatch.transport=shm",
                             "dispatch.shm_mib=8"])
    assert cfg.dispatch.transport == "shm" and cfg.dispatch.shm_mib == 8
    with pytest.raises(ConfigError, match="shm_mib"):
        load_config(None, ["dispatch.shm_mib=0"])


# ---- benchmark -----------------------------------------------------------------------------------
def test_alltoall_bench_quick_writes_the_schema(python_env, tmp_path):
    out = tmp_path / "alltoall.json"
    proc = bench("alltoall", "--quick", "--json", str(out), env=python_env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "shm@64KiB/ep2" in proc.stdout
    result = json.loads(out.read_text())
    assert result["name"] == "alltoall" and result["params"]["quick"] is True
    variants = [r["variant"] for r in result["rows"]]
    assert variants == ["gloo@64KiB/ep2", "shm@64KiB/ep2", "gloo@256KiB/ep2", "shm@256KiB/ep2"]
    for row in result["rows"]:
        assert set(row) == {"variant", "transport", "ep", "bytes", "seconds", "gbytes_per_s",
                            "samples"}
        assert row["ep"] == 2 and row["transport"] in ("gloo", "shm")
        assert row["bytes"] == (64 if "64KiB" in row["variant"] else 256) * 1024
        assert 0 < row["seconds"] < 1 and len(row["samples"]) == result["params"]["repeats"]
        assert row["gbytes_per_s"] == pytest.approx(row["bytes"] / row["seconds"] / 1e9)
    assert set(result["ratios"]) == {"shm/gloo_gbytes_per_s@64KiB/ep2",
                                     "shm/gloo_gbytes_per_s@256KiB/ep2"}
    assert all(v > 0 for v in result["ratios"].values())
