"""benchmarks/cpu_probes.py: the wrong-results probe builds behind the README's split of the CPU time."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cpu_probes  # noqa: E402
from ab import library, raw_kernel_args  # noqa: E402

import lomix_kernels as lk  # noqa: E402
from lomix_kernels import cpu  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available(), reason=cpu.unavailable_reason())


@pytest.mark.parametrize("probe", [p for p in cpu_probes.PROBES if cpu_probes.PROBES[p]])
def test_every_probe_patch_applies_to_this_tree(probe):
    # a patch that no longer matches csrc/ must stop the tool, not build the unchanged kernels
    patched = cpu_probes.patched_sources(cpu_probes.PROBES[probe])
    for file, text in patched.items():
        assert text != (cpu_probes.ROOT / "csrc" / file).read_text()
    for file, _, new in cpu_probes.PROBES[probe]:
        assert new in patched[file]


def test_a_stale_patch_stops_the_tool():
    with pytest.raises(SystemExit, match="csrc/lomix_cpu.cpp changed"):
        cpu_probes.patched_sources([("lomix_cpu.cpp", "no such line\n", "")])


def test_split_of_the_medians():
    med = {"kernels": (30.0, 50.0), "maps twice": (56.0, 95.0), "no maps": (3.0, 4.5),
           "L2-resident logits": (28.5, 49.0), "no gradient stores": (30.0, 49.5)}
    rows = {label.split(" (")[0]: cells for label, *cells in cpu_probes.split(med)}
    assert rows["the maps as the library runs them, at least"] == [26.0, 45.0]
    assert rows["everything else, at most"] == [4.0, 5.0]
    assert rows["… of which waiting on the logits' loads"] == [1.5, 1.0]
    assert rows["… of which the gradient stores"] == [None, 0.5]
    assert rows["the streaming alone, not overlapped"] == [3.0, 4.5]


def test_the_no_maps_probe_builds_and_accumulates_no_map_statistics(tmp_path):
    # the probe library runs on real inputs and its patch took effect: the target sums are made, the
    # per-map sums are not (the unchanged kernels' are not zero)
    cpu_probes.build_probe(cpu_probes.PROBES["no maps"], tmp_path)
    probe = cpu._open(library(tmp_path, cpu.variant()))
    L, C = 3, 4
    torch.manual_seed(0)
    logits = [torch.randn(2, C, 9, 7) for _ in range(L)]
    target = torch.randint(0, C, (2, 9, 7))
    crit = lk.LoMixLoss(L, C, backend="cpu")
    plan, params = raw_kernel_args(crit)
    loaded = cpu._LIB
    try:
        kernels = cpu.CpuKernels.forward(plan, logits, target, None, params)
        cpu._LIB = probe
        probed = cpu.CpuKernels.forward(plan, logits, target, None, params)
    finally:
        cpu._LIB = loaded
    assert kernels.ce.abs().sum() > 0 and probed.ce.abs().sum() == 0 and probed.inter.abs().sum() == 0
    torch.testing.assert_close(probed.tsum, kernels.tsum)
    torch.testing.assert_close(probed.count, kernels.count)


@pytest.mark.parametrize("patches", [cpu_probes.PHASE_TIMERS, cpu_probes.L1_RESIDENT_LOGITS + cpu_probes.PHASE_TIMERS])
def test_the_phase_timers_apply_to_this_tree(patches):
    patched = cpu_probes.patched_sources(patches)
    for file, _, new in patches:
        assert new in patched[file]


@pytest.mark.skipif(cpu.cpu_level() < 1, reason="--phases reads the x86 time stamp counter")
def test_the_phase_timers_count_every_tile_and_phase(tmp_path):
    # the timed build runs on real inputs, counts the forward's and the backward's tiles alike and puts
    # ticks on every phase; reading resets the counters
    import ctypes

    cpu_probes.build_probe(cpu_probes.PHASE_TIMERS, tmp_path)
    timed = cpu._open(library(tmp_path, cpu.variant()))
    L, C, B = 3, 4, 2
    torch.manual_seed(0)
    logits = [torch.randn(B, C, 9, 7) for _ in range(L)]
    target = torch.randint(0, C, (B, 9, 7))
    plan, params = raw_kernel_args(lk.LoMixLoss(L, C, backend="cpu"))
    grads = [torch.randn(plan.num_maps, B, C) for _ in range(3)]
    ticks = (ctypes.c_double * 7)()
    loaded = cpu._LIB
    try:
        cpu._LIB = timed
        timed.lomix_cpu_phase_ticks(ticks)
        cpu.CpuKernels.forward(plan, logits, target, None, params)
        cpu.CpuKernels.backward(plan, logits, target, None, params, *grads)
        timed.lomix_cpu_phase_ticks(ticks)
        again = (ctypes.c_double * 7)()
        timed.lomix_cpu_phase_ticks(again)
    finally:
        cpu._LIB = loaded
    assert all(ticks[k] > 0 for k in range(5))
    assert ticks[5] == ticks[6] and B <= ticks[5] <= B * 9  # at least a tile per sample, at most one per row
    assert list(again) == [0.0] * 7
