"""The reliability tier (the README's "Security on a shared box" and "How it works" promises):
long-running fault injection.

Every test here carries ``pytest.mark.reliability`` (``-m "not reliability"`` leaves the tier out)
and may report figures through the ``figures`` fixture; ``pytest_terminal_summary`` prints them
at the end of the run so CI logs show them even without ``-s``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
FIGURES: pytest.StashKey[dict[str, Any]] = pytest.StashKey()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "reliability: fault-injection tier (kill -9 loop, claim race, disk full, churn, "
                   "real users); see the README's promises")
    config.stash[FIGURES] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A dict the test fills with the figures it proved (printed at the end of the run)."""
    return request.config.stash[FIGURES]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    figs = config.stash.get(FIGURES, {})
    if not figs:
        return
    terminalreporter.section("reliability figures")
    for key in sorted(figs):
        terminalreporter.write_line(f"{key}: {figs[key]}")

