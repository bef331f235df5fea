"""Report rendering: text/JSON/CSV tables, PNG and SVG sizes, and the self-contained HTML report."""

from __future__ import annotations

import csv
import io
import json
import re
import struct
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gpusched.reports import (
    TABLE_HEADERS,
    html_report,
    throughput_csv,
    throughput_json,
    throughput_plot,
    throughput_table,
    timeline_html,
    timeline_plot,
    timeline_size,
)
from gpusched.throughput import SetStats, busy_fraction, recommend, summarize

WL = "ssd/resnet18/bs16/spec:ab12cd34"
T0 = 1_760_000_000.0
GPUS = [{"index": 0, "uuid": "GPU-aaaa", "name": "NVIDIA RTX A4000"},
        {"index": 1, "uuid": "GPU-bbbb", "name": "NVIDIA GeForce RTX 2070"}]
EVIL = "<script>alert(1)</script>"


def _epochs(job_id: int, models: list[str], s: float, n: int = 6) -> list[dict[str, Any]]:
    return [{"job_id": job_id, "attempt": 1, "epoch": e, "seconds": s * (2 if e == 1 else 1) + (e % 2) * 0.5,
             "gpu_models": json.dumps(models), "gpu_count": len(models), "workload": WL, "validated": 0}
            for e in range(1, n + 1)]


@pytest.fixture
def stats() -> list[SetStats]:
    return summarize(_epochs(1, ["RTX A4000"], 48) + _epochs(2, ["RTX 2070"], 67)
                     + _epochs(3, ["RTX A4000", "RTX 2070"], 40))


def _span(job_id: int, name: str, kind: str, status: str, uuids: list[str], start: float,
          end: float | None) -> dict[str, Any]:
    idx = {g["uuid"]: g for g in GPUS}
    return {"job_id": job_id, "attempt": 1, "name": name, "kind": kind, "status": status,
            "gpu_uuids": uuids, "gpu_indices": [idx[u]["index"] for u in uuids],
            "gpu_names": [idx[u]["name"] for u in uuids], "started_at": start, "ended_at": end}


SPANS = [
    _span(1, "ssd-a4000", "tao:train", "succeeded", ["GPU-aaaa"], T0 - 600, T0 + 3600),
    _span(2, EVIL, "job", "failed", ["GPU-bbbb"], T0 + 300, T0 + 1200),
    _span(3, "ssd-both", "tao:train", "succeeded", ["GPU-aaaa", "GPU-bbbb"], T0 + 4000, T0 + 6000),
    _span(4, "eval", "tao:evaluate", "succeeded", ["GPU-aaaa"], T0 + 6100, T0 + 6400),
    _span(5, "still going", "tao:train", "running", ["GPU-bbbb"], T0 + 6500, None),
]
SINCE, UNTIL = T0, T0 + 8 * 3600


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_table_text(stats: list[SetStats]) -> None:
    text = throughput_table(stats, recommend(stats))
    lines = text.splitlines()
    assert lines[0].split() == ["WORKLOAD", "GPU", "SET", "GPUS", "S/EPOCH", "MEDIAN", "P90", "EPOCHS/H",
                                "SAMPLES", "CONFIDENCE", "SCALING"]
    assert "RTX 2070 + RTX A4000" in lines[3] and "0.60" in lines[3] and "90.0" in lines[3]
    assert "Recommendations:" in text and "split when more than one job waits" in text
    assert "No training epochs" in throughput_table([], [])
    assert "No recommendations yet" in throughput_table(stats, [])


def test_json_keys(stats: list[SetStats]) -> None:
    data = throughput_json(stats, ["x"], {"GPU-aaaa": 0.5})
    assert set(data) == {"sets", "recommendations", "busy_fraction"}
    assert set(data["sets"][0]) == {"workload", "gpu_set", "gpu_models", "gpu_count", "samples", "median_s",
                                    "p90_s", "validation_median_s", "epochs_per_hour", "confidence",
                                    "scaling_efficiency"}
    assert data["busy_fraction"] == {"GPU-aaaa": 0.5}
    json.dumps(data)  # serialisable as is


def test_csv_parses(stats: list[SetStats]) -> None:
    rows = list(csv.DictReader(io.StringIO(throughput_csv(stats))))
    assert len(rows) == 3
    assert rows[2]["gpu_set"] == "RTX 2070 + RTX A4000" and float(rows[2]["median_s"]) == 40.0
    assert rows[0]["scaling_efficiency"] == ""
    assert len(TABLE_HEADERS) == 9


@pytest.mark.parametrize("n_gpus", [1, 2, 5])
def test_timeline_png_has_documented_size(tmp_path: Path, n_gpus: int) -> None:
    gpus = [{"index": i, "uuid": f"GPU-{i}", "name": "NVIDIA H200"} for i in range(n_gpus)]
    spans = [{"job_id": 9, "name": "x", "kind": "tao:train", "status": "running", "gpu_uuids": ["GPU-0"],
              "started_at": SINCE + 10, "ended_at": None}]
    out = tmp_path / "t.png"
    timeline_plot(spans, gpus, SINCE, UNTIL, out)
    assert png_size(out.read_bytes()) == (1400, 200 + 60 * n_gpus) == timeline_size(n_gpus)


def test_timeline_png_custom_size_and_spans_on_unknown_gpus() -> None:
    buf = io.BytesIO()
    timeline_plot(SPANS, [], SINCE, UNTIL, buf, width_px=800, height_px=300)
    assert png_size(buf.getvalue()) == (800, 300)
    buf = io.BytesIO()
    timeline_plot(SPANS, GPUS[:1], SINCE, UNTIL, buf)  # GPU-bbbb comes from the spans
    assert png_size(buf.getvalue()) == timeline_size(2)


def test_timeline_svg_parses() -> None:
    buf = io.BytesIO()
    timeline_plot(SPANS, GPUS, SINCE, UNTIL, buf, fmt="svg")
    root = ET.fromstring(buf.getvalue())
    assert root.tag.endswith("svg")
    with pytest.raises(ValueError, match="unsupported"):
        timeline_plot(SPANS, GPUS, SINCE, UNTIL, io.BytesIO(), fmt="gif")


def test_throughput_plot_png(stats: list[SetStats]) -> None:
    buf = io.BytesIO()
    throughput_plot(stats, buf)
    assert png_size(buf.getvalue()) == (1000, 90 + 70 + 44 * 3)
    empty = io.BytesIO()
    throughput_plot([], empty)
    assert png_size(empty.getvalue())[0] == 1000


class Sections(HTMLParser):
    """Checks nesting and counts charts per <section>."""

    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.section: str | None = None
        self.charts: dict[str, int] = {}
        self.headings: list[str] = []
        self._in_h2 = False
        self.scripts = 0
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key):
                self.urls.append(a[key] or "")
        if tag == "script":
            self.scripts += 1
        if tag == "section":
            self.section = a["id"]
            self.charts[a["id"] or ""] = 0
        if tag in ("img", "svg") and self.section:
            self.charts[self.section] += 1
        self._in_h2 = tag == "h2"
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, (self.stack, tag)
        self.stack.pop()
        if tag == "section":
            self.section = None
        self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.headings.append(data)


def parse(doc: str) -> Sections:
    p = Sections()
    p.feed(doc)
    p.close()
    assert p.stack == []
    return p


def test_html_report_is_self_contained_and_escaped(stats: list[SetStats]) -> None:
    busy = busy_fraction(SPANS, GPUS, SINCE, UNTIL)
    doc = html_report(stats, recommend(stats), busy, SPANS, GPUS, SINCE, UNTIL)
    p = parse(doc)
    assert p.headings == ["GPUs", "Throughput by GPU set", "Recommendations", "GPU busy fraction",
                          "Timeline"]
    assert p.charts == {"gpus": 0, "throughput": 1, "recommendations": 0, "busy": 0, "timeline": 1}
    assert 'class="note"' not in doc  # real GPUs, real seconds: nothing to label
    assert p.scripts == 0 and "<script>" not in doc
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in p.urls)
    assert not re.search(r"https?://", doc)
    assert "split when more than one job waits" in doc


def test_html_report_without_data() -> None:
    doc = html_report([], [], {}, [], GPUS, SINCE, UNTIL)
    p = parse(doc)
    assert p.charts == {"gpus": 0, "throughput": 1, "recommendations": 0, "busy": 0, "timeline": 1}
    assert "No recommendations yet" in doc


def test_html_report_labels_simulated_gpus_and_scaled_time(stats: list[SetStats]) -> None:
    gpus = [{**g, "simulated": True, "memory_total_mib": 16384, "state": "idle"} for g in GPUS]
    doc = html_report(stats, recommend(stats), busy_fraction(SPANS, gpus, SINCE, UNTIL), SPANS,
                      gpus, SINCE, UNTIL, time_scale=0.004)
    p = parse(doc)
    assert p.headings == ["GPUs (simulated)", "Throughput by GPU set (scaled time)",
                          "Recommendations", "GPU busy fraction", "Timeline (scaled time)"]
    note = doc.split('<p class="note">')[1].split("</p>")[0]
    assert "Simulated GPUs" in note and "0.004× real time" in note
    gpu_list = doc.split('<section id="gpus">')[1].split("</section>")[0]
    for g in GPUS:
        assert g["name"] in gpu_list and g["uuid"] in gpu_list
    assert "16.0 GiB" in gpu_list


def test_html_report_without_matplotlib_says_so(stats: list[SetStats],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain install (no ``reports`` extra) still writes the page; charts are left out."""
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    doc = html_report(stats, recommend(stats), busy_fraction(SPANS, GPUS, SINCE, UNTIL), SPANS,
                      GPUS, SINCE, UNTIL)
    assert doc.count("matplotlib is not installed") == 2  # the throughput chart and the timeline
    assert "<img" not in doc and "Throughput by GPU set" in doc


def test_timeline_html() -> None:
    doc = timeline_html(SPANS, GPUS, SINCE, UNTIL, busy_fraction(SPANS, GPUS, SINCE, UNTIL))
    p = parse(doc)
    assert p.charts == {"timeline": 1, "busy": 0}
    assert "&lt;script&gt;" in doc and "<script>" not in doc
    assert not re.search(r"https?://", doc)
