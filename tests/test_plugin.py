"""The plug-in API (epruntime.plugin) on a user's own megatron-core model, real gloo ranks.

- launch/plugin_gpt.py trains a plain megatron-core GPTModel at EP=2 under torchrun with
  epruntime's dispatchers plugged in; its losses equal the same model built from megatron-core's
  stock spec (megatron-core's own alltoall dispatcher, run on CPU by the compat adapter alone),
  same weights (fingerprinted) and data.
- plug() rewrites megatron-core's own layer and block specs (dense layers of moe_layer_freq left
  dense, the user's spec untouched) and names what it cannot run.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.dist import spawn_reports, write_report
from tests.launch import check, run

SCRIPT = "launch/plugin_gpt.py"
STEPS = 3


def _train(tmp_path, dispatcher: str, *extra: str) -> dict:
    out = tmp_path / f"{dispatcher}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", SCRIPT,
           "--ep", "2", "--dispatcher", dispatcher, "--steps", str(STEPS), "--out", str(out),
           *extra]
    check(run(cmd, timeout=300))
    return json.loads(out.read_text())


def test_plugged_gpt_trains_like_megatron_stock_spec(tmp_path):
    stock = _train(tmp_path, "stock")
    # The baseline really is megatron-core's own dispatcher, built by its own MoELayer.
    assert stock["dispatcher_classes"] == [
        "megatron.core.transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher"]
    assert stock["ledger"] is None
    expected = {"dedup": "epruntime.dispatch.dedup.DedupTokenDispatcher",
                "alltoall": "epruntime.dispatch.megatron.LedgeredAlltoAllDispatcher"}
    runs = {}
    for dispatcher, cls in expected.items():
        got = runs[dispatcher] = _train(tmp_path, dispatcher)
        assert got["dispatcher_classes"] == [cls]
        assert got["weights_sha256"] == stock["weights_sha256"]  # same initial model
        assert got["losses"] == pytest.approx(stock["losses"], rel=1e-5, abs=0)
        assert len(got["losses"]) == STEPS
    # The ledger saw the plugged model's traffic: megatron-core's dispatcher sends one row per
    # remote (token, expert) pair, dedup one per (token, rank), which is the floor.
    a2a, dedup = runs["alltoall"]["ledger"], runs["dedup"]["ledger"]
    assert dedup["rows_sent"] == dedup["floor_rows"] == a2a["floor_rows"]
    assert 0 < dedup["rows_sent"] < a2a["rows_sent"]
    assert dedup["cross_rank_bytes"] < a2a["cross_rank_bytes"]


def test_bad_arguments_exit_2_naming_them(tmp_path):
    proc = run([sys.executable, SCRIPT, "--ep", "2", "--experts", "7"])
    assert proc.returncode == 2
    assert "--experts 7 is not divisible by --ep 2" in proc.stderr


def _spec_worker(rank: int, out_dir: str) -> None:
    import dataclasses

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec,
                                                          get_gpt_layer_local_spec)
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    from epruntime import compat, plugin
    from epruntime.dispatch import CommLedger
    from epruntime.placement import Placement, PlacementError

    compat.enable()
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(expert_model_parallel_size=2)
    compat.cpu_model_parallel_manual_seed(0)
    report: dict = {}

    def config(**kw):
        base = dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_moe_experts=4,
                    moe_router_topk=2, moe_ffn_hidden_size=32, moe_token_dispatcher_type="alltoall",
                    expert_model_parallel_size=2, use_cpu_initialization=True,
                    add_bias_linear=False, gradient_accumulation_fusion=False,
                    bias_dropout_fusion=False, masked_softmax_fusion=False,
                    persist_layer_norm=False, moe_permute_fusion=False)
        return TransformerConfig(**{**base, **kw})

    class MyRouter(TopKRouter):
        pass

    # Block spec with a dense first layer (DeepSeek's moe_layer_freq), the user's router class.
    cfg = config(moe_layer_freq=[0, 1, 1])
    block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    before = repr(block)
    plugged = plugin.plug(cfg, block, dispatcher="dedup", router=MyRouter)
    report["spec_untouched"] = repr(block) == before
    report["moe_layer_numbers"] = list(plugged.moe_layer_numbers)
    model = GPTModel(config=cfg, transformer_layer_spec=plugged.spec, vocab_size=16,
                     max_sequence_length=8, position_embedding_type="learned_absolute")
    ep = plugin.attach(model, plugged)
    layers = model.decoder.layers
    report["mlp_types"] = [type(layer.mlp).__name__ for layer in layers]
    report["router_types"] = [type(m.router).__name__ for m in ep.moe_layers]
    report["runtime_layers"] = [d.runtime.layer_index for d in ep.dispatchers]
    report["ledger_layers"] = plugged.ledger.num_layers
    # A non-contiguous placement reaches the dedup dispatchers through set_placement.
    swapped = Placement.from_rank_lists([[1, 3], [0, 2]])
    ep.set_placements([swapped, swapped])
    report["placement_set"] = all(d.placement == swapped for d in ep.dispatchers)
    # One forward + backward through the plugged model, with the ledger counting.
    ids = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(rank))
    pos = torch.arange(8)[None].expand(2, -1)
    model(ids, pos, attention_mask=None, labels=ids).sum().backward()
    report["ledger_rows"] = int(plugged.ledger.summary(dist.group.WORLD)["rows_sent"])
    # epruntime's Prometheus exporter on the plugged model: the step's bytes and expert load.
    from epruntime.engine import StepResult

    exporter = ep.metrics(serve=False)
    model(ids, pos, attention_mask=None, labels=ids).sum().backward()
    exporter.on_step(0, StepResult(1.0, 1.0, 1e-3, ids.numel(), {}), 0.1)
    text = exporter.exposition().decode()
    report["metrics_rows"] = sum(float(line.split()[-1]) for line in text.splitlines()
                                 if line.startswith("epruntime_alltoall_rows_sent_total{"))
    report["metrics_load"] = sum(float(line.split()[-1]) for line in text.splitlines()
                                 if line.startswith("epruntime_expert_load_tokens{"))
    exporter.close()
    report["ledger_rows_both"] = int(plugged.ledger.summary(dist.group.WORLD)["rows_sent"])

    # A layer spec: repeated per layer, each layer with its own runtime; alltoall keeps
    # megatron-core's contiguous placement and refuses another one by name.
    cfg2 = config(num_layers=2)
    layer = get_gpt_layer_local_spec(num_experts=4)
    plugged2 = plugin.plug(cfg2, layer, dispatcher="alltoall", ledger=CommLedger(2, 2, rank, 2))
    model2 = GPTModel(config=cfg2, transformer_layer_spec=plugged2.spec, vocab_size=16,
                      max_sequence_length=8, position_embedding_type="learned_absolute")
    ep2 = plugin.attach(model2, plugged2)
    report["layer_spec_runtimes"] = [d.runtime.layer_index for d in ep2.dispatchers]
    report["layer_spec_original_mlp"] = layer.submodules.mlp.module is MoELayer
    try:
        ep2.set_placements([swapped, swapped])
    except PlacementError as err:
        report["alltoall_refuses"] = str(err)
    # A model not built from the plugged spec is refused.
    try:
        plugin.attach(model2, plugged)
    except plugin.PluginError as err:
        report["wrong_model"] = str(err)
    errors = {}
    for name, kwargs, experts in (("dense", {}, None),  # a dense layer spec: nothing to plug
                                  ("allgather", dict(moe_token_dispatcher_type="allgather"), 4)):
        try:
            plugin.plug(config(**kwargs), get_gpt_layer_local_spec(num_experts=experts),
                        dispatcher="dedup")
        except plugin.PluginError as err:
            errors[name] = str(err)
    try:
        plugin.plug(cfg2, layer, dispatcher="flex")
    except plugin.PluginError as err:
        errors["unknown"] = str(err)
    if not plugin.transformer_engine_available():  # CPU hosts: asking for TE is a named error
        try:
            plugin.layer_spec(cfg2, transformer_engine=True)
        except plugin.PluginError as err:
            errors["te"] = str(err)
    experts = plugin.layer_spec(cfg2).submodules.mlp.submodules.experts
    report["auto_layer_spec"] = getattr(experts, "module", experts).__name__
    report["errors"] = errors
    write_report(out_dir, rank, report)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def test_plug_rewrites_megatron_specs(tmp_path):
    reports = spawn_reports(_spec_worker, 2, tmp_path)
    r = reports[0]
    assert r["spec_untouched"]
    assert r["moe_layer_numbers"] == [2, 3]
    assert r["mlp_types"] == ["MLP", "SpecMoELayer", "SpecMoELayer"]
    assert r["router_types"] == ["MyRouter", "MyRouter"]
    assert r["runtime_layers"] == [0, 1] and r["ledger_layers"] == 2
    assert all(rep["ledger_rows"] > 0 for rep in reports)
    # Each rank's exporter counted its own sends since the ledger began (both passes), and the
    # expert load its routers saw in the second: 16 tokens x top-2 in each of the 2 MoE layers.
    assert sum(rep["metrics_rows"] for rep in reports) == r["ledger_rows_both"] > r["ledger_rows"]
    assert all(rep["metrics_load"] == 2 * 16 * 2 for rep in reports)
    assert r["layer_spec_runtimes"] == [0, 1] and r["layer_spec_original_mlp"]
    assert r["placement_set"]
    assert "contiguous" in r["alltoall_refuses"]
    assert "was not built from this plugged spec" in r["wrong_model"]
    assert "the spec has no MoE layer" in r["errors"]["dense"]
    assert "moe_token_dispatcher_type='allgather'" in r["errors"]["allgather"]
    assert "dispatcher='flex'" in r["errors"]["unknown"] and "dedup" in r["errors"]["unknown"]
    assert r["auto_layer_spec"] == ("SequentialMLP" if importlib.util.find_spec(
        "transformer_engine") is None else "TEGroupedMLP")
    if importlib.util.find_spec("transformer_engine") is None:
        assert "Transformer Engine is not installed" in r["errors"]["te"]
