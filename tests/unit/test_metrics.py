"""Prometheus exposition: parses, carries the gauges and the epoch histogram, serves on loopback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpusched.metrics import metric_families, render_metrics, serve_metrics

GPUS = [
    {"index": 0, "uuid": "GPU-a", "name": "NVIDIA RTX A4000", "memory_used_mib": 9830,
     "memory_total_mib": 16376, "utilization_pct": 97, "temperature_c": 71, "state": "busy"},
    {"index": 1, "uuid": "GPU-b", "name": "NVIDIA GeForce RTX 2070", "memory_used_mib": 0,
     "memory_total_mib": 8192, "utilization_pct": None, "temperature_c": None, "state": "idle"},
]
EPOCHS: list[dict[str, Any]] = [
    {"seconds": 48.0, "gpu_models": json.dumps(["RTX A4000"]), "validated": 0},
    {"seconds": 50.0, "gpu_models": json.dumps(["RTX A4000"]), "validated": 0},
    {"seconds": 90.0, "gpu_models": json.dumps(["RTX A4000"]), "validated": 1},  # not a training epoch
    {"seconds": 40.0, "gpu_models": json.dumps(["RTX A4000", "RTX 2070"]), "validated": 0},
    {"seconds": None, "gpu_models": json.dumps(["RTX 2070"]), "validated": 0},
]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_render_metrics_parses() -> None:
    text = render_metrics(GPUS, {"running": 1, "queued": 3}, 3, EPOCHS).decode()
    s = samples(text)
    lab = (("gpu", "0"), ("name", "NVIDIA RTX A4000"), ("uuid", "GPU-a"))
    assert s[("gpusched_gpu_memory_used_mib", lab)] == 9830
    assert s[("gpusched_gpu_utilization_pct", lab)] == 97
    assert ("gpusched_gpu_utilization_pct", (("gpu", "1"), ("name", "NVIDIA GeForce RTX 2070"),
                                             ("uuid", "GPU-b"))) not in s
    assert s[("gpusched_gpu_state", (("gpu", "0"), ("state", "busy")))] == 1
    assert s[("gpusched_gpu_state", (("gpu", "0"), ("state", "idle")))] == 0
    assert s[("gpusched_gpu_state", (("gpu", "1"), ("state", "idle")))] == 1
    assert s[("gpusched_jobs", (("status", "queued"),))] == 3
    assert s[("gpusched_queue_length", ())] == 3
    assert s[("gpusched_epoch_seconds_count", (("gpu_model", "RTX A4000"),))] == 2
    assert s[("gpusched_epoch_seconds_sum", (("gpu_model", "RTX A4000"),))] == 98
    assert s[("gpusched_epoch_seconds_bucket", (("gpu_model", "RTX A4000"), ("le", "45.0")))] == 0
    assert s[("gpusched_epoch_seconds_bucket", (("gpu_model", "RTX A4000"), ("le", "60.0")))] == 2
    assert s[("gpusched_epoch_seconds_count", (("gpu_model", "RTX 2070 + RTX A4000"),))] == 1


def test_each_render_is_independent() -> None:
    a = samples(render_metrics(GPUS, {}, 0, EPOCHS).decode())
    b = samples(render_metrics(GPUS, {}, 0, EPOCHS).decode())
    assert a == b  # a fresh registry per call: no counts carried over


def test_serve_metrics_on_loopback() -> None:
    scrapes = []

    def fetch() -> list[Any]:
        scrapes.append(1)
        return metric_families(GPUS, {"running": 1}, len(scrapes), [])

    server = serve_metrics(0, fetch)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        for n in (1, 2):  # every scrape asks for fresh families
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                assert resp.headers["Content-Type"].startswith("text/plain")
                body = resp.read().decode()
            assert f"gpusched_queue_length {n}.0" in body
    finally:
        server.shutdown()
        server.server_close()


def test_served_by_prometheus_client() -> None:
    """The library's own server, not a hand-written one."""
    from prometheus_client import exposition

    server = serve_metrics(0, lambda: [])
    try:
        assert isinstance(server, exposition.ThreadingWSGIServer)
    finally:
        server.shutdown()
        server.server_close()


def test_a_failing_scrape_answers_500_and_the_server_goes_on() -> None:
    calls = []

    def fetch() -> list[Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("store busy")
        return metric_families(GPUS, {}, 7, [])

    server = serve_metrics(0, fetch)
    try:
        port = server.server_address[1]
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert err.value.code == 500
        err.value.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert "gpusched_queue_length 7.0" in resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
