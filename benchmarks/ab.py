"""A/B timing of the CPU kernels: this working tree's build against another git revision's, interleaved.

    python benchmarks/ab.py HEAD~1                  # synapse2d, 8 pairs, the avx512 (else best) variant
    python benchmarks/ab.py v0.3 --config l5 --pairs 12
    python benchmarks/ab.py HEAD --in-process --pairs 20   # the raw kernels, both libraries in one process

Small kernel changes (a few %) drown in this shared machine's run-to-run noise (±5% per run) when the
two builds are timed minutes apart. This builds REV's kernels (``git archive`` of csrc/ and setup.py
into a temporary folder, ``setup.py build_ext --inplace``), then times forward+backward of the current
library and REV's library alternately, each run in a fresh process (``benchmarks/run.py``'s worker,
with ``LOMIX_CPU_LIBRARY`` pointing at the library), and prints both means, the mean of the per-pair
ratios and its ~95% interval. Both libraries must have the same C ABI (``lomix_cpu_abi_version``);
the Python side is always this tree's. Build this tree first (``make setup`` or ``pip install -e .``).

``--in-process`` loads both libraries into one process and times, per library and pair, its raw kernels
(forward, then backward; no finish, no autograd) and a whole loss step (``LoMixLoss`` forward+backward),
alternately on the same inputs, the order swapped every pair: the machine's drift between processes
drops out, and the per-pair ratios of synapse2d's raw kernels scatter by ~±1% (one thread) instead of
the step's ~±3–5% between processes — changes of 1–2% become measurable.
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


def loaded_variant() -> str:
    """The ISA variant ``lomix_kernels.cpu`` loads on this CPU (the tools' default ``--variant``)."""
    from lomix_kernels import cpu

    if not cpu.available():
        raise SystemExit(f"no CPU kernels loaded: {cpu.unavailable_reason()}")
    return cpu.variant()


# What building the kernel libraries needs, relative to the checkout (build_revision, cpu_probes.py).
BUILD_FILES = ("csrc", "setup.py", "pyproject.toml", "lomix_kernels/__init__.py")


def build_in_place(folder: Path) -> None:
    """Compile the kernel libraries (all variants) of the BUILD_FILES under ``folder``, next to them."""
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=folder, check=True,
                   capture_output=True)


def build_revision(rev: str, into: Path) -> None:
    """REV's csrc/ and setup.py, compiled in place (all of its variants) under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *BUILD_FILES], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    build_in_place(into)


def raw_kernel_args(crit):
    """(plan, params) that ``lomix_kernels.cpu.CpuKernels.forward``/``backward`` take for ``crit``'s maps:
    its Plan and its packed parameters, detached (the raw kernels, no autograd)."""
    import torch

    from lomix_kernels.fused import Plan, packed_params

    L, C = crit.num_stages, crit.num_classes
    params = [p.detach() for p in packed_params(crit.maps, L, C, crit.cat_weight, crit.cat_bias, crit.awf_weight,
                                                crit.awf_bias, crit.awf_param, torch.device("cpu"))]
    return Plan.build(crit.maps, L, C, crit.options(), crit.awf_param), params


def raw_problem(config: str, scale: float = 1.0, threads: int = 0):
    """``(crit, logits, target, plan, params, raw_logits, stat_grads)``: ``config``'s inputs (spatial sizes
    scaled by ``scale``), its loss module, the raw kernels' arguments (``raw_kernel_args``), the logits
    detached and seeded statistic gradients — on ``threads`` threads (0: torch's default)."""
    import torch

    from run import make_problem

    import lomix_kernels as lk

    if threads:
        torch.set_num_threads(threads)
    B, C, L, spatial, heads, logits, target = make_problem(config, scale)
    crit = lk.LoMixLoss(L, C, backend="cpu")
    plan, params = raw_kernel_args(crit)
    torch.manual_seed(1)
    stat_grads = [torch.randn(len(crit.maps), B, C) * 1e-3 for _ in range(3)]
    return crit, logits, target, plan, params, [z.detach() for z in logits], stat_grads


def alternate(libraries: dict, rounds: int, one) -> dict:
    """{name: [one(), ...]}: each kernel library of ``libraries`` ({name: path}) loaded in turn (the one
    ``lomix_kernels.cpu`` calls) for a call of ``one``, first once each as a warm-up (first-touch pages,
    thread pools), then ``rounds`` times, the order reversed every other round; the loaded library is
    restored at the end."""
    from lomix_kernels import cpu

    opened = {name: cpu._open(path) for name, path in libraries.items()}
    loaded = cpu._LIB
    out = {name: [] for name in opened}
    try:
        for lib in opened.values():
            cpu._LIB = lib  # (CpuKernels calls the library through cpu._library())
            one()
        for i in range(rounds):
            order = list(opened.items()) if i % 2 == 0 else list(opened.items())[::-1]
            for name, lib in order:
                cpu._LIB = lib
                out[name].append(one())
    finally:
        cpu._LIB = loaded
    return out


def in_process_pairs(config: str, libraries: dict, pairs: int, threads: int = 0, scale: float = 1.0) -> dict:
    """{name: [(raw forward ms, raw backward ms, step ms), ...]}: each library in ``libraries`` ({name:
    path}) timed alternately in this process on ``config``'s inputs (order reversed every other pair), on
    ``threads`` threads (0: torch's default), spatial sizes scaled by ``scale``. Each library's gradient
    buffers stay in its own pool."""
    import time

    from lomix_kernels import cpu

    crit, logits, target, plan, params, raw_logits, stat_grads = raw_problem(config, scale, threads)

    def one():
        for z in logits:
            z.grad = None  # (the last step's gradients back to their library's pool)
        crit.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        cpu.CpuKernels.forward(plan, raw_logits, target, None, params)
        t1 = time.perf_counter()
        grads = cpu.CpuKernels.backward(plan, raw_logits, target, None, params, *stat_grads)
        t2 = time.perf_counter()
        del grads
        t3 = time.perf_counter()
        crit(logits, target).backward()
        t4 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t4 - t3) * 1e3

    try:
        return alternate(libraries, pairs, one)
    finally:
        for z in logits:
            z.grad = None


def summary(rev: str, config: str, what: str, base: list, current: list) -> str:
    """Both means and the mean per-pair ratio current / base with its ~95% interval."""
    ratios = [c / b for b, c in zip(base, current)]
    mean = sum(ratios) / len(ratios)
    sd = math.sqrt(sum((r - mean) ** 2 for r in ratios) / max(1, len(ratios) - 1))
    half = 2 * sd / math.sqrt(len(ratios))
    return (f"{config}, {what}, {len(ratios)} interleaved pairs: {rev} {sum(base) / len(base):.1f} ms, "
            f"current {sum(current) / len(current):.1f} ms; current / {rev} = {mean:.3f} (±{half:.3f}, ~95%)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the git revision to compare against (e.g. HEAD~1)")
    ap.add_argument("--config", default="synapse2d")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per run (median)")
    ap.add_argument("--variant", default=None, help="which ISA variant's library to compare (default: the one this CPU loads)")
    ap.add_argument("--in-process", action="store_true", help="time the raw kernels of both libraries in one process")
    ap.add_argument("--threads", type=int, default=0, help="with --in-process: kernel threads (1 is the steadiest)")
    args = ap.parse_args()
    args.variant = args.variant or loaded_variant()
    current = library(ROOT, args.variant)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building {args.rev} ...", flush=True)
        build_revision(args.rev, Path(tmp))
        base = library(Path(tmp), args.variant)
        if args.in_process:
            t = in_process_pairs(args.config, {"base": base, "current": current}, args.pairs, args.threads)
            for what, value in (("raw forward", lambda x: x[0]), ("raw backward", lambda x: x[1]),
                                ("raw forward+backward", lambda x: x[0] + x[1]), ("step", lambda x: x[2])):
                print(summary(args.rev, args.config, what, [value(x) for x in t["base"]],
                              [value(x) for x in t["current"]]))
            return
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
    print("\n" + summary(args.rev, args.config, f"{args.variant}, step", times["base"], times["current"]))


if __name__ == "__main__":
    main()
