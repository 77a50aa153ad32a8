"""pipeline/ is the runtime: it must never import torch, export/ or calibration/, nor matplotlib
except in the coil report (drawn by the coil service, a process of its own, never the daemon)."""

import ast
import subprocess
import sys

from tests.conftest import REPO

FORBIDDEN = ("torch", "export", "calibration", "torchvision", "efficientnet_lite_pytorch", "matplotlib")
DRAWS = "report.py"  # pipeline/coil/report.py, the one runtime module allowed matplotlib


def test_pipeline_sources_do_not_import_offline_packages() -> None:
    offenders = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            draws = path.relative_to(REPO / "pipeline").as_posix() == f"coil/{DRAWS}"
            bad = [n for n in names if n.split(".")[0] in FORBIDDEN and not (draws and n.split(".")[0] == "matplotlib")]
            offenders += [f"{path.name}: {n}" for n in bad]
    assert offenders == []


def test_importing_every_pipeline_module_loads_no_torch() -> None:
    modules = [
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for p in sorted((REPO / "pipeline").rglob("*.py"))
        if p.stem != "__init__" and p.relative_to(REPO / "pipeline").as_posix() != f"coil/{DRAWS}"
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'export', 'calibration', 'matplotlib')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    assert len(modules) >= 25
    assert "pipeline.inference.patchcore" in modules
