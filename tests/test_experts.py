"""model.expert_compute=grouped (epruntime.model.experts) against megatron-core's SequentialMLP
loop: the same loss and gradients, bit for bit, through the real engine at EP=2, and the loop
itself wherever the grouped path does not apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from epruntime.model.experts import grouped_linear
from tests import configs
from tests.dist import spawn

GLOBAL_BATCH = configs.GLOBAL_BATCH


def test_grouped_linear_equals_per_expert_linear_with_empty_experts_and_expanded_grads():
    torch.manual_seed(0)
    counts = [3, 0, 5, 1, 0, 7]
    x = torch.randn(sum(counts), 8, requires_grad=True)
    w = torch.randn(len(counts), 12, 8, requires_grad=True)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    got = grouped_linear(x, w, offsets)
    want = torch.cat([F.linear(xe, w[e]) for e, xe in enumerate(torch.split(x, counts))])
    assert torch.equal(got, want)
    # The gradient of a sum is expanded (stride 0), which the grouped kernel's backward refuses.
    g_got = torch.autograd.grad(got.sum(), (x, w))
    g_want = torch.autograd.grad(want.sum(), (x, w))
    for a, b in zip(g_got, g_want):
        assert torch.equal(a, b)


def _engine_worker(rank: int, out: str, ffn: int) -> None:
    from epruntime import distributed
    from epruntime.data import SyntheticVQA, shard_slice
    from epruntime.engine import Engine
    from epruntime.model.experts import GroupedLocalExperts

    results = {}
    env = None
    for compute in ("loop", "grouped"):
        cfg = configs.small_config("parallel.ep_size=2", f"model.moe_ffn_hidden_size={ffn}",
                                   f"model.expert_compute={compute}")
        env = env or distributed.init_distributed(cfg)
        ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
        engine = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len)
        experts = [m for m in engine.model.modules() if hasattr(m, "local_experts")]
        assert len(experts) == cfg.model.num_layers
        grouped = [isinstance(m, GroupedLocalExperts) for m in experts]
        assert all(grouped) == (compute == "grouped"), grouped
        local = torch.arange(GLOBAL_BATCH)[shard_slice(GLOBAL_BATCH, env.dp_rank, env.dp_size)]
        loss = engine.forward_backward(ds.batch(local), GLOBAL_BATCH)
        results[compute] = {
            "loss": loss,
            "refusal": [getattr(m, "refusal", "loop") for m in experts],
            "grads": {n: p.grad.clone()
                      for n, p in engine.model.global_named_parameters(env.ep_rank)},
        }
    torch.save(results, f"{out}/rank{rank}.pt")
    distributed.shutdown()


@pytest.mark.parametrize("ffn, grouped_runs", [(16, True), (10, False)])
def test_grouped_experts_match_the_loop_bit_for_bit_at_ep2(tmp_path, ffn, grouped_runs):
    """ffn 16: the grouped GEMMs run (64-byte rows); ffn 10 (40-byte rows, not a multiple of the
    kernel's 16 bytes): the grouped module says why and runs megatron-core's loop."""
    spawn(_engine_worker, 2, str(tmp_path), ffn)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        loop, grouped = r["loop"], r["grouped"]
        refusals = grouped["refusal"]
        if grouped_runs:
            assert refusals == [None, None]
        else:
            assert all("not multiples of 16 bytes" in str(s) for s in refusals), refusals
        assert grouped["loss"] == loop["loss"]
        assert grouped["grads"].keys() == loop["grads"].keys()
        expert_grads = [n for n in loop["grads"] if "local_experts" in n]
        assert expert_grads
        for name, g in loop["grads"].items():
            assert torch.equal(grouped["grads"][name], g), name


def test_expert_compute_benchmark_quick_writes_the_schema(python_env, tmp_path):
    """`profiling/bench.py expert_compute --quick`: both paths timed side by side in one world,
    training on the same losses."""
    import json
    import subprocess

    from tests.conftest import ROOT, python_bin

    out = tmp_path / "expert_compute.json"
    proc = subprocess.run([python_bin(), str(ROOT / "profiling" / "bench.py"), "expert_compute",
                           "--quick", "--json", str(out)], cwd=ROOT, env=python_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    loop, grouped = result["rows"]
    assert (loop["variant"], grouped["variant"]) == ("loop", "grouped")
    assert grouped["final_loss"] == loop["final_loss"]
    assert result["ratios"]["losses_identical"] == 1.0
    for row in result["rows"]:
        assert row["steps"] == len(row["samples"]) > 0
        assert 0 < row["expert_forward_s"] < row["step_time_s"]
    assert result["ratios"]["grouped/loop_step_time"] > 0
