"""Overlap in the dedup dispatchers (epruntime.dispatch.overlap) on real gloo ranks with a real
megatron-core MoE layer: shared experts run during the dispatch all-to-all, and
`dispatch.overlap` runs this rank's own rows through its experts while the remote rows travel.

Against the same layer with overlap off (same weights, inputs, routing), per dispatcher (dedup;
dedup-hier on two one-rank nodes) and transport (the process group; shared memory):
- shared-expert overlap alone: output and every gradient bit-identical;
- dispatch.overlap: output and every gradient equal to fp32 rounding (the experts run as two
  calls, which reorders the sums of their weight gradients; see the overlap module), and the
  largest gap is reported; the ledger's bytes are unchanged; phase timing still counts one
  dispatch and one combine per call and keeps the expert compute out of the comm time.
"""

from __future__ import annotations

import pytest
import torch

from tests import configs
from tests.dist import spawn

EXPERTS, HIDDEN, SHARED = 8, 32, 16
SEQ, BATCH, VISION = 22, 4, 16
# variant: (dispatch kind, two nodes, transport, shared experts, shared overlap, dispatch.overlap)
BASES = {"dedup/pg": ("dedup", False, "pg"), "dedup/shm": ("dedup", False, "shm"),
         "hier/pg": ("dedup-hier", True, "pg"), "hier/shm": ("dedup-hier", True, "shm")}
MODES = {"plain": (False, False, False), "plain+overlap": (False, False, True),
         "shared": (True, False, False), "shared+shared_overlap": (True, True, False),
         "shared+both": (True, True, True)}


def _worker(rank: int, ep_size: int, out: str) -> None:
    import dataclasses

    from megatron.core import parallel_state as ps
    from megatron.core.transformer.spec_utils import build_module

    from epruntime import distributed
    from epruntime.dispatch import CommLedger, dispatcher_class
    from epruntime.dispatch.timing import PhaseTimer
    from epruntime.model.spec import moe_layer_spec, transformer_config
    from epruntime.placement import Placement
    from epruntime.runtime import LayerRuntime, Observers, TokenStream
    from epruntime.transport.shm import ShmTransport

    results = {}
    env = None
    for mode, (shared, shared_overlap, overlap) in MODES.items():
        extra = [f"model.moe_shared_expert_intermediate_size={SHARED}"] if shared else []
        cfg = configs.small_config(*extra, "model.moe_aux_loss_coeff=0",
                                   f"parallel.ep_size={ep_size}")
        if env is None:
            env = distributed.init_distributed(cfg)
            group = ps.get_expert_model_parallel_group()
            gen = torch.Generator().manual_seed(100 + rank)
            x_SBH = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
            weight_SBH = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
            modality_SB = (torch.arange(SEQ) >= VISION).logical_not().long()[:, None].expand(
                SEQ, BATCH)
            transports = {"pg": None, "shm": ShmTransport(group, ep_size, 8, 60.0),
                          "shm@2nodes": ShmTransport(group, ep_size // 2, 8, 60.0)}
        tc = dataclasses.replace(transformer_config(cfg), moe_shared_expert_overlap=shared_overlap)
        for base, (kind, two_nodes, transport) in BASES.items():
            per_node = ep_size // 2 if two_nodes else ep_size
            ledger = CommLedger(1, ep_size, env.ep_rank, per_node)
            timer = PhaseTimer(1)
            tokens = TokenStream()
            tname = transport + ("@2nodes" if two_nodes and transport == "shm" else "")
            runtime = LayerRuntime(0, transport=transports[tname],
                                   observers=Observers(ledger, timer), tokens=tokens,
                                   overlap=overlap, timeout_s=60.0)
            spec = moe_layer_spec(cfg, dispatcher=dispatcher_class(kind))
            layer = build_module(spec.submodules.mlp, config=tc, layer_number=1, runtime=runtime)
            layer.token_dispatcher.set_placement(Placement.contiguous(EXPERTS, ep_size, per_node))
            with torch.no_grad():  # the same weights in every variant
                for i, p in enumerate(layer.parameters()):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(
                        1000 * i + 7)) * 0.2)
                for slot, module in enumerate(layer.experts.local_experts):
                    e = rank * len(layer.experts.local_experts) + slot
                    for j, p in enumerate((module.linear_fc1.weight, module.linear_fc2.weight)):
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(
                            5000 + 10 * e + j)) * 0.2)
            x = x_SBH.clone().requires_grad_(True)
            tokens.enter(modality_SB)
            y, _ = layer(x)
            (y * weight_SBH).sum().backward()
            grads = {"input": x.grad.clone()}
            grads.update({name: p.grad.clone() for name, p in layer.named_parameters()})
            timer.settle()
            calls = timer.calls[0]
            results[f"{base}/{mode}"] = {
                "output": y.detach(), "grads": grads,
                "ledger_bytes": int(ledger.payload_bytes.sum() + ledger.meta_bytes.sum()),
                "calls": calls.tolist(),  # [direction, phase]
                "comm_s": float(timer.seconds.sum()),
            }
    for t in transports.values():
        if t is not None:
            t.close()
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda ep: f"ep{ep}")
def runs(request, tmp_path_factory):
    """Per rank {variant: results}. EP=4: dedup-hier on two nodes of two ranks, so the second
    hop has local and remote rows."""
    ep = request.param
    out = tmp_path_factory.mktemp(f"overlap_ep{ep}")
    spawn(_worker, ep, ep, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(ep)]


def _pairs(runs, base, on, off):
    for rank, r in enumerate(runs):
        a, b = r[f"{base}/{on}"], r[f"{base}/{off}"]
        yield rank, a, b


@pytest.mark.parametrize("base", BASES)
def test_shared_expert_overlap_is_bit_identical(runs, base):
    for rank, a, b in _pairs(runs, base, "shared+shared_overlap", "shared"):
        assert torch.equal(a["output"], b["output"]), (base, rank)
        assert a["grads"].keys() == b["grads"].keys()
        assert any("shared_experts" in k for k in a["grads"])
        for name in a["grads"]:
            assert torch.equal(a["grads"][name], b["grads"][name]), (base, rank, name)
        assert a["ledger_bytes"] == b["ledger_bytes"]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("on, off", [("plain+overlap", "plain"), ("shared+both", "shared")])
def test_local_first_overlap_matches_overlap_off(runs, base, on, off):
    """Output and every gradient but the routed experts' weights bit-identical (this BLAS
    computes a row the same whatever the row count of the call, at these sizes); the experts'
    weight gradients sum over two calls instead of one: equal to fp32 rounding. That rounding
    scales with the summed magnitudes, not with an element's value (an element near zero after
    cancellation carries the error of its large terms), so it is bounded normwise: ||a - b|| <=
    1e-6 ||b||, 8x fp32's unit roundoff (measured: 2.4e-7 at most). (Elementwise
    rtol 1e-5 held on one CPU's BLAS and failed by 1.7e-6 on an AMD EPYC's.)"""
    worst = 0.0
    for rank, a, b in _pairs(runs, base, on, off):
        assert torch.equal(a["output"], b["output"]), (base, rank)
        assert a["grads"].keys() == b["grads"].keys()
        for name in a["grads"]:
            ga, gb = a["grads"][name], b["grads"][name]
            if "experts.local_experts" not in name:
                assert torch.equal(ga, gb), (base, rank, name)
            gap = float((ga - gb).norm() / gb.norm().clamp_min(1e-30))
            assert gap <= 1e-6, f"{base} rank {rank} {name}: normwise relative gap {gap:.3g}"
            worst = max(worst, gap)
        # the same bytes on the wire, by the ledger's count
        assert a["ledger_bytes"] == b["ledger_bytes"] > 0
        # one dispatch and one combine forward, as with overlap off; backward times the fan-out
        # and the sum of each of the two expert calls (one more span per phase)
        assert a["calls"][0] == b["calls"][0] == [1, 1]
        assert [x + 1 for x in b["calls"][1]] == a["calls"][1]
        assert a["comm_s"] > 0
    print(f"{base} {on} vs {off}: largest normwise gradient gap {worst:.3g}")


def test_overlap_needs_a_dedup_dispatcher():
    from epruntime.config import ConfigError

    with pytest.raises(ConfigError, match=r"dispatch\.overlap=true needs dispatch\.kind=dedup"):
        configs.small_config("dispatch.overlap=true")
    cfg = configs.small_config("dispatch.kind=dedup", "dispatch.overlap=true",
                               "model.moe_shared_expert_intermediate_size=8",
                               "model.moe_shared_expert_overlap=true")
    assert cfg.dispatch.overlap and cfg.model.moe_shared_expert_overlap
    from epruntime.model.options import check_megatron_options

    check_megatron_options(cfg, "gloo")  # the dedup dispatchers need no CUDA side stream
    alltoall = configs.small_config("model.moe_shared_expert_intermediate_size=8",
                                    "model.moe_shared_expert_overlap=true")
    with pytest.raises(ConfigError, match="CUDA side stream"):
        check_megatron_options(alltoall, "gloo")


def test_overlap_bench_trains_the_same_model(python_env, tmp_path):
    """bench.py overlap --quick: real Engines train paired steps with overlap off and on; the
    shared-expert overlap gives the same losses bit for bit, local-first to rounding."""
    import json
    import subprocess

    from tests.conftest import ROOT, python_bin

    out = tmp_path / "overlap.json"
    proc = subprocess.run([python_bin(), str(ROOT / "profiling" / "bench.py"), "overlap",
                           "--quick", "--variants", "dedup,dedup+shared", "--json", str(out)],
                          cwd=ROOT, env=python_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    split = rows.pop("experts alone: two calls vs one (no communication)")
    assert result["ratios"]["experts:two_calls/one_call"] == split["step_on/off"] > 0
    assert list(rows) == ["dedup", "dedup+shared"]
    for name, row in rows.items():
        assert len(row["samples_off"]) == len(row["samples_on"]) == result["params"]["pairs"]
        assert 0 < row["comm_seconds_on"] < row["step_time_on_s"]
        assert 0 < row["comm_seconds_off"] < row["step_time_off_s"]
        assert result["ratios"][f"{name}:step_on/off"] == row["step_on/off"] > 0
    assert rows["dedup+shared"]["max_loss_gap"] == 0.0
    assert rows["dedup"]["max_loss_gap"] < 1e-5
