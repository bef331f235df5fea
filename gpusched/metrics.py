"""Prometheus exposition: GPU, job and queue gauges plus an epoch-time histogram.

Optional (``metrics.port`` in the config, off by default) and local only: prometheus_client's
own server (``start_http_server``) binds 127.0.0.1. prometheus_client is imported lazily and
each server has its own ``CollectorRegistry`` whose one collector builds the families afresh on
every scrape, so nothing lingers in the library's global registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from gpusched.throughput import gpu_set_key

#: every GPU state the daemon reports; each GPU gets one 0/1 sample per state
GPU_STATES = ("idle", "busy", "foreign", "drained", "lost")
#: epoch durations from 1 s to 10 min
EPOCH_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0,
                 450.0, 600.0)


def _models(row: dict[str, Any]) -> list[str]:
    raw = row.get("gpu_models") or []
    if isinstance(raw, str):
        raw = json.loads(raw)
    return [str(m) for m in raw]


def _epoch_buckets(values: list[float]) -> list[tuple[str, float]]:
    values = sorted(values)
    out, i = [], 0
    for le in EPOCH_BUCKETS:
        while i < len(values) and values[i] <= le:
            i += 1
        out.append((str(le), float(i)))
    out.append(("+Inf", float(len(values))))
    return out


def metric_families(gpus: Iterable[dict[str, Any]], job_counts: dict[str, int], queue_len: int,
                    epoch_rows: Iterable[dict[str, Any]]) -> list[Any]:
    """The families of one scrape. ``epoch_rows`` are store epoch rows; training epochs only
    (validated ones include evaluation time) go into the histogram, labelled by GPU set. Pass a
    bounded window of rows: the histogram is rebuilt from them on every scrape.

    Families are built directly (no Gauge/Histogram objects), so no ``_created`` series claims
    the histogram was reset at every scrape.
    """
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

    labels = ["gpu", "uuid", "name"]
    mem_used = GaugeMetricFamily("gpusched_gpu_memory_used_mib", "GPU memory in use (MiB)", labels=labels)
    mem_total = GaugeMetricFamily("gpusched_gpu_memory_total_mib", "GPU memory in all (MiB)", labels=labels)
    util = GaugeMetricFamily("gpusched_gpu_utilization_pct", "GPU utilization (%)", labels=labels)
    temp = GaugeMetricFamily("gpusched_gpu_temperature_c", "GPU temperature (°C)", labels=labels)
    state = GaugeMetricFamily("gpusched_gpu_state", "1 for the GPU's current scheduling state",
                              labels=["gpu", "state"])
    jobs = GaugeMetricFamily("gpusched_jobs", "Jobs by status", labels=["status"])
    queue = GaugeMetricFamily("gpusched_queue_length", "Jobs waiting for GPUs", value=queue_len)
    epochs = HistogramMetricFamily("gpusched_epoch_seconds", "Seconds per training epoch",
                                   labels=["gpu_model"])

    for g in gpus:
        idx = str(g.get("index"))
        lv = [idx, str(g.get("uuid", "")), str(g.get("name", ""))]
        for family, key in ((mem_used, "memory_used_mib"), (mem_total, "memory_total_mib"),
                            (util, "utilization_pct"), (temp, "temperature_c")):
            if g.get(key) is not None:
                family.add_metric(lv, float(g[key]))
        current = str(g.get("state") or "")
        for st in dict.fromkeys((*GPU_STATES, current) if current else GPU_STATES):
            state.add_metric([idx, st], 1.0 if st == current else 0.0)
    for status, n in sorted(job_counts.items()):
        jobs.add_metric([str(status)], float(n))
    per_set: dict[str, list[float]] = {}
    for row in epoch_rows:
        secs = row.get("seconds")
        if secs is None or row.get("validated"):
            continue
        per_set.setdefault(gpu_set_key(_models(row)), []).append(float(secs))
    for key in sorted(per_set):
        epochs.add_metric([key], _epoch_buckets(per_set[key]), sum_value=sum(per_set[key]))

    return [mem_used, mem_total, util, temp, state, jobs, queue, epochs]


class _Snapshot:
    """A collector that asks for fresh families on every scrape."""

    def __init__(self, fetch: Callable[[], list[Any]]) -> None:
        self.fetch = fetch

    def collect(self) -> Iterable[Any]:
        return self.fetch()


def _registry(fetch: Callable[[], list[Any]]) -> Any:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Snapshot(fetch))
    return reg


def render_metrics(gpus: Iterable[dict[str, Any]], job_counts: dict[str, int], queue_len: int,
                   epoch_rows: Iterable[dict[str, Any]]) -> bytes:
    """The text exposition format of :func:`metric_families`."""
    from prometheus_client import generate_latest

    families = metric_families(gpus, job_counts, queue_len, epoch_rows)
    return bytes(generate_latest(_registry(lambda: families)))


def serve_metrics(port: int, fetch: Callable[[], list[Any]]) -> Any:
    """Serve ``fetch()`` (e.g. a :func:`metric_families` call) at http://127.0.0.1:port/metrics
    through ``prometheus_client.start_http_server`` (a daemon thread). ``port=0`` picks a free
    port (``server.server_address[1]``). Stop with ``server.shutdown(); server.server_close()``.
    A scrape whose ``fetch`` raises is answered 500; the server goes on."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr="127.0.0.1", registry=_registry(fetch))
    return server
