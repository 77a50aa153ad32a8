"""docs/architecture.md matches the code: every room it names exists, every runtime module
belongs to a room, and each module imports only its own room and what the table allows."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

DOC = REPO / "docs" / "architecture.md"
FIRST_PARTY = ("pipeline", "export", "calibration", "stripinspect", "benchmarks")


def _import_table() -> dict[str, tuple[str, ...]]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Who may import whom", 1)[1]
    table: dict[str, tuple[str, ...]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        table[cells[0].strip("`")] = tuple(re.findall(r"`([a-z_.]+)`", cells[1]))
    return table


def _room_of(module: str, rooms: list[str]) -> str | None:
    best = None
    for room in rooms:
        if (module == room or module.startswith(room + ".")) and (best is None or len(room) > len(best)):
            best = room
    return best


def _imports(path) -> list[str]:  # type: ignore[no-untyped-def]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return [m for m in out if m.split(".")[0] in FIRST_PARTY]


def test_table_parses_and_every_room_exists() -> None:
    table = _import_table()
    assert len(table) >= 10
    for room in table:
        path = REPO.joinpath(*room.split("."))
        assert path.is_dir() or path.with_suffix(".py").is_file(), f"{room} named in {DOC.name} does not exist"
    for room, allowed in table.items():
        for target in allowed:
            assert target in table or any(t.startswith(target + ".") for t in table), f"{room}: unknown {target}"


def test_every_pipeline_module_belongs_to_a_room() -> None:
    rooms = list(_import_table())
    stray = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if path.stem == "__init__" and path.parent == REPO / "pipeline":
            continue
        if _room_of(module, rooms) in (None, "pipeline"):
            stray.append(module)
    assert stray == []


def test_modules_import_only_what_their_row_allows() -> None:
    table = _import_table()
    rooms = list(table)
    offenders = []
    checked = 0
    for top in FIRST_PARTY:
        for path in sorted((REPO / top).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            room = _room_of(module, rooms)
            if room is None and path.stem == "__init__":
                continue  # the package marker pipeline/__init__.py
            assert room is not None, f"{module} belongs to no room of {DOC.name}"
            allowed = (room, *table[room])
            for target in _imports(path):
                if not any(target == a or target.startswith(a + ".") for a in allowed):
                    offenders.append(f"{module} -> {target}")
            checked += 1
    assert checked > 50
    assert offenders == []


def test_benchmark_extra_is_imported_by_benchmarks_only() -> None:
    # anomalib and what it brings (pyproject's bench extra) are for benchmarks/vs_anomalib.py, run
    # from a separate environment; the product must not need them.
    bench_only = ("anomalib", "lightning", "pytorch_lightning", "timm")
    offenders = []
    for top in ("pipeline", "export", "calibration", "stripinspect"):
        for path in sorted((REPO / top).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in bench_only]
    assert offenders == []
