"""pipeline/ is the runtime: it must never import torch, matplotlib, export/ or calibration/.
The one exception: the end-of-coil report draws with matplotlib (the coil service, at coil end)."""

import ast
import subprocess
import sys

from tests.conftest import REPO

FORBIDDEN = ("torch", "export", "calibration", "torchvision", "efficientnet_lite_pytorch", "matplotlib")
DRAWS = "pipeline.coil.report"


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
            mod = ".".join(path.relative_to(REPO).with_suffix("").parts)
            allowed = {"matplotlib"} if mod == DRAWS else set()
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in set(FORBIDDEN) - allowed]
    assert offenders == []


def test_importing_every_pipeline_module_loads_no_torch() -> None:
    modules = [
        ".".join(p.relative_to(REPO).with_suffix("").parts)
        for p in sorted((REPO / "pipeline").rglob("*.py"))
        if p.stem != "__init__"
    ]
    runtime = [m for m in modules if m != DRAWS]
    code = (
        "import importlib, sys\n"
        f"for m in {runtime!r}: importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'export', 'calibration', 'matplotlib')]\n"
        f"importlib.import_module({DRAWS!r})\n"
        "bad += [m for m in sys.modules if m.split('.')[0] in ('torch', 'export', 'calibration')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    assert len(modules) >= 25
    assert "pipeline.inference.patchcore" in modules and DRAWS in modules
