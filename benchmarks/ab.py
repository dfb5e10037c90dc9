"""A/B timing of the CPU kernels: this working tree's build against another git revision's, interleaved.

    python benchmarks/ab.py HEAD~1                  # synapse2d, 8 pairs, the avx512 (else best) variant
    python benchmarks/ab.py v0.3 --config l5 --pairs 12

Small kernel changes (a few %) drown in this shared machine's run-to-run noise (±5% per run) when the
two builds are timed minutes apart. This builds REV's kernels (``git archive`` of csrc/ and setup.py
into a temporary folder, ``setup.py build_ext --inplace``), then times forward+backward of the current
library and REV's library alternately, each run in a fresh process (``benchmarks/run.py``'s worker,
with ``LOMIX_CPU_LIBRARY`` pointing at the library), and prints both means, the mean of the per-pair
ratios and its ~95% interval. Both libraries must have the same C ABI (``lomix_cpu_abi_version``);
the Python side is always this tree's. Build this tree first (``make setup`` or ``pip install -e .``).
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run import _worker_process  # noqa: E402  (one worker: the same timing as make bench)


def library(folder: Path, variant: str) -> str:
    """The ``variant`` kernel library built in the checkout at ``folder``."""
    from lomix_kernels.cpu import _built_variants  # one place for the libraries' file names

    found = _built_variants(str(folder / "lomix_kernels")).get(variant)
    if not found:
        raise SystemExit(f"no {variant} kernel library in {folder / 'lomix_kernels'}")
    return found


def build_revision(rev: str, into: Path) -> None:
    """REV's csrc/ and setup.py, compiled in place (all of its variants) under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "csrc", "setup.py", "pyproject.toml",
                              "lomix_kernels/__init__.py"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=into, check=True,
                   capture_output=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the git revision to compare against (e.g. HEAD~1)")
    ap.add_argument("--config", default="synapse2d")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per run (median)")
    ap.add_argument("--variant", default="avx512", help="which ISA variant's library to compare")
    args = ap.parse_args()
    current = library(ROOT, args.variant)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building {args.rev} ...", flush=True)
        build_revision(args.rev, Path(tmp))
        base = library(Path(tmp), args.variant)
        times = {"base": [], "current": []}
        for i in range(args.pairs):
            for name, lib in (("base", base), ("current", current)):
                os.environ["LOMIX_CPU_LIBRARY"] = lib
                r = _worker_process(args.config, "cpu", args.repeats, 1.0, "time", 1500)
                if "error" in r:
                    raise SystemExit(f"{name}: {r['error']}")
                times[name].append(r["median_s"] * 1e3)
            print(f"pair {i + 1}: {args.rev} {times['base'][-1]:.1f} ms, current {times['current'][-1]:.1f} ms",
                  flush=True)
    ratios = [c / b for b, c in zip(times["base"], times["current"])]
    mean = sum(ratios) / len(ratios)
    sd = math.sqrt(sum((r - mean) ** 2 for r in ratios) / max(1, len(ratios) - 1))
    half = 2 * sd / math.sqrt(len(ratios))
    print(f"\n{args.config}, {args.variant}, {args.pairs} interleaved pairs: {args.rev} "
          f"{sum(times['base']) / len(ratios):.1f} ms, current {sum(times['current']) / len(ratios):.1f} ms; "
          f"current / {args.rev} = {mean:.3f} (±{half:.3f}, ~95%)")


if __name__ == "__main__":
    main()
