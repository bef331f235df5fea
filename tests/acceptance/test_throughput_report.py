"""Throughput and timeline reports from real TAO train stages (fake TAO, local runner) on the
source's two cards: RTX A4000 48 s/epoch, RTX 2070 67 s/epoch, both together 40 s/epoch.

Absolute times are scaled (GPUSCHED_FAKE_TAO_SCALE), so the report is checked by ratios of
medians: 67/48 for the 2070 against the A4000, 40/48 for the pair, and the pair's scaling
efficiency 48 / (2 × 40) = 0.6.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gpusched.testing.harness import DaemonProcess, fake_tao_env, short_tmpdir

pytestmark = pytest.mark.acceptance

EXAMPLE_SPEC = Path(__file__).resolve().parents[2] / "examples/specs/ssd_train_resnet18_kitti.txt"
GPUS = "RTX A4000:16G,RTX 2070:8G"
A4000, RTX2070 = "RTX A4000", "RTX 2070"
REFERENCE = {A4000: 48.0, RTX2070: 67.0, "pair": 40.0}


def small_spec(dst: Path) -> Path:
    """12 epochs, a checkpoint every 6, no validation epoch (they only feed validation_median)."""
    text = EXAMPLE_SPEC.read_text()
    for key, value in (("num_epochs", 12), ("checkpoint_interval", 6),
                       ("validation_period_during_training", 50)):
        text, n = re.subn(rf"\b{key}: \d+", f"{key}: {value}", text)
        assert n == 1, key
    dst.write_text(text)
    return dst


class _Html(HTMLParser):
    """Images per <section id=...>, and every URL-ish attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.section: str | None = None
        self.images: dict[str | None, list[str]] = {}
        self.urls: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "section":
            self.section = a.get("id")
        if tag == "img":
            self.images.setdefault(self.section, []).append(a.get("src") or "")
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "data", "action")]

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self.section = None


@pytest.fixture(scope="module")
def measured() -> Iterator[tuple[DaemonProcess, Path, list[int]]]:
    """One train stage on GPU 0, one on GPU 1 (at the same time), then one on both."""
    root = short_tmpdir("gsr")
    d = DaemonProcess(root / "state", simulate=GPUS, env=fake_tao_env()).start()
    try:
        spec = small_spec(root / "train.txt")
        ids = []
        for where, res in ((["--on", "0"], "a4000"), (["--on", "1"], "rtx2070"),
                           ([], "pair")):
            gpus = ["--gpus", "2"] if res == "pair" else []
            r = d.cli("tao", *where, "-e", "GPUSCHED_FAKE_TAO_SCALE=0.01", "--name", res, "ssd",
                      "train", "-e", str(spec), "-r", str(root / res), *gpus)
            assert r.returncode == 0, r.stderr
            ids.append(int(r.stdout))
        r = d.cli("wait", *map(str, ids), "--timeout", "90", timeout=100)
        assert r.returncode == 0, f"{r.stdout}{r.stderr}\n{d.log()}"
        yield d, root, ids
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def _json(d: DaemonProcess, *args: str) -> Any:
    r = d.cli(*args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_placement_follows_the_request(measured: tuple[DaemonProcess, Path, list[int]]) -> None:
    d, _root, (a, b, pair) = measured
    assert _json(d, "show", str(a), "--json")["gpu_indices"] == [0]
    assert _json(d, "show", str(b), "--json")["gpu_indices"] == [1]
    assert sorted(_json(d, "show", str(pair), "--json")["gpu_indices"]) == [0, 1]


def test_throughput_reproduces_the_reference_ratios(
        measured: tuple[DaemonProcess, Path, list[int]]) -> None:
    d, _root, _ids = measured
    report = _json(d, "report", "throughput", "--format", "json")
    sets = {s["gpu_set"]: s for s in report["sets"]}
    pair_key = f"{RTX2070} + {A4000}"
    assert sorted(sets) == sorted([A4000, RTX2070, pair_key]), sets
    assert len({s["workload"] for s in sets.values()}) == 1  # one spec, one workload
    for s in sets.values():
        assert s["samples"] == 11  # epochs 2..12: the warm-up epoch is left out
    a4000, rtx2070, pair = sets[A4000], sets[RTX2070], sets[pair_key]
    assert (rtx2070["median_s"] / a4000["median_s"]) == pytest.approx(
        REFERENCE[RTX2070] / REFERENCE[A4000], rel=0.10)
    assert (pair["median_s"] / a4000["median_s"]) == pytest.approx(
        REFERENCE["pair"] / REFERENCE[A4000], rel=0.10)
    assert pair["median_s"] < a4000["median_s"] < rtx2070["median_s"]
    assert pair["gpu_count"] == 2 and sorted(pair["gpu_models"]) == sorted([A4000, RTX2070])
    assert pair["scaling_efficiency"] == pytest.approx(0.6, rel=0.10)
    assert a4000["scaling_efficiency"] is None and rtx2070["scaling_efficiency"] is None
    recs = report["recommendations"]
    assert any("split when more than one job waits" in r for r in recs), recs
    assert any(r.startswith(f"{A4000} is 1.") and f"faster than {RTX2070}" in r for r in recs)
    assert set(report["busy_fraction"]) == {g["uuid"] for g in _json(d, "gpus", "--json")}

    # CSV: the same sets, parsed by the csv module
    r = d.cli("report", "throughput", "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert sorted(row["gpu_set"] for row in rows) == sorted(sets)
    for row in rows:
        assert float(row["median_s"]) == pytest.approx(sets[row["gpu_set"]]["median_s"])

    # the text table carries the same recommendation
    r = d.cli("report", "throughput")
    assert r.returncode == 0 and "split when more than one job waits" in r.stdout


def test_html_report_is_one_self_contained_file(
        measured: tuple[DaemonProcess, Path, list[int]]) -> None:
    d, root, _ids = measured
    out = root / "report.html"
    r = d.cli("report", "throughput", "--format", "html", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in root.glob("*.html")) == ["report.html"]
    text = out.read_text()
    parser = _Html()
    parser.feed(text)
    parser.close()
    charts = {k: v for k, v in parser.images.items() if v}
    assert set(charts) == {"throughput", "timeline"}, parser.images
    for section, imgs in charts.items():
        assert len(imgs) == 1, section
        assert imgs[0].startswith("data:image/png;base64,")
    assert all(u.startswith("data:") for u in parser.urls), parser.urls
    assert "http://" not in text and "https://" not in text
    assert not parser.tags & {"script", "link", "iframe"}
    assert "split when more than one job waits" in text


def test_timeline_png_svg(measured: tuple[DaemonProcess, Path, list[int]]) -> None:
    d, root, _ids = measured
    png = root / "timeline.png"
    r = d.cli("report", "timeline", "--format", "png", "-o", str(png))
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1400, 200 + 60 * 2)

    svg = root / "timeline.svg"
    r = d.cli("report", "timeline", "--format", "svg", "-o", str(svg))
    assert r.returncode == 0, r.stderr
    tree = ET.parse(svg)
    assert tree.getroot().tag.endswith("svg")


def test_top_once_prints_the_gpus(measured: tuple[DaemonProcess, Path, list[int]]) -> None:
    d, _root, _ids = measured
    r = d.cli("top", "--once")
    assert r.returncode == 0, r.stderr
    assert "GPUs" in r.stdout
    for name in (A4000, RTX2070):
        assert name in r.stdout
    assert "idle" in r.stdout
