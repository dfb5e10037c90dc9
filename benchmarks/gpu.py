"""GPU benchmark: the Triton backend against the eager and torch.compile'd reference on CUDA.

    python benchmarks/gpu.py                       # synapse2d, l5, ct3d (+ native heads) on cuda
    python benchmarks/gpu.py --configs synapse2d --impls triton,reference
    (rows merge into results/gpu.json across calls; --fresh starts over)
    python benchmarks/gpu.py --step ct3d-native triton 0.2   # one forward+backward (sanitizer, ncu)

Each (config, impl) runs in a fresh subprocess. First, in parallel (``--jobs``), every Triton tile
candidate and every torch.compile'd reference is compiled once into the on-disk caches (one step
each; a compile longer than ``--compile-cap`` marks that row skipped). Then, one at a time: time,
the median of CUDA-event-timed forward+backward steps after a warm-up step (the first step also
autotunes), at most ``--repeats`` steps or ~1 s (at least 3). ``--budget`` bounds the whole run: rows that no
longer fit are reported as skipped. Memory: peak CUDA memory allocated
during one forward+backward minus what was allocated just before (inputs, parameters), from
torch.cuda.max_memory_allocated. Floor (SPEC §8): the larger of
- memory: the bytes a fused pass must move (read logits + target in forward; read them again and
  write the logits grads in backward) / the device-to-device copy bandwidth measured in-process;
- compute: the operations of a lower-bound work model (``work_per_pixel``: map building, softmax,
  statistics, the backward's recompute, dL/dz and operator adjoints; no padding, no selects) on
  the FP32 lanes (128 per SM per clock) and the exponentials on the SFUs (16 per SM per clock), at
  the SM count and clock torch reports (1.75 GHz when it reports none).
Writes benchmarks/results/gpu.{json,md,png}.

Without CUDA, ``--interpret --scale 0.05`` runs the same script on tiny CPU problems through
Triton's interpreter (a smoke test of the script; its times mean nothing).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the package itself, where it is not installed
from floor import work_per_pixel  # noqa: E402  (one place for the work model)
from run import CONFIGS, RESULTS, fmt_ratio, make_problem  # noqa: E402  (one place for the configs and inputs)

DEFAULT_CONFIGS = ["synapse2d", "l5", "ct3d", "synapse2d-native", "ct3d-native", "ct3d-l5"]
IMPLS = ["triton", "reference", "compiled"]  # the order rows are timed in: a tight budget cuts compiled first


def setup_step(cfg_name: str, impl: str, scale: float):
    """(step, crit, logits, target, sizes): one forward+backward of ``impl`` on a config's inputs."""
    import torch

    import lomix_kernels as lk

    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, C, L, spatial, heads, logits, target = make_problem(cfg_name, scale, device)
    crit = lk.LoMixLoss(L, C, backend="triton" if impl == "triton" else "reference", validate=False).to(device)
    fn = torch.compile(crit) if impl == "compiled" else crit

    def step():
        for z in logits:
            z.grad = None
        crit.zero_grad(set_to_none=True)
        fn(logits, target).backward()

    return step, crit, logits, target, (B, C, L, spatial, heads)


def one_step(cfg_names: str, impl: str, scale: float) -> dict:
    """Exactly one forward+backward per config of the comma-separated ``cfg_names`` (what the sanitizer
    and the profiler run; also the cache warm-up)."""
    import torch

    t0 = time.perf_counter()
    for cfg_name in cfg_names.split(","):
        setup_step(cfg_name, impl, scale)[0]()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"config": cfg_names, "impl": impl, "step_s": time.perf_counter() - t0, **kernel_launches(impl)}


def kernel_launches(impl: str) -> dict:
    """The Triton kernels' configs, registers and spills of the latest launches (triton only)."""
    if impl != "triton":
        return {}
    from lomix_kernels import triton_backend

    return {"kernels": triton_backend.last_launches()}


def worker(cfg_name: str, impl: str, repeats: int, scale: float, max_seconds: float = 1.0) -> dict:
    """Time (lomix_kernels.bench.measure: at most ``repeats`` steps or ~``max_seconds``), then on CUDA the
    peak memory of one step and the floor."""
    import torch

    from lomix_kernels.bench import measure

    cuda = torch.cuda.is_available()
    _, crit, logits, target, (B, C, L, spatial, heads) = setup_step(cfg_name, impl, scale)
    out = {"config": cfg_name, "impl": impl, "scale": scale, "spatial": spatial, "heads": heads, "L": L,
           "device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)",
           "target_mb": target.numel() * target.element_size() / 2 ** 20}
    out.update(measure(crit, logits, target, compiled=impl == "compiled", repeats=repeats, max_seconds=max_seconds))
    out.update(kernel_launches(impl))
    if cuda:
        out["peak_extra_mb"] = measure(crit, logits, target, compiled=impl == "compiled", mode="mem")["peak_extra_mb"]
        moved = 2 ** 20 * (3 * out["logits_mb"] + 2 * out["target_mb"])
        out["floor_memory_s"] = moved / copy_bandwidth()
        ops, exps = work_per_pixel(crit)
        props = torch.cuda.get_device_properties(0)
        clock = (getattr(props, "clock_rate", 0) or 1.75e6) * 1e3  # kHz -> Hz
        pixels = B * math.prod(spatial)
        out["floor_compute_s"] = max(ops * pixels / (props.multi_processor_count * 128 * clock),
                                     exps * pixels / (props.multi_processor_count * 16 * clock))
        out["floor_s"] = max(out["floor_memory_s"], out["floor_compute_s"])
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), median of 10 copies of 1 GiB."""
    import torch

    x = torch.empty(2 ** 28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * x.numel() * 4 / sorted(times)[5]


def run_case(cfg, impl, repeats, scale, env, timeout=1200, step=False):
    """One (config, impl) in a fresh process: a timed row, or with ``step`` one forward+backward."""
    mode = ["--step", cfg, impl, str(scale)] if step else ["--worker", cfg, impl, str(repeats), str(scale)]
    try:
        p = subprocess.run([sys.executable, __file__, *mode], capture_output=True, text=True, env=env,
                           timeout=max(1, timeout))
    except subprocess.TimeoutExpired:
        return {"config": cfg, "impl": impl, "error": f"timed out after {timeout:.0f}s"}
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        msg = next((ln for ln in reversed(lines) if "OutOfMemoryError" in ln), lines[-1] if lines else "killed")
        return {"config": cfg, "impl": impl, "error": f"exit {p.returncode}: {msg[:200]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def warm_caches(configs, impls, scale, env, jobs, cap, log=print, seconds=None):
    """Compile every Triton tile candidate (pinned one at a time) and every torch.compile'd reference
    into the on-disk caches, ``jobs`` processes at a time, so that the timed runs (one at a time)
    pay no compile. Returns {config: reason} for the compiled rows whose compile failed, took
    longer than ``cap`` seconds, or did not fit in ``seconds`` for the whole warm-up."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from lomix_kernels import triton_backend

    tasks = [(cfg, "compiled", None) for cfg in configs if "compiled" in impls]  # the longest first
    for cfg in configs:
        if "triton" in impls:
            candidates = triton_backend.CONFIGS_3D if len(CONFIGS[cfg][2]) == 3 else triton_backend.CONFIGS_2D
            tasks += [(cfg, "triton", c) for c in candidates]

    big = threading.Semaphore(2)  # compiled 3D references hold ~10-40 GB each while they run: two at a time

    deadline = None if seconds is None else time.perf_counter() + seconds

    def one(cfg, impl, e):
        left = cap if deadline is None else min(cap, deadline - time.perf_counter())
        if left < 5:
            return {"config": cfg, "impl": impl, "error": "not started: the warm-up's time was up"}
        return run_case(cfg, impl, 1, scale, e, timeout=left, step=True)

    def warm(task):
        cfg, impl, cand = task
        e = dict(env, **({"LOMIX_TRITON_CONFIG": ",".join(map(str, cand))} if cand else {}))
        if impl == "compiled" and len(CONFIGS[cfg][2]) == 3:
            with big:
                return task, one(cfg, impl, e)
        return task, one(cfg, impl, e)

    skipped = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for (cfg, impl, cand), r in pool.map(warm, tasks):
            log(f"  warm {cfg:18s} {impl:9s} {str(cand or ''):24s} "
                f"{r.get('error') or format(r['step_s'], '.1f') + ' s'}")
            if impl == "compiled" and "error" in r:
                skipped[cfg] = f"torch.compile did not finish within the {cap:.0f} s cap ({r['error']})"
    return skipped


def run_table(configs, impls, *, repeats=20, scale=1.0, env=None, jobs=8, compile_cap=150.0, budget=None,
              log=print, warmed=None):
    """Rows for every (config, impl): warm the caches (unless ``warmed``, the result of an earlier
    warm_caches, is given), then time each alone. With ``budget`` (s) the rows that would start after
    it are reported as skipped."""
    env = dict(os.environ if env is None else env)
    env.setdefault("LOMIX_TRITON_AUTOTUNE", "1")  # the table reports the fastest candidate and which it is
    started = time.perf_counter()
    skipped = warmed if warmed is not None else (
        warm_caches(configs, impls, scale, env, jobs, compile_cap, log) if jobs > 0 else {})
    rows = []
    for impl in sorted(impls, key=IMPLS.index):  # impl-major, triton first: a tight budget cuts compiled rows
        for cfg in configs:
            left = None if budget is None else budget - (time.perf_counter() - started)
            if impl == "compiled" and cfg in skipped:
                r = {"config": cfg, "impl": impl, "skipped": skipped[cfg]}
            elif left is not None and left < 5:
                r = {"config": cfg, "impl": impl, "skipped": "over the time budget of this run"}
            else:
                r = run_case(cfg, impl, repeats, scale, env, timeout=1200 if left is None else left)
            rows.append(r)
            mem = f"  peak extra {r['peak_extra_mb']:8.1f} MB" if "peak_extra_mb" in r else ""
            msg = r.get("error") or r.get("skipped") or f"{r['median_s'] * 1e3:9.3f} ms{mem}"
            log(f"{cfg:18s} {impl:10s} {msg}")
    return rows


def summarize(rows) -> str:
    by = {(r["config"], r["impl"]): r for r in rows}
    lines = ["| config | maps | reference | compiled | triton | vs eager | vs compiled | floor (memory, compute) | "
             "floor / triton | peak extra: reference | compiled | triton |", "|" + "---|" * 12]

    def t(r):
        if "median_s" in r:
            return f"{r['median_s'] * 1e3:.2f} ms"
        if not r:
            return "—"
        if "skipped" in r:
            return "skipped"
        error = r.get("error", "")
        return "timed out" if "timed out" in error else "OOM" if "out of memory" in error.lower() else "error"

    def m(r):
        return f"{r['peak_extra_mb']:.0f} MB" if "peak_extra_mb" in r else "—"

    for cfg in dict.fromkeys(r["config"] for r in rows):
        ref, comp, tri = (by.get((cfg, i), {}) for i in ("reference", "compiled", "triton"))
        floor, took = tri.get("floor_s"), tri.get("median_s")
        floor_ms = (f"{floor * 1e3:.3f} ms ({tri['floor_memory_s'] * 1e3:.3f}, {tri['floor_compute_s'] * 1e3:.3f})"
                    if floor else "—")
        fraction = f"{floor / took:.3f}" if floor and took else "—"
        lines.append(f"| {cfg} | {tri.get('maps', ref.get('maps', ''))} | {t(ref)} | {t(comp)} | {t(tri)} | "
                     f"{fmt_ratio(ref.get('median_s'), took).strip()} | "
                     f"{fmt_ratio(comp.get('median_s'), took).strip()} | {floor_ms} | {fraction} | "
                     f"{m(ref)} | {m(comp)} | {m(tri)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--step", nargs=3, metavar=("CONFIGS", "IMPL", "SCALE"),
                    help="one forward+backward per config (comma-separated), then exit")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--repeats", type=int, default=20, help="at most this many timed steps (or ~2 s)")
    ap.add_argument("--scale", type=float, default=1.0, help="scale every spatial size (default 1)")
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile warm-up processes (0: none)")
    ap.add_argument("--compile-cap", type=float, default=150.0, help="seconds one compile may take")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: none)")
    ap.add_argument("--interpret", action="store_true", help="no CUDA: run through Triton's interpreter")
    ap.add_argument("--out", default=str(RESULTS), help="folder of the results (default benchmarks/results)")
    ap.add_argument("--name", default="gpu", help="results file stem")
    ap.add_argument("--fresh", action="store_true", help="drop earlier rows of <out>/<name>.json (default: merge)")
    args = ap.parse_args()
    if args.worker:
        cfg, impl, repeats, scale = args.worker
        print(json.dumps(worker(cfg, impl, int(repeats), float(scale))))
        return
    if args.step:
        cfg, impl, scale = args.step
        print(json.dumps(one_step(cfg, impl, float(scale))))
        return
    env = dict(os.environ)
    if args.interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("benchmarks/gpu.py needs a CUDA device (or --interpret --scale 0.05 for a CPU smoke test)")
    rows = run_table(args.configs.split(","), args.impls.split(","), repeats=args.repeats, scale=args.scale,
                     env=env, jobs=args.jobs, compile_cap=args.compile_cap, budget=args.budget)
    write_results(rows, Path(args.out), args.name, merge=not args.fresh)


def write_results(rows, out: Path, name: str, merge: bool = True) -> str:
    """Write <out>/<name>.json (rows merged with earlier ones unless ``merge`` is False) and .md; the table."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    if path.exists() and merge:  # a lent GPU runs short commands: one config per call adds up
        new = {(r["config"], r["impl"]) for r in rows}
        rows = [r for r in json.loads(path.read_text())["rows"] if (r["config"], r["impl"]) not in new] + rows
    table = summarize(rows)
    print("\n" + table)
    path.write_text(json.dumps({"rows": rows, "stamp": time.strftime("%Y%m%d-%H%M%S")}, indent=1))
    (out / f"{name}.md").write_text(table + "\n")
    plot(rows, out / f"{name}.png")
    return table


def plot(rows, path: Path) -> None:
    """Time and peak CUDA memory side by side (log scale) per config and impl."""
    from plots import pyplot, time_memory_axes

    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    time_memory_axes(axes, rows, [i for i in IMPLS if any(r["impl"] == i for r in rows)], "LoMix loss, GPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
