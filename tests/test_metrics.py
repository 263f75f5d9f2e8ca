"""Prometheus metrics: the exporter on its own, the generated dashboard, and a real 2-rank
training run scraped by a real Prometheus (scripts/prometheus.sh) whose query API must see every
documented metric on both ranks and answer every dashboard query."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from epruntime.config import load_config
from epruntime.model.router_tap import RouterTap
from epruntime.runtime import TokenStream
from epruntime.dispatch.ledger import CommLedger
from epruntime.engine import StepResult
from epruntime.metrics import METRICS, MetricsExporter, NullMetrics, metrics_for
from epruntime.placement import Placement
from profiling import grafana
from tests.conftest import ROOT
from tests.launch import check, run, sets, torchrun_cmd

TINY = str(ROOT / "launch/configs/tiny-vqa.yaml")
SCRIPT = ROOT / "scripts/prometheus.sh"


# ---- the exporter without a training job ---------------------------------------------------------


class FakeRouter(nn.Module):
    """Returns (probs, routing_map) like megatron's TopKRouter: token t goes to expert t % E."""

    def __init__(self, experts: int):
        super().__init__()
        self.experts = experts

    def forward(self, hidden_TH: torch.Tensor):
        tokens = hidden_TH.shape[0]
        routing = torch.zeros(tokens, self.experts, dtype=torch.bool)
        routing[torch.arange(tokens), torch.arange(tokens) % self.experts] = True
        return routing.float(), routing


def fake_engine(layers: int = 2, experts: int = 4):
    cfg = load_config(None, [f"model.num_layers={layers}", f"model.num_experts={experts}",
                             "model.moe_topk=1", "model.moe_router_pre_softmax=true",
                             "parallel.ep_size=2"])
    routers = [FakeRouter(experts) for _ in range(layers)]
    model = SimpleNamespace(moe_layers=[SimpleNamespace(router=r) for r in routers],
                            placements=[Placement.contiguous(experts, 2)] * layers,
                            router_tap=RouterTap(routers, TokenStream()))
    # ranks_per_node=1: rank 0 -> rank 1 crosses nodes.
    return SimpleNamespace(cfg=cfg, env=SimpleNamespace(rank=0, local_rank=0), model=model,
                           ledger=CommLedger(layers, 2, 0, 1)), routers


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_are_off_by_default():
    cfg = load_config(None, [])
    assert cfg.metrics.enabled is False and cfg.metrics.host == "127.0.0.1"
    assert isinstance(metrics_for(cfg, engine=None), NullMetrics)  # no server, no hooks


def test_catalog_follows_prometheus_conventions():
    for m in METRICS:
        assert m.name.startswith("epruntime_") and m.labels[0] == "rank"
        assert m.name.endswith("_total") == (m.type == "counter"), m.name
    assert len({m.name for m in METRICS}) == len(METRICS)


def test_exporter_feeds_ledger_deltas_and_routing():
    engine, routers = fake_engine()
    mx = MetricsExporter(engine, serve=False)
    try:
        ledger = engine.ledger
        payload = torch.zeros(6, 4, dtype=torch.float32)  # 16 bytes a row
        ledger.record_exchange(0, "dispatch", [2, 4], payload)  # 4 rows to rank 1 (inter-node)
        ledger.record_routing(0, torch.tensor([3, 5]), torch.tensor([2, 4]), None, 6)
        routers[0](torch.zeros(6, 1))  # experts 0,1 (rank 0) get 2 tokens, experts 2,3 (rank 1) get 1
        routers[1](torch.zeros(4, 1))
        step = StepResult(loss=2.0, grad_norm=1.0, lr=1e-3, tokens=6, aux_losses={})
        mx.on_step(0, step, 0.5)
        mx.on_migration({"bytes_sent": 100, "seconds": 0.5})
        ledger.record_exchange(0, "dispatch", [0, 1], payload[:1])  # one more row next step
        routers[0](torch.zeros(4, 1))
        mx.on_step(1, StepResult(2.0, 1.0, 1e-3, 6, {}), 0.5)
        mx.on_checkpoint()
        s = samples(mx.exposition().decode())
    finally:
        mx.close()
    r = 'rank="0"'
    assert s[f'epruntime_alltoall_bytes_total{{layer="0",locality="inter_node",phase="dispatch",{r}}}'] == 5 * 16
    assert s[f'epruntime_alltoall_bytes_total{{layer="0",locality="intra_node",phase="dispatch",{r}}}'] == 0
    assert s[f'epruntime_alltoall_rows_sent_total{{layer="0",{r}}}'] == 5
    assert s[f'epruntime_alltoall_expert_rows_total{{layer="0",{r}}}'] == 5
    assert s[f'epruntime_alltoall_floor_rows_total{{layer="0",{r}}}'] == 4
    # Per EP rank pair: rank 0's 5 rows to rank 1; its 2 rows to itself are local.
    assert s[f'epruntime_alltoall_pair_bytes_total{{dst="1",{r},src="0"}}'] == 5 * 16
    assert s[f'epruntime_alltoall_pair_bytes_total{{dst="0",{r},src="0"}}'] == 0
    # One process: the EP load is this rank's routing, (token, expert) rows [3, 5] in step 0
    # and none in step 1 (the gauges keep step 0); layer 1 has no rows and stays balanced.
    assert s[f'epruntime_ep_balancedness_ratio{{layer="0",{r}}}'] == pytest.approx(4 / 5)
    assert s[f'epruntime_ep_overload_ratio{{layer="0",{r}}}'] == pytest.approx(5 / 4)
    assert s[f'epruntime_ep_balancedness_ratio{{layer="1",{r}}}'] == 1.0
    stat = "epruntime_ep_balancedness_over_layers_ratio"
    assert s[f'{stat}{{{r},stat="min"}}'] == pytest.approx(4 / 5)
    assert s[f'epruntime_moe_tokens_total{{layer="0",modality="text",{r}}}'] == 6
    assert s[f'epruntime_tokens_processed_total{{{r}}}'] == 12
    # Last step only: 4 tokens over 4 experts, one each: balanced.
    assert [s[f'epruntime_expert_load_tokens{{expert="{e}",layer="0",{r}}}'] for e in range(4)] == [1] * 4
    assert s[f'epruntime_expert_balancedness_ratio{{layer="0",{r}}}'] == 1.0
    # Layer 1 saw 4 tokens in step 0 and nothing since: its gauges keep that step.
    assert s[f'epruntime_expert_balancedness_ratio{{layer="1",{r}}}'] == 1.0
    assert s[f'epruntime_migration_events_total{{{r}}}'] == 1
    assert s[f'epruntime_migration_bytes_total{{{r}}}'] == 100
    assert s[f'epruntime_checkpoint_events_total{{{r}}}'] == 1
    assert s[f'epruntime_step_duration_seconds_count{{{r}}}'] == 2
    assert s[f'epruntime_vision_tokens_kept_ratio{{{r}}}'] == 1.0
    assert s[f'epruntime_smoes_msi_ratio{{layer="0",{r}}}'] == 0.0  # SMoES off: 0


def test_exporter_feeds_phase_seconds_per_step():
    from epruntime.dispatch.timing import PARTS, HostClock, PhaseTimer
    from epruntime.metrics import catalog

    assert catalog.PARTS == PARTS  # the labels are the timer's parts
    engine, _ = fake_engine()
    engine.timer = PhaseTimer(2, HostClock())
    mx = MetricsExporter(engine, serve=False)
    try:
        wait, coll = PARTS.index("wait"), PARTS.index("collective")
        engine.timer.seconds[1, 0, 0, coll] = 0.003  # layer 1, forward dispatch
        engine.timer.seconds[0, 1, 1, wait] = 0.0005  # layer 0, backward combine
        mx.on_step(0, StepResult(2.0, 1.0, 1e-3, 6, {}), 0.5)
        engine.timer.seconds[1, 0, 0, coll] += 0.002  # the next step: the delta is observed
        mx.on_step(1, StepResult(2.0, 1.0, 1e-3, 6, {}), 0.5)
        s = samples(mx.exposition().decode())
    finally:
        mx.close()
    r = 'rank="0"'
    h = "epruntime_alltoall_phase_seconds"
    fwd = f'direction="forward",part="collective",phase="dispatch",{r}'
    assert s[f"{h}_count{{{fwd}}}"] == 2
    assert s[f"{h}_sum{{{fwd}}}"] == pytest.approx(0.005)
    le = f'direction="forward",le="0.0025",part="collective",phase="dispatch",{r}'
    assert s[f"{h}_bucket{{{le}}}"] == 1  # 0.003 then 0.002: one sample under 2.5 ms
    bwd = f'direction="backward",part="wait",phase="combine",{r}'
    assert s[f"{h}_sum{{{bwd}}}"] == pytest.approx(0.0005)
    total = "epruntime_alltoall_seconds_total"
    assert s[f'{total}{{direction="forward",layer="1",phase="dispatch",{r}}}'] == pytest.approx(
        0.005)
    assert s[f'{total}{{direction="forward",layer="0",phase="dispatch",{r}}}'] == 0


def test_exporter_serves_only_our_metrics_on_loopback():
    engine, _ = fake_engine()
    mx = MetricsExporter(engine, port=0)  # port 0: any free port
    try:
        host, port = mx.server.httpd.server_address[:2]
        assert host == "127.0.0.1"
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        names = {line.split()[2] if line.startswith("#") else line.split("{")[0].split()[0]
                 for line in text.splitlines() if line}
        assert names and all(n.startswith("epruntime_") for n in names), names
        assert {m.series for m in METRICS} <= names
        for path in ("/", "/favicon.ico", "/metrics/x", "/debug"):
            status, body = get(f"http://127.0.0.1:{port}{path}")
            assert status == 404 and "epruntime_" not in body, path
        # Not reachable on the host's other addresses.
        try:
            addr = socket.gethostbyname(socket.gethostname())
        except OSError:
            addr = "127.0.0.1"
        if not addr.startswith("127."):
            with pytest.raises(OSError), socket.create_connection((addr, port), timeout=2):
                pass
    finally:
        mx.close()


def test_port_in_use_is_a_clear_error():
    """A taken port is a user error (ConfigError, exit 2) naming the field and the port."""
    from epruntime.config import ConfigError

    engine, _ = fake_engine()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics.port: cannot serve /metrics on "
                                              f"127.0.0.1:{port} .*the port is in use"):
            MetricsExporter(engine, port=port)


def test_dashboard_files_are_up_to_date_and_use_only_catalog_metrics():
    assert grafana.main(["--check"]) == 0, "run python profiling/grafana.py"
    exprs = grafana.expressions(json.loads((ROOT / "docker" / grafana.DASHBOARD).read_text()))
    unused = [m.name for m in METRICS if not any(m.name in e for e in exprs)]
    assert not unused, f"metrics without a panel: {unused}"
    promtool = shutil.which("promtool")
    if promtool:
        check(run([promtool, "check", "config", str(ROOT / "docker" / grafana.PROMETHEUS)]))


# ---- a real training job scraped by a real Prometheus ------------------------------------------


def two_free_ports() -> int:
    """A base port P with P and P+1 free on 127.0.0.1 (the two ranks' exporters)."""
    for _ in range(200):
        base = random.randint(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="module")
def prometheus():
    """(url, metrics base port): a Prometheus scraping 127.0.0.1:{P, P+1} every second."""
    try:
        proc = run(["bash", str(SCRIPT), "--install-only"], timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("installing Prometheus timed out")
    if proc.returncode != 0:
        pytest.skip(f"Prometheus cannot be installed: {proc.stderr.strip()[-500:]}")
    base = two_free_ports()
    server = subprocess.Popen(["bash", str(SCRIPT), "--ports", f"{base},{base + 1}"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(server.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(60)
        url = first[0].strip() if first else ""
        assert url.startswith("http://127.0.0.1:"), \
            f"prometheus.sh printed {url!r}: {server.stderr.read() if server.poll() is not None else ''}"
        yield url, base
    finally:
        server.send_signal(signal.SIGTERM)  # the script stops Prometheus and removes its dir
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def query(url: str, expr: str, at: float) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    status, body = get(f"{url}/api/v1/query?{q}")
    data = json.loads(body)
    assert status == 200 and data["status"] == "success", (expr, body[:500])
    return data["data"]["result"]


def last_time_both_up(url: str, start: float, end: float) -> float:
    q = urllib.parse.urlencode({"query": 'count(up{job="epruntime"} == 1)', "start": start,
                                "end": end, "step": "1"})
    _, body = get(f"{url}/api/v1/query_range?{q}")
    values = [v for r in json.loads(body)["data"]["result"] for v in r["values"]]
    both = [float(t) for t, n in values if n == "2"]
    assert both, "Prometheus never saw both ranks up"
    return max(both)


def test_prometheus_scrapes_every_metric_of_a_training_run(prometheus, tmp_path):
    url, base = prometheus
    fields = dict(train__output_dir=tmp_path / "run", train__max_steps=32,
                  train__checkpoint_interval=16, train__progress="false",
                  data__max_train_items=4096, data__max_eval_items=256,
                  data__global_batch_size=64, model__num_layers=2,
                  smoes__enabled="true", smoes__rebin_interval=8, dispatch__kind="dedup",
                  dispatch__placement="bins",
                  dispatch__timing="on",
                  metrics__enabled="true", metrics__port=base, metrics__linger_s=3)
    start = time.time()
    check(run(torchrun_cmd("epruntime.train", 2, "--config", TINY, *sets(**fields))))
    end = time.time()
    at = last_time_both_up(url, start, end)

    scrapes = query(url, 'sum_over_time(up{job="epruntime"}[10m])', at)
    assert len(scrapes) == 2 and all(float(r["value"][1]) >= 4 for r in scrapes), scrapes

    for m in METRICS:
        ranks = {r["metric"]["rank"] for r in query(url, f"group by (rank) ({m.series})", at)}
        assert ranks == {"0", "1"}, f"{m.series}: ranks {ranks}"

    def per_rank(expr: str) -> dict[str, float]:
        return {r["metric"]["rank"]: float(r["value"][1]) for r in query(url, expr, at)}

    assert per_rank("epruntime_train_step") == {"0": 32, "1": 32}
    assert per_rank("epruntime_checkpoint_events_total") == {"0": 2, "1": 2}
    assert all(v >= 1 for v in per_rank("epruntime_migration_events_total").values())
    assert all(v > 0 for v in per_rank("sum by (rank) (epruntime_alltoall_bytes_total)").values())
    assert all(v > 0 for v in per_rank("epruntime_tokens_processed_total").values())
    assert all(v > 0 for v in per_rank("max by (rank) (epruntime_smoes_msi_ratio)").values())
    assert per_rank("epruntime_flops_ratio") == {"0": 1, "1": 1}
    # EP balance: both ranks export the same all-reduced figures; bytes flow both ways.
    for layer in ("0", "1"):
        b = per_rank(f'epruntime_ep_balancedness_ratio{{layer="{layer}"}}')
        o = per_rank(f'epruntime_ep_overload_ratio{{layer="{layer}"}}')
        assert b["0"] == b["1"] and 0 < b["0"] <= 1 and o["0"] == pytest.approx(1 / b["0"])
    pairs = {(r["metric"]["src"], r["metric"]["dst"]): float(r["value"][1])
             for r in query(url, "epruntime_alltoall_pair_bytes_total", at)}
    assert pairs[("0", "1")] > 0 and pairs[("1", "0")] > 0 and pairs[("0", "0")] == 0
    # dispatch.timing=on: 32 steps x 2 directions x 2 phases x 5 parts samples, some time in each
    assert per_rank("sum by (rank) (epruntime_alltoall_phase_seconds_count)") == {
        "0": 32 * 20, "1": 32 * 20}
    assert all(v > 0 for v in per_rank(
        'sum by (rank) (epruntime_alltoall_phase_seconds_sum{part="collective"})').values())

    board = json.loads((ROOT / "docker" / grafana.DASHBOARD).read_text())
    empty = []
    for expr in grafana.expressions(board):
        promql = expr.replace("$rank", ".*").replace("$__rate_interval", "1m")
        if not query(url, promql, at):
            empty.append(promql)
    assert not empty, f"dashboard queries without data: {empty}"


def test_overhead_benchmark_quick(tmp_path):
    out = tmp_path / "metrics.json"
    check(run([sys.executable, "profiling/bench.py", "metrics", "--quick", "--json", str(out)],
              timeout=300))
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == ["metrics_off", "metrics_on"]
    assert result["rows"][1]["scrapes"] > 0 and result["ratios"]["on/off_paired_blocks"] > 0
