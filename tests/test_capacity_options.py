"""megatron-core's capacity, shared-expert and dense-layer options under every dispatcher.

For each option set, the same weights and global batch through megatron-core's own alltoall
dispatcher (ledger-wrapped) and epruntime's dedup and dedup-hier dispatchers give the same loss,
logits and gradients (rtol 1e-4), at EP=2 and EP=4 on real gloo ranks: one spawn per EP size
runs every option set and dispatcher. With expert capacity, the (token, expert) pairs dropped
are megatron-core's own (recomputed from the router's logits with megatron-core's
`apply_router_token_dropping`) and the ledger, and so summary.json's `comm`, counts them.

A model with a dense first layer (`moe_layer_freq`) trains, checkpoints and resumes at EP=2.
Bad combinations are named config errors before any process group exists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from epruntime.config import ConfigError
from tests import configs
from tests.dist import spawn
from tests.launch import run

GB = configs.GLOBAL_BATCH
KINDS = ("alltoall", "dedup", "dedup-hier")
CAP = "model.moe_expert_capacity_factor"
OPTION_SETS = {
    "capacity_probs": [f"{CAP}=1.0"],
    "capacity_position_pad": [f"{CAP}=1.0", "model.moe_token_drop_policy=position",
                              "model.moe_pad_expert_input_to_capacity=true"],
    "capacity_probs_pad": [f"{CAP}=0.5", "model.moe_pad_expert_input_to_capacity=true"],
    "shared_expert": ["model.moe_shared_expert_intermediate_size=24"],
    "dense_first_layer": ["model.num_layers=3", "model.moe_layer_freq=[0,1,1]"],
    # SMoES attention-accumulated scores advance through the dense layer's attention too
    "smoes_dense_first_layer": ["model.num_layers=3", "model.moe_layer_freq=[0,1,1]",
                                "smoes.enabled=true", "smoes.score=attention"],
    # every other layer MoE ([1, 0, 1]) with a shared expert and position-policy capacity
    "freq2_shared_capacity": ["model.num_layers=3", "model.moe_layer_freq=2",
                              "model.moe_shared_expert_intermediate_size=24", f"{CAP}=1.0",
                              "model.moe_token_drop_policy=position"],
}
CAPACITY_SETS = [name for name, sets in OPTION_SETS.items() if any(CAP in s for s in sets)]


def _cfg(ep: int, name: str, kind: str):
    per_node = 1 if ep == 2 else 2  # dedup-hier: 2 nodes either way
    return configs.small_config(*OPTION_SETS[name], f"parallel.ep_size={ep}",
                                f"dispatch.kind={kind}", f"dispatch.ranks_per_node={per_node}")


def _megatron_drops(router, args, counts: list) -> None:
    """Forward hook: recompute this router call's routing with megatron-core's own functions,
    capacity off and on, and keep (routing map after capacity, pairs dropped, padding pairs)."""
    from megatron.core.transformer.moe.moe_utils import (
        apply_router_token_dropping,
        topk_routing_with_score_function,
    )

    c = router.config
    with torch.no_grad():
        logits = router.gating(args[0]).view(-1, c.num_moe_experts)
        probs, full = topk_routing_with_score_function(
            logits, c.moe_router_topk, use_pre_softmax=c.moe_router_pre_softmax,
            num_groups=c.moe_router_num_groups, group_topk=c.moe_router_group_topk,
            scaling_factor=c.moe_router_topk_scaling_factor, score_function=router.score_function,
            expert_bias=router.expert_bias)
        _, final = apply_router_token_dropping(
            probs, full, router_topk=c.moe_router_topk,
            capacity_factor=c.moe_expert_capacity_factor, drop_policy=c.moe_token_drop_policy,
            pad_to_capacity=c.moe_pad_expert_input_to_capacity)
    kept = int((full & final).sum())
    counts.append((final, int(full.sum()) - kept, int(final.sum()) - kept))


def _worker(rank: int, ep: int, out: str) -> None:
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_moe_layer_wise_logging_tracker,
    )

    from epruntime import distributed, optim
    from epruntime.data import SyntheticVQA, shard_slice
    from epruntime.engine import Engine
    from epruntime.model.router_tap import moe_routers

    env = distributed.init_distributed(_cfg(ep, "shared_expert", "alltoall"))
    ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
    batch = ds.batch(torch.arange(GB)[shard_slice(GB, env.dp_rank, env.dp_size)])
    results = {}
    for name in OPTION_SETS:
        for kind in KINDS:
            cfg = _cfg(ep, name, kind)
            # megatron-core's process-wide aux-loss tracker is sized by the first model's depth
            get_moe_layer_wise_logging_tracker().clear()
            engine = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len)
            capacity = cfg.model.moe_expert_capacity_factor is not None
            routers = moe_routers(engine.model)
            counts: list[list] = [[] for _ in routers]
            decided: list[list] = [[] for _ in routers]
            for layer, router in enumerate(routers):
                if capacity:
                    router.register_forward_hook(
                        lambda m, a, o, c=counts[layer]: _megatron_drops(m, a, c))
                router.register_forward_hook(
                    lambda m, a, o, d=decided[layer]: d.append(o[1].detach().clone()))
            logits = []
            engine.model.register_forward_hook(lambda m, a, o: logits.append(o.detach().clone()))
            # Engine.forward_backward, keeping the logits
            engine.gradients.zero_grad()
            loss, _ = engine.local_loss(batch, GB)
            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / env.dp_size))
            loss.backward()
            engine.gradients.reduce()
            total = loss.detach().clone()
            torch.distributed.all_reduce(total)
            summary = engine.comm_summary()
            results[name, kind] = {
                "loss": total.item(), "logits": logits[0],
                "grads": {n: p.grad.clone() for n, p in
                          engine.model.global_named_parameters(env.ep_rank)
                          if p.grad is not None},
                "num_params": sum(1 for _ in engine.model.parameters()),
                "num_moe_layers": len(routers),
                "dense_layer_params": sorted(
                    n for n, _ in engine.model.named_parameters()
                    if ".mlp.linear_fc1." in n),
                "dropped": [sum(d for _, d, _ in c) for c in counts],
                "padded": [sum(p for _, _, p in c) for c in counts],
                # the router's routing map is megatron-core's capacity-applied one
                "router_matches": all(torch.equal(f, d[0]) for c, d in zip(counts, decided)
                                      for f, _, _ in c),
                "summary": {k: summary[k] for k in ("dropped_pairs", "dropped_pairs_text",
                                                    "dropped_pairs_vision", "padded_pairs",
                                                    "rows_sent", "expert_rows",
                                                    "floor_rows")},
                "summary_per_layer": [(x["dropped_pairs"], x["padded_pairs"])
                                      for x in summary["per_layer"]],
            }
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 4], ids=["ep2", "ep4"])
def runs(request, tmp_path_factory):
    ep = request.param
    out = tmp_path_factory.mktemp(f"options_ep{ep}")
    spawn(_worker, ep, ep, str(out))
    return ep, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ep)]


def _merged_grads(ranks, key) -> dict:
    """Every parameter's reduced gradient: experts by logical id (one holder each), the
    replicated rest equal on every rank."""
    merged = {}
    for r in ranks:
        for name, g in r[key]["grads"].items():
            if name in merged:
                torch.testing.assert_close(g, merged[name], rtol=0, atol=0, msg=name)
            merged[name] = g
    return merged


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("kind", ["dedup", "dedup-hier"])
def test_loss_logits_and_gradients_equal_megatron_cores_alltoall(runs, name, kind):
    ep, ranks = runs
    ref, got = (name, "alltoall"), (name, kind)
    assert ranks[0][got]["loss"] == pytest.approx(ranks[0][ref]["loss"], rel=1e-4)
    for r in ranks:
        torch.testing.assert_close(r[got]["logits"], r[ref]["logits"], rtol=1e-4, atol=1e-6)
    want, have = _merged_grads(ranks, ref), _merged_grads(ranks, got)
    assert have.keys() == want.keys()
    # every expert of every MoE layer got a gradient (num_experts=8 per layer)
    experts = {n.split(".linear_fc")[0] for n in want if "local_experts" in n}
    assert len(experts) == 8 * ranks[0][ref]["num_moe_layers"]
    for n in want:
        torch.testing.assert_close(have[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", CAPACITY_SETS)
@pytest.mark.parametrize("kind", KINDS)
def test_dropped_pairs_are_megatron_cores_and_the_ledger_counts_them(runs, name, kind):
    ep, ranks = runs
    dropped = sum(sum(r[name, kind]["dropped"]) for r in ranks)  # megatron-core's, all ranks
    padded = sum(sum(r[name, kind]["padded"]) for r in ranks)
    assert dropped > 0, "the capacity factor should drop pairs of this routing"
    pad = "pad" in name
    assert (padded > 0) == pad
    for r in ranks:
        assert r[name, kind]["router_matches"]
        s = r[name, kind]["summary"]  # summed over the ranks: the same on each
        assert s["dropped_pairs"] == dropped
        assert s["dropped_pairs_text"] + s["dropped_pairs_vision"] == dropped
        assert s["padded_pairs"] == padded
        if kind == "alltoall":  # one row per remote (token, expert) pair, padding ones included
            assert s["rows_sent"] == s["expert_rows"]
        elif kind == "dedup":  # one per remote (token, rank) pair of the capacity-applied map
            assert s["rows_sent"] == s["floor_rows"] < s["expert_rows"]
        per_layer = [sum(x["dropped"][i] for x in (q[name, kind] for q in ranks))
                     for i in range(r[name, kind]["num_moe_layers"])]
        assert [d for d, _ in r[name, kind]["summary_per_layer"]] == per_layer


def test_dense_layers_have_a_dense_mlp_and_no_expert_state(runs):
    ep, ranks = runs
    r = ranks[0]
    assert r["dense_first_layer", "alltoall"]["num_moe_layers"] == 2
    assert r["dense_first_layer", "alltoall"]["dense_layer_params"] == [
        "gpt.decoder.layers.0.mlp.linear_fc1.weight"]
    assert r["freq2_shared_capacity", "dedup"]["dense_layer_params"] == [
        "gpt.decoder.layers.1.mlp.linear_fc1.weight"]
    grads = _merged_grads(ranks, ("dense_first_layer", "dedup"))
    assert not any("layers.0.mlp.experts" in n or "layers.0.mlp.router" in n for n in grads)
    shared = _merged_grads(ranks, ("shared_expert", "dedup"))
    assert any(".mlp.shared_experts.linear_fc1" in n for n in shared)


# ---- train, checkpoint, resume with a dense first layer (EP=2) ----------------------------------
RESUME = ["model.num_layers=3", "model.moe_layer_freq=[0,1,1]", f"{CAP}=1.0",
          "model.moe_shared_expert_intermediate_size=24", "dispatch.kind=dedup",
          "parallel.ep_size=2", "train.warmup_steps=1", "train.checkpoint_interval=2",
          "train.progress=false", "data.synthetic_items=64", "data.max_eval_items=16"]


def _train_worker(rank: int, out: str) -> None:
    from megatron.core import parallel_state as ps

    from epruntime import distributed
    from epruntime.train import _train

    for run_dir, steps in (("straight", 3), ("resumed", 2), ("resumed", 3)):
        cfg = configs.small_config(*RESUME, f"train.output_dir={out}/{run_dir}",
                                   f"train.max_steps={steps}")
        env = distributed.init_distributed(cfg)
        _train(cfg, env)
        ps.destroy_model_parallel()  # the next run builds megatron-core's groups again


def test_dense_first_layer_trains_checkpoints_and_resumes_at_ep2(tmp_path):
    spawn(_train_worker, 2, str(tmp_path))
    straight = json.loads((tmp_path / "straight/summary.json").read_text())
    resumed = json.loads((tmp_path / "resumed/summary.json").read_text())
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 3
    assert resumed["final_loss"] == straight["final_loss"]  # bit for bit
    assert resumed["eval_accuracy"] == straight["eval_accuracy"]
    # two MoE layers of three: placements, ledger rows and checkpointed experts are theirs
    assert len(resumed["placements"]) == 2 and len(resumed["comm"]["per_layer"]) == 2
    assert resumed["comm"]["dropped_pairs"] > 0  # capacity drops land in summary.json
    meta = json.loads(next((tmp_path / "resumed/checkpoints").glob("step_*3/meta.json"))
                      .read_text())
    assert len(meta["placements"]) == 2


# ---- named config errors --------------------------------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    (["model.moe_pad_expert_input_to_capacity=true"], "model.moe_pad_expert_input_to_capacity"),
    ([f"{CAP}=0"], CAP),
    (["model.moe_token_drop_policy=random"], "moe_token_drop_policy"),
    (["model.moe_layer_freq=[1,0,1]"], "model.moe_layer_freq"),  # 2 layers
    (["model.moe_layer_freq=[0,0]"], "model.moe_layer_freq"),
    (["model.moe_layer_freq=0"], "model.moe_layer_freq"),
    (["model.moe_shared_expert_overlap=true"], "model.moe_shared_expert_overlap"),
    (["dispatch.overlap=true"], "dispatch.overlap"),  # megatron-core's alltoall dispatcher
    (["model.moe_layer_freq=[0,1]", "fastmmoe.enabled=true", "fastmmoe.policy=fastmmoe",
      "fastmmoe.layers=[0]"], "fastmmoe.layers"),
])
def test_bad_combinations_are_named_config_errors(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        configs.small_config(*overrides)


def test_options_the_installed_megatron_core_lacks_are_named():
    from epruntime.model.options import check_megatron_options, installed_transformer_options

    cfg = configs.small_config("model.num_layers=3", "model.moe_layer_freq=[0,1,1]")
    check_megatron_options(cfg, "gloo")  # megatron-core 0.16 has every option
    older = installed_transformer_options() - {"moe_layer_freq"}
    with pytest.raises(ConfigError, match=r"model\.moe_layer_freq not supported by the installed"):
        check_megatron_options(cfg, "gloo", installed=older)
    check_megatron_options(configs.small_config(), "gloo", installed=older)  # left at default


def test_expert_tensor_parallelism_under_dedup_is_a_named_error():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from epruntime.model.options import check_transformer_config

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2,
                               num_moe_experts=4, expert_tensor_parallel_size=2,
                               expert_model_parallel_size=2, add_bias_linear=False)
    check_transformer_config(config, "alltoall")
    for kind in ("dedup", "dedup-hier"):
        with pytest.raises(ConfigError, match="expert_tensor_parallel_size=2"):
            check_transformer_config(config, kind)


def test_shared_expert_overlap_on_cpu_exits_2_before_any_process_group(tmp_path):
    proc = run([sys.executable, "-m", "epruntime.train", *sum(
        (["--set", s] for s in [*configs.SMALL, "model.moe_shared_expert_intermediate_size=8",
                                "model.moe_shared_expert_overlap=true", "parallel.backend=gloo",
                                f"train.output_dir={tmp_path}"]), [])], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("model.moe_shared_expert_overlap=true with dispatch.kind=alltoall runs the shared "
            "experts on a CUDA") in proc.stderr
    assert not any(Path(tmp_path).iterdir())  # nothing written, nothing started
