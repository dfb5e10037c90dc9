"""Speed and peak memory of LoMix forward+backward: reference, torch.compile(reference), fused.

    python benchmarks/run.py                 # SPEC §8 configs: synapse2d, l5, ct3d (+ native heads)
    python benchmarks/run.py --sweep         # also cost vs L (2..6) and vs pixels
    python benchmarks/run.py --configs synapse2d --impls cpu,reference

Each (config, impl) runs in two fresh subprocesses. Time: median of repeats after warm-up, inputs
and parameters fixed, default allocator settings. Memory: the process's peak RSS during one
forward+backward minus its RSS just before (VmHWM reset through /proc/self/clear_refs), in a
process where glibc returns every block over 64 KB to the OS at free, so a warm heap cannot hide
the peak (that setting slows the eager reference, so it is never used for timing).
Writes benchmarks/results/latest.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from plots import pyplot, time_memory_axes  # noqa: E402  (the pictures of run.py and gpu.py)

CONFIGS = {  # name: (B, C, spatial, L, native)
    "synapse2d": (6, 9, (224, 224), 4, False),
    "l5": (6, 9, (224, 224), 5, False),
    "ct3d": (2, 14, (96, 96, 96), 4, False),
    "ct3d-l5": (2, 14, (96, 96, 96), 5, False),
    "synapse2d-native": (6, 9, (224, 224), 4, True),
    "ct3d-native": (2, 14, (96, 96, 96), 4, True),
    # tiny problems for smoke runs of the GPU scripts through Triton's interpreter
    "smoke2d": (1, 3, (16, 12), 3, True),
    "smoke3d": (1, 2, (8, 8, 6), 2, True),
}
DEFAULT_CONFIGS = ["synapse2d", "l5", "ct3d", "ct3d-l5", "synapse2d-native", "ct3d-native"]
SWEEP_L = range(2, 7)          # cost vs number of stages (B=2, C=9, 128²)
SWEEP_SIDES = (64, 128, 256, 384)  # cost vs pixels (B=2, C=9, L=4)
for _L in SWEEP_L:
    CONFIGS[f"sweepL{_L}"] = (2, 9, (128, 128), _L, False)
for _side in SWEEP_SIDES:
    CONFIGS[f"sweepP{_side}"] = (2, 9, (_side, _side), 4, False)
IMPLS = ["reference", "compiled", "cpu"]
MEM_LIMIT_GB = 20.0  # leave room for the OS on a 24 GB machine


# ------------------------------------------------------------------------------------ worker --
def make_problem(cfg_name: str, scale: float, device: str = "cpu"):
    """A config's inputs (seeded): ``(B, C, L, spatial, heads, logits, target)``, spatial sizes scaled
    by ``scale``; native configs have EMCAD-like heads at 1/32 .. 1/4 (L = 4), else full size."""
    import torch

    torch.manual_seed(0)
    B, C, spatial, L, native = CONFIGS[cfg_name]
    spatial = tuple(max(4, int(round(s * scale))) for s in spatial)
    heads = [tuple(max(1, s // (2 ** (L + 1 - i) if native else 1)) for s in spatial) for i in range(L)]
    logits = [torch.randn(B, C, *sp, device=device, requires_grad=True) for sp in heads]
    target = torch.randint(0, C, (B, *spatial), dtype=torch.int64, device=device)
    return B, C, L, spatial, heads, logits, target


def worker(cfg_name: str, impl: str, repeats: int, scale: float, mode: str) -> dict:
    """One (config, impl) measured by lomix_kernels.bench.measure ("time": median of ``repeats``
    steps; "mem": peak extra RSS of one step)."""
    import torch

    import lomix_kernels as lk
    from lomix_kernels.bench import measure

    B, C, L, spatial, heads, logits, target = make_problem(cfg_name, scale)
    backend = "cpu" if impl.startswith("cpu") else "reference"  # "cpu@avx2": a forced ISA variant
    crit = lk.LoMixLoss(L, C, backend=backend, validate=impl != "compiled")
    out = {"config": cfg_name, "impl": impl, "scale": scale, "B": B, "C": C, "L": L, "spatial": spatial,
           "heads": heads, "threads": torch.get_num_threads(),
           "target_mb": target.numel() * target.element_size() / 2 ** 20}
    if backend == "cpu":
        out["cpu_variant"] = lk.cpu.variant()
    out.update(measure(crit, logits, target, compiled=impl == "compiled", repeats=repeats, mode=mode))
    if backend == "cpu" and mode == "time":
        from floor import cpu_floor

        out.update(cpu_floor(crit, B * math.prod(spatial), out["logits_mb"], out["target_mb"], out["threads"],
                             out["cpu_variant"]))
    return out


# ------------------------------------------------------------------------------------ driver --
def _worker_process(cfg, impl, repeats, scale, mode, timeout):
    env = dict(os.environ)
    if "@" in impl:  # cpu@<variant>: that ISA variant of the CPU kernels (LOMIX_CPU_ISA)
        env["LOMIX_CPU_ISA"] = impl.split("@", 1)[1]
    if mode == "mem":
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--worker", cfg, impl, str(repeats), str(scale), mode]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": cfg, "impl": impl, "error": f"timed out after {timeout}s"}
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["killed"]
        return {"config": cfg, "impl": impl, "error": f"exit {out.returncode}: {tail[0][:200]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_case(cfg: str, impl: str, repeats: int, scale: float = 1.0, timeout: int = 1500, memory: bool = True) -> dict:
    """Time in one subprocess, then (``memory``) peak extra memory in another."""
    r = _worker_process(cfg, impl, repeats, scale, "time", timeout)
    if memory and "error" not in r:
        m = _worker_process(cfg, impl, 1, scale, "mem", timeout)
        r["peak_extra_mb"] = m.get("peak_extra_mb", float("nan"))
    return r


def reference_estimate_gb(cfg: str) -> float:
    """Peak extra memory of the eager reference, extrapolated linearly in pixels from a 1/2-size run."""
    r = _worker_process(cfg, "reference", 1, 0.5, "mem", 1500)
    if "error" in r:
        return float("nan")
    return r["peak_extra_mb"] * math.prod(CONFIGS[cfg][2]) / math.prod(r["spatial"]) / 1024


def needs_estimate(cfg: str, impl: str) -> bool:
    """The eager/compiled reference on the 3D configs needs ~16 GB or more (about 90 s a step for
    ct3d, and more than the 24 GB machine has for ct3d-l5): estimate it from a half-size run
    instead of running it (or crashing) in the default table."""
    return cfg.startswith("ct3d") and impl in ("reference", "compiled")


def fmt_ratio(a, b):
    return f"{a / b:6.1f}x" if a and b else "    n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="also run the L and pixel scaling sweeps")
    ap.add_argument("--table", action="store_true", help="only re-print the table of results/<name>.json")
    ap.add_argument("--name", default="latest", help="results file stem in benchmarks/results (default: latest)")
    args = ap.parse_args()
    if args.worker:
        cfg, impl, repeats, scale, mode = args.worker
        print(json.dumps(worker(cfg, impl, int(repeats), float(scale), mode)))
        return

    if args.table:
        print(summarize(json.loads((RESULTS / f"{args.name}.json").read_text())["rows"]))
        return
    RESULTS.mkdir(exist_ok=True)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    rows = []
    for cfg in args.configs.split(","):
        for impl in args.impls.split(","):
            if needs_estimate(cfg, impl):
                if impl == "reference":
                    gb = reference_estimate_gb(cfg)
                    fits = gb < MEM_LIMIT_GB
                    rows.append({"config": cfg, "impl": impl, "error": "not run (estimated)", "fits": fits,
                                 "estimated_peak_gb": gb})
                    print(f"{cfg:18s} {impl:10s} not run: needs ~{gb:.1f} GB extra (extrapolated from a half-size "
                          f"run), {'fits' if fits else 'does NOT fit'} in {MEM_LIMIT_GB:.0f} GB")
                continue
            r = run_case(cfg, impl, args.repeats if not cfg.startswith("ct3d") else max(2, args.repeats // 2))
            rows.append(r)
            if "error" in r:
                print(f"{cfg:18s} {impl:10s} ERROR {r['error']}")
            else:
                print(f"{cfg:18s} {impl:10s} {r['median_s'] * 1e3:9.1f} ms  peak extra {r['peak_extra_mb']:9.1f} MB "
                      f"(logits {r['logits_mb']:.1f} MB, {r['maps']} maps)", flush=True)
    sweep = run_sweeps(args.repeats) if args.sweep else []
    variants = [r for r in rows if "@" in r["impl"] and "median_s" in r]
    if variants:  # ISA variants of the CPU kernels, side by side in this run
        print("\n" + "\n".join(f"{r['config']:18s} {r['impl']:14s} ({r['cpu_variant']}) {r['median_s'] * 1e3:8.1f} ms"
                                for r in variants))
    table = summarize(rows)
    print("\n" + table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"rows": rows, "sweep": sweep, "stamp": stamp}, indent=1))
    (RESULTS / f"{args.name}.md").write_text(table + "\n")
    plot(rows, sweep, args.name)


def floor_ratio(r) -> str:
    """Measured time / the floor (benchmarks/floor.py), with the floor itself."""
    if "median_s" not in r or not r.get("floor_s"):
        return "—"
    ms = r["floor_s"] * 1e3
    return f"{r['median_s'] / r['floor_s']:.2f}x of {ms:{'.0f' if ms >= 10 else '.2g'}} ms"


def summarize(rows) -> str:
    by = {(r["config"], r["impl"]): r for r in rows}
    lines = ["| config | maps | reference | compiled | cpu (fused) | speed-up vs eager | vs compiled | cpu / floor | "
             "peak extra mem: reference | cpu | mem ratio | cpu mem / (target+logits+grads) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cfg in dict.fromkeys(r["config"] for r in rows):
        ref, comp, fused = by.get((cfg, "reference"), {}), by.get((cfg, "compiled"), {}), by.get((cfg, "cpu"), {})

        def t(r):
            if "median_s" in r:
                return f"{r['median_s'] * 1e3:.0f} ms"
            if not r:
                return "—"
            return "not run" if r.get("fits") else "does not fit"

        def m(r):
            if "peak_extra_mb" in r:
                return f"{r['peak_extra_mb']:.0f} MB"
            if "estimated_peak_gb" in r:
                return f"~{r['estimated_peak_gb']:.1f} GB (est.{'' if r.get('fits') else ', does not fit'})"
            return "—"

        ref_mem = ref.get("peak_extra_mb") or (ref.get("estimated_peak_gb", 0) * 1024) or None
        f_mem = fused.get("peak_extra_mb")
        lg = fused.get("logits_mb")
        tg = fused.get("target_mb", 0.0)
        lines.append(
            f"| {cfg} | {fused.get('maps', ref.get('maps', ''))} | {t(ref)} | {t(comp)} | {t(fused)} | "
            f"{fmt_ratio(ref.get('median_s'), fused.get('median_s')).strip()} | "
            f"{fmt_ratio(comp.get('median_s'), fused.get('median_s')).strip()} | {floor_ratio(fused)} | "
            f"{m(ref)} | {m(fused)} | "
            f"{fmt_ratio(ref_mem, f_mem).strip()} | {f_mem / (2 * lg + tg):.2f}x |" if f_mem and lg else
            f"| {cfg} | | {t(ref)} | {t(comp)} | {t(fused)} | | | | {m(ref)} | {m(fused)} | | |")
    return "\n".join(lines)


def run_sweeps(repeats):
    out = []
    for L in SWEEP_L:
        for impl in ("cpu", "reference"):
            r = run_case(f"sweepL{L}", impl, repeats, memory=False)
            out.append({"sweep": "L", "x": L, **r})
            print(f"sweep L={L} {impl:10s} {r.get('median_s', float('nan')) * 1e3:8.1f} ms", flush=True)
    for side in SWEEP_SIDES:
        for impl in ("cpu", "reference"):
            r = run_case(f"sweepP{side}", impl, repeats, memory=False)
            out.append({"sweep": "pixels", "x": 2 * side * side, **r})
            print(f"sweep pixels={2 * side * side} {impl:10s} {r.get('median_s', float('nan')) * 1e3:8.1f} ms", flush=True)
    return out


def plot(rows, sweep, name="latest"):
    """results/<name>.png: time and peak memory side by side (log scale), and the sweeps if run."""
    plt = pyplot()
    if plt is None:
        return
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    ncols = 4 if sweep else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5), squeeze=False)
    time_memory_axes(axes[0][:2], rows, impls, "LoMix loss, CPU")
    if sweep:
        for ax, kind, xl in ((axes[0][2], "L", "decoder stages L"), (axes[0][3], "pixels", "pixels")):
            for impl in ("cpu", "reference"):
                pts = [(r["x"], r["median_s"] * 1e3) for r in sweep if r["sweep"] == kind and r.get("impl") == impl
                       and "median_s" in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xlabel(xl)
            ax.set_ylabel("ms")
            ax.set_yscale("log")
            ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)
    print(f"wrote {RESULTS / name}.png, .json, .md")


if __name__ == "__main__":
    main()
