"""benchmarks/device_check.py — the one-shot GPU check — in its smoke mode (tiny CPU problems through
Triton's interpreter), so the script cannot rot while no GPU is at hand; and its parsers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import triton_available

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import device_check  # noqa: E402

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@needs_triton
def test_smoke_run_writes_every_part(tmp_path):
    out = tmp_path / "check"
    p = subprocess.run([sys.executable, str(BENCH / "device_check.py"), str(out), "--smoke"], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(f.name for f in out.iterdir())
    assert len(files) <= 8 and files[0] != "." and "summary.md" in files, files
    summary = (out / "summary.md").read_text()
    for key, title in device_check.PARTS.items():
        assert f"| {key}. {title} | " in summary
    assert "| a. correctness on CUDA | ok |" in summary and "2 passed, 0 failed" in summary
    rows = {(r["config"], r["impl"]): r for r in json.loads((out / "gpu.json").read_text())["rows"]}
    for cfg in ("smoke2d", "smoke3d"):
        assert rows[(cfg, "triton")]["median_s"] > 0 and rows[(cfg, "reference")]["median_s"] > 0
        assert rows[(cfg, "triton")]["kernels"]["backward"]["config"]
    steps = json.loads((out / "train_step.json").read_text())["rows"]
    assert {r["loss"] for r in steps} == {"lomix-reference", "lomix-fused", "deep_supervision"}
    assert all(r["step_ms"] > 0 and r["loss_ms"] > 0 and r["maps"] > 0 for r in steps)


def test_a_failing_part_does_not_stop_the_others(tmp_path, monkeypatch):
    def broken(ck, cap):
        raise RuntimeError("this part is broken")

    monkeypatch.setitem(device_check.PART_FUNCS, "a", broken)
    assert device_check.main([str(tmp_path), "--smoke", "--parts", "abe"]) == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| a. correctness on CUDA | FAILED |" in summary and "this part is broken" in summary
    assert "| b. compute-sanitizer | skipped |" in summary and "| e. Nsight Compute profiles | skipped |" in summary


def test_parse_ncu_raw_csv():
    text = ('==PROF== Connected to process 1\n"ID","Process ID","Kernel Name","gpu__time_duration.sum",'
            '"launch__registers_per_thread","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio"\n'
            '"","","","usecond","register/thread","ratio"\n"0","1","_forward_kernel","812.35","255","3.2"\n')
    row = device_check.parse_ncu(text)
    assert row["gpu__time_duration.sum"] == "812.35 usecond" and row["launch__registers_per_thread"] == "255 register/thread"
    assert row["Kernel Name"] == "_forward_kernel"
    assert device_check._stall_name("smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio") \
        == "long_scoreboard"
    assert device_check.parse_ncu("==ERROR== no kernels were profiled") is None


def test_targets_pass_and_miss():
    rows = [{"config": "x", "impl": "triton", "median_s": 1.0, "floor_s": 0.6},
            {"config": "x", "impl": "reference", "median_s": 25.0},
            {"config": "x", "impl": "compiled", "median_s": 4.0},
            {"config": "y", "impl": "triton", "error": "exit 1"}]
    assert device_check.targets(rows) == ["- x: 25.0× vs reference PASS; 4.0× vs compiled MISS; floor/triton 0.60 PASS"]


def test_table_columns_follow_the_impl_not_the_timing_order():
    import gpu

    rows = [{"config": "x", "impl": "triton", "median_s": 0.002, "peak_extra_mb": 5.0, "maps": 3},
            {"config": "x", "impl": "reference", "median_s": 0.010, "peak_extra_mb": 50.0},
            {"config": "x", "impl": "compiled", "error": "timed out after 26s"}]
    line = gpu.summarize(rows).splitlines()[2]
    assert line.startswith("| x | 3 | 10.00 ms | timed out | 2.00 ms | 5.0x | n/a |"), line
    assert line.endswith("| 50 MB | — | 5 MB |"), line
    assert gpu.IMPLS[0] == "triton"  # timed first: a tight budget cuts the compiled rows, never triton's


@pytest.mark.parametrize("argv, message", [
    (["--cap", "c"], "--cap expects PART=SECONDS"),
    (["--cap", "z=10"], "--cap expects PART=SECONDS"),
    (["--impls", "triton,eager"], "--impls expects a comma-separated subset"),
])
def test_bad_options_are_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        device_check.main([str(tmp_path / "out"), "--smoke", "--parts", "b", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_cap_and_impls_options_reach_the_parts(tmp_path, monkeypatch):
    seen = {}

    def record(ck, cap):
        seen["cap"], seen["plan"] = cap, ck.table_plan()
        return "ok", "recorded"

    monkeypatch.setitem(device_check.PART_FUNCS, "e", record)
    assert device_check.main([str(tmp_path), "--parts", "e", "--cap", "e=7", "--impls", "triton,reference"]) == 0
    assert seen["cap"] == 7.0 and seen["plan"][1] == ["triton", "reference"]
