"""megatron-core's router options under every dispatcher, on real gloo ranks.

For each option set (score function, pre-softmax, top-k scaling, expert bias, device- and
node-limited group routing, the four load-balancing types, z-loss, fp64 routing, and SMoES on
top), the whole MoE-VLM with the same weights and global batch gives megatron-core's own alltoall
dispatcher's loss, logits and every gradient under dispatch.kind=dedup and dedup-hier (on two
"nodes"), at EP=2 and EP=4. Aux-loss-free balancing moves the expert biases by megatron-core's
rule in the training step, identically on every rank, and checkpoints carry them. With
node-limited routing on two nodes the ledger shows no token reaching more nodes than
moe_router_group_topk. Placements, migration and the planner keep routing groups whole or refuse
by name. Ranks are spawned once per EP size; each test reads their results.
"""

from __future__ import annotations

import sys

import pytest
import torch

from epruntime.config import ConfigError
from tests import configs
from tests.dist import spawn

GB = configs.GLOBAL_BATCH
RATE = 0.01  # expert-bias update rate: large enough to see


def option_sets(ep: int) -> dict[str, list[str]]:
    """Option name -> model overrides, at EP size `ep` (8 experts, top-3, 2 layers)."""
    device_groups = [f"model.moe_router_num_groups={ep}",  # one group per EP rank
                     f"model.moe_router_group_topk={1 if ep == 2 else 2}"]
    bias = ["model.moe_router_score_function=sigmoid", "model.moe_router_enable_expert_bias=true",
            f"model.moe_router_bias_update_rate={RATE}"]
    return {
        # DeepSeek-V3's router: sigmoid + aux-loss-free bias + device-limited groups + seq aux
        "sigmoid+bias+device-groups+seq-aux": [*bias, *device_groups,
                                               "model.moe_router_load_balancing_type=seq_aux_loss"],
        "pre-softmax+scaling+z-loss+fp64": [
            "model.moe_router_pre_softmax=true", "model.moe_router_topk_scaling_factor=2.5",
            "model.moe_z_loss_coeff=0.001", "model.moe_router_dtype=fp64"],
        "global-aux-loss": ["model.moe_router_load_balancing_type=global_aux_loss"],
        # node-limited: one group per node of the two-node layout, a token stays on one node
        "node-groups+no-aux": ["model.moe_router_num_groups=2", "model.moe_router_group_topk=1",
                               "model.moe_router_load_balancing_type=none"],
        "smoes+sigmoid+bias+device-groups": [*bias, *device_groups, "smoes.enabled=true",
                                             "smoes.score=hard"],
    }


# variant -> (dispatch kind, two nodes)
VARIANTS = {"alltoall": ("alltoall", False), "dedup": ("dedup", False),
            "dedup-hier@2nodes": ("dedup-hier", True), "alltoall@2nodes": ("alltoall", True)}


def variants_of(option: str) -> list[str]:
    """megatron-core's alltoall on two nodes only where the ledger must prove the node limit."""
    return [v for v in VARIANTS if v != "alltoall@2nodes" or option == "node-groups+no-aux"]


def config(ep: int, option: str, variant: str, *extra: str):
    kind, two_nodes = VARIANTS[variant]
    return configs.small_config(
        *option_sets(ep)[option], f"parallel.ep_size={ep}", f"dispatch.kind={kind}",
        f"dispatch.ranks_per_node={ep // 2 if two_nodes else ep}",
        "model.moe_aux_loss_coeff=0.01", "train.grad_clip=1e9",  # grads as computed, unclipped
        *extra)


# ---- real ranks ---------------------------------------------------------------------------------
def _run(engine, batches) -> dict:
    """Logits, two training steps, gradients of the first, biases after each, the ledger."""
    import torch.distributed as dist

    from epruntime.model.router_step import biased_routers

    model, b0, b1 = engine.model, *batches
    model.eval()  # logits of the batch before any update (eval: no counters, no aux losses)
    with torch.no_grad():
        logits0 = model(b0.images, b0.question_ids, b0.question_lens)
    model.train()
    routers = [layer.mlp.router for layer in model.gpt.decoder.layers]
    counts_LE = torch.zeros(len(routers), routers[0].config.num_moe_experts)

    def counter(layer):
        def hook(module, args, output):
            counts_LE[layer] += output[1].sum(0)
        return hook

    hooks = [r.register_forward_hook(counter(i)) for i, r in enumerate(routers)]
    step0 = engine.train_step(b0, 0)
    for h in hooks:
        h.remove()
    dist.all_reduce(counts_LE)  # the global batch's tokens per expert, counted independently
    grads0 = {n: p.grad.clone() for n, p in model.global_named_parameters(engine.env.ep_rank)
              if p.grad is not None}
    bias0 = [r.expert_bias.clone() for r in biased_routers(model)]
    step1 = engine.train_step(b1, 1)
    summary = engine.comm_summary()
    # megatron-core's aux-loss tracker is process-wide: names of earlier engines stay, at 0
    aux0 = {name: value for name, value in step0.aux_losses.items() if value != 0}
    return {"loss0": step0.loss, "logits0": logits0, "grads0": grads0, "aux0": aux0,
            "counts0": counts_LE, "bias0": bias0, "loss1": step1.loss,
            "bias1": [r.expert_bias.clone() for r in biased_routers(model)],
            "tokens_by_nodes": summary["tokens_by_nodes"],
            "max_nodes_per_token": summary["max_nodes_per_token"]}


def split_and_swapped(ep: int):
    """(a placement splitting routing group 0 over two ranks, one moving whole groups) for
    device-limited groups (one group per rank) of 8 experts at EP `ep`."""
    from epruntime.placement import Placement

    if ep == 2:
        return (Placement.from_rank_lists([[0, 1, 2, 4], [3, 5, 6, 7]]),
                Placement.from_rank_lists([[4, 5, 6, 7], [0, 1, 2, 3]]))
    return (Placement.from_rank_lists([[0, 2], [1, 3], [4, 5], [6, 7]]),
            Placement.from_rank_lists([[2, 3], [0, 1], [6, 7], [4, 5]]))


def _placement_checks(env, ds, batches, out: str) -> dict:
    """Device-limited groups: placements that split a group are refused (model, migration), one
    that moves whole groups migrates and trains; the expert bias survives a checkpoint."""
    from epruntime import checkpoint
    from epruntime.engine import Engine
    from epruntime.model.router_step import biased_routers
    from epruntime.placement import PlacementError
    from epruntime.placement.migrate import MigrationError, migrate_experts

    option = "sigmoid+bias+device-groups+seq-aux"
    cfg = config(env.ep_size, option, "dedup", f"train.output_dir={out}/ckpt")
    engine = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len)
    layers = cfg.model.num_layers
    report = {}
    split, swapped = split_and_swapped(env.ep_size)
    try:
        engine.model.set_placements([split] * layers)
    except PlacementError as err:
        report["set_placements"] = str(err)
    try:
        migrate_experts(engine.model, engine.optimizer, [split] * layers)
    except MigrationError as err:
        report["migrate"] = str(err)
    moved = migrate_experts(engine.model, engine.optimizer, [swapped] * layers)
    report["swapped_moved"] = moved.experts_moved
    report["swapped_loss"] = engine.train_step(batches[0], 0).loss
    checkpoint.save_checkpoint(engine, 1, {"note": "router options"})
    saved = [r.expert_bias.clone() for r in biased_routers(engine.model)]
    fresh = Engine(cfg, env, len(ds.vocab), ds.num_answers, ds.max_question_len)
    report["fresh_bias_zero"] = all(bool((r.expert_bias == 0).all())
                                    for r in biased_routers(fresh.model))
    checkpoint.load_checkpoint(fresh, checkpoint.latest_checkpoint(cfg.train.output_dir))
    report["saved_bias"] = saved
    report["loaded_bias"] = [r.expert_bias.clone() for r in biased_routers(fresh.model)]
    report["buffer_names"] = [n for n, _ in fresh.model.global_named_buffers(env.ep_rank)
                              if n.endswith("expert_bias")]
    return report


def _worker(rank: int, ep: int, out: str) -> None:
    from epruntime import distributed
    from epruntime.data import SyntheticVQA, shard_slice
    from epruntime.engine import Engine

    first = next(iter(option_sets(ep)))
    env = distributed.init_distributed(config(ep, first, "alltoall"))
    ds = SyntheticVQA(64, image_size=16, question_len=6, seed=3)
    mine = shard_slice(GB, env.dp_rank, env.dp_size)
    batches = [ds.batch(torch.arange(s * GB, (s + 1) * GB)[mine]) for s in (0, 1)]
    results = {}
    for option in option_sets(ep):
        for variant in variants_of(option):
            engine = Engine(config(ep, option, variant), env, len(ds.vocab), ds.num_answers,
                            ds.max_question_len)
            results[(option, variant)] = _run(engine, batches)
    results["placement"] = _placement_checks(env, ds, batches, out)
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda ep: f"ep{ep}")
def runs(request, tmp_path_factory):
    """{"ep": EP size, "ranks": [per rank: results]} of one spawn per EP size."""
    ep = request.param
    out = tmp_path_factory.mktemp(f"router_options_ep{ep}")
    spawn(_worker, ep, ep, str(out))
    return {"ep": ep, "ranks": [torch.load(out / f"rank{r}.pt", weights_only=False)
                                for r in range(ep)]}


def _cases(ep: int) -> list[tuple[str, str]]:
    return [(o, v) for o in option_sets(ep) for v in variants_of(o) if v != "alltoall"]


def _merged_grads(runs, key) -> dict:
    """Every rank's gradients: expert gradients by logical expert, dense ones equal everywhere."""
    merged = {}
    for rank in runs["ranks"]:
        for name, g in rank[key]["grads0"].items():
            if name in merged:
                torch.testing.assert_close(g, merged[name], rtol=0, atol=0, msg=name)
            merged[name] = g
    return merged


@pytest.mark.parametrize("case", range(len(_cases(2))))
def test_loss_logits_and_gradients_equal_megatron_cores(runs, case):
    option, variant = _cases(runs["ep"])[case]
    ref_key, key = (option, "alltoall"), (option, variant)
    for rank in runs["ranks"]:
        ref, got = rank[ref_key], rank[key]
        assert got["loss0"] == pytest.approx(ref["loss0"], rel=1e-4)
        torch.testing.assert_close(got["logits0"], ref["logits0"], rtol=1e-4, atol=1e-6)
        assert got["aux0"].keys() == ref["aux0"].keys()
        for name, value in ref["aux0"].items():  # the aux losses megatron-core tracked
            assert got["aux0"][name] == pytest.approx(value, rel=1e-4), name
        assert got["loss1"] == pytest.approx(ref["loss1"], rel=1e-4)
    ref, got = _merged_grads(runs, ref_key), _merged_grads(runs, key)
    assert got.keys() == ref.keys()
    assert sum(1 for n in ref if "local_experts" in n) == 2 * 2 * 8  # every expert got one
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_each_option_changes_the_routing_it_names(runs):
    """The options reach megatron-core: every set routes differently from plain softmax top-k
    (global-aux-loss changes only the loss), SMoES adds its losses to the same routing, and the
    load-balancing types track the aux losses they name."""
    ranks, ep = runs["ranks"], runs["ep"]
    logits = {o: ranks[0][(o, "alltoall")]["logits0"] for o in option_sets(ep)}
    plain = logits.pop("global-aux-loss")
    for option, other in logits.items():
        assert not torch.allclose(other, plain, rtol=1e-3), option
    twin, smoes = (ranks[0][(o, "alltoall")] for o in ("sigmoid+bias+device-groups+seq-aux",
                                                        "smoes+sigmoid+bias+device-groups"))
    torch.testing.assert_close(smoes["logits0"], twin["logits0"])  # same routing at step 0
    router = "decoder.layers.0.mlp.router.weight"
    name = next(n for n in twin["grads0"] if n.endswith(router))
    assert not torch.allclose(smoes["grads0"][name], twin["grads0"][name])  # its losses
    aux = {o: set(ranks[0][(o, "alltoall")]["aux0"]) for o in option_sets(ep)}
    assert "seq_load_balancing_loss" in aux["sigmoid+bias+device-groups+seq-aux"]
    assert {"load_balancing_loss", "z_loss"} <= aux["pre-softmax+scaling+z-loss+fp64"]
    assert "global_load_balancing_loss" in aux["global-aux-loss"]
    assert not aux["node-groups+no-aux"]
    assert {"smoes_mi_loss", "smoes_bal_loss", "load_balancing_loss"} <= \
        aux["smoes+sigmoid+bias+device-groups"]


@pytest.mark.parametrize("option", ["sigmoid+bias+device-groups+seq-aux",
                                    "smoes+sigmoid+bias+device-groups"])
def test_expert_bias_moves_by_megatron_cores_rule_identically_on_every_rank(runs, option):
    ranks = runs["ranks"]
    for variant in variants_of(option):
        first = ranks[0][(option, variant)]
        assert len(first["bias0"]) == 2  # one per MoE layer
        # megatron-core's get_updated_expert_bias on the global batch's tokens per expert
        counts_LE = first["counts0"]
        mean = counts_LE.sum(1, keepdim=True) / counts_LE.shape[1]
        expected_LE = torch.sign(mean - counts_LE) * RATE
        assert (expected_LE != 0).any()
        torch.testing.assert_close(torch.stack(first["bias0"]), expected_LE, rtol=0, atol=0)
        assert not torch.equal(first["bias1"][0], first["bias0"][0])  # moved again at step 1
        for rank in ranks:
            got = rank[(option, variant)]
            for key in ("bias0", "bias1"):  # bit-identical on every rank
                for a, b in zip(got[key], first[key]):
                    assert torch.equal(a, b), (variant, key)
            assert torch.equal(got["counts0"], counts_LE)
        # and the same under every dispatcher
        ref = ranks[0][(option, "alltoall")]
        for a, b in zip(first["bias1"], ref["bias1"]):
            assert torch.equal(a, b), variant


def test_node_limited_routing_reaches_at_most_group_topk_nodes_by_the_ledger(runs):
    ranks = runs["ranks"]
    # layers x forward passes (the logits pass, two steps) x global batch x tokens per sample
    tokens = 2 * 3 * GB * 22
    for variant in ("dedup-hier@2nodes", "alltoall@2nodes"):
        got = ranks[0][("node-groups+no-aux", variant)]
        assert got["max_nodes_per_token"] == 1  # moe_router_group_topk=1
        assert got["tokens_by_nodes"] == [0, tokens, 0]
    # the same ledger without group-limited routing: tokens do reach both nodes
    free = ranks[0][("pre-softmax+scaling+z-loss+fp64", "dedup-hier@2nodes")]
    assert free["max_nodes_per_token"] == 2 and free["tokens_by_nodes"][2] > 0
    assert sum(free["tokens_by_nodes"]) == tokens
    # device-limited groups on two nodes: at most group_topk ranks, so nodes
    limited = ranks[0][("sigmoid+bias+device-groups+seq-aux", "dedup-hier@2nodes")]
    assert limited["max_nodes_per_token"] <= (1 if runs["ep"] == 2 else 2)


def test_placements_and_migration_keep_groups_whole_and_checkpoints_carry_the_bias(runs):
    option = f"model.moe_router_num_groups={runs['ep']} (device-limited routing)"
    for rank in runs["ranks"]:
        rep = rank["placement"]
        assert "routing group 0" in rep["set_placements"] and option in rep["set_placements"]
        assert "cannot migrate experts" in rep["migrate"] and option in rep["migrate"]
        assert rep["swapped_moved"] == 2 * 8  # every expert of both layers changed rank
        assert rep["swapped_loss"] > 0
        assert rep["fresh_bias_zero"]
        assert any((b != 0).any() for b in rep["saved_bias"])
        for a, b in zip(rep["saved_bias"], rep["loaded_bias"]):
            assert torch.equal(a, b)
        assert len(rep["buffer_names"]) == 2


# ---- without ranks ------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, named", [
    (["model.moe_router_num_groups=3", "model.moe_router_group_topk=1"],
     "model.moe_router_num_groups=3 does not divide model.num_experts=8"),
    (["model.moe_router_num_groups=2", "model.moe_router_group_topk=3"],
     "model.moe_router_group_topk=3 exceeds model.moe_router_num_groups=2"),
    (["model.moe_router_num_groups=2"], "model.moe_router_group_topk go together"),
    (["model.moe_router_num_groups=8", "model.moe_router_group_topk=4"],
     "model.moe_topk=3 is below model.moe_router_group_topk=4"),
    (["model.moe_router_num_groups=8", "model.moe_router_group_topk=2"],
     "model.moe_topk=3 experts do not fit"),
    (["model.moe_router_enable_expert_bias=true"],
     "model.moe_router_enable_expert_bias=true needs model.moe_router_score_function=sigmoid"),
    (["model.moe_topk=1"], "model.moe_router_pre_softmax=true"),
    (["model.moe_router_score_function=relu"], "model.moe_router_score_function"),
    (["model.moe_router_load_balancing_type=sinkhorn"], "model.moe_router_load_balancing_type"),
    (["model.moe_router_dtype=bf16"], "model.moe_router_dtype"),
    (["model.moe_z_loss_coeff=-1"], "model.moe_z_loss_coeff"),
    (["model.moe_router_num_groups=2", "model.moe_router_group_topk=1", "smoes.enabled=true",
      "dispatch.kind=dedup", "dispatch.placement=bins", "parallel.ep_size=2"],
     "dispatch.placement=bins with model.moe_router_num_groups=2"),
])
def test_combinations_that_cannot_run_are_named_config_errors(overrides, named):
    with pytest.raises(ConfigError, match="invalid config") as err:
        configs.small_config(*overrides)
    assert named in str(err.value)


def test_defaults_keep_the_routing_of_before_and_options_reach_transformer_config():
    from epruntime.model.spec import transformer_config

    tc = transformer_config(configs.small_config())
    assert (tc.moe_router_score_function, tc.moe_router_load_balancing_type,
            tc.moe_router_dtype, tc.moe_router_enable_expert_bias, tc.moe_router_num_groups,
            tc.moe_z_loss_coeff, tc.moe_router_pre_softmax) == (
        "softmax", "aux_loss", "fp32", False, None, None, False)
    tc = transformer_config(configs.small_config(*option_sets(4)[
        "sigmoid+bias+device-groups+seq-aux"], "parallel.ep_size=4",
        "model.moe_z_loss_coeff=0.001", "model.moe_router_topk_scaling_factor=2.5"))
    assert (tc.moe_router_score_function, tc.moe_router_enable_expert_bias,
            tc.moe_router_bias_update_rate, tc.moe_router_num_groups, tc.moe_router_group_topk,
            tc.moe_router_load_balancing_type, tc.moe_z_loss_coeff,
            tc.moe_router_topk_scaling_factor) == (
        "sigmoid", True, RATE, 4, 2, "seq_aux_loss", 0.001, 2.5)


@pytest.mark.parametrize("groups, per_node, unit", [(4, 2, "rank"), (8, 2, "rank"),
                                                    (2, 2, "node"), (1, 4, "node"), (1, 2, None)])
def test_groups_must_fit_a_rank_or_a_node_of_the_launch(groups, per_node, unit):
    """8 experts at EP=4: before any process group, a group that would straddle nodes is a
    named config error (distributed.init_distributed runs this check)."""
    from epruntime.distributed import check_router_groups
    from epruntime.placement.groups import RouterGroupError, group_unit

    cfg = configs.small_config(f"model.moe_router_num_groups={groups}",
                               f"model.moe_router_group_topk={min(groups, 3)}",
                               "parallel.ep_size=4")
    if unit is None:
        with pytest.raises(ConfigError, match="model.moe_router_num_groups=1: groups of 8"):
            check_router_groups(cfg, per_node)
        with pytest.raises(RouterGroupError):
            group_unit(8, groups, 4, per_node)
    else:
        check_router_groups(cfg, per_node)
        assert group_unit(8, groups, 4, per_node) == unit


def _coactivation(seed: int, experts: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    topk_TK = torch.stack([torch.randperm(experts, generator=gen)[:4] for _ in range(400)])
    from epruntime.placement.strategies import coactivation_counts

    return coactivation_counts(topk_TK, experts)


@pytest.mark.parametrize("groups, ranks, per_node, unit", [(4, 4, 4, "rank"), (8, 4, 2, "rank"),
                                                           (2, 4, 2, "node")])
def test_traffic_aware_placement_moves_whole_groups(groups, ranks, per_node, unit):
    from epruntime.placement.groups import group_unit, group_violation
    from epruntime.placement.strategies import traffic_aware_placement

    C = _coactivation(groups)
    assert group_unit(16, groups, ranks, per_node) == unit
    free = traffic_aware_placement(C, ranks, per_node)
    assert group_violation(free, groups) is not None  # without the option, groups get split
    kept = traffic_aware_placement(C, ranks, per_node, num_groups=groups)
    assert group_violation(kept, groups) is None
    assert sorted(e for r in kept.experts_per_rank() for e in r) == list(range(16))


def test_group_violation_names_the_group_the_places_and_the_option():
    from epruntime.placement import Placement
    from epruntime.placement.groups import group_violation

    assert group_violation(Placement.contiguous(8, 4, 2), 2) is None  # node-limited, contiguous
    split_node = Placement.from_rank_lists([[0, 1], [2, 4], [3, 5], [6, 7]], 2)
    message = group_violation(split_node, 2)
    assert message.startswith("routing group 0 (experts 0..3) is split over nodes [0, 1]")
    assert "model.moe_router_num_groups=2 (node-limited routing)" in message
    # the same placement is fine for device-limited groups of 2 that it keeps on ranks
    assert group_violation(Placement.from_rank_lists([[2, 3], [0, 1], [6, 7], [4, 5]], 2), 4) \
        is None


def test_row_plan_counts_the_nodes_each_token_reaches():
    from epruntime.dispatch import CommLedger
    from epruntime.dispatch.plan import routing_map_from_topk, row_plan
    from epruntime.placement import Placement

    placement = Placement.contiguous(8, 4, 2)  # node 0: experts 0-3, node 1: experts 4-7
    topk_TK = torch.tensor([[0, 1, 2], [0, 4, 5], [6, 7, 5], [3, 4, 0]])
    routing_TE = routing_map_from_topk(topk_TK, 8)
    for kind in ("expert", "rank", "node"):
        plan = row_plan(routing_TE, None, placement, kind, source_rank=0, topk=3)
        assert plan.token_nodes_T.tolist() == [1, 2, 1, 2]
    ledger = CommLedger(1, 4, 0, 2)
    ledger.record_routing(0, plan.expert_rows_RR, plan.floor_rows_RR, None, 4, plan.token_nodes_T)
    summary = ledger.summary()
    assert summary["tokens_by_nodes"] == [0, 2, 2] and summary["max_nodes_per_token"] == 2


def test_smoes_gate_follows_the_score_function():
    from epruntime.smoes.router import gate_probs

    logits = torch.tensor([[0.0, 1.0, -2.0, 3.0]])
    torch.testing.assert_close(gate_probs(logits, "softmax"), torch.softmax(logits, -1))
    s = torch.sigmoid(logits)
    torch.testing.assert_close(gate_probs(logits, "sigmoid"), s / s.sum())


@pytest.mark.parametrize("args, launch, named", [
    (["model.moe_router_num_groups=4", "model.moe_router_group_topk=5"], {},
     "model.moe_router_group_topk=5 exceeds model.moe_router_num_groups=4"),
    # one group of all 32 experts on 2 nodes of 2 ranks: checked before any process group
    (["parallel.ep_size=4", "model.moe_router_num_groups=1", "model.moe_router_group_topk=1"],
     {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
     "model.moe_router_num_groups=1: groups of 32 experts fit neither in one EP rank"),
], ids=["group-topk-over-groups", "group-straddles-nodes"])
def test_a_bad_router_option_exits_2_naming_the_field(tmp_path, args, launch, named):
    from tests.launch import run

    sets = [x for a in [*args, f"train.output_dir={tmp_path}"] for x in ("--set", a)]
    proc = run([sys.executable, "-m", "epruntime.train", *sets], timeout=120, extra_env=launch)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and named in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def test_planner_places_whole_groups_or_skips_the_strategy(tmp_path):
    """Tokens co-activate experts {c, c+4, c+8, c+12}, across the four routing groups of 4: the
    free traffic-aware plan splits groups, the plan with the model's groups keeps them whole and
    skips (by name) strategies that cannot."""
    import numpy as np

    from epruntime import plan
    from epruntime.placement.groups import group_violation

    g = np.random.default_rng(2)
    top = np.stack([4 * g.permutation(4)[:3] + c for c in g.integers(0, 4, 2000)])
    np.save(tmp_path / "r.npy", np.stack([top, top], axis=1))
    routing = plan.load_routing(tmp_path / "r.npy")
    _, free, _ = plan.plan(routing, routing, 4, 4, 0, 1.05, 64, 2, "in-sample")
    assert group_violation(free[("traffic", 0)][0], 4) is not None
    _, kept, skipped = plan.plan(routing, routing, 4, 4, 0, 1.05, 64, 2, "in-sample",
                                 num_groups=4)
    assert ("traffic", 0) in kept and ("contiguous", 0) in kept
    assert all(group_violation(p, 4) is None for ps in kept.values() for p in ps)
    assert any("routing group" in s and "model.moe_router_num_groups=4" in s for s in skipped)


def test_checkpoints_written_before_the_router_options_load_with_their_defaults():
    import json

    from epruntime.checkpoint import CheckpointError, check_compatible

    cfg = configs.small_config()
    model = json.loads(cfg.canonical_json())["model"]
    older = {k: v for k, v in model.items() if not k.startswith(("moe_router", "moe_z_loss"))}
    check_compatible({"config": {"model": older}}, cfg, "older")  # ran with today's defaults
    # a field added inside a section (model.vision.grid_positions) too
    older["vision"] = {k: v for k, v in model["vision"].items() if k != "grid_positions"}
    check_compatible({"config": {"model": older}}, cfg, "older")
    with pytest.raises(CheckpointError, match="model.vision: checkpoint"):
        check_compatible({"config": {"model": older}},
                         configs.small_config("model.vision.grid_positions=true"), "older")
    with pytest.raises(CheckpointError, match="model.moe_router_score_function: checkpoint "
                                              "'softmax' vs config 'sigmoid'"):
        check_compatible({"config": {"model": older}},
                         configs.small_config("model.moe_router_score_function=sigmoid"), "older")
