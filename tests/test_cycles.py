"""benchmarks/cpu_cycles.cpp (make cycles): the per-function cost table of the CPU kernels builds
against csrc/ and prints a finite, positive cost for every function of every map kind."""
import math
import platform
import subprocess
from pathlib import Path

from lomix_kernels import cpu

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("orig", "add", "mult", "cat", "awf")


def _march():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    return ["-march=x86-64-v4"] if cpu.cpu_level() >= 4 else ["-march=x86-64-v3"]


def test_cycle_table_builds_and_runs(tmp_path):
    exe = tmp_path / "cpu_cycles"
    subprocess.run(["g++", "-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math", *_march(), "-fopenmp",
                    str(ROOT / "benchmarks" / "cpu_cycles.cpp"), "-o", str(exe)], check=True, capture_output=True)
    out = subprocess.run([str(exe), "5", "200"], check=True, capture_output=True, text=True).stdout
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"map", *KINDS}, out
    for kind in KINDS:
        values = [float(v) for v in rows[kind].strip().strip("|").split("|")[1:]]
        assert len(values) == 8 and all(math.isfinite(v) and v >= 0 for v in values), rows[kind]
        assert values[6] > 0 and values[7] > 0  # forward and backward totals
    assert subprocess.run([str(exe), "17"], capture_output=True).returncode == 2  # classes out of range
