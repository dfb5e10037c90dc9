"""The GPU check in one command, for a machine that already has CUDA torch and triton (no venv, no
network, no C++ build):

    python3 benchmarks/device_check.py OUTDIR            # ~8 minutes on one H100
    python3 benchmarks/device_check.py OUTDIR --smoke    # the same parts on tiny CPU problems (Triton's
                                                         # interpreter; no sanitizer, no profiler)

Parts, each in subprocesses under its own time cap; a part that fails or runs out of time is
reported and the next one runs:
  a. correctness: tests/test_triton.py on CUDA tensors (LOMIX_TRITON_ON_GPU=1) against the float64
     reference, in parallel shards, autotuning off (the tile-config test covers every candidate);
  b. compute-sanitizer memcheck, racecheck (shared memory only) and synccheck on one small
     forward+backward in 2D and 3D with native heads;
  c. the GPU table (benchmarks/gpu.py): triton, eager and torch.compile'd reference on the SPEC §8
     configs — time, peak CUDA memory, floor, the autotuner's choice and the kernels' registers/spills;
  d. a real training step (benchmarks/train_step.py): the loss's share of a U-Net optimizer step
     and the step's peak memory; and `python -m lomix_kernels.bench --quick` (fused, eager) on the device;
  e. Nsight Compute on the forward and backward kernels of synapse2d and ct3d-native (raw CSV).
Writes at most 8 files to OUTDIR, summary.md first and rewritten after every part (so a run cut
short still leaves what it measured): summary.md, log.txt, tests.txt, gpu.json, gpu.md, gpu.png,
train_step.json, ncu.csv.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import gpu  # noqa: E402  (the GPU table: one place for configs, workers and the floor model)

CAPS = {"a": 120, "b": 60, "c": 180, "d": 60, "e": 50}  # seconds; ~7.8 min in all (c's compiles overlap a)
PARTS = {"a": "correctness on CUDA", "b": "compute-sanitizer", "c": "GPU table", "d": "training step",
         "e": "Nsight Compute profiles"}
SANITIZER_TOOLS = ("racecheck", "synccheck", "memcheck")  # racecheck first: the barriers are what part a cannot see
SANITIZER_CASES = "synapse2d-native,ct3d-native"  # at 1/4 scale (56², 24³): several super-tiles, native heads
SANITIZER_SCALE = 0.25
PROFILE_CONFIGS = ("synapse2d", "ct3d-native")
WARM_CAP = 120  # seconds one compile (a Triton candidate, a torch.compile'd reference) may take
NCU_SECTIONS = ("LaunchStats", "Occupancy", "SpeedOfLight", "ComputeWorkloadAnalysis", "WarpStateStats")
NCU_METRICS = ("l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum,l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum,"
               "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio,"
               "regex:sm__inst_executed_pipe_.*\\.avg\\.pct_of_peak_sustained_active")
NCU_SUMMARY = {  # raw metric -> summary label
    "gpu__time_duration.sum": "duration",
    "launch__registers_per_thread": "registers",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved occupancy %",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM throughput %",
    "l1tex__t_bytes_pipe_lsu_mem_local_op_ld.sum": "local (spill) load bytes",
    "l1tex__t_bytes_pipe_lsu_mem_local_op_st.sum": "local (spill) store bytes",
    "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active": "FMA pipe %",
    "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active": "XU (SFU) pipe %",
}


class Check:
    """The run's state: output folder, log, per-part results, and the summary rewritten after each part."""

    def __init__(self, out: Path, smoke: bool, caps: dict, impls=None):
        self.out, self.smoke, self.caps, self.impls = out, smoke, caps, impls
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "log.txt", "w")
        self.results = {}  # part -> (status, seconds, markdown)
        self.started = time.perf_counter()
        self.env = dict(os.environ)
        if smoke:
            self.env["TRITON_INTERPRET"] = "1"
        else:
            self.env.pop("TRITON_INTERPRET", None)
            self.env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # several processes share it
        vendored = ROOT / ".device-pkgs"  # `make device-pkgs`: pytest for a python that lacks it
        if vendored.is_dir():
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(vendored), self.env.get("PYTHONPATH")]))
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")]))

    def log(self, text: str) -> None:
        stamp = f"[{time.perf_counter() - self.started:6.1f} s] "
        print(stamp + text, flush=True)
        self.log_file.write(stamp + text + "\n")
        self.log_file.flush()

    def run(self, cmd, timeout, env=None, cwd=ROOT):
        """(returncode or None on time-out, combined output); the command is logged."""
        self.log("$ " + " ".join(map(str, cmd)))
        try:
            p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env or self.env, cwd=cwd,
                               timeout=max(1.0, timeout))
            return p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"") + (exc.stderr or b"")
            return None, out.decode(errors="replace") if isinstance(out, bytes) else out

    def table_plan(self):
        """(configs, impls, scale, jobs, repeats) of part c."""
        if self.smoke:
            return ["smoke2d", "smoke3d"], ["triton", "reference"], 1.0, 2, 2
        return gpu.DEFAULT_CONFIGS, self.impls or gpu.IMPLS, 1.0, min(8, os.cpu_count() or 2), 20

    def start_warm_up(self) -> None:
        """Compile part c's Triton candidates and compiled references in the background (CPU-bound,
        parallel processes), overlapping part a; part c waits for it."""
        import threading

        configs, impls, scale, jobs, _ = self.table_plan()
        self.warmed = {}

        def warm():  # done by the end of part a plus half of c's cap at the latest
            seconds = self.caps.get("a", 0) + self.caps["c"] / 2
            self.warmed.update(gpu.warm_caches(configs, impls, scale, self.env, jobs, WARM_CAP, self.log, seconds))

        self.warm_thread = threading.Thread(target=warm, daemon=True)
        self.warm_thread.start()

    def part(self, key: str, fn) -> None:
        t0 = time.perf_counter()
        self.log(f"== part {key}: {PARTS[key]} (cap {self.caps[key]} s)")
        try:
            status, text = fn(self, self.caps[key])
        except Exception as exc:  # noqa: BLE001 - a broken part is reported; the next part still runs
            import traceback

            status, text = "FAILED", f"```\n{traceback.format_exc()[-3000:]}\n```"
            self.log(f"part {key} raised {exc!r}")
        self.results[key] = (status, time.perf_counter() - t0, text)
        self.log(f"== part {key}: {status} in {time.perf_counter() - t0:.0f} s")
        self.write_summary()

    def write_summary(self) -> None:
        lines = [f"# Device check{' (smoke: interpreter, tiny problems)' if self.smoke else ''}", "",
                 f"Command: `python3 benchmarks/device_check.py OUTDIR{' --smoke' if self.smoke else ''}`; "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}; total {time.perf_counter() - self.started:.0f} s.", "",
                 environment(), "", "| part | status | seconds |", "|---|---|---|"]
        lines += [f"| {k}. {PARTS[k]} | {s} | {t:.0f} |" for k, (s, t, _) in self.results.items()]
        for k, (s, t, text) in self.results.items():
            lines += ["", f"## {k}. {PARTS[k]}: {s}", "", text]
        (self.out / "summary.md").write_text("\n".join(lines) + "\n")


def environment() -> str:
    import torch

    try:
        import triton

        tv = triton.__version__
    except Exception as exc:  # noqa: BLE001
        tv = f"not importable ({exc!r})"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return (f"Device: {dev}; python {platform.python_version()}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), triton {tv}; {os.cpu_count()} CPU cores.")


def find_tool(name: str):
    """A CUDA command-line tool on PATH or in the usual CUDA folders."""
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/local").glob("cuda*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    return None


def gpu_tool(ck: "Check", name: str, what: str):
    """(path, None) of a CUDA command-line tool, or (None, (status, text)) saying why its part is skipped."""
    if ck.smoke:
        return None, ("skipped", f"Smoke mode: no GPU, no {what}.")
    tool = find_tool(name)
    return (tool, None) if tool else (None, ("skipped", f"{name} not found on PATH or under /usr/local/cuda*/bin."))


# ---------------------------------------------------------------------------------------- parts --
def part_tests(ck: Check, cap: float):
    """a. tests/test_triton.py against the float64 reference, in parallel shards."""
    env = dict(ck.env, LOMIX_TRITON_AUTOTUNE="0")
    if ck.smoke:
        select, shards = ["-k", "test_pinned_config_is_checked or test_deterministic"], 2
    else:
        env["LOMIX_TRITON_ON_GPU"] = "1"
        select, shards = ["-k", "not compile_for_h100"], max(1, min(8, (os.cpu_count() or 2) // 2))
    procs = []
    logs = []
    for i in range(shards):
        log = open(ck.out / f".tests-{i}.txt", "w+")
        cmd = [sys.executable, "-m", "pytest", "tests/test_triton.py", "-o", "addopts=", "-q", "-rfE", "-p",
               "no:cacheprovider", *select]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      env=dict(env, LOMIX_TEST_SHARD=f"{i}/{shards}")))
        logs.append(log)
    ck.log(f"pytest tests/test_triton.py in {shards} shards")
    deadline = time.perf_counter() + cap
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            timed_out = True
            p.kill()
            p.wait()
    text, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for i, log in enumerate(logs):
        log.seek(0)
        body = log.read()
        log.close()
        os.unlink(log.name)
        text.append(f"===== shard {i}/{shards}\n{body}")
        for n, kind in re.findall(r"(\d+) (passed|failed|error|skipped)", body.splitlines()[-1] if body else ""):
            counts[kind] += int(n)
    (ck.out / "tests.txt").write_text("\n".join(text))
    failures = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", "\n".join(text), re.M)))
    ok = not timed_out and all(p.returncode == 0 for p in procs) and counts["passed"] > 0
    status = "ok" if ok else ("TIMED OUT" if timed_out else "FAILED")
    md = f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, {counts['skipped']} skipped " \
         f"({shards} shards; full output in tests.txt)."
    if failures:
        md += "\n\nFailing tests:\n" + "\n".join(f"- `{f}`" for f in failures[:40])
    return status, md


def part_sanitizer(ck: Check, cap: float):
    """b. compute-sanitizer tools on one small forward+backward per case (2D and 3D, native heads)."""
    tool, skip = gpu_tool(ck, "compute-sanitizer", "sanitizer")
    if skip:
        return skip
    env = dict(ck.env, LOMIX_TRITON_AUTOTUNE="0")
    deadline = time.perf_counter() + cap
    step = [sys.executable, HERE / "gpu.py", "--step", SANITIZER_CASES, "triton", SANITIZER_SCALE]
    ck.run(step, deadline - time.perf_counter(), env)  # compile outside the sanitizer first (Triton's disk cache)
    rows, clean = ["| cases | tool | exit | result |", "|---|---|---|---|"], True
    for name in SANITIZER_TOOLS:
        left = deadline - time.perf_counter()
        if left < 5:
            rows.append(f"| {SANITIZER_CASES} | {name} | — | not run: part time cap |")
            clean = False
            continue
        code, out = ck.run([tool, "--tool", name, "--print-limit", "20", "--error-exitcode", "3",
                            "--report-api-errors", "no", *step], left, env)  # device-side findings only
        ck.log(out[-4000:])
        summary = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: .*", out)
        last = out.strip().splitlines()[-1][:150] if out.strip() else "—"
        rows.append(f"| {SANITIZER_CASES} ×{SANITIZER_SCALE} | {name} | {'timeout' if code is None else code} | "
                    f"{'; '.join(summary) or last} |")
        clean &= code == 0 and bool(summary) and all(re.search(r"SUMMARY: 0 ", s) for s in summary)
    note = ("racecheck sees shared-memory hazards only; the read-modify-writes of global partial rows and slots "
            "are checked by part a (bit-identical runs, reference comparison on many tiles).")
    return ("ok" if clean else "FAILED"), "\n".join(rows) + "\n\n" + note + " Full output in log.txt."


def part_table(ck: Check, cap: float):
    """c. the GPU table (benchmarks/gpu.py), into OUTDIR/gpu.{json,md}."""
    import torch

    if not ck.smoke and not torch.cuda.is_available():
        return "FAILED", "No CUDA device: run with --smoke on a machine without one."
    configs, impls, scale, jobs, repeats = ck.table_plan()
    started = time.perf_counter()
    ck.warm_thread.join(timeout=cap / 2 + 10)  # it stops starting compiles by then
    rows = gpu.run_table(configs, impls, repeats=repeats, scale=scale, env=ck.env, budget=cap - (time.perf_counter()
                         - started), log=ck.log, warmed=ck.warmed)
    table = gpu.write_results(rows, ck.out, "gpu", merge=False)
    tuned = [f"- {r['config']}: " + ", ".join(f"{k} {v['config']} ({v.get('n_regs', '?')} regs, "
                                              f"{v.get('n_spills', '?')} spills)" for k, v in r["kernels"].items())
             for r in rows if r.get("impl") == "triton" and r.get("kernels")]
    errors = [f"- {r['config']} {r['impl']}: {r.get('error') or r.get('skipped')}" for r in rows
              if "error" in r or "skipped" in r]
    verdict = targets(rows)
    md = "\n".join([table, "", "Triton configs the autotuner chose, registers and spills (driver-reported):", *tuned,
                    "", "SPEC §8 targets (≥ 20× eager, ≥ 5× compiled, floor/triton ≥ 0.5):", *verdict,
                    *(["", "Not measured:", *errors] if errors else [])])
    ok = any("median_s" in r for r in rows if r["impl"] == "triton")
    ck.log(f"table done in {time.perf_counter() - started:.0f} s")
    return ("ok" if ok and not any("error" in r for r in rows) else "PARTIAL" if ok else "FAILED"), md


def targets(rows) -> list:
    """Pass/fail lines against SPEC §8 per config, from the rows that were measured."""
    by = {(r["config"], r["impl"]): r for r in rows}
    out = []
    for cfg in dict.fromkeys(r["config"] for r in rows):
        tri = by.get((cfg, "triton"), {})
        if "median_s" not in tri:
            continue
        checks = []
        for impl, goal in (("reference", 20), ("compiled", 5)):
            r = by.get((cfg, impl), {})
            if "median_s" in r:
                x = r["median_s"] / tri["median_s"]
                checks.append(f"{x:.1f}× vs {impl} {'PASS' if x >= goal else 'MISS'}")
        if tri.get("floor_s"):
            f = tri["floor_s"] / tri["median_s"]
            checks.append(f"floor/triton {f:.2f} {'PASS' if f >= 0.5 else 'MISS'}")
        out.append(f"- {cfg}: " + ("; ".join(checks) or "no comparison measured"))
    return out


def part_train_step(ck: Check, cap: float):
    """d. benchmarks/train_step.py into OUTDIR/train_step.json."""
    path = ck.out / "train_step.json"
    cmd = [sys.executable, HERE / "train_step.py", "--out", path]
    cmd += ["--smoke", "--dims", "2", "--steps", "1"] if ck.smoke else ["--steps", "3"]
    deadline = time.perf_counter() + cap
    env = dict(ck.env, LOMIX_TRITON_AUTOTUNE="0")  # one Triton compile for the network's heads, not five
    code, out = ck.run(cmd, cap - 20, env)  # ~20 s left for the users' microbenchmark below
    ck.log(out[-3000:])
    if not path.exists():
        return ("TIMED OUT" if code is None else "FAILED"), f"```\n{out[-2000:]}\n```"
    rows = json.loads(path.read_text())["rows"]
    bench_cmd = [sys.executable, "-m", "lomix_kernels.bench", "--quick", "--impls", "fused,reference"]
    bench_cmd += ["--device", "cpu"] if ck.smoke else []
    code_b, out_b = ck.run(bench_cmd, max(5.0, deadline - time.perf_counter()), env)  # the users' microbenchmark
    ck.log(out_b[-2000:])
    status_b = "timeout" if code_b is None else code_b
    bench_md = (f"`python -m lomix_kernels.bench --quick --impls fused,reference` (exit {status_b}):\n\n"
                + "\n".join(ln for ln in out_b.splitlines() if ln.startswith("|")))
    lines = ["| dim | loss | maps | step | loss alone | loss share | step peak memory |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dim']}D | {r['loss']} | | {r['error']} | | | |")
            continue
        peak = f"{r['step_peak_mb']:.0f} MB" if "step_peak_mb" in r else "—"
        lines.append(f"| {r['dim']}D | {r['loss']} ({r['backend']}) | {r['maps']} | {r['step_ms']:.1f} ms | "
                     f"{r['loss_ms']:.1f} ms | {100 * r['loss_share']:.0f}% | {peak} |")
    return ("ok" if code == 0 and code_b == 0 else "PARTIAL"), "\n".join(lines) + "\n\n" + bench_md


def part_profiles(ck: Check, cap: float):
    """e. Nsight Compute on the forward and backward kernels (the autotuner's configs from part c)."""
    tool, skip = gpu_tool(ck, "ncu", "profiler")
    if skip:
        return skip
    chosen = {}
    if (ck.out / "gpu.json").exists():
        for r in json.loads((ck.out / "gpu.json").read_text())["rows"]:
            if r.get("impl") == "triton" and r.get("kernels"):
                chosen[r["config"]] = {k: v["config"] for k, v in r["kernels"].items()}
    deadline = time.perf_counter() + cap
    blocks, lines, ok = [], ["| problem | kernel | config | " + " | ".join(NCU_SUMMARY.values()) + " | top stalls |",
                             "|---" * (len(NCU_SUMMARY) + 4) + "|"], True
    for cfg in PROFILE_CONFIGS:
        for kind in ("forward", "backward"):
            pin = chosen.get(cfg, {}).get(kind)
            env = dict(ck.env, LOMIX_TRITON_AUTOTUNE="0")
            if pin:
                env["LOMIX_TRITON_CONFIG"] = ",".join(map(str, pin))
            raw = ck.out / ".ncu.csv"
            base = [tool, "--csv", "--page", "raw", "--log-file", raw, "-k", f"regex:_{kind}_kernel", "-c", "1"]
            base += [a for s in NCU_SECTIONS for a in ("--section", s)]
            target = [sys.executable, HERE / "gpu.py", "--step", cfg, "triton", "1"]
            code, out = ck.run(base + ["--metrics", NCU_METRICS] + target, deadline - time.perf_counter(), env)
            if code != 0:  # an unknown metric name on this ncu version: the sections alone
                ck.log(out[-2000:])
                code, out = ck.run(base + target, deadline - time.perf_counter(), env)
            text = (raw.read_text() if raw.exists() else "") or out  # the report, wherever this ncu wrote it
            raw.unlink(missing_ok=True)
            ck.log(out[-1500:])
            row = parse_ncu(text)
            if code != 0 or row is None:
                ok = False
                lines.append(f"| {cfg} | {kind} | {pin or 'default'} | ncu failed (exit {code}): "
                             f"{(out.strip().splitlines() or ['—'])[-1][:150]} |")
                continue
            blocks.append(f"# {cfg} {kind} config={pin or 'default'}\n{text.strip()}")
            stalls = sorted(((float(v), k) for k, v in row.items() if "issue_stalled" in k and _num(v)), reverse=True)
            top = ", ".join(f"{_stall_name(k)} {v:.1f}" for v, k in stalls[:3])
            lines.append(f"| {cfg} | {kind} | {pin or 'default'} | "
                         + " | ".join(row.get(m, "—") for m in NCU_SUMMARY) + f" | {top or '—'} |")
    (ck.out / "ncu.csv").write_text("\n\n".join(blocks) + "\n")
    return ("ok" if ok else "PARTIAL" if blocks else "FAILED"), "\n".join(lines) + "\n\nRaw metrics: ncu.csv."


def _stall_name(metric: str) -> str:
    """smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio -> long_scoreboard"""
    return re.sub(r".*stalled_(.*)_per_issue.*", r"\1", metric)


def _num(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def parse_ncu(text: str):
    """The first kernel row of ncu's ``--page raw --csv`` output as {metric: "value unit"}, or None."""
    rows = [r for r in csv.reader(io.StringIO(text[text.find('"ID"'):])) if r] if '"ID"' in text else []
    if len(rows) < 3:  # header, units, one kernel
        return None
    header, units, first = rows[0], rows[1], rows[2]
    return {h: (f"{v} {u}".strip() if h in NCU_SUMMARY else v) for h, u, v in zip(header, units, first)}


PART_FUNCS = {"a": part_tests, "b": part_sanitizer, "c": part_table, "d": part_train_step, "e": part_profiles}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder (created)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU problems through Triton's interpreter")
    ap.add_argument("--parts", default="acdbe", help="which parts to run, in this order (default acdbe: the "
                    "sanitizer after the table, whose compiles run in the background during a)")
    ap.add_argument("--scale-caps", type=float, default=1.0, help="multiply every part's time cap")
    ap.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS",
                    help="one part's time cap, e.g. --cap c=200 (after --scale-caps)")
    ap.add_argument("--impls", help=f"part c's implementations (default {','.join(gpu.IMPLS)})")
    args = ap.parse_args(argv)
    caps = {k: v * args.scale_caps for k, v in CAPS.items()}
    for item in args.cap:
        key, _, seconds = item.partition("=")
        if key not in CAPS or not seconds:
            ap.error(f"--cap expects PART=SECONDS with PART one of {''.join(CAPS)}, got {item!r}")
        caps[key] = float(seconds)
    caps = {k: caps[k] for k in args.parts}  # the warm-up's deadline counts only the parts that run
    impls = args.impls.split(",") if args.impls else None
    if impls and not set(impls) <= set(gpu.IMPLS):
        ap.error(f"--impls expects a comma-separated subset of {','.join(gpu.IMPLS)}, got {args.impls!r}")
    ck = Check(Path(args.out), args.smoke, caps, impls)
    ck.log(environment())
    if "c" in args.parts:
        ck.start_warm_up()
    for key in args.parts:
        ck.part(key, PART_FUNCS[key])
    ck.log(f"done in {time.perf_counter() - ck.started:.0f} s: " +
           ", ".join(f"{k} {s}" for k, (s, _, _) in ck.results.items()))
    return 0 if all(s in ("ok", "skipped") for s, _, _ in ck.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
