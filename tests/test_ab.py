"""benchmarks/ab.py: the in-process A/B timing of two kernel libraries (the tool behind CPU_LOG's ratios)."""
import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ab  # noqa: E402

from lomix_kernels import cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available(), reason=cpu.unavailable_reason())


def test_in_process_pairs_times_each_library_and_restores_the_loaded_one():
    loaded = cpu._LIB
    path = cpu._built_variants()[cpu.variant()]
    times = ab.in_process_pairs("synapse2d", {"base": path, "current": path}, pairs=3, threads=1, scale=0.1)
    assert cpu._LIB is loaded
    assert set(times) == {"base", "current"}
    for rows in times.values():
        assert len(rows) == 3
        assert all(len(r) == 3 and all(math.isfinite(x) and x > 0 for x in r) for r in rows)


def test_summary_is_the_mean_of_the_per_pair_ratios():
    line = ab.summary("REV", "cfg", "step", [10.0, 20.0, 40.0], [5.0, 20.0, 60.0])
    ratio, half = map(float, re.search(r"= ([\d.]+) \(±([\d.]+)", line).groups())
    assert ratio == pytest.approx((0.5 + 1.0 + 1.5) / 3, abs=1e-3)
    assert half == pytest.approx(2 * 0.5 / math.sqrt(3), abs=1e-3)
    assert "REV 23.3 ms, current 28.3 ms" in line
