"""GPU benchmark: the Triton backend against the eager and torch.compile'd reference on CUDA.

    python benchmarks/gpu.py                       # synapse2d, l5, ct3d (+ native heads) on cuda
    python benchmarks/gpu.py --configs synapse2d --impls triton,reference
    (rows merge into results/gpu.json across calls; --fresh starts over)

Each (config, impl) runs in a fresh subprocess. Time: median of CUDA-event-timed forward+backward
steps after warm-up (the first step also autotunes / compiles). Memory: peak CUDA memory allocated
during one forward+backward minus what was allocated just before (inputs, parameters), from
torch.cuda.max_memory_allocated. Floor (SPEC §8): the larger of
- memory: the bytes a fused pass must move (read logits + target in forward; read them again and
  write the logits grads in backward) / the device-to-device copy bandwidth measured in-process;
- compute: the operations of a lower-bound work model (``work_per_pixel``: map building, softmax,
  statistics, the backward's recompute, dL/dz and operator adjoints; no padding, no selects) on
  the FP32 lanes (128 per SM per clock) and the exponentials on the SFUs (16 per SM per clock), at
  the SM count and clock torch reports (1.75 GHz when it reports none).
Writes benchmarks/results/gpu.{json,md}.

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
from run import RESULTS, fmt_ratio, make_problem  # noqa: E402  (one place for the configs and inputs)

DEFAULT_CONFIGS = ["synapse2d", "l5", "ct3d", "synapse2d-native", "ct3d-native", "ct3d-l5"]
IMPLS = ["reference", "compiled", "triton"]


def worker(cfg_name: str, impl: str, repeats: int, scale: float) -> dict:
    import torch

    import lomix_kernels as lk

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    B, C, L, spatial, heads, logits, target = make_problem(cfg_name, scale, device)
    crit = lk.LoMixLoss(L, C, backend="triton" if impl == "triton" else "reference", validate=False).to(device)
    fn = torch.compile(crit) if impl == "compiled" else crit

    def step():
        for z in logits:
            z.grad = None
        crit.zero_grad(set_to_none=True)
        fn(logits, target).backward()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    sync()
    out = {"config": cfg_name, "impl": impl, "scale": scale, "spatial": spatial, "heads": heads, "L": L,
           "maps": len(crit.map_names), "warmup_s": time.perf_counter() - t0,
           "device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)",
           "logits_mb": sum(z.numel() * z.element_size() for z in logits) / 2 ** 20,
           "target_mb": target.numel() * target.element_size() / 2 ** 20}
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    times.sort()
    out.update(median_s=times[len(times) // 2], min_s=times[0], repeats=repeats)
    if cuda:
        for z in logits:
            z.grad = None
        crit.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out["peak_extra_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
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


def work_per_pixel(crit):
    """(FP32 operations, exponentials) per output pixel of one fused forward + backward, counting an
    FMA as one operation: a lower-bound model of the work (what any fused kernel must do)."""
    C = crit.num_classes
    ops = exps = 0
    for m in crit.maps:
        k = len(m.members)
        if m.op in ("add", "mult"):
            build, adjoint = (k - 1) * C, (k - 1) * C * (2 if m.op == "mult" else 1)
        elif m.op == "cat":
            build, adjoint = k * C * C, 2 * k * C * C  # 1x1 conv; backward: input grads + weight grads
        elif m.op == "awf":
            scores = k * C * (k if crit.awf_param == "paper" else 1)
            build, adjoint = scores + k * C, 2 * scores + 3 * k * C
            exps += 2 * k  # the attention softmax, forward and recompute
        else:
            build = adjoint = 0
        # forward: build + softmax (max, shift, sum, normalize) + three weighted sums;
        # backward: recompute + dL/dz (softmax Jacobian-vector product, ~6 per class) + adjoint
        ops += (build + 4 * C + 4 * C) + (build + 4 * C + 6 * C + adjoint)
        exps += 2 * C + 2  # softmax exps forward and recompute, and the log of the sum
    return ops, exps


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


def run_case(cfg, impl, repeats, scale, env, timeout=1200):
    cmd = [sys.executable, __file__, "--worker", cfg, impl, str(repeats), str(scale)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": cfg, "impl": impl, "error": f"timed out after {timeout}s"}
    if p.returncode != 0:
        lines = (p.stderr or p.stdout).strip().splitlines()
        msg = next((ln for ln in reversed(lines) if "OutOfMemoryError" in ln), lines[-1] if lines else "killed")
        return {"config": cfg, "impl": impl, "error": f"exit {p.returncode}: {msg[:200]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def summarize(rows) -> str:
    by = {(r["config"], r["impl"]): r for r in rows}
    lines = ["| config | maps | reference | compiled | triton | vs eager | vs compiled | floor (memory, compute) | "
             "floor / triton | peak extra: reference | compiled | triton |", "|" + "---|" * 12]

    def t(r):
        return f"{r['median_s'] * 1e3:.2f} ms" if "median_s" in r else ("OOM / error" if r else "—")

    def m(r):
        return f"{r['peak_extra_mb']:.0f} MB" if "peak_extra_mb" in r else "—"

    for cfg in dict.fromkeys(r["config"] for r in rows):
        ref, comp, tri = (by.get((cfg, i), {}) for i in IMPLS)
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
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--scale", type=float, default=1.0, help="scale every spatial size (default 1)")
    ap.add_argument("--interpret", action="store_true", help="no CUDA: run through Triton's interpreter")
    ap.add_argument("--name", default="gpu", help="results file stem in benchmarks/results")
    ap.add_argument("--fresh", action="store_true", help="drop earlier rows of results/<name>.json (default: merge)")
    args = ap.parse_args()
    if args.worker:
        cfg, impl, repeats, scale = args.worker
        print(json.dumps(worker(cfg, impl, int(repeats), float(scale))))
        return
    env = dict(os.environ)
    if args.interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        import torch

        if not torch.cuda.is_available():
            sys.exit("benchmarks/gpu.py needs a CUDA device (or --interpret --scale 0.05 for a CPU smoke test)")
    rows = []
    for cfg in args.configs.split(","):
        for impl in args.impls.split(","):
            r = run_case(cfg, impl, args.repeats, args.scale, env)
            rows.append(r)
            mem = f"  peak extra {r['peak_extra_mb']:8.1f} MB" if "peak_extra_mb" in r else ""
            msg = r.get("error") or f"{r['median_s'] * 1e3:9.3f} ms{mem}"
            print(f"{cfg:18s} {impl:10s} {msg}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    if path.exists() and not args.fresh:  # a lent GPU runs 10-minute commands: one config per call adds up
        new = {(r["config"], r["impl"]) for r in rows}
        rows = [r for r in json.loads(path.read_text())["rows"] if (r["config"], r["impl"]) not in new] + rows
    table = summarize(rows)
    print("\n" + table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path.write_text(json.dumps({"rows": rows, "stamp": stamp}, indent=1))
    (RESULTS / f"{args.name}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
