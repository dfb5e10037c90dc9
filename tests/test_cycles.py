"""benchmarks/cpu_cycles.cpp (make cycles): the cost tables of the CPU kernels build against csrc/ and
print a finite, positive cost for every function of every map kind (table 1), for every kind, the
sum and the whole tile of the 48-map problem (table 2), and for each kind and member count of its maps
(table 3)."""
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
    per_kind, rest = out.split("(2) the whole tile")
    whole, by_k = rest.split("(3) the maps of (2)")

    def rows(text):
        return {line.split("|")[1].strip(): [v.strip() for v in line.strip().strip("|").split("|")[1:]]
                for line in text.splitlines() if line.startswith("| ") and "---" not in line}

    table = rows(per_kind)
    assert set(table) == {"map", *KINDS}, out
    for kind in KINDS:
        values = [float(v) for v in table[kind]]
        assert len(values) == 8 and all(math.isfinite(v) and v >= 0 for v in values), table[kind]
        assert values[6] > 0 and values[7] > 0  # forward and backward totals
    table = rows(whole)
    assert [int(table[kind][0]) for kind in KINDS] == [4, 11, 11, 11, 11], out  # maps of each kind at L = 4
    for name in (*KINDS, "sum of the functions alone", "the tile run as the library runs it"):
        forward, backward = (float(v) for v in table[name][-2:])
        assert math.isfinite(forward) and math.isfinite(backward) and forward > 0 and backward > 0, table[name]
    table = rows(by_k)  # L = 4: the original maps (k = 1), every other kind with k = 2, 3, 4 (6, 4, 1 maps)
    expected = {"orig, k = 1": 4, **{f"{kind}, k = {k}": n for kind in KINDS[1:] for k, n in ((2, 6), (3, 4), (4, 1))}}
    assert {name: int(row[0]) for name, row in table.items() if name != "map"} == expected, out
    for name in expected:
        values = [float(v) for v in table[name][1:]]
        assert len(values) == 8 and all(math.isfinite(v) and v >= 0 for v in values), table[name]
        assert values[6] > 0 and values[7] > 0, table[name]
    assert subprocess.run([str(exe), "17"], capture_output=True).returncode == 2  # classes out of range
