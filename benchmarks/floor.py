"""The floor a fused LoMix forward+backward cannot beat (SPEC §8): one place for the work model —
FP32 operations and exponentials per output pixel — and for the CPU's peak it is divided by
(benchmarks/gpu.py divides the same work by the GPU's lanes and SFUs).

CPU floor = max(compute, memory):
- compute: (ops + exps × CPU_EXP_OPS) × pixels / (threads × vector lanes × vector FMAs per second),
  with the lanes of the ISA variant that ran (16 AVX-512, 8 AVX2, 4 otherwise) and the FMA rate the
  kernel library itself measures on this machine (lomix_kernels.cpu.vector_fma_rate: 12 independent
  chains, so the FMA pipes' throughput at the clock they run at) — a measured peak, not a guessed pipe
  count and clock; an exponential or logarithm costs what csrc/simd.h's polynomial kernels issue;
- memory: the bytes a fused pass must move (logits read twice, their gradients written once, the
  target read twice) / this process's measured copy bandwidth.
"""
from __future__ import annotations

import time

CPU_EXP_OPS = 18  # fast_exp in csrc/simd.h: clamp 2, range reduction 5, polynomial 7, scale 4 (fast_log: 22)
LANES = {"avx512": 16, "native": 16, "avx2": 8, "portable": 4}


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


def vector_fma_rate() -> float:
    """Vector FMAs per second one thread sustains with the loaded kernel library (best of 3)."""
    from lomix_kernels import cpu

    return max(cpu.vector_fma_rate() for _ in range(3))


def cpu_copy_bandwidth() -> float:
    """Host copy bandwidth in bytes/s (read + write counted), best of 5 copies of 256 MiB."""
    import torch

    x = torch.ones(2 ** 26)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


def cpu_floor(crit, pixels: int, logits_mb: float, target_mb: float, threads: int, variant: str) -> dict:
    """floor_compute_s, floor_memory_s and floor_s of one fused CPU forward+backward."""
    ops, exps = work_per_pixel(crit)
    peak = threads * LANES.get(variant, 4) * vector_fma_rate()
    compute = (ops + exps * CPU_EXP_OPS) * pixels / peak
    memory = 2 ** 20 * (3 * logits_mb + 2 * target_mb) / cpu_copy_bandwidth()
    return {"floor_compute_s": compute, "floor_memory_s": memory, "floor_s": max(compute, memory)}
