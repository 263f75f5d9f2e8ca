"""Replicated experts in the runtime (issue 15 item 1), on real gloo ranks and megatron-core.

A placement file may hold several copies of a logical expert; the dedup dispatchers send each
(token, expert) pair to one copy, copies' gradients are summed before the optimizer step. What
must hold: the replicated model's loss, gradients and gradient norm equal the unreplicated
model's (EP=2, EP=4; dedup and dedup-hier; both transports), copies stay bit-identical in
parameters and AdamW state after training steps (both optimizer paths), a checkpoint loads at
another EP size and another placement with the same eval accuracy, EP larger than the number of
experts runs, megatron-core's dispatcher refuses copies by name, and migration that adds and
drops copies keeps the loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import configs
from tests.dist import spawn

GB = configs.GLOBAL_BATCH
STEPS = 3  # training steps before the copies are compared

# 8 experts; EP=2: 5 slots per rank, experts 0 and 5 copied; EP=4: 3 slots per rank, experts
# 0, 1, 2 and 6 copied (a copy on the token's own rank, and across the two "nodes" of 2 ranks).
REPLICAS = {
    2: [[0, 1, 2, 3, 5], [4, 5, 6, 7, 0]],
    4: [[0, 1, 6], [2, 3, 0], [4, 5, 1], [6, 7, 2]],
}
COPIED = {2: 2, 4: 4}
# EP=2 after migration: copies of 0 and 5 dropped, copies of 6 and 1 added.
MIGRATED = [[0, 1, 2, 3, 6], [4, 5, 6, 7, 1]]


def _write_placements(path: Path, per_rank: list[list[int]], layers: int = 2,
                      ranks_per_node: int | None = None, local_share: float | None = None) -> str:
    from epruntime.placement import Placement
    from epruntime.placement.file import save_placements

    p = Placement.from_rank_lists(per_rank, ranks_per_node).with_local_share(local_share)
    save_placements(path, [p] * layers, None, "test copies")
    return str(path)


def _cfg(*overrides: str):
    return configs.small_config("model.moe_aux_loss_coeff=0.01", *overrides)


def _engine(cfg, env):
    from epruntime.data import SyntheticVQA
    from epruntime.engine import Engine

    ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
    return Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len), ds


def _batch(ds, env, step: int = 0):
    from epruntime.data import shard_slice

    idx = torch.arange(GB * step, GB * (step + 1)) % len(ds)
    return ds.batch(idx[shard_slice(GB, env.dp_rank, env.dp_size)])


def _copy_state(engine) -> dict:
    """Global name -> [(param, exp_avg, exp_avg_sq)] of every copy this rank holds."""
    out: dict = {}
    for name, p in engine.model.global_named_parameters(engine.env.ep_rank):
        if "local_experts" not in name:
            continue
        state = engine.optimizer_state.get(p, {})
        out.setdefault(name, []).append(
            [p.detach().clone()] + [state[k].clone() for k in ("exp_avg", "exp_avg_sq")])
    return out


def _probe(engine, ds, env, train_steps: int = 0) -> dict:
    """Loss, gradients (global names, after the copies' reduction) and gradient norm of one
    global batch; then `train_steps` optimizer steps and every copy's parameters and state."""
    loss = engine.forward_backward(_batch(ds, env), GB)
    grads: dict = {}
    for name, p in engine.model.global_named_parameters(env.ep_rank):
        grads.setdefault(name, []).append(p.grad.detach().clone())
    out = {"loss": loss, "grads": grads, "norm": engine.gradients.grad_norm(),
           "slots": engine.model.placements[0].num_local}
    if train_steps:
        out["step_losses"] = [engine.train_step(_batch(ds, env, s), s).loss
                              for s in range(train_steps)]
        out["copies"] = _copy_state(engine)
    return out


def _variants_worker(rank: int, ep: int, variants: dict, out: str) -> None:
    """Every variant (name -> (config overrides, train steps)) on the same ranks, in turn."""
    from megatron.core import parallel_state as ps

    from epruntime import distributed

    results, env_ep = {}, None
    for name, (overrides, steps) in variants.items():
        cfg = _cfg(*overrides)
        if env_ep != cfg.parallel.ep_size:
            if env_ep is not None:
                ps.destroy_model_parallel()
            env = distributed.init_distributed(cfg)
            env_ep = cfg.parallel.ep_size
        engine, ds = _engine(cfg, env)
        results[name] = _probe(engine, ds, env, steps)
        if engine.transport is not None and hasattr(engine.transport, "close"):
            engine.transport.close()
    torch.save(results, f"{out}/rank{rank}.pt")


def _merge(reports: list[dict], variant: str) -> tuple[float, dict, float]:
    """(loss, gradient per global name, norm) of one variant over all ranks; every holder of a
    name (dense parameters, copies of an expert) has the same reduced gradient, bit for bit."""
    losses, norms, merged = set(), set(), {}
    for r in reports:
        v = r[variant]
        losses.add(v["loss"])
        norms.add(v["norm"])
        for name, gs in v["grads"].items():
            for g in gs:
                if name in merged:
                    torch.testing.assert_close(g, merged[name], rtol=0, atol=0,
                                               msg=f"{variant}: {name} differs between holders")
                merged[name] = g
    assert len(losses) == 1 and len(norms) == 1, (variant, losses, norms)
    return losses.pop(), merged, norms.pop()


def _assert_equal(ref, other, what: str) -> None:
    (ref_loss, ref_g, ref_norm), (loss, grads, norm) = ref, other
    assert loss == pytest.approx(ref_loss, rel=1e-5), what
    assert norm == pytest.approx(ref_norm, rel=1e-5), what
    assert grads.keys() == ref_g.keys(), what
    for name in ref_g:
        torch.testing.assert_close(grads[name], ref_g[name], rtol=1e-5, atol=1e-7,
                                   msg=f"{what}: {name}")


def _assert_copies_identical(reports: list[dict], variant: str) -> int:
    """Every copy of every expert holds the same parameters and AdamW moments after the steps,
    bit for bit; returns how many experts have more than one copy."""
    held: dict = {}
    for r in reports:
        for name, copies in r[variant]["copies"].items():
            held.setdefault(name, []).extend(copies)
    replicated = 0
    for name, copies in held.items():
        if len(copies) > 1:
            replicated += 1
        for c in copies[1:]:
            for a, b, what in zip(copies[0], c, ("param", "exp_avg", "exp_avg_sq")):
                assert torch.equal(a, b), f"{variant}: {name} {what} differs between copies"
    return replicated


def _run(tmp_path: Path, world: int, ep: int, variants: dict) -> list[dict]:
    out = tmp_path / f"ep{ep}"
    out.mkdir(exist_ok=True)
    spawn(_variants_worker, world, ep, variants, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("ep", [2, 4])
def test_replicated_model_equals_unreplicated(tmp_path, ep):
    """Loss, every gradient and the gradient norm of a model with copies equal the model
    without copies (rtol 1e-5) under dedup and dedup-hier over both transports; copies end
    bit-identical after training steps with megatron-core's optimizer and the flat one."""
    rpn = ep // 2  # dedup-hier: two "nodes", so node dedup has a hop to make
    plain = [f"parallel.ep_size={ep}", "dispatch.kind=dedup"]
    flat = _write_placements(tmp_path / "copies.json", REPLICAS[ep])
    hier = _write_placements(tmp_path / "copies_hier.json", REPLICAS[ep], ranks_per_node=rpn)
    rep = [f"parallel.ep_size={ep}", f"dispatch.placement=file:{flat}"]
    rep_hier = [f"parallel.ep_size={ep}", f"dispatch.placement=file:{hier}",
                "dispatch.kind=dedup-hier", f"dispatch.ranks_per_node={rpn}"]
    variants = {
        "ref": (plain, 0),
        "dedup": ([*rep, "dispatch.kind=dedup"], STEPS),
        "dedup-shm": ([*rep, "dispatch.kind=dedup", "dispatch.transport=shm"], 0),
        "hier": (rep_hier, STEPS),
        "hier-shm": ([*rep_hier, "dispatch.transport=shm"], 0),
    }
    if ep == 2:
        variants["dedup-flat"] = ([*rep, "dispatch.kind=dedup", "train.optimizer=epruntime"],
                                  STEPS)
        # the planner's balancing copy choice (a local share) and local-first overlap, each
        # through the same runtime
        shared = _write_placements(tmp_path / "copies_share.json", REPLICAS[ep], local_share=0.5)
        variants["dedup-share"] = ([f"parallel.ep_size={ep}", f"dispatch.placement=file:{shared}",
                                    "dispatch.kind=dedup"], STEPS)
        variants["dedup-overlap"] = ([*rep, "dispatch.kind=dedup", "dispatch.overlap=true"], 0)
    else:  # 4 ranks on 2 shared cores: shm once (under dedup-hier) is enough here
        del variants["dedup-shm"]
    reports = _run(tmp_path, ep, ep, variants)
    ref = _merge(reports, "ref")
    assert reports[0]["ref"]["slots"] == 8 // ep
    for name in variants:
        if name == "ref":
            continue
        assert reports[0][name]["slots"] == len(REPLICAS[ep][0]), name
        _assert_equal(ref, _merge(reports, name), f"{name} at EP={ep}")
        if variants[name][1]:  # copied experts x 2 layers x 2 weights (fc1, fc2)
            assert _assert_copies_identical(reports, name) == COPIED[ep] * 2 * 2, name


def test_ep_larger_than_experts(tmp_path):
    """2 experts (top-1) on EP=4, every expert on two ranks (one slot
    per rank): runs, and equals the same model at EP=2 without copies."""
    small = ["model.num_experts=2", "model.moe_topk=1", "model.moe_router_pre_softmax=true"]
    path = _write_placements(tmp_path / "ep4.json", [[0], [1], [1], [0]])
    variants = {
        "ref": ([*small, "parallel.ep_size=2", "dispatch.kind=dedup"], 0),
        "ep4": ([*small, "parallel.ep_size=4", "dispatch.kind=dedup",
                 f"dispatch.placement=file:{path}"], STEPS),
    }
    reports = _run(tmp_path, 4, 4, variants)
    assert reports[0]["ep4"]["slots"] == 1
    _assert_equal(_merge(reports, "ref"), _merge(reports, "ep4"), "EP=4 > 2 experts")
    assert _assert_copies_identical(reports, "ep4") == 2 * 2 * 2  # 2 experts x 2 layers x 2


# ---- checkpoints, migration, refusals ---------------------------------------------------------
def _ckpt_cfg(ep: int, out: str, *extra: str):
    return _cfg(f"parallel.ep_size={ep}", "dispatch.kind=dedup", f"train.output_dir={out}",
                *extra)


def _ckpt_worker(rank: int, out: str, files: dict) -> None:
    """Train with copies at EP=2, checkpoint, evaluate; load at EP=4 with other copies and at
    EP=2 without copies (contiguous); evaluate each."""
    from megatron.core import parallel_state as ps

    from epruntime import checkpoint, distributed

    results = {}
    cfg = _ckpt_cfg(2, f"{out}/run", f"dispatch.placement=file:{files['ep2']}")
    env = distributed.init_distributed(cfg)
    engine, ds = _engine(cfg, env)
    for s in range(STEPS):
        engine.train_step(_batch(ds, env, s), s)
    path = checkpoint.save_checkpoint(engine, STEPS, {})
    results["saved"] = engine.evaluate(ds)
    for name, ep, extra in (("ep4_copies", 4, [f"dispatch.placement=file:{files['ep4']}"]),
                            ("ep2_plain", 2, [])):
        ps.destroy_model_parallel()
        cfg_ep = _ckpt_cfg(ep, f"{out}/run_{name}", *extra)
        env_ep = distributed.init_distributed(cfg_ep)
        other, _ = _engine(cfg_ep, env_ep)
        checkpoint.load_checkpoint(other, Path(path), restore_training_state=False)
        results[name] = other.evaluate(ds)
        results[name + "_slots"] = other.model.placements[0].num_local
    torch.save({k: v if isinstance(v, int) else {"acc": v["eval_accuracy"],
                                                 "loss": v["eval_loss"]}
                for k, v in results.items()}, f"{out}/rank{rank}.pt")


def test_checkpoint_loads_at_another_ep_and_placement(tmp_path):
    files = {"ep2": _write_placements(tmp_path / "ep2.json", REPLICAS[2]),
             "ep4": _write_placements(tmp_path / "ep4.json", REPLICAS[4])}
    spawn(_ckpt_worker, 4, str(tmp_path), files)
    r = torch.load(tmp_path / "rank0.pt")
    assert r["ep4_copies_slots"] == 3 and r["ep2_plain_slots"] == 4
    for name in ("ep4_copies", "ep2_plain"):
        assert r[name]["acc"] == r["saved"]["acc"], name
        assert r[name]["loss"] == pytest.approx(r["saved"]["loss"], rel=1e-5), name


def _migrate_worker(rank: int, out: str, path: str) -> None:
    """Train with copies, migrate to a placement that drops two copies and adds two others,
    compare the loss of one batch before and after, train on and compare the copies."""
    from epruntime import distributed
    from epruntime.placement import Placement
    from epruntime.placement.controller import place

    cfg = _cfg("parallel.ep_size=2", "dispatch.kind=dedup", f"dispatch.placement=file:{path}")
    env = distributed.init_distributed(cfg)
    engine, ds = _engine(cfg, env)
    for s in range(2):
        engine.train_step(_batch(ds, env, s), s)
    probe = _batch(ds, env, 5)

    def loss() -> float:
        with torch.no_grad():
            return engine.local_loss(probe, GB)[0].item()

    before = loss()
    report = place(engine, [Placement.from_rank_lists(MIGRATED)] * 2)
    after = loss()
    engine.train_step(_batch(ds, env, 2), 2)
    torch.save({"before": before, "after": after, "report": report,
                "copies": _copy_state(engine),
                "placement": engine.model.placements[0].experts_per_rank()},
               f"{out}/rank{rank}.pt")


def test_migration_adds_and_drops_copies(tmp_path):
    path = _write_placements(tmp_path / "copies.json", REPLICAS[2])
    spawn(_migrate_worker, 2, str(tmp_path), path)
    reports = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in reports:
        assert r["placement"] == MIGRATED
        assert r["before"] == pytest.approx(r["after"], rel=1e-5)
        # per layer two new copies arrive (6 on rank 0, 1 on rank 1), each a whole expert
        assert r["report"]["experts_moved"] == 2 * 2 and r["report"]["all_verified"]
        assert r["report"]["tensors_received"] > 0
    assert _assert_copies_identical([{"m": r} for r in reports], "m") == 2 * 2 * 2


def _refusal_worker(rank: int, out: str, path: str) -> None:
    from epruntime import distributed
    from epruntime.dispatch.megatron import LedgeredAlltoAllDispatcher
    from epruntime.engine import Engine
    from epruntime.data import SyntheticVQA
    from epruntime.placement import Placement, PlacementError

    messages = {}
    cfg = _cfg("parallel.ep_size=2", "dispatch.kind=dedup", f"dispatch.placement=file:{path}")
    env = distributed.init_distributed(cfg)
    ds = SyntheticVQA(16, image_size=16, question_len=6, seed=3)
    try:  # megatron-core's dispatcher handed a replicated placement at build
        Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len,
               dispatcher_cls=LedgeredAlltoAllDispatcher)
    except PlacementError as err:
        messages["build"] = f"{type(err).__name__}: {err}"
    plain = _cfg("parallel.ep_size=2", "dispatch.kind=alltoall")
    engine, _ = _engine(plain, env)
    try:  # ... or later, by set_placements
        engine.model.set_placements([Placement.from_rank_lists(REPLICAS[2])] * 2)
    except PlacementError as err:
        messages["set"] = f"{type(err).__name__}: {err}"
    torch.save(messages, f"{out}/rank{rank}.pt")


def test_megatron_dispatcher_refuses_copies(tmp_path):
    from epruntime.config import ConfigError, load_config

    path = _write_placements(tmp_path / "copies.json", REPLICAS[2])
    with pytest.raises(ConfigError, match="dispatch.kind=dedup or dedup-hier"):
        load_config(None, [*configs.SMALL, "parallel.ep_size=2", "dispatch.kind=alltoall",
                           f"dispatch.placement=file:{path}"])
    spawn(_refusal_worker, 2, str(tmp_path), path)
    m = torch.load(tmp_path / "rank0.pt")
    assert m["build"].startswith("ReplicatedPlacementError") and "megatron-core" in m["build"] \
        and "LedgeredAlltoAllDispatcher" in m["build"], m
    assert "cannot route copies" in m["set"] and "dedup-hier" in m["set"], m


def test_route_to_copies_prefers_the_local_copy():
    """Pure: a pair goes to the copy on the token's rank; elsewhere, copies are spread by token;
    weights follow the pair to its copy."""
    from epruntime.dispatch.copies import route_to_copies
    from epruntime.placement import Placement

    p = Placement.from_rank_lists(REPLICAS[2])  # expert 0 at slots 0 and 9, 5 at 4 and 6
    rm = torch.zeros(4, 8, dtype=torch.bool)
    rm[:, 0] = rm[:, 5] = rm[:, 7] = True
    probs = torch.rand(4, 8) * rm
    for src, want in ((0, {0, 4, 8}), (1, {9, 6, 8})):
        m, pr, view = route_to_copies(rm, probs, p, src, 3)
        assert view.num_physical == 10 and not view.is_replicated
        for t in range(4):
            assert set(m[t].nonzero().flatten().tolist()) == want
            assert torch.equal(pr[t][m[t]].sort().values, probs[t][rm[t]].sort().values)
    plain = Placement.contiguous(8, 2)
    assert route_to_copies(rm, probs, plain, 0, 3)[0] is rm


@pytest.mark.parametrize("local_share", [None, 0.6])
def test_route_to_copies_on_topk_equals_every_column(local_share):
    """The copy choice on each token's K routed experts gives what it gives on all E columns
    (the wide form it replaced), under both copy rules, with dropped pairs (rows under K)."""
    from epruntime.dispatch.copies import route_to_copies
    from epruntime.placement import Placement

    p = Placement.from_rank_lists(REPLICAS[2]).with_local_share(local_share)
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(64, 8, generator=gen)
    rm = torch.zeros(64, 8, dtype=torch.bool).scatter_(1, scores.topk(3, dim=1).indices, True)
    rm[::5, :] &= torch.rand(13, 8, generator=gen) < 0.6  # a capacity drop: fewer than K
    probs = torch.rand(64, 8, generator=gen) * rm
    for src in (0, 1):
        narrow = route_to_copies(rm, probs, p, src, 3)
        wide = route_to_copies(rm, probs, p, src, 8)
        assert torch.equal(narrow[0], wide[0]) and torch.equal(narrow[1], wide[1])
        assert int(narrow[0].sum()) == int(rm.sum())  # every pair to exactly one copy


def test_group_limited_routing_refuses_copies():
    """Copies are chosen pair by pair, so group-limited routing's bound on the ranks or nodes a
    token reaches would not hold: a replicated placement is refused, naming the option."""
    from epruntime.placement import Placement
    from epruntime.placement.groups import group_violation

    copies = Placement.from_rank_lists(REPLICAS[2])
    message = group_violation(copies, 2)
    assert message is not None and "model.moe_router_num_groups=2" in message
    assert "copies" in message
    assert group_violation(Placement.contiguous(8, 2), 2) is None
