"""The package's import layering: `module` -> `functional` -> backends -> `fused` -> `reference`/`params`
-> `inputs`/`finish`/`spec`, with no import running back up, and the integrations never imported by the
core package."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "lomix_kernels"
FLOOR = {  # a module imports only modules on lower floors (the README's layering, bottom first)
    "finish": 0, "inputs": 0,
    "spec": 1,
    "params": 2, "reference": 2,
    "fused": 3,
    "cpu": 4, "triton_backend": 4,
    "functional": 5, "report": 5,
    "module": 6,
    "bench": 7, "__init__": 7,
}


def _package_imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
    return names


def test_no_import_runs_back_up():
    assert {p.stem for p in PKG.glob("*.py")} == set(FLOOR), "a new module needs its floor here"
    for name, floor in FLOOR.items():
        for dep in _package_imports(PKG / f"{name}.py"):
            assert dep in FLOOR, f"{name} imports {dep}, which has no floor in this test"
            assert FLOOR[dep] < floor, f"{name} (floor {floor}) imports {dep} (floor {FLOOR[dep]})"


def test_core_package_never_imports_the_integrations():
    code = ("import sys, lomix_kernels; lomix_kernels.LoMixLoss(3, 3); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('nnunetv2', 'monai') "
            "or m.startswith('lomix_kernels.integrations')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
