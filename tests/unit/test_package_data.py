"""The demo's pipeline and specs ship inside the package (a wheel has no examples/ directory)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gpusched import demo

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _data_files(base: Path) -> dict[str, bytes]:
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and p.suffix in (".toml", ".txt")}


def test_package_copy_matches_examples() -> None:
    shipped = Path(str(demo.examples()))
    want = _data_files(EXAMPLES)
    assert "ssd_resnet18_kitti.toml" in want and "specs/ssd_train_resnet18_kitti.txt" in want
    got = _data_files(shipped)
    assert got.keys() == want.keys(), "gpusched/data/examples/ and examples/ hold other files: " \
        "copy examples/*.toml and examples/specs/*.txt into gpusched/data/examples/"
    stale = [name for name in want if got[name] != want[name]]
    assert not stale, f"gpusched/data/examples/ differs from examples/ in {stale}: copy them again"


def test_package_data_is_declared() -> None:
    """pyproject's package-data globs cover every shipped file (or the wheel would lack it)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = cfg["tool"]["setuptools"]["package-data"]["gpusched"]
    pkg = ROOT / "gpusched"
    covered = {str(p.relative_to(pkg)) for g in globs for p in pkg.glob(g)}
    shipped = {f"data/examples/{name}" for name in _data_files(Path(str(demo.examples())))}
    assert shipped <= covered, sorted(shipped - covered)


def test_license_is_an_spdx_string() -> None:
    """A ``license = {text = ...}`` table is deprecated by setuptools (PEP 639)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["project"]["license"] == "Apache-2.0"


def test_copy_examples_copies_pipeline_and_specs(tmp_path: Path) -> None:
    demo.copy_examples(demo.examples(), tmp_path / "work")
    assert _data_files(tmp_path / "work") == _data_files(EXAMPLES)
    assert not list((tmp_path / "work").rglob("*.py"))


def test_demo_without_its_data_leaves_no_directory(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"

    def fake_tmpdir(prefix: str = "") -> Path:
        state.mkdir()
        return state

    monkeypatch.setattr(demo, "short_tmpdir", fake_tmpdir)
    monkeypatch.setattr(demo, "examples", lambda: tmp_path / "no-such-package-data")
    with pytest.raises(FileNotFoundError, match="missing from the package"):
        demo.main(out=lambda line: None)
    assert not state.exists()


def test_demo_report_shows_the_run_s_busy_fractions() -> None:
    """Busy fractions over the run itself, not since 1970 (the demo's report said 0.0 %)."""
    now = 1_760_000_000.0
    gpus = [{"index": 0, "uuid": "GPU-a", "name": "RTX A4000", "simulated": True},
            {"index": 1, "uuid": "GPU-b", "name": "RTX 2070", "simulated": True}]
    spans = [{"job_id": 1, "attempt": 1, "name": "p/train", "kind": "tao:train",
              "status": "succeeded", "gpu_uuids": ["GPU-a", "GPU-b"], "gpu_indices": [0, 1],
              "gpu_names": ["RTX A4000", "RTX 2070"], "started_at": now - 40, "ended_at": now - 20},
             {"job_id": 2, "attempt": 1, "name": "p/evaluate", "kind": "tao:evaluate",
              "status": "succeeded", "gpu_uuids": ["GPU-a"], "gpu_indices": [0],
              "gpu_names": ["RTX A4000"], "started_at": now - 20, "ended_at": now}]
    doc = demo.report_html([], [], spans, gpus, now)
    busy = doc.split('<section id="busy">')[1].split("</section>")[0]
    assert "100.0%" in busy and "50.0%" in busy  # GPU 0 the whole run, GPU 1 half of it
    assert "GPUs (simulated)" in doc and "scaled time" in doc
    assert f"{demo.SCALE:g}× real time" in doc
