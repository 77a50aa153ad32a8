"""pipeline/ is the runtime: it must never import torch, matplotlib, export/ or calibration/."""

import ast
import subprocess
import sys

from tests.conftest import REPO

FORBIDDEN = ("torch", "export", "calibration", "torchvision", "efficientnet_lite_pytorch", "matplotlib")


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
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []


def test_importing_every_pipeline_module_loads_no_torch() -> None:
    modules = [
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for p in sorted((REPO / "pipeline").rglob("*.py"))
        if p.stem != "__init__"
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
