"""The repository stands alone: no file points readers at notes that live outside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: notes kept beside the checkout while it was written; readers of a clone or a wheel have none
OUTSIDE = re.compile(r"/work/shared|(tao|slurm)-facts\.md|\breliability\.md|\bdesign\.md")
SCANNED = ("gpusched", "tests", "bench", "examples", "scripts", "etc", "systemd")


def _files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for top in SCANNED:
        files += [p for p in (ROOT / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return [p for p in files if p != Path(__file__).resolve()]


def test_no_reference_to_notes_outside_the_repository() -> None:
    hits = []
    for path in _files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                 if OUTSIDE.search(line)]
    assert not hits, f"references to files outside the repository: {hits}"


def test_parsers_cite_tao_sources() -> None:
    doc = (ROOT / "gpusched" / "parsers.py").read_text()
    assert "NVIDIA/tao_tensorflow1_backend" in doc
    assert "cv/common/utils.py:OneIndexedCSVLogger" in doc
