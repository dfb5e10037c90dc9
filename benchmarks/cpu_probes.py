"""Where the fused CPU kernels' time goes outside the per-map functions: wrong-results probe builds.

    python benchmarks/cpu_probes.py                          # synapse2d, two threads, 8 rounds
    python benchmarks/cpu_probes.py --config ct3d-native --pairs 4 --threads 1

``make cycles`` times each per-tile function with the tile in L1; this asks what the library does around
them. It builds this working tree's kernels several times, each with one change to the pass over the
work items (a source patch in a temporary copy: the results are wrong on purpose, only the time counts),
loads them all into one process and times their raw forward and backward alternately on the same inputs
(``ab.in_process_pairs``, the order reversed every other round). The probes:

- **kernels**: unchanged;
- **maps twice**: every tile's maps computed twice (the stages' exponentials made again): the increment
  is the maps' work as the library runs it — a lower bound, since the second pass finds the tile's
  data, statistics partials and parameter partials warm (so "everything else" is an upper bound);
- **no maps**: no map at all — the streaming alone: the tile loads (logits, labels, target sums), the
  backward's zeroed tile gradients and gradient stores, the flushes and reductions;
- **L2-resident logits**: every tile's logits read from the first 4096 pixels of its rows (an
  L2-resident window): the time the loads wait on memory that the next tile's prefetch does not hide;
- **no gradient stores**: the backward's gradient rows not written.

It prints each probe's medians (markdown) and the split they imply. With native-resolution heads the
resampled stages' interpolation is part of "no maps" (the L2-resident probe moves only the stages at
output resolution).

    python benchmarks/cpu_probes.py --phases --threads 1   # x86: time stamp counter ticks per tile

``--phases`` asks the tile's phases instead (how the next tile's prefetch was found never to have been
compiled): the kernels and the **L1-resident logits** probe (every tile reads its sample's first tile) are
built with the time stamp counter read around each phase of the pass over a tile — the forward's tile load
and maps, the backward's tile load, maps and gradient stores — summed over the threads, and it prints
the median ticks per tile of each. The loads' difference between the two is their wait on memory; a
change that only moves a wait from one phase to another shows up as such.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
# ab.py: one place for the build, the timing and the library names
from ab import (BUILD_FILES, alternate, build_in_place, in_process_pairs, library, loaded_variant,  # noqa: E402
                raw_problem)

# (file, the source text, its replacement): each must match exactly once in this tree's csrc/.
FORWARD_MAPS = "        forward_maps(pr, ly, tl, lanes);\n"
BACKWARD_MAPS = "        backward_maps(pr, ly, tl, gce, ginter, qgz.data(), B, item.b, dp);\n"
RESET_EXPS = "        std::fill(tl.ex_ready.begin(), tl.ex_ready.end(), 0);\n"
STORES = "        store_gradient_rows(pr, stages, item.b, p0, n, tl, grad_logits);\n"
PROBES = {
    "kernels": [],
    "maps twice": [
        ("lomix_cpu.cpp", FORWARD_MAPS, FORWARD_MAPS + RESET_EXPS + FORWARD_MAPS),
        ("lomix_cpu.cpp", BACKWARD_MAPS, BACKWARD_MAPS + RESET_EXPS + BACKWARD_MAPS),
    ],
    "no maps": [
        ("lomix_cpu.cpp", FORWARD_MAPS, ""),
        ("lomix_cpu.cpp", BACKWARD_MAPS, "        std::fill(tl.gx.begin(), tl.gx.end(), 0.0f);\n"),
    ],
    "L2-resident logits": [
        ("interpolate.h", "const int64_t off = (b * C + c) * P + p0;", "const int64_t off = (b * C + c) * P + p0 % 4096;"),
        ("interpolate.h", "pr.pixels + p0 + TP) * es;", "pr.pixels + p0 % 4096 + TP) * es;"),
    ],
    "no gradient stores": [
        ("lomix_cpu.cpp", STORES, ""),
    ],
}

# --phases: ticks of the time stamp counter around each phase, summed in probe_ticks (atomics: every thread's)
# and read and reset through lomix_cpu_phase_ticks; slots 5 and 6 count the forward's and backward's tiles.
PHASES = ["forward: tile load", "forward: maps", "backward: tile load", "backward: maps", "backward: gradient stores"]
FORWARD_LOAD = "        load_tile(pr, stages, item.b, p0, n, tl, true, errs[it]);\n"
BACKWARD_LOAD = "        load_tile(pr, stages, item.b, p0, n, tl, false, errs[it]);\n"


def _timed(line: str, slot: int, count_slot: int = -1) -> tuple:
    count = f" probe_ticks[{count_slot}].fetch_add(1);" if count_slot >= 0 else ""
    return ("lomix_cpu.cpp", line, "        { const uint64_t probe_t0 = __rdtsc();\n" + line
            + f"        probe_ticks[{slot}].fetch_add(__rdtsc() - probe_t0);{count} }}\n")


PHASE_TIMERS = [
    ("interpolate.h", '#include "layout.h"\n',
     '#include "layout.h"\n#include <atomic>\n#include <x86intrin.h>\n'
     "static std::atomic<uint64_t> probe_ticks[7];  // cpu_probes.py --phases\n"),
    _timed(FORWARD_LOAD, 0, 5), _timed(FORWARD_MAPS, 1), _timed(BACKWARD_LOAD, 2, 6), _timed(BACKWARD_MAPS, 3),
    _timed(STORES, 4),
    ("lomix_cpu.cpp", 'extern "C" {\n', 'extern "C" {\nvoid lomix_cpu_phase_ticks(double* out) {  // cpu_probes.py\n'
     "  for (int i = 0; i < 7; ++i) out[i] = (double)probe_ticks[i].exchange(0);\n}\n"),
]
L1_RESIDENT_LOGITS = [
    ("interpolate.h", "const int64_t off = (b * C + c) * P + p0;", "const int64_t off = (b * C + c) * P + p0 % TP;"),
    ("interpolate.h", "pr.pixels + p0 + TP) * es;", "pr.pixels + p0 % TP) * es;"),
]


def patched_sources(patches: list) -> dict:
    """{file name: text} of this tree's csrc/ files that ``patches`` change, with the patches applied."""
    texts = {}
    for file, old, new in patches:
        text = texts.get(file, (ROOT / "csrc" / file).read_text())
        if text.count(old) != 1:
            raise SystemExit(f"cpu_probes.py: csrc/{file} changed; update the probe patch for {old.strip()!r}")
        texts[file] = text.replace(old, new)
    return texts


def build_probe(patches: list, into: Path) -> None:
    """This tree's build files (``ab.BUILD_FILES``) with ``patches`` applied to csrc/, compiled in place
    under ``into``."""
    for name in BUILD_FILES:
        source, target = ROOT / name, into / name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    for file, text in patched_sources(patches).items():
        (into / "csrc" / file).write_text(text)
    build_in_place(into)


def split(med: dict) -> list:
    """(label, forward ms, backward ms) rows of the split the probes' medians ``med`` ({probe: (forward,
    backward)}) imply; None where a probe does not apply."""
    k, twice = med["kernels"], med["maps twice"]
    maps = [t - x for t, x in zip(twice, k)]
    return [
        ("the maps as the library runs them, at least (maps twice − kernels)", *maps),
        ("everything else, at most (kernels − that)", *[x - m for x, m in zip(k, maps)]),
        ("… of which waiting on the logits' loads (kernels − L2-resident)",
         *[x - r for x, r in zip(k, med["L2-resident logits"])]),
        ("… of which the gradient stores (kernels − no stores; backward)", None, k[1] - med["no gradient stores"][1]),
        ("the streaming alone, not overlapped (no maps)", *med["no maps"]),
    ]


def phase_ticks(config: str, libraries: dict, rounds: int, threads: int) -> dict:
    """{name: [[ticks per tile of each of PHASES], ...]} of libraries built with PHASE_TIMERS, their raw
    forward and backward run alternately on ``config``'s inputs (``ab.raw_problem``, ``ab.alternate``)."""
    import ctypes

    from lomix_kernels import cpu

    _, _, target, plan, params, raw, stat_grads = raw_problem(config, 1.0, threads)
    ticks = (ctypes.c_double * 7)()

    def one():
        cpu._LIB.lomix_cpu_phase_ticks(ticks)  # (reset)
        cpu.CpuKernels.forward(plan, raw, target, None, params)
        grads = cpu.CpuKernels.backward(plan, raw, target, None, params, *stat_grads)
        del grads  # (back to the library's pool)
        cpu._LIB.lomix_cpu_phase_ticks(ticks)
        fwd_tiles, bwd_tiles = max(ticks[5], 1.0), max(ticks[6], 1.0)
        return [t / n for t, n in zip(ticks[:5], (fwd_tiles, fwd_tiles, bwd_tiles, bwd_tiles, bwd_tiles))]

    return alternate(libraries, rounds, one)


def build_all(builds: dict, tmp: str, variant: str) -> dict:
    """{name: the ``variant`` library} of each build ({name: patches}), built under ``tmp``."""
    libs = {}
    for name, patches in builds.items():
        print(f"building: {name} ...", flush=True)
        folder = Path(tmp) / name.replace(" ", "_")
        folder.mkdir()
        build_probe(patches, folder)
        libs[name] = library(folder, variant)
    return libs


def main_phases(args) -> None:
    builds = {"kernels": PHASE_TIMERS, "L1-resident logits": L1_RESIDENT_LOGITS + PHASE_TIMERS}
    with tempfile.TemporaryDirectory() as tmp:
        rows = phase_ticks(args.config, build_all(builds, tmp, args.variant), args.pairs, args.threads)
    print(f"\n{args.config}, {args.threads} thread(s), {args.variant}, medians of {args.pairs} rounds: time stamp "
          "counter ticks per tile\n")
    print("| phase | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
    for k, phase in enumerate(PHASES):
        print(f"| {phase} | " + " | ".join(f"{statistics.median(r[k] for r in rows[n]):.0f}" for n in rows) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="synapse2d")
    ap.add_argument("--pairs", type=int, default=8, help="rounds of all probes, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", default=None, help="the ISA variant to build the probes of (default: the one this CPU loads)")
    ap.add_argument("--phases", action="store_true", help="ticks per tile of each phase (x86), see above")
    args = ap.parse_args()
    args.variant = args.variant or loaded_variant()
    if args.phases:
        main_phases(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        times = in_process_pairs(args.config, build_all(PROBES, tmp, args.variant), args.pairs, args.threads)

    med = {name: (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
           for name, rows in times.items()}
    print(f"\n{args.config}, {args.threads} thread(s), {args.variant}, medians of {args.pairs} interleaved rounds "
          f"(raw kernels, ms)\n")
    print("| probe | forward | backward |\n|---|---|---|")
    for name, (f, b) in med.items():
        print(f"| {name} | {f:.1f} | {b:.1f} |")
    print("\n| split | forward | backward |\n|---|---|---|")
    for label, *cells in split(med):
        print(f"| {label} | " + " | ".join("—" if v is None else f"{v:.1f}" for v in cells) + " |")


if __name__ == "__main__":
    main()
