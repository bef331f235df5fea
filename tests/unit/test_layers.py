"""The design's layers, enforced: imports only point down, and each outside system has one
owner (sqlite-utils: store; pynvml: gpus; docker and processes: runners)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "gpusched"

LAYERS: dict[str, int] = {
    "errors": 1, "clock": 1, "units": 1, "paths": 1, "safefs": 1,
    "models": 2, "states": 2, "config": 2,
    "scheduling": 3, "tao": 3, "parsers": 3, "parsers_tao": 3, "pipelines": 3,
    "throughput": 3, "policy": 3, "specedit": 3, "speedmodel": 3, "simulate": 3, "traces": 3,
    "store": 4, "gpus": 4, "runners": 4, "progress": 4,
    "daemon": 5, "service": 5, "server": 5, "client": 5, "stages": 5, "pipeline_runner": 5,
    "admin": 5, "notifier": 5,
    "metrics": 5,
    "cli": 6, "cli_submit": 6, "cli_list": 6, "fastcli": 6, "render": 6, "reports": 6,
    "top": 6, "demo": 6,
}
OWNERS = {"sqlite_utils": {"store"}, "pynvml": {"gpus"}, "docker": {"runners"},
          "subprocess": {"runners"}}


def _module_key(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "gpusched":
                names |= {f"gpusched.{a.name}" for a in node.names}
    return names


def test_every_module_has_a_layer() -> None:
    keys = {_module_key(p) for p in PKG.rglob("*.py")} - {"__init__", "testing"}
    assert keys <= set(LAYERS), f"modules without a layer: {sorted(keys - set(LAYERS))}"


def test_imports_only_point_down() -> None:
    problems = []
    for path in PKG.rglob("*.py"):
        key = _module_key(path)
        if key in ("testing", "__init__"):
            continue
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] != "gpusched" or len(parts) < 2:
                continue
            target = parts[1]
            if target == "testing" and key != "demo":
                problems.append(f"{path.name} imports the test fakes ({name})")
            elif target in LAYERS and LAYERS[target] > LAYERS[key]:
                problems.append(f"{path.relative_to(PKG)} (layer {LAYERS[key]}) imports "
                                f"{name} (layer {LAYERS[target]})")
    assert not problems, "\n".join(problems)


def test_outside_systems_have_one_owner() -> None:
    problems = []
    for path in PKG.rglob("*.py"):
        key = _module_key(path)
        if key == "testing":
            continue
        for name in _imports(path):
            top = name.split(".")[0]
            if top in OWNERS and key not in OWNERS[top]:
                problems.append(f"{path.relative_to(PKG)} imports {top}")
    assert not problems, "\n".join(problems)
