"""Where the fused CPU loss spends its time, by map kind, next to each kind's share of the floor.

    python benchmarks/cpu_breakdown.py                      # synapse2d
    python benchmarks/cpu_breakdown.py --config ct3d-native --repeats 3

Times the fused loss with the original maps only, then with the original maps plus one operator's
maps (add, mult, cat, awf): the difference, divided by that operator's map count, is what one such map
costs — forward (under no_grad) and backward (forward+backward minus forward) — and the same
difference of benchmarks/floor.py's work model is its floor. The first row (original maps only)
carries the per-step costs every plan pays: loading the tile (reading or interpolating the logits),
the stages' exponentials, writing the gradients. Median of ``--repeats`` steps after a warm-up, one
process, so rows compare within a run (this machine's noise between runs is ±5%).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from floor import cpu_floor  # noqa: E402  (one place for the work model)
from run import make_problem  # noqa: E402  (the benchmark table's inputs)

KINDS = ("add", "mult", "cat", "awf")


def step_times(crit, logits, target, repeats: int):
    """(forward s, backward s): medians over ``repeats`` steps after one warm-up step."""
    import torch

    def one():
        for z in logits:
            z.grad = None
        crit.zero_grad(set_to_none=True)
        with torch.no_grad():
            t0 = time.perf_counter()
            crit(logits, target)
            t1 = time.perf_counter()
        loss = crit(logits, target)
        loss.backward()
        t2 = time.perf_counter()
        return t1 - t0, (t2 - t1) - (t1 - t0)

    one()
    fwd, bwd = zip(*(one() for _ in range(repeats)))
    return statistics.median(fwd), statistics.median(bwd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="synapse2d")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch

    import lomix_kernels as lk

    B, C, L, spatial, heads, logits, target = make_problem(args.config, 1.0)
    pixels = B * math.prod(spatial)
    threads, variant = torch.get_num_threads(), lk.cpu.variant()

    def measure(ops):
        crit = lk.LoMixLoss(L, C, backend="cpu", ops=ops)
        fwd, bwd = step_times(crit, logits, target, args.repeats)
        floor = cpu_floor(crit, pixels, 0.0, 0.0, threads, variant)["floor_compute_s"]
        return len(crit.maps), fwd, bwd, floor

    print(f"{args.config}: B={B} C={C} L={L} {spatial}, heads {heads}, {threads} threads, {variant} build")
    print("| maps | count | forward ms / map | backward ms / map | both | floor ms / map | × floor |")
    print("|---|---|---|---|---|---|---|")
    n0, f0, b0, fl0 = measure([])
    print(f"| original (and per-step costs) | {n0} | {1e3 * f0 / n0:.3g} | {1e3 * b0 / n0:.3g} | "
          f"{1e3 * (f0 + b0) / n0:.3g} | {1e3 * fl0 / n0:.3g} | {(f0 + b0) / fl0:.1f} |")
    for kind in KINDS:
        n, f, b, fl = measure([kind])
        k = n - n0
        df, db, dfl = (f - f0) / k, (b - b0) / k, (fl - fl0) / k
        print(f"| {kind} | {k} | {1e3 * df:.3g} | {1e3 * db:.3g} | {1e3 * (df + db):.3g} | {1e3 * dfl:.3g} | "
              f"{(df + db) / dfl:.1f} |")
    n, f, b, fl = measure(None)
    print(f"| all (one step) | {n} | {1e3 * f:.4g} ms | {1e3 * b:.4g} ms | {1e3 * (f + b):.4g} ms | "
          f"{1e3 * fl:.4g} ms | {(f + b) / fl:.2f} |")


if __name__ == "__main__":
    main()
