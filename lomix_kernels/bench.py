"""Benchmark LoMix on your own problem: forward+backward time and peak extra memory of the fused
backend against the eager and the torch.compile'd reference, each in a fresh process.

    python -m lomix_kernels.bench --stages 4 --classes 9 --batch 6 --size 224 224
    python -m lomix_kernels.bench --size 96 96 96 --batch 2 --classes 14 --native 32,16,8,4 --device cuda
    python -m lomix_kernels.bench --quick                      # a small problem, a few seconds

``--native`` gives each head's downsampling factor, coarse -> fine (default: every head at the
target's size). Memory: on CPU the process's peak RSS during one forward+backward minus its RSS
just before (Linux); on CUDA torch.cuda.max_memory_allocated. The reference is skipped, with the
reason, when its estimated memory would not fit in what the device has free.
(benchmarks/run.py, the project's fixed table, measures through the same :func:`measure`.)
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

import torch

# Eager reference memory per (map × sample × class × pixel × 4 bytes): measured 3.3 on synapse2d
# (1.72 GB) and ct3d (15.6 GB); 4 leaves a margin.
REFERENCE_BYTES_FACTOR = 4.0
IMPLS = ("fused", "reference", "compiled")


def make_inputs(stages: int, classes: int, batch: int, size: Sequence[int], native: Optional[Sequence[int]] = None,
                device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """(logits, target): ``stages`` random heads (B, C, *size // native[i]) coarse -> fine, and a random
    (B, *size) int64 target."""
    g = torch.Generator().manual_seed(seed)
    factors = list(native) if native else [1] * stages
    if len(factors) != stages:
        raise ValueError(f"--native needs {stages} factors (one per stage, coarse -> fine), got {factors}")
    logits = [(torch.randn(batch, classes, *[max(1, s // f) for s in size], generator=g) * 2).to(device, dtype)
              .requires_grad_() for f in factors]
    target = torch.randint(0, classes, (batch, *size), generator=g).to(device)
    return logits, target


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(fn, cuda: bool) -> float:
    """Seconds one call of ``fn`` takes: CUDA events on a GPU, perf_counter on the CPU."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_extra_mb(fn, cuda: bool) -> float:
    """MB that one call of ``fn`` needs beyond what was allocated before it: allocated CUDA memory on a
    GPU, the process's RSS on the CPU (Linux; NaN where the peak cannot be reset)."""
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    can_reset = _reset_peak_rss()
    base = _rss_kb("VmRSS:")
    fn()
    return (_rss_kb("VmHWM:") - base) / 1024 if can_reset else float("nan")


def measure(crit, logits, target, *, compiled: bool = False, repeats: int = 5, mode: str = "time",
            max_seconds: Optional[float] = None) -> dict:
    """One warm-up forward+backward of ``crit`` (compiled with torch.compile if ``compiled``), then
    ``mode="time"``: the median of ``repeats`` timed steps (fewer, but at least 3, once ``max_seconds``
    have passed; CUDA events on a GPU); ``mode="mem"``: the peak extra memory of one step (RSS on
    CPU, allocated CUDA memory on a GPU), in MB."""
    fn = torch.compile(crit) if compiled else crit
    cuda = logits[0].is_cuda

    def step():
        for z in logits:
            z.grad = None
        crit.zero_grad(set_to_none=True)
        fn(logits, target).backward()

    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    out = {"warmup_s": time.perf_counter() - t0, "maps": len(crit.map_names),
           "logits_mb": sum(z.numel() * z.element_size() for z in logits) / 2 ** 20}
    if mode == "mem":
        gc.collect()
        for z in logits:
            z.grad = None
        crit.zero_grad(set_to_none=True)
        if not cuda:  # the CPU kernels' recycled gradient buffers count in the step's peak, as fresh ones would
            from . import cpu

            cpu.release_cached_gradients()
        out["peak_extra_mb"] = peak_extra_mb(step, cuda)
        return out
    times, started = [], time.perf_counter()
    while len(times) < repeats and (max_seconds is None or len(times) < 3
                                    or time.perf_counter() - started < max_seconds):
        times.append(timed(step, cuda))
    times.sort()
    out.update(median_s=times[len(times) // 2], min_s=times[0], max_s=times[-1], repeats=len(times))
    return out


def reference_fits(num_maps: int, batch: int, classes: int, pixels: int, device: str) -> tuple[bool, str]:
    """Whether the eager reference's estimated memory fits in what ``device`` has free, and why."""
    need = REFERENCE_BYTES_FACTOR * num_maps * batch * classes * pixels * 4
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info()[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return True, "free memory unknown"
    verdict = need < 0.8 * free
    return verdict, f"needs ~{need / 2 ** 30:.1f} GB (estimated), {free / 2 ** 30:.1f} GB free"


def _worker(args) -> dict:
    import lomix_kernels as lk

    dtype = getattr(torch, args.dtype)
    logits, target = make_inputs(args.stages, args.classes, args.batch, args.size, args.native, args.device, dtype)
    backend = args.backend if args.impl == "fused" else "reference"
    crit = lk.LoMixLoss(args.stages, args.classes, scheme=args.scheme, backend=backend,
                        validate=args.impl != "compiled").to(args.device)
    out = measure(crit, logits, target, compiled=args.impl == "compiled", repeats=args.repeats, mode=args.mode)
    if args.impl == "fused":
        from lomix_kernels.functional import resolve_backend

        out["backend"] = resolve_backend(backend, logits[0])
        if out["backend"] == "cpu":
            out["cpu_variant"] = lk.cpu.variant()
    return out


def _run(args, impl: str, mode: str) -> dict:
    cmd = [sys.executable, "-m", "lomix_kernels.bench", "--worker", "--impl", impl, "--mode", mode,
           *_problem_args(args)]
    env = dict(os.environ)
    if mode == "mem" and args.device == "cpu":  # glibc gives freed blocks back, so RSS shows every allocation
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        return {"error": (lines[-1] if lines else f"exit {p.returncode}")[:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _problem_args(args) -> list:
    out = ["--stages", str(args.stages), "--classes", str(args.classes), "--batch", str(args.batch),
           "--size", *map(str, args.size), "--scheme", args.scheme, "--backend", args.backend, "--dtype", args.dtype,
           "--device", args.device, "--repeats", str(args.repeats)]
    return out + (["--native", ",".join(map(str, args.native))] if args.native else [])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lomix_kernels.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, default=4, help="L, the number of heads (default 4)")
    ap.add_argument("--classes", type=int, default=9)
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--size", type=int, nargs="+", default=[224, 224], help="target size: H W or D H W")
    ap.add_argument("--native", type=lambda s: [int(v) for v in s.split(",")], default=None,
                    help="per-head downsampling factors, coarse -> fine, e.g. 32,16,8,4")
    ap.add_argument("--scheme", default="lomix", choices=["last_layer", "deep_supervision", "mutation", "lomix"])
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "triton"], help="the fused backend")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impls", default=",".join(IMPLS), help="which of fused,reference,compiled to run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per measurement process")
    ap.add_argument("--quick", action="store_true", help="a small problem (B=1, C=4, 64², L=3, 2 repeats)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.stages, args.classes, args.batch, args.size, args.repeats, args.native = 3, 4, 1, [64, 64], 2, None
    if len(args.size) not in (2, 3):
        ap.error("--size takes 2 (H W) or 3 (D H W) numbers")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    from lomix_kernels import spec

    cfg = spec.resolve_scheme(args.scheme, args.stages)
    num_maps = len(spec.build_maps(args.stages, cfg.originals, cfg.ops))
    pixels = math.prod(args.size)
    print(f"LoMix {args.scheme}: L={args.stages}, C={args.classes}, B={args.batch}, size {tuple(args.size)}, "
          f"heads /{args.native or 1}, {args.dtype} on {args.device}, {num_maps} maps; torch {torch.__version__}",
          flush=True)
    rows = {}
    for impl in args.impls.split(","):
        if impl not in IMPLS:
            raise SystemExit(f"--impls: unknown {impl!r}; choose from {IMPLS}")
        if impl in ("reference", "compiled"):
            fits, why = reference_fits(num_maps, args.batch, args.classes, pixels, args.device)
            if not fits:
                rows[impl] = {"skipped": f"would not fit: {why}"}
                print(f"  {impl:9s} skipped: would not fit ({why})", flush=True)
                continue
        print(f"  {impl:9s} timing ...", end="", flush=True)
        r = _run(args, impl, "time")
        if "error" not in r:
            print(f" {r['median_s'] * 1e3:.1f} ms; memory ...", end="", flush=True)
            m = _run(args, impl, "mem")
            r["peak_extra_mb"] = m.get("peak_extra_mb", float("nan"))
            print(f" {r['peak_extra_mb']:.0f} MB" + (f" [{r['backend']}" + (f", {r['cpu_variant']}" if r.get(
                "cpu_variant") else "") + "]" if "backend" in r else ""), flush=True)
        else:
            print(f" error: {r['error']}", flush=True)
        rows[impl] = r
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"problem": vars(args), "rows": rows}, f, indent=1)
    return 0 if all("error" not in r for r in rows.values()) else 1


def format_table(rows: dict) -> str:
    fused = rows.get("fused", {})
    lines = ["| impl | forward+backward | peak extra memory | fused speed-up | fused memory saving |",
             "|---|---|---|---|---|"]
    for impl, r in rows.items():
        if "median_s" not in r:
            lines.append(f"| {impl} | {r.get('skipped') or r.get('error')} | | | |")
            continue
        speed = f"{r['median_s'] / fused['median_s']:.1f}×" if impl != "fused" and "median_s" in fused else ""
        mem = (f"{r['peak_extra_mb'] / fused['peak_extra_mb']:.0f}×" if impl != "fused" and
               fused.get("peak_extra_mb", 0) > 0 else "")
        lines.append(f"| {impl} | {r['median_s'] * 1e3:.1f} ms | {r['peak_extra_mb']:.0f} MB | {speed} | {mem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
