"""megatron-core's DistributedDataParallel and optimizer (train.optimizer=megatron) against the
hand-written flat all-reduce, float64 clipping loop and torch AdamW it replaced
(train.optimizer=epruntime): real gloo ranks, the same weights and batches, clipping active.

World 4 at EP=2 has an expert-data-parallel group of 2, so both reductions (dense over DP=4,
experts over expert-DP=2) and the EP-summed norm are exercised."""

from __future__ import annotations

import pytest
import torch

from tests import configs
from tests.dist import spawn

STEPS = 3
CLIP = 0.05  # far below the gradient norms of this model: every step is clipped


def _worker(rank: int, world: int, ep: int, extra: tuple[str, ...], out: str) -> None:
    from epruntime import distributed
    from epruntime.data import SyntheticVQA, shard_slice
    from epruntime.engine import Engine

    base = [f"parallel.ep_size={ep}", f"train.grad_clip={CLIP}", "train.warmup_steps=1",
            "train.weight_decay=0.1"]
    cfgs = {"epruntime": configs.small_config(*base, "train.optimizer=epruntime"),
            "megatron": configs.small_config(*base, "train.optimizer=megatron", *extra)}
    env = distributed.init_distributed(cfgs["megatron"])
    ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
    report = {}
    for variant, cfg in cfgs.items():
        engine = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len)
        steps = []
        for step in range(STEPS):
            idx = torch.arange(step * 8, step * 8 + 8)[shard_slice(8, env.dp_rank, env.dp_size)]
            r = engine.train_step(ds.batch(idx), step)
            steps.append((r.loss, r.grad_norm))
        params = {n: p.detach().clone()
                  for n, p in engine.model.global_named_parameters(env.ep_rank)}
        state = {n: {k: v.clone() for k, v in engine.optimizer_state[p].items()}
                 for n, p in engine.model.global_named_parameters(env.ep_rank)}
        report[variant] = {"steps": steps, "params": params, "state": state}
    report["megatron_is_megatron"] = type(engine.optimizer).__module__.startswith("megatron.core")
    from epruntime.optim import inner_optimizers

    report["fused"] = [g["fused"] for o in inner_optimizers(engine.optimizer)
                       for g in o.param_groups]
    torch.save(report, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("world,ep,extra", [
    (4, 2, ()),
    (2, 2, ("train.overlap_grad_reduce=true", "train.ddp_bucket_size=1000")),
], ids=["world4-ep2", "world2-ep2-overlap-buckets"])
def test_megatron_ddp_and_optimizer_match_the_hand_written_path(tmp_path, world, ep, extra):
    spawn(_worker, world, world, ep, extra, str(tmp_path))
    for rank in range(world):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["megatron_is_megatron"]
        assert r["fused"] and all(r["fused"])  # torch's fused CPU AdamW (optim.fuse_on_cpu)
        flat, mcore = r["epruntime"], r["megatron"]
        for (loss_a, norm_a), (loss_b, norm_b) in zip(flat["steps"], mcore["steps"]):
            assert loss_b == pytest.approx(loss_a, rel=1e-5)
            assert norm_b == pytest.approx(norm_a, rel=1e-5)  # megatron's fp32 vs fp64
            assert norm_a > 10 * CLIP  # the clip was active
        assert flat["params"].keys() == mcore["params"].keys()
        for name in flat["params"]:
            torch.testing.assert_close(mcore["params"][name], flat["params"][name],
                                       rtol=1e-4, atol=1e-6, msg=name)
            assert mcore["state"][name].keys() == {"step", "exp_avg", "exp_avg_sq"}, name
            for k in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(mcore["state"][name][k], flat["state"][name][k],
                                           rtol=1e-4, atol=1e-9, msg=f"{name} {k}")


def _one_rank_groups_worker(rank: int, out: str) -> None:
    """World 2 at EP=2: the expert buffer's data-parallel group and the dense optimizer's
    grad-stats (model-parallel) group have one rank each, so the CPU shortcuts (no bucket
    all-reduce, no norm all-reduce over them; the in-place clip) apply. Trains without them
    (megatron-core's collectives and clip), then with them, from the same seed and batches."""
    import contextlib

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup

    from epruntime import compat, distributed
    from epruntime.data import SyntheticVQA, shard_slice
    from epruntime.engine import Engine

    cfg = configs.small_config("parallel.ep_size=2", f"train.grad_clip={CLIP}",
                               "train.warmup_steps=1", "train.weight_decay=0.1")
    env = distributed.init_distributed(cfg)
    ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
    shortcut = _ParamAndGradBucketGroup.start_grad_sync
    report = {"group_sizes": [dist.get_world_size(ps.get_expert_data_parallel_group()),
                              dist.get_world_size(ps.get_model_parallel_group())]}
    for variant in ("megatron-core", "shortcut"):
        with (compat.without_shortcuts() if variant == "megatron-core"
              else contextlib.nullcontext()):
            report[f"{variant}_sync_is_megatron_cores"] = (
                _ParamAndGradBucketGroup.start_grad_sync is shortcut.__wrapped__)
            engine = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len)
            steps = []
            for step in range(STEPS):
                idx = torch.arange(step * 8, step * 8 + 8)[shard_slice(8, env.dp_rank,
                                                                       env.dp_size)]
                r = engine.train_step(ds.batch(idx), step)
                steps.append((r.loss, r.grad_norm))
        report[variant] = {
            "steps": steps,
            "params": {n: p.detach().clone()
                       for n, p in engine.model.global_named_parameters(env.ep_rank)},
            "expert_groups": [dist.get_world_size(g.data_parallel_group)
                              for g in engine.gradients.ddp.expert_parallel_bucket_groups]}
    torch.save(report, f"{out}/rank{rank}.pt")


def test_one_rank_group_shortcuts_leave_every_bit_as_megatron_core(tmp_path):
    """The CPU shortcuts of the megatron path (compat adapters ddp-one-rank-sync, grad-norm and
    grad-clip) skip collectives over one-rank groups and the clip's temporaries: losses, norms
    and parameters are bit-identical to megatron-core's own collectives and clip
    (compat.without_shortcuts) after clipped steps."""
    spawn(_one_rank_groups_worker, 2, str(tmp_path))
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["group_sizes"] == [1, 1]
        assert r["megatron-core_sync_is_megatron_cores"]
        assert not r["shortcut_sync_is_megatron_cores"]
        assert r["shortcut"]["expert_groups"] == [1]  # the expert buffer takes the shortcut
        before, after = r["megatron-core"], r["shortcut"]
        assert after["steps"] == before["steps"]
        assert all(norm > 10 * CLIP for _, norm in after["steps"])  # the clip was active
        assert before["params"].keys() == after["params"].keys()
        for name, value in before["params"].items():
            assert torch.equal(after["params"][name], value), name


def test_cpu_clip_scales_as_megatron_cores_local_multi_tensor_scale():
    """The grad-clip adapter multiplies in place; megatron-core's local path writes
    `g * coeff` back: the same products, bit for bit."""
    from megatron.core.utils import local_multi_tensor_applier, local_multi_tensor_scale

    from epruntime.compat import cpu_ops

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen))
              for shape in ((7, 5), (3,), (64, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 10
    total_norm = float(torch.stack([p.grad.norm() for p in params]).norm())
    unclipped = [p.grad.clone() for p in params]
    expected = [p.grad.clone() for p in params]
    local_multi_tensor_applier(local_multi_tensor_scale, None, [expected, expected],
                               CLIP / (total_norm + 1e-6))

    def cuda_path(*args):
        raise AssertionError("CPU gradients took megatron-core's CUDA path")

    cpu_ops.clip_grad_by_total_norm(cuda_path)(params, CLIP, total_norm)
    for p, e, u in zip(params, expected, unclipped):
        assert torch.equal(p.grad, e)
        assert not torch.equal(p.grad, u)  # the clip was active


def _no_decay_worker(rank: int, out: str) -> None:
    """megatron-core's optimizer groups: 1-D parameters and biases get no weight decay, the
    rest train.weight_decay, dense and expert parameters in separate chained optimizers."""
    from epruntime import distributed
    from epruntime.data import SyntheticVQA
    from epruntime.engine import Engine

    cfg = configs.small_config("parallel.ep_size=2", "train.weight_decay=0.1")
    env = distributed.init_distributed(cfg)
    ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
    engine = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len)
    engine.train_step(ds.batch(torch.arange(4 * rank, 4 * rank + 4)), 0)
    decay = {}
    for opt in engine.optimizer.chained_optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                decay[id(p)] = (group["weight_decay"], group["is_expert_parallel"])
    rows = [(n, p.dim(), *decay[id(p)]) for n, p in engine.model.named_parameters()]
    torch.save(rows, f"{out}/rank{rank}.pt")


def test_weight_decay_groups_and_expert_optimizer(tmp_path):
    spawn(_no_decay_worker, 2, str(tmp_path))
    rows = torch.load(tmp_path / "rank0.pt")
    for name, dim, wd, is_expert in rows:
        assert wd == (0.0 if dim == 1 or name.endswith(".bias") else 0.1), name
        assert is_expert == (".local_experts." in name), name


def test_optimizer_step_benchmark_quick_writes_the_schema(python_env, tmp_path):
    """`profiling/bench.py optimizer_step --quick`: both paths timed side by side, and they
    train to the same loss."""
    import json
    import subprocess

    from tests.conftest import ROOT, python_bin

    out = tmp_path / "optimizer_step.json"
    proc = subprocess.run([python_bin(), str(ROOT / "profiling" / "bench.py"), "optimizer_step",
                           "--quick", "--json", str(out)], cwd=ROOT, env=python_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    before, after, no_shortcuts = result["rows"]
    assert (before["variant"], after["variant"]) == ("epruntime (before)", "megatron (after)")
    assert no_shortcuts["variant"] == "megatron without CPU shortcuts"
    assert after["final_loss"] == pytest.approx(before["final_loss"], rel=1e-5)
    assert no_shortcuts["final_loss"] == after["final_loss"]  # the shortcuts change no bit
    for row in result["rows"]:
        assert row["steps"] == len(row["samples"]) > 0
        assert 0 < row["grad_path_s"] < row["step_time_s"]
    assert result["ratios"]["after/before_step_time"] > 0
    assert result["ratios"]["shortcuts/no_shortcuts_grad_path"] > 0


@pytest.mark.parametrize("overrides,named", [
    (("train.optimizer=epruntime", "train.overlap_grad_reduce=true"), "train.optimizer=megatron"),
    (("train.ddp_bucket_size=1000",), "train.overlap_grad_reduce=true"),
    (("train.optimizer=adam",), "train.optimizer"),
    (("train.overlap_grad_reduce=true", "train.ddp_bucket_size=0"), "ddp_bucket_size"),
])
def test_ddp_options_that_cannot_apply_are_named_config_errors(overrides, named):
    from epruntime.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match=named.replace(".", r"\.")):
        configs.small_config(*overrides)
    configs.small_config("train.overlap_grad_reduce=true", "train.ddp_bucket_size=1000")


def test_fused_cpu_adamw_makes_the_same_update():
    """optim.fuse_on_cpu switches a CPU AdamW to torch's fused kernel: the same parameters and
    moments as the per-tensor loop after a few steps (to fp32 rounding), other optimizers
    untouched."""
    from epruntime.optim import fuse_on_cpu

    torch.manual_seed(0)
    params = [torch.randn(7, 5), torch.randn(5), torch.randn(3, 3, 2)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    runs = {}
    for fused in (False, True):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = torch.optim.AdamW([{"params": ps[:2], "weight_decay": 0.1},
                                 {"params": ps[2:], "weight_decay": 0.0}], lr=1e-2)
        if fused:
            fuse_on_cpu(opt)
            assert [g["fused"] for g in opt.param_groups] == [True, True]
        for step in grads:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        runs[fused] = (ps, [opt.state[p] for p in ps])
    for a, b in zip(runs[False][0], runs[True][0]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for sa, sb in zip(runs[False][1], runs[True][1]):
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-6, atol=1e-9)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    fuse_on_cpu(sgd)
    assert "fused" not in sgd.param_groups[0] or not sgd.param_groups[0]["fused"]
