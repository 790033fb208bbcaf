"""The layout holds: imports run one way along the flow, and no modules import each other
in a circle.

    common  <-  config  <-  cdc, outbox  <-  dispatcher  <-  api  <-  sidecar

``common`` (errors, metrics, logs, formatting) imports nothing of ours; capture (``cdc``)
and the outbox know nothing of each other, the shell wires them; nothing imports the
shell.  Every import counts, also one inside a function or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MAY_IMPORT: dict[str, set[str]] = {
    "common": set(),
    "config": {"common"},
    "cdc": {"common", "config"},
    "outbox": {"common", "config"},
    "dispatcher": {"common", "config", "outbox"},
    "api": {"common", "config", "outbox", "dispatcher"},
    "sidecar": {"common", "config", "cdc", "outbox", "dispatcher", "api", "ct1_client"},
    "ct1_client": set(),  # its own distribution (client/): nothing of the sidecar
}
PACKAGES = set(MAY_IMPORT)
WHERE = {"ct1_client": Path("client") / "ct1_client"}  # a package's folder, when not its name
# The one reach back into capture: the API reads the same mapping file to know which
# columns never leave the sidecar (and which types capture produces).
ALLOWED = {"api.app imports cdc", "api.app imports cdc.mapping"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / WHERE.get(package, Path(package))).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from pkg import mod`` names the module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES:
                out.add(name)
    return out


GRAPH = {name: imports_of(path, set(modules())) - {name} for name, path in modules().items()}


def test_the_layout_is_what_the_test_reads():
    assert {name.split(".")[0] for name in GRAPH} == PACKAGES
    assert "cdc.decode" in GRAPH["cdc.capture"]  # the reader sees real imports


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_imports_run_along_the_flow(package):
    against = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.split(".")[0] == package
        for target in targets
        if target.split(".")[0] not in MAY_IMPORT[package] | {package}
    )
    against = [line for line in against if line not in ALLOWED]
    assert not against, "\n".join(against)


def test_no_modules_import_each_other_in_a_circle():
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    circles: list[str] = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                walk(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module, [module])
    assert not circles, "\n".join(circles)
