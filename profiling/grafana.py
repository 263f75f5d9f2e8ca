"""Generate the Grafana dashboard and the Prometheus/Grafana provisioning files from code:

    python profiling/grafana.py            # (re)write them under docker/
    python profiling/grafana.py --check    # exit 1 if the files under docker/ are stale

Writes docker/grafana/dashboards/epruntime.json, docker/prometheus/prometheus.yml (scrapes ranks
on 127.0.0.1:9400..9407 every 1 s) and docker/grafana/provisioning/{datasources/prometheus.yml,
dashboards/epruntime.yml}. Panel queries use only metric names of epruntime.metrics.METRICS (the
generator refuses any other), `$rank` (a multi-value rank variable) and `$__rate_interval`.

The provisioning assumes Prometheus and Grafana share the runtime host's network (the exporter
binds 127.0.0.1 by default): Prometheus at 127.0.0.1:9090, dashboards mounted at
/var/lib/grafana/dashboards.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python profiling/grafana.py` puts profiling/ first
    sys.path.insert(0, str(ROOT))

from epruntime.metrics.catalog import METRICS  # noqa: E402

DOCKER = ROOT / "docker"
DASHBOARD = Path("grafana/dashboards/epruntime.json")
PROMETHEUS = Path("prometheus/prometheus.yml")
DATASOURCE = Path("grafana/provisioning/datasources/prometheus.yml")
PROVIDER = Path("grafana/provisioning/dashboards/epruntime.yml")
DS = {"type": "prometheus", "uid": "prometheus"}
BASE_PORT, MAX_LOCAL_RANKS = 9400, 8
R = 'rank=~"$rank"'
RI = "$__rate_interval"


def _rate(metric: str, by: str, extra: str = "") -> str:
    sel = f"{R},{extra}" if extra else R
    return f"sum by ({by}) (rate({metric}{{{sel}}}[{RI}]))"


# (row title, [(panel title, type, unit, [(expr, legend)], description)])
Panel = tuple[str, str, str, list[tuple[str, str]], str]
SECTIONS: list[tuple[str, list[Panel]]] = [
    ("Throughput", [
        ("Tokens/s", "timeseries", "short",
         [(f"sum(epruntime_tokens_per_second{{{R}}})", "all ranks"),
          (f"epruntime_tokens_per_second{{{R}}}", "rank {{rank}}")],
         "Tokens per second of the last step, per rank and summed."),
        ("Tokens processed /s (rate)", "timeseries", "short",
         [(_rate("epruntime_tokens_processed_total", "rank"), "rank {{rank}}")],
         "Rate of the tokens-processed counter."),
        ("Step time", "timeseries", "s",
         [(f"histogram_quantile(0.5, sum by (le) (rate(epruntime_step_duration_seconds_bucket"
           f"{{{R}}}[{RI}])))", "p50"),
          (f"histogram_quantile(0.9, sum by (le) (rate(epruntime_step_duration_seconds_bucket"
           f"{{{R}}}[{RI}])))", "p90"),
          (f"sum(rate(epruntime_step_duration_seconds_sum{{{R}}}[{RI}])) / "
           f"sum(rate(epruntime_step_duration_seconds_count{{{R}}}[{RI}]))", "mean")],
         "Training step wall time over all selected ranks."),
        ("Training step", "stat", "none",
         [(f"max(epruntime_train_step{{{R}}})", "step")], "Steps completed."),
    ]),
    ("Optimisation", [
        ("Loss", "timeseries", "none",
         [(f"avg(epruntime_loss{{{R}}})", "loss")], "Global-batch mean cross-entropy."),
        ("Gradient norm", "timeseries", "none",
         [(f"avg(epruntime_grad_norm{{{R}}})", "grad norm")], "Before clipping."),
        ("Learning rate", "timeseries", "none",
         [(f"avg(epruntime_learning_rate{{{R}}})", "lr")], ""),
    ]),
    ("All-to-all communication", [
        ("All-to-all bytes/s by phase and locality", "timeseries", "Bps",
         [(_rate("epruntime_alltoall_bytes_total", "phase, locality"), "{{phase}} {{locality}}")],
         "Cross-rank payload + metadata bytes of the MoE dispatch/combine all-to-alls "
         "(forward; backward mirrors them)."),
        ("All-to-all bytes/s by layer", "timeseries", "Bps",
         [(_rate("epruntime_alltoall_bytes_total", "layer"), "layer {{layer}}")], ""),
        ("Inter-node bytes/s per rank", "timeseries", "Bps",
         [(_rate("epruntime_alltoall_bytes_total", "rank", 'locality="inter_node"'),
           "rank {{rank}}")], "Bytes that cross node boundaries (0 on one node)."),
        ("Rows sent vs per-expert vs floor (/s)", "timeseries", "short",
         [(_rate("epruntime_alltoall_rows_sent_total", "layer"), "sent L{{layer}}"),
          (_rate("epruntime_alltoall_expert_rows_total", "layer"), "per-expert L{{layer}}"),
          (_rate("epruntime_alltoall_floor_rows_total", "layer"), "floor L{{layer}}")],
         "Rows the dispatcher sent, rows megatron's per-expert dispatcher would send, and the "
         "(token, remote rank) floor."),
        ("Rows sent / floor", "timeseries", "none",
         [(f"{_rate('epruntime_alltoall_rows_sent_total', 'layer')} / "
           f"{_rate('epruntime_alltoall_floor_rows_total', 'layer')}", "L{{layer}}")],
         "1 is optimal rank deduplication."),
        ("MoE tokens/s by modality", "timeseries", "short",
         [(_rate("epruntime_moe_tokens_total", "modality"), "{{modality}}")], ""),
    ]),
    ("EP load balance and bytes per rank pair", [
        ("Bytes/s per EP rank pair", "bargauge", "Bps",
         [(_rate("epruntime_alltoall_pair_bytes_total", "src, dst"), "{{src}} -> {{dst}}")],
         "Cross-rank bytes (payload + metadata, dispatch + combine, all layers) from EP rank "
         "src to EP rank dst."),
        ("EP balancedness per layer (mean/max rank load)", "timeseries", "percentunit",
         [(f"max by (layer) (epruntime_ep_balancedness_ratio{{{R}}})", "L{{layer}}")],
         "(token, expert) rows each EP rank's experts received in the last step, all ranks' "
         "tokens: mean over max. 1 is even."),
        ("EP balancedness over layers", "timeseries", "percentunit",
         [(f"max by (stat) (epruntime_ep_balancedness_over_layers_ratio{{{R},"
           f'stat=~"p50|p95|min"}})', "{{stat}}")],
         "Percentiles over layers of the per-layer balancedness (last step)."),
        ("EP overload per layer (busiest rank / mean)", "timeseries", "none",
         [(f"max by (layer) (epruntime_ep_overload_ratio{{{R}}})", "L{{layer}}")],
         "Every rank waits for the busiest one: its load over the mean bounds the MoE layer's "
         "slowdown from imbalance."),
    ]),
    ("All-to-all time (dispatch.timing=on|barrier; empty while off)", [
        ("All-to-all share of wall time by part", "timeseries", "percentunit",
         [(f"{_rate('epruntime_alltoall_phase_seconds_sum', 'part')} / scalar(count(count by "
           f"(rank) (epruntime_alltoall_phase_seconds_count{{{R}}})))", "{{part}}")],
         "Seconds per second each part of the dispatch/combine phases took, forward + backward, "
         "mean over ranks. wait: for the slowest peer."),
        ("All-to-all seconds per step by phase", "timeseries", "s",
         [(f"{_rate('epruntime_alltoall_phase_seconds_sum', 'direction, phase')} / scalar(sum("
           f"rate(epruntime_step_duration_seconds_count{{{R}}}[{RI}])))",
           "{{direction}} {{phase}}")],
         "Mean seconds of one training step per rank in each phase, all layers and parts."),
        ("Part time per step (p50, p90)", "timeseries", "s",
         [(f"histogram_quantile(0.5, sum by (le, part) (rate("
           f"epruntime_alltoall_phase_seconds_bucket{{{R}}}[{RI}])))", "p50 {{part}}"),
          (f"histogram_quantile(0.9, sum by (le, part) (rate("
           f"epruntime_alltoall_phase_seconds_bucket{{{R}}}[{RI}])))", "p90 {{part}}")],
         "Per (rank, step, direction, phase) samples of each part."),
        ("All-to-all seconds/s by layer", "timeseries", "percentunit",
         [(_rate("epruntime_alltoall_seconds_total", "layer"), "layer {{layer}}")],
         "Summed over ranks, directions and phases."),
        ("Waiting for the slowest peer, per rank", "timeseries", "percentunit",
         [(_rate("epruntime_alltoall_phase_seconds_sum", "rank", 'part="wait"'),
           "rank {{rank}}")], "A rank that waits least is the one the others wait for."),
    ]),
    ("Routing and load", [
        ("Expert load (last step, all ranks)", "bargauge", "short",
         [(f"sum by (layer, expert) (epruntime_expert_load_tokens{{{R}}})",
           "L{{layer}} e{{expert}}")], "Tokens routed to each expert in the last step."),
        ("Expert load max/mean", "timeseries", "none",
         [(f"max by (layer) (sum by (layer, expert) (epruntime_expert_load_tokens{{{R}}})) / "
           f"avg by (layer) (sum by (layer, expert) (epruntime_expert_load_tokens{{{R}}}))",
           "L{{layer}}")], "Hottest expert over the mean expert (1 is perfectly even)."),
        ("Balancedness (mean/max per-rank load)", "timeseries", "percentunit",
         [(f"avg by (layer) (epruntime_expert_balancedness_ratio{{{R}}})", "avg L{{layer}}"),
          (f"min by (layer) (epruntime_expert_balancedness_ratio{{{R}}})", "worst rank L{{layer}}")],
         "Per layer, of each rank's routing under the current placement."),
    ]),
    ("SMoES (0 when smoes.enabled=false)", [
        ("Modality specialization index (bins)", "timeseries", "none",
         [(f"avg by (layer) (epruntime_smoes_msi_ratio{{{R}}})", "L{{layer}}")], ""),
        ("Bin load (last step)", "timeseries", "short",
         [(f"sum by (layer, bin) (epruntime_smoes_bin_load_tokens{{{R}}})",
           "L{{layer}} bin {{bin}}")], ""),
    ]),
    ("FastMMoE (1 until FastMMoE lands)", [
        ("Vision tokens kept", "stat", "percentunit",
         [(f"avg(epruntime_vision_tokens_kept_ratio{{{R}}})", "kept")], ""),
        ("FLOPs vs full model", "stat", "percentunit",
         [(f"avg(epruntime_flops_ratio{{{R}}})", "flops")], ""),
    ]),
    ("Events", [
        ("Checkpoints saved", "stat", "none",
         [(f"max(epruntime_checkpoint_events_total{{{R}}})", "checkpoints")], ""),
        ("Skipped steps (non-finite)", "stat", "none",
         [(f"max(epruntime_skipped_steps_total{{{R}}})", "skipped")],
         "train.skip_nonfinite_steps: steps without an update."),
        ("Expert migrations", "stat", "none",
         [(f"max(epruntime_migration_events_total{{{R}}})", "migrations")], ""),
        ("Migration bytes (all ranks)", "stat", "bytes",
         [(f"sum(epruntime_migration_bytes_total{{{R}}})", "bytes")], ""),
        ("Migration time per rank", "timeseries", "s",
         [(f"epruntime_migration_seconds_total{{{R}}}", "rank {{rank}}")], "Cumulative."),
    ]),
    ("Evaluation", [
        ("Eval accuracy", "stat", "percentunit",
         [(f"avg(epruntime_eval_accuracy_ratio{{{R}}})", "accuracy")], ""),
        ("Eval loss", "stat", "none", [(f"avg(epruntime_eval_loss{{{R}}})", "loss")], ""),
        ("Eval items", "stat", "none", [(f"max(epruntime_eval_items{{{R}}})", "items")], ""),
    ]),
]

_NAME = re.compile(r"\bepruntime_[a-z0-9_]+")


def _known_series() -> set[str]:
    names = set()
    for m in METRICS:
        names.add(m.name)
        if m.type == "histogram":
            names |= {f"{m.name}_bucket", f"{m.name}_sum", f"{m.name}_count"}
    return names


def expressions(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of the dashboard's panels (not the variable query)."""
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def dashboard() -> dict[str, Any]:
    known, panels, y, pid = _known_series(), [], 0, 1
    for row_title, row_panels in SECTIONS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        width = 24 // min(len(row_panels), 4)
        for i, (title, kind, unit, exprs, desc) in enumerate(row_panels):
            for expr, _ in exprs:
                unknown = set(_NAME.findall(expr)) - known
                if unknown:
                    raise ValueError(f"panel {title!r} uses unknown metrics {sorted(unknown)}")
            height = 4 if kind == "stat" else 8
            panel: dict[str, Any] = {
                "id": pid, "type": kind, "title": title, "description": desc, "datasource": DS,
                "gridPos": {"h": height, "w": width, "x": (i % 4) * width,
                            "y": y + (i // 4) * height},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"datasource": DS, "expr": e, "legendFormat": legend,
                             "refId": chr(ord("A") + k),
                             "instant": kind in ("stat", "bargauge"),
                             "range": kind not in ("stat", "bargauge")}
                            for k, (e, legend) in enumerate(exprs)],
            }
            if kind == "stat":
                panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                                      "values": False}, "colorMode": "value"}
            if kind == "bargauge":
                panel["options"] = {"orientation": "horizontal", "displayMode": "gradient",
                                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                                      "values": False}}
            panels.append(panel)
            pid += 1
        rows_used = (len(row_panels) + 3) // 4
        y += rows_used * max(4 if p[1] == "stat" else 8 for p in row_panels)
    return {
        "uid": "epruntime", "title": "epruntime: expert-parallel MoE-VLM", "tags": ["epruntime"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
        "time": {"from": "now-30m", "to": "now"}, "refresh": "5s", "timezone": "",
        "templating": {"list": [{
            "name": "rank", "label": "rank", "type": "query", "datasource": DS,
            "query": {"query": "label_values(epruntime_train_step, rank)", "refId": "rank"},
            "definition": "label_values(epruntime_train_step, rank)",
            "multi": True, "includeAll": True, "allValue": ".*", "refresh": 2, "sort": 3,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }]},
        "annotations": {"list": []},
        "panels": panels,
    }


def prometheus_yml() -> str:
    targets = ", ".join(f'"127.0.0.1:{BASE_PORT + r}"' for r in range(MAX_LOCAL_RANKS))
    return ("# Generated by profiling/grafana.py. Ranks serve /metrics on metrics.port + local_rank\n"
            "# (default 9400..); Prometheus shares the runtime host's network.\n"
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: epruntime\n    static_configs:\n"
            f"      - targets: [{targets}]\n")


def datasource_yml() -> str:
    return ("# Generated by profiling/grafana.py.\napiVersion: 1\ndatasources:\n"
            "  - name: Prometheus\n    uid: prometheus\n    type: prometheus\n    access: proxy\n"
            "    url: http://127.0.0.1:9090\n    isDefault: true\n"
            "    jsonData:\n      timeInterval: 1s\n")


def provider_yml() -> str:
    return ("# Generated by profiling/grafana.py.\napiVersion: 1\nproviders:\n"
            "  - name: epruntime\n    folder: epruntime\n    type: file\n"
            "    allowUiUpdates: true\n    updateIntervalSeconds: 30\n"
            "    options:\n      path: /var/lib/grafana/dashboards\n")


def files() -> dict[Path, str]:
    return {DASHBOARD: json.dumps(dashboard(), indent=2) + "\n", PROMETHEUS: prometheus_yml(),
            DATASOURCE: datasource_yml(), PROVIDER: provider_yml()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grafana.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DOCKER, help="default: docker/")
    parser.add_argument("--check", action="store_true", help="exit 1 if any file is stale")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in files().items():
        path = args.out_dir / rel
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    if stale:
        print("stale (run python profiling/grafana.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
