"""Per-rank Prometheus exporter: `/metrics` on `metrics.host:metrics.port + local_rank`.

Each rank owns a private CollectorRegistry holding only the metrics of `catalog.METRICS` (no
process/platform/GC collectors), served by a small HTTP server on a daemon thread that answers
`/metrics` and 404s everything else. The train and infer loops call `on_step`, `on_checkpoint`,
`on_eval` and `close`; `metrics_for` hands back a no-op `NullMetrics` when metrics are off, so the
loops pay nothing then.

Per step the exporter reads the engine's cumulative CommLedger and feeds the counters the delta
since the previous step; likewise the PhaseTimer's seconds (dispatch.timing), whose per-step
parts go into a histogram; expert load comes from forward hooks on the MoE routers. EP balance
(`epruntime.balance`) needs every rank's routing: one all-reduce of the step's [layers, EP ranks]
rank loads per step, on every rank (the train loop calls `on_step` on all of them).
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
import torch.distributed as dist
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from epruntime.balance import over_layers, rank_balance
from epruntime.metrics.catalog import (
    BALANCE_STATS,
    BUCKETS_S,
    DIRECTIONS,
    LOCALITIES,
    METRICS,
    MODALITIES,
    PARTS,
    PHASES,
    STEP_BUCKETS_S,
    MetricSpec,
)



class MetricsServer:
    """Serves one registry at /metrics on (host, port); nothing else."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes every second
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        try:
            self.httpd = Server((host, port), Handler)
        except OSError as err:  # a user error (exit 2): the port is taken or the host is wrong
            from epruntime.config import ConfigError

            why = "the port is in use" if err.errno == errno.EADDRINUSE else err.strerror
            raise ConfigError(f"metrics.port: cannot serve /metrics on {host}:{port} (metrics.host,"
                              f" metrics.port + local rank): {why}; choose another metrics.port "
                              "or stop what holds it") from None
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="epruntime-metrics",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


def build_registry() -> tuple[CollectorRegistry, dict[str, Any]]:
    """A fresh registry with every metric of the catalog, by name."""
    # `_created` series double every counter for no use here (the process start is known).
    disable_created_metrics()
    registry = CollectorRegistry(auto_describe=True)
    metrics: dict[str, Any] = {}
    for spec in METRICS:
        metrics[spec.name] = _make(spec, registry)
    return registry, metrics


def _make(spec: MetricSpec, registry: CollectorRegistry) -> Any:
    if spec.type == "counter":
        return Counter(spec.name, spec.help, spec.labels, registry=registry)
    if spec.type == "gauge":
        return Gauge(spec.name, spec.help, spec.labels, registry=registry)
    return Histogram(spec.name, spec.help, spec.labels, registry=registry,
                     buckets=BUCKETS_S.get(spec.name, STEP_BUCKETS_S))


class NullMetrics:
    """Metrics off: every hook is a no-op."""

    enabled = False

    def on_step(self, step: int, result: Any, seconds: float) -> None:
        pass

    def on_migration(self, report: dict) -> None:
        pass

    def on_checkpoint(self) -> None:
        pass

    def on_eval(self, figures: dict, tokens_per_s: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsExporter(NullMetrics):
    """Exports one rank's training/inference figures; see catalog.METRICS for the list."""

    enabled = True

    def __init__(self, engine: Any, host: str = "127.0.0.1", port: int = 9400,
                 linger_s: float = 0.0, serve: bool = True):
        cfg, env = engine.cfg, engine.env
        self.engine, self.linger_s = engine, linger_s
        self.registry, self.m = build_registry()
        self.rank = str(env.rank)
        self.num_layers, self.num_experts = cfg.model.num_moe_layers, cfg.model.num_experts
        self.smoes = cfg.smoes.enabled
        self.num_bins = cfg.num_bins
        self._init_series()

        # Expert load (and, with SMoES, modality x expert counts) since the last publish, summed
        # on the routing map's device so a GPU step is not synchronised per layer.
        self._load: list[torch.Tensor | None] = [None] * self.num_layers
        self._joint: list[torch.Tensor | None] = [None] * self.num_layers
        self._tap = engine.model.router_tap
        self._tap.add("exporter", self._on_routing)
        self._ledger: Any = None
        self._prev: dict[str, torch.Tensor] = {}
        self._masks: tuple[torch.Tensor, ...] = ()  # cross, intra, inter of this rank's row
        self._rank_of: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}
        self._timer: Any = None
        self._prev_seconds: torch.Tensor | None = None
        self.server = MetricsServer(self.registry, host, port) if serve else None

    # ---- series ----------------------------------------------------------------------------
    def _c(self, name: str, **labels: Any) -> Any:
        return self.m[name].labels(rank=self.rank, **{k: str(v) for k, v in labels.items()})

    def _init_series(self) -> None:
        """Create every labelled child up front: all series exist (at 0) from the first scrape,
        and the per-step path indexes prebuilt children instead of hashing labels."""
        L, E, K = range(self.num_layers), range(self.num_experts), range(self.num_bins)
        c = self._c
        self.c_tokens = c("epruntime_tokens_processed_total")
        self.g_tok_s = c("epruntime_tokens_per_second")
        self.h_step = c("epruntime_step_duration_seconds")
        self.g_step = c("epruntime_train_step")
        self.g_loss = c("epruntime_loss")
        self.g_gnorm = c("epruntime_grad_norm")
        self.g_lr = c("epruntime_learning_rate")
        self.c_bytes = [[[c("epruntime_alltoall_bytes_total", layer=l, phase=p, locality=loc)
                          for loc in LOCALITIES] for p in PHASES] for l in L]
        self.c_rows = [c("epruntime_alltoall_rows_sent_total", layer=l) for l in L]
        self.c_expert_rows = [c("epruntime_alltoall_expert_rows_total", layer=l) for l in L]
        self.c_floor_rows = [c("epruntime_alltoall_floor_rows_total", layer=l) for l in L]
        ep_rank, ep_size = self.engine.ledger.ep_rank, self.engine.ledger.ep_size
        self.c_pair_bytes = [c("epruntime_alltoall_pair_bytes_total", src=ep_rank, dst=r)
                             for r in range(ep_size)]
        self.g_ep_balance = [c("epruntime_ep_balancedness_ratio", layer=l) for l in L]
        self.g_ep_overload = [c("epruntime_ep_overload_ratio", layer=l) for l in L]
        self.g_ep_over_layers = {k: c("epruntime_ep_balancedness_over_layers_ratio", stat=k)
                                 for k in BALANCE_STATS}
        for g in (*self.g_ep_balance, *self.g_ep_overload, *self.g_ep_over_layers.values()):
            g.set(1.0)  # no load yet is balanced
        self.h_part = [[[c("epruntime_alltoall_phase_seconds", direction=d, phase=p, part=q)
                         for q in PARTS] for p in PHASES] for d in DIRECTIONS]
        self.c_layer_s = [[[c("epruntime_alltoall_seconds_total", layer=l, direction=d, phase=p)
                            for p in PHASES] for d in DIRECTIONS] for l in L]
        self.c_moe_tokens = [[c("epruntime_moe_tokens_total", layer=l, modality=m)
                              for m in MODALITIES] for l in L]
        self.g_load = [[c("epruntime_expert_load_tokens", layer=l, expert=e) for e in E] for l in L]
        self.g_balance = [c("epruntime_expert_balancedness_ratio", layer=l) for l in L]
        self.g_msi = [c("epruntime_smoes_msi_ratio", layer=l) for l in L]
        self.g_bin = [[c("epruntime_smoes_bin_load_tokens", layer=l, bin=k) for k in K] for l in L]
        for g in self.g_balance:
            g.set(1.0)  # no load yet is balanced
        # The full model until an evaluation with fastmmoe reduction reports otherwise.
        self.g_vision_kept = c("epruntime_vision_tokens_kept_ratio")
        self.g_flops_ratio = c("epruntime_flops_ratio")
        self.g_vision_kept.set(1.0)
        self.g_flops_ratio.set(1.0)
        self.c_ckpt = c("epruntime_checkpoint_events_total")
        self.c_skipped = c("epruntime_skipped_steps_total")
        self.c_mig = c("epruntime_migration_events_total")
        self.c_mig_bytes = c("epruntime_migration_bytes_total")
        self.c_mig_s = c("epruntime_migration_seconds_total")
        self.g_eval_acc = c("epruntime_eval_accuracy_ratio")
        self.g_eval_loss = c("epruntime_eval_loss")
        self.g_eval_items = c("epruntime_eval_items")

    # ---- hooks -------------------------------------------------------------------------------
    def _on_routing(self, event: Any) -> None:
        """One router call (epruntime.model.router_tap.RouterEvent)."""
        layer, routing_map_TE = event.layer, event.routing_map_TE
        load_E = routing_map_TE.sum(0)
        prev = self._load[layer]
        self._load[layer] = load_E if prev is None else prev + load_E
        if self.smoes and event.modality_T is not None:
            onehot_T2 = torch.nn.functional.one_hot(event.modality_T.long(), 2).float()
            joint = onehot_T2.T @ routing_map_TE.float()
            prev_j = self._joint[layer]
            self._joint[layer] = joint if prev_j is None else prev_j + joint

    # ---- called by the loops -------------------------------------------------------------------
    def on_step(self, step: int, result: Any, seconds: float) -> None:
        self.c_tokens.inc(result.tokens)
        self.g_tok_s.set(result.tokens / seconds if seconds > 0 else 0.0)
        self.h_step.observe(seconds)
        self.g_step.set(step + 1)
        self.g_loss.set(result.loss)
        self.g_gnorm.set(result.grad_norm)
        self.g_lr.set(result.lr)
        if result.skipped:
            self.c_skipped.inc()
        self._publish_balance(self._publish_ledger())
        self._publish_timer()
        self._publish_routing()

    def on_migration(self, report: dict) -> None:
        self.c_mig.inc()
        self.c_mig_bytes.inc(report.get("bytes_sent", 0))
        self.c_mig_s.inc(report.get("seconds", 0.0))

    def on_checkpoint(self) -> None:
        self.c_ckpt.inc()

    def on_eval(self, figures: dict, tokens_per_s: float | None = None) -> None:
        self.g_eval_acc.set(figures.get("eval_accuracy", 0.0))
        self.g_eval_loss.set(figures.get("eval_loss", 0.0))
        self.g_eval_items.set(figures.get("eval_items", 0))
        if figures.get("vision_tokens"):
            self.g_vision_kept.set(figures["vision_tokens_kept"] / figures["vision_tokens"])
        if "flops_ratio" in figures:
            self.g_flops_ratio.set(figures["flops_ratio"])
        if tokens_per_s is not None:
            self.g_tok_s.set(tokens_per_s)
        self._publish_routing()

    def close(self) -> None:
        self._tap.remove("exporter")
        if self.server is not None:
            if self.linger_s > 0:
                time.sleep(self.linger_s)  # let the scraper see the final values
            self.server.close()
            self.server = None

    # ---- publishing ------------------------------------------------------------------------------
    def _publish_ledger(self) -> torch.Tensor:
        """Counters += ledger delta since the previous call (this rank's cross-rank sends).
        Returns the delta of this rank's (token, expert) rows per destination, [L, R]."""
        ledger = self.engine.ledger
        me = ledger.ep_rank
        # Only this rank's sending row ([..., src=me, :]) is filled on this rank: copy just that,
        # so the per-step cost stays O(L * R), not O(L * R^2), at large EP sizes.
        now = {"bytes": ledger.payload_bytes[:, :, me] + ledger.meta_bytes[:, :, me],
               "rows": ledger.rows[:, 0, me].clone(),
               "expert_rows": ledger.expert_rows[:, me].clone(),
               "floor_rows": ledger.floor_rows[:, me].clone(),
               "tokens": ledger.tokens.clone()}
        if ledger is not self._ledger:  # a new ledger object starts from zero
            self._ledger = ledger
            self._prev = {k: torch.zeros_like(v) for k, v in now.items()}
            cross, intra, inter = (m[me] for m in ledger.masks())
            self._masks = cross.long(), intra.long(), inter.long()
        d = {k: (v - self._prev[k]).clamp_(min=0) for k, v in now.items()}
        self._prev = now
        cross, intra, inter = self._masks
        sent_LPR = d["bytes"]
        by_loc = torch.stack([sent_LPR @ intra, sent_LPR @ inter], -1).tolist()
        pair = (sent_LPR.sum(dim=(0, 1)) * cross).tolist()
        rows = (d["rows"] @ cross).tolist()
        expert = (d["expert_rows"] @ cross).tolist()
        floor = (d["floor_rows"] @ cross).tolist()
        tokens = d["tokens"].tolist()
        for l in range(self.num_layers):
            for p in range(len(PHASES)):
                for k in range(len(LOCALITIES)):
                    if by_loc[l][p][k]:
                        self.c_bytes[l][p][k].inc(by_loc[l][p][k])
            for child, value in ((self.c_rows[l], rows[l]), (self.c_expert_rows[l], expert[l]),
                                 (self.c_floor_rows[l], floor[l])):
                if value:
                    child.inc(value)
            for m in range(len(MODALITIES)):
                if tokens[l][m]:
                    self.c_moe_tokens[l][m].inc(tokens[l][m])
        for child, value in zip(self.c_pair_bytes, pair):
            if value:
                child.inc(value)
        return d["expert_rows"]

    def _publish_balance(self, sent_LR: torch.Tensor) -> None:
        """EP balance of the last step: every rank's (token, expert) rows per destination EP
        rank, summed over all ranks (one all-reduce, L * R int64), then epruntime.balance."""
        if not self.engine.cfg.dispatch.ledger:
            return  # nothing recorded, on any rank (the config is the same everywhere)
        load_LR = sent_LR
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # NCCL reduces device tensors, gloo host ones (as CommLedger.totals).
            device = (torch.device("cuda", torch.cuda.current_device())
                      if dist.get_backend() == "nccl" else torch.device("cpu"))
            load_LR = sent_LR.to(device, copy=True)
            dist.all_reduce(load_LR)
        if not bool(load_LR.any()):  # host sync (after the collective): no step recorded
            return
        balancedness_L, overload_L = rank_balance(load_LR)  # host copy
        for l, (b, o) in enumerate(zip(balancedness_L.tolist(), overload_L.tolist())):
            self.g_ep_balance[l].set(b)
            self.g_ep_overload[l].set(o)
        stats = over_layers(balancedness_L, overload_L)
        for k, g in self.g_ep_over_layers.items():
            g.set(stats[f"balancedness_{k}"])

    def _publish_timer(self) -> None:
        """Phase seconds since the previous step: one histogram sample per (direction, phase,
        part), counters per layer. Nothing while dispatch.timing is off."""
        timer = getattr(self.engine, "timer", None)
        if timer is None:
            return
        timer.settle()  # the engine settled it at the end of the step: nothing left to resolve
        now = timer.seconds.clone()
        if timer is not self._timer or self._prev_seconds is None:
            self._timer, self._prev_seconds = timer, torch.zeros_like(now)
        d_LDPQ = (now - self._prev_seconds).clamp_(min=0)
        self._prev_seconds = now
        step_DPQ = d_LDPQ.sum(0).tolist()
        for i in range(len(DIRECTIONS)):
            for p in range(len(PHASES)):
                for q in range(len(PARTS)):
                    self.h_part[i][p][q].observe(step_DPQ[i][p][q])
        layer_LDP = d_LDPQ.sum(-1).tolist()
        for l in range(self.num_layers):
            for i in range(len(DIRECTIONS)):
                for p in range(len(PHASES)):
                    if layer_LDP[l][i][p]:
                        self.c_layer_s[l][i][p].inc(layer_LDP[l][i][p])

    def _publish_routing(self) -> None:
        """Expert load, per-EP-rank balancedness and SMoES bins of the routing since last call."""
        if all(x is None for x in self._load):
            return
        placements = self.engine.model.placements
        routers = None
        if self.smoes:
            from epruntime.smoes.router import smoes_routers

            routers = smoes_routers(self.engine.model)
        for l in range(self.num_layers):
            load = self._load[l]
            if load is None:
                continue
            load_E = load.double().cpu()
            for e, value in enumerate(load_E.tolist()):
                self.g_load[l][e].set(value)
            if placements[l].is_replicated:  # each expert's load split over its copies
                from epruntime.placement.replicas import rank_loads_from_expert_loads

                load_R = torch.from_numpy(rank_loads_from_expert_loads(load_E.numpy(),
                                                                       placements[l]))
            else:
                rank_of_E = self._rank_of_expert(l, placements[l])
                load_R = torch.zeros(placements[l].num_ranks, dtype=torch.float64)
                load_R.index_add_(0, rank_of_E, load_E)
            peak = float(load_R.max())
            self.g_balance[l].set(float(load_R.mean()) / peak if peak > 0 else 1.0)
            if routers:
                self._publish_bins(l, routers[l], load_E)
        self._load = [None] * self.num_layers
        self._joint = [None] * self.num_layers

    def _publish_bins(self, layer: int, router: Any, load_E: torch.Tensor) -> None:
        from epruntime.smoes.metrics import msi_from_joint

        bins_E = router.bin_of_expert.detach().long().cpu()
        load_K = torch.zeros(self.num_bins, dtype=torch.float64).index_add_(0, bins_E, load_E)
        for k, value in enumerate(load_K.tolist()):
            self.g_bin[layer][k].set(value)
        joint = self._joint[layer]
        if joint is not None:
            joint_2E = joint.double().cpu()
            joint_2K = torch.zeros(2, self.num_bins, dtype=torch.float64).index_add_(1, bins_E,
                                                                                   joint_2E)
            self.g_msi[layer].set(msi_from_joint(joint_2K))

    def _rank_of_expert(self, layer: int, placement: Any) -> torch.Tensor:
        cached = self._rank_of.get(layer)
        if cached is None or cached[0] != placement.rank_of_expert:  # changes on migration
            cached = (placement.rank_of_expert,
                      torch.tensor(placement.rank_of_expert, dtype=torch.long))
            self._rank_of[layer] = cached
        return cached[1]

    def exposition(self) -> bytes:
        """The text a scrape would return (tests and debugging)."""
        return generate_latest(self.registry)


def metrics_for(cfg: Any, engine: Any) -> NullMetrics:
    """The exporter for this rank when `metrics.enabled`, else a no-op."""
    m = cfg.metrics
    if not m.enabled:
        return NullMetrics()
    return MetricsExporter(engine, m.host, m.port + engine.env.local_rank, m.linger_s)
