"""Prometheus metrics of a run: the catalog of what is exported and the per-rank exporter."""

from epruntime.metrics.catalog import METRICS, MetricSpec
from epruntime.metrics.exporter import MetricsExporter, MetricsServer, NullMetrics, metrics_for

__all__ = ["METRICS", "MetricSpec", "MetricsExporter", "MetricsServer", "NullMetrics",
           "metrics_for"]
