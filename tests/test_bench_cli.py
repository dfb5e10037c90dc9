"""``python -m lomix_kernels.bench``: the microbenchmark on the user's own problem."""
import json
import subprocess
import sys

import pytest

from lomix_kernels import bench, cpu


@pytest.mark.skipif(not cpu.available(), reason=cpu.unavailable_reason())
def test_quick_run_measures_fused_and_reference(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "lomix_kernels.bench", "--quick", "--impls", "fused,reference",
                        "--native", "4,2,1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| fused |" in p.stdout and "| reference |" in p.stdout
    rows = json.loads(out.read_text())["rows"]
    assert rows["fused"]["backend"] == "cpu" and rows["fused"]["cpu_variant"] == cpu.variant()
    for r in rows.values():
        assert r["median_s"] > 0 and r["peak_extra_mb"] >= 0 and r["maps"] == 19


def test_reference_that_would_not_fit_is_skipped_with_the_reason(capsys):
    code = bench.main(["--size", "2000", "2000", "2000", "--batch", "4", "--classes", "14", "--impls", "reference"])
    out = capsys.readouterr().out
    assert code == 0 and "skipped: would not fit" in out and "GB (estimated)" in out


def test_bad_problem_arguments():
    with pytest.raises(ValueError, match="--native needs 3 factors"):
        bench.make_inputs(3, 2, 1, (8, 8), native=[2, 1])
    with pytest.raises(SystemExit):
        bench.parse_args(["--size", "8"])


def test_package_without_compiled_kernels_falls_back_clearly(tmp_path):
    """The pure-Python package (no compiled library next to it) imports; auto uses the reference with
    one warning saying why; backend="cpu" raises that reason."""
    import shutil
    from pathlib import Path

    src = Path(bench.__file__).parent
    shutil.copytree(src, tmp_path / "lomix_kernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = """
import warnings, torch, lomix_kernels as lk
assert not lk.cpu.available() and "not found" in lk.cpu.unavailable_reason()
z = [torch.randn(1, 2, 4, 4, requires_grad=True) for _ in range(2)]
y = torch.randint(0, 2, (1, 4, 4))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    lk.LoMixLoss(2, 2)(z, y).backward()
assert any("falling back to the reference" in str(x.message) for x in w), [str(x.message) for x in w]
try:
    lk.LoMixLoss(2, 2, backend="cpu")(z, y)
    raise SystemExit("no error")
except RuntimeError as e:
    assert "backend='cpu' is unavailable" in str(e) and "not found" in str(e), e
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr
