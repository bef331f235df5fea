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
