"""benchmarks/floor.py: the work model and the CPU floor the benchmark table divides by."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import floor  # noqa: E402
import run  # noqa: E402

import lomix_kernels as lk  # noqa: E402


def test_work_grows_with_classes_and_maps():
    small, more_classes, more_maps = (floor.work_per_pixel(lk.LoMixLoss(L, C)) for L, C in ((3, 4), (3, 8), (4, 4)))
    assert more_classes[0] > 2 * small[0] and more_classes[1] > small[1]
    assert more_maps[0] > small[0] and more_maps[1] > small[1]
    # deep supervision: per map only the softmax/statistics work, no operator builds or adjoints — the
    # forward's softmax 4C and sums 4C, the backward's softmax 4C and dL/dz 8C (q = 2); the stages'
    # exponentials (forward and recompute) and one logarithm per map
    ds = floor.work_per_pixel(lk.LoMixLoss(4, 9, scheme="deep_supervision"))
    assert ds == (4 * 20 * 9, 4 * 2 * 9 + 4)


def test_dl_dz_counts_the_squared_dice_terms():
    """dL/dz takes 8 operations per class with the squared Dice denominator (q = 2), 7 with q = 1
    (floor.DLDZ_OPS): one C per map between the two."""
    squared, plain = (lk.LoMixLoss(4, 9, dice_squared=q2) for q2 in (True, False))
    assert floor.work_per_pixel(squared)[0] - floor.work_per_pixel(plain)[0] == len(squared.maps) * 9
    assert floor.work_per_pixel(squared)[1] == floor.work_per_pixel(plain)[1]


def test_add_maps_multiply_their_members_exponentials():
    """With the original maps in the plan, an add map costs (k−1)·C products per pass instead of 2C
    exponentials and builds no logits in either pass (csrc/layout.h's rule); it and the original maps
    take their CE sums' logit part from per-stage sums (2C per stage, 3C for a map's own sums instead of
    4C); with a sigmoid it has its own exponentials."""
    C, L = 9, 4
    with_add = floor.work_per_pixel(lk.LoMixLoss(L, C, ops=["add"]))
    no_add = floor.work_per_pixel(lk.LoMixLoss(L, C, ops=[]))
    add_maps = [m for m in lk.LoMixLoss(L, C, ops=["add"]).maps if m.op == "add"]
    assert with_add[1] - no_add[1] == len(add_maps)  # the forward's logarithm only
    # per map: both passes' products, the adjoint, the softmax work (4C + 4C), its sums (3C), dL/dz (8C)
    per_map = sum(3 * (len(m.members) - 1) * C + 19 * C for m in add_maps)
    stages = 2 * C * L - C * L  # the stages' CE sums, and one C less for each original map's sums
    assert with_add[0] - no_add[0] == per_map + stages
    sigmoid = lk.LoMixLoss(4, 1, ops=["add"], activation="sigmoid")  # every add map its own exponentials
    assert floor.work_per_pixel(sigmoid)[1] == 2 * 1 * 4 + len(add_maps) * (2 * 1 + 1) + 4


def test_cpu_floor_divides_by_the_variant_lanes(monkeypatch):
    monkeypatch.setattr(floor, "vector_fma_rate", lambda: 4e9)
    monkeypatch.setattr(floor, "cpu_copy_bandwidth", lambda: 1e12)
    crit = lk.LoMixLoss(4, 9)
    wide, narrow = (floor.cpu_floor(crit, 10 ** 6, 10.0, 1.0, 2, v) for v in ("avx512", "avx2"))
    ops, exps = floor.work_per_pixel(crit)
    assert wide["floor_compute_s"] == pytest.approx((ops + exps * 8) * 1e6 / (2 * 16 * 4e9))
    assert narrow["floor_compute_s"] == pytest.approx((ops + exps * 11) * 1e6 / (2 * 8 * 4e9))
    assert wide["floor_s"] == max(wide["floor_compute_s"], wide["floor_memory_s"])
    assert run.floor_ratio({"median_s": 0.3, **wide}).startswith(f"{0.3 / wide['floor_s']:.2f}x of ")
    assert run.floor_ratio({"error": "x"}) == "—"


def test_the_library_measures_its_vector_fma_rate():
    """The peak comes from the kernel library on this machine: positive, below a (generous) physical bound
    of 4 vector FMAs per cycle at 6 GHz, and repeatable within a factor of two."""
    from lomix_kernels import cpu

    if not cpu.available():
        pytest.skip(cpu.unavailable_reason())
    a, b = cpu.vector_fma_rate(2_000_000), cpu.vector_fma_rate(2_000_000)
    assert 1e8 < a < 4 * 6e9 and 0.5 < a / b < 2.0


def test_cpu_breakdown_rows_add_up():
    """benchmarks/cpu_breakdown.py on a tiny config: one row per map kind with positive times and
    floors, and the whole step's floor equals the floor of the full plan."""
    import subprocess

    from lomix_kernels import cpu

    if not cpu.available():
        pytest.skip(cpu.unavailable_reason())
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_breakdown.py"
    out = subprocess.run([sys.executable, str(script), "--config", "smoke2d", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"maps", "original (and per-step costs)", "add", "mult", "cat", "awf", "all (one step)"}
    for kind in ("add", "mult", "cat", "awf"):  # L = 3: 4 subsets (3 pairs, 1 triple) per operator
        count, fwd, bwd, both, floor_ms, ratio = rows[kind]
        assert int(count) == 4 and float(floor_ms) > 0
        float(fwd), float(bwd), float(ratio)  # numbers (differences of tiny timings may be negative)
    assert int(rows["all (one step)"][0]) == 3 + 4 * 4
