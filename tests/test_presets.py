"""Architecture presets (launch/configs/presets/): each is a MoE-VLM config that keeps its family's
routing structure, trains under torchrun with dispatch.kind=dedup and alltoall, and infers from
the dedup checkpoint.

The EP=2 runs are the ones every suite run pays for (20 steps, a small global batch and slices of
easy-vqa): both dispatchers, compared with each other. The EP=4 run (4 CPU ranks on the same
cores) trains and infers the node-limited preset with dedup alone, which is what EP=4 adds
(node-limited routing over four ranks); four ranks' rows and the dispatchers' agreement at EP=4
are test_ep_equivalence's and test_dedup_dispatch's (the other presets at EP=4 repeated them). It
is marked `slow`: deselect it with `-m "not slow"`.
"""

from __future__ import annotations

import json
import math

import pytest

from epruntime.config import load_config
from tests.conftest import ROOT
from tests.launch import check, run, sets, summary, torchrun_cmd
from tests.test_bench import bench

PRESETS = ROOT / "launch" / "configs" / "presets"
# name: (routed experts, top-k) as the family routes.
ROUTING = {"mixtral": (8, 2), "qwen3-vl-moe": (128, 8), "deepseek-v3-lite": (64, 6),
           "deepseek-vl2-tiny": (64, 6)}
STEPS = 20


def test_every_preset_loads_and_is_a_moe_vlm():
    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert set(ROUTING) <= set(names)
    for name in names:
        cfg = load_config(PRESETS / f"{name}.yaml")
        assert cfg.model.num_experts > cfg.model.moe_topk >= 1
        assert cfg.model.num_vision_tokens > 0  # a vision-language model
    for name, (experts, topk) in ROUTING.items():
        m = load_config(PRESETS / f"{name}.yaml").model
        assert (m.num_experts, m.moe_topk) == (experts, topk)


def _train_and_infer(preset: str, kind: str, ep: int, out,
                     infer: bool) -> tuple[dict, dict | None]:
    config = str(PRESETS / f"{preset}.yaml")
    train_dir, infer_dir = out / f"{kind}", out / f"{kind}-infer"
    common = sets(parallel__ep_size=ep, dispatch__kind=kind)
    check(run(torchrun_cmd("epruntime.train", ep, "--config", config, *common, *sets(
        train__output_dir=train_dir, train__max_steps=STEPS, train__checkpoint_interval=STEPS,
        train__progress="false", data__global_batch_size=8, data__max_train_items=512,
        data__max_eval_items=64)), timeout=900))
    if not infer:
        return summary(train_dir), None
    check(run(torchrun_cmd("epruntime.infer", ep, "--checkpoint", str(train_dir), *common,
                           *sets(infer__output_dir=infer_dir)), timeout=900))
    return summary(train_dir), summary(infer_dir)


def _check_preset(preset: str, ep: int, tmp_path, kinds=("dedup", "alltoall")) -> None:
    # Inference from the first dispatcher's checkpoint (the entry point is the same code for
    # either dispatcher, which test_train_e2e runs at every EP size).
    runs = {kind: _train_and_infer(preset, kind, ep, tmp_path, infer=kind == kinds[0])
            for kind in kinds}
    for kind, (trained, inferred) in runs.items():
        assert trained["steps"] == STEPS and trained["ep_size"] == ep
        assert math.isfinite(trained["final_loss"]) and trained["skipped_steps"] == 0
        assert trained["eval_items"] == 64
        if inferred is None:
            continue
        # Inference on the checkpoint reproduces the training run's evaluation.
        assert inferred["ep_size"] == ep and inferred["steps"] == STEPS
        assert inferred["eval_items"] == trained["eval_items"]
        assert inferred["eval_accuracy"] == trained["eval_accuracy"]
        assert inferred["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)
    dedup = runs["dedup"][0]
    # The ledger: dedup sends the floor (one row per token and remote rank).
    assert dedup["comm"]["rows_sent"] == dedup["comm"]["floor_rows"] > 0
    group_topk = load_config(PRESETS / f"{preset}.yaml").model.moe_router_group_topk
    if group_topk is not None:  # node-limited routing: the ledger shows the bound held
        for trained, _ in runs.values():
            assert 1 <= trained["comm"]["max_nodes_per_token"] <= group_topk
    if "alltoall" not in runs:
        return
    a2a = runs["alltoall"][0]
    # The same model, weights and data under both dispatchers: only the order of the combine's
    # sums differs, over 20 optimizer steps.
    assert dedup["final_loss"] == pytest.approx(a2a["final_loss"], rel=1e-3)
    assert dedup["eval_loss"] == pytest.approx(a2a["eval_loss"], rel=1e-3)
    # megatron-core's dispatcher sends one row per remote (token, expert) pair: more than the
    # floor for top-k > 1.
    assert a2a["comm"]["rows_sent"] > a2a["comm"]["floor_rows"]


@pytest.mark.parametrize("preset", sorted(ROUTING))
def test_preset_trains_and_infers_at_ep2(preset, tmp_path):
    _check_preset(preset, 2, tmp_path)


# the presets whose routing EP=4 changes: node-limited, the groups then one per rank
NODE_LIMITED = sorted(name for name in ROUTING
                      if load_config(PRESETS / f"{name}.yaml").model.moe_router_group_topk)


@pytest.mark.slow
@pytest.mark.parametrize("preset", NODE_LIMITED)
def test_preset_trains_and_infers_at_ep4(preset, tmp_path):
    _check_preset(preset, 4, tmp_path, kinds=("dedup",))


def test_bench_dispatch_unknown_preset_exits_2_naming_the_known_ones(python_env):
    proc = bench("dispatch", "--preset", "no-such-model", "--quick", env=python_env, timeout=120)
    assert proc.returncode == 2
    assert "launch/configs/presets/no-such-model.yaml" in proc.stderr
    assert "mixtral" in proc.stderr and "qwen3-vl-moe" in proc.stderr


def test_bench_dispatch_preset_reports_the_dispatch_table(python_env, tmp_path):
    out = tmp_path / "dispatch.json"
    proc = bench("dispatch", "--preset", "mixtral", "--quick", "--json", str(out),
                 env=python_env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["params"]["preset"] == "mixtral"
    assert result["params"]["config"] == "launch/configs/presets/mixtral.yaml"
    by = {row["variant"]: row for row in result["rows"]}
    assert set(by) == {"megatron-alltoall", "dedup", "dedup+traffic"}
    for row in by.values():
        assert row["detail"]["model"] == "preset"
        assert 0 < row["balancedness"] <= 1 and row["tokens_per_s"] > 0
    # Mixtral's top-2: megatron-core sends a row per remote (token, expert), dedup the floor.
    a2a, dedup = by["megatron-alltoall"], by["dedup"]
    assert dedup["rows_sent"] == dedup["floor_rows"] == a2a["floor_rows"] < a2a["rows_sent"]
    assert dedup["cross_rank_bytes"] < a2a["cross_rank_bytes"]
    assert result["ratios"]["dedup/megatron-alltoall_rows_sent"] == pytest.approx(
        dedup["rows_sent"] / a2a["rows_sent"])
