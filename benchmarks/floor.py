"""The floor a fused LoMix forward+backward cannot beat (SPEC §8): one place for the work model —
FP32 operations and exponentials per output pixel — and for the CPU's peak it is divided by
(benchmarks/gpu.py divides the same work by the GPU's lanes and SFUs).

CPU floor = max(compute, memory):
- compute: (ops + exps × CPU_EXP_OPS) × pixels / (threads × vector lanes × vector FMAs per second),
  with the lanes of the ISA variant that ran (16 AVX-512, 8 AVX2, 4 otherwise) and the FMA rate the
  kernel library itself measures on this machine (lomix_kernels.cpu.vector_fma_rate: 12 independent
  chains, so the FMA pipes' throughput at the clock they run at) — a measured peak, not a guessed pipe
  count and clock; an exponential or logarithm costs what csrc/simd.h's exp_nonpositive_v issues on that variant;
- memory: the bytes a fused pass must move (logits read twice, their gradients written once, the
  target read twice) / this process's measured copy bandwidth.
"""
from __future__ import annotations

import time

# Vector operations one exponential costs in csrc/simd.h's exp_nonpositive_v: with AVX-512 the scaling
# to base 2 1, the range reduction 1 (vreduceps), polynomial 5, scale by 2^floor 1 (vscalefps); otherwise
# clamp 1 (vmaxps), n 2 (an FMA with 1.5·2^23 + 127 and a subtraction), range reduction 1, polynomial 5,
# scale by 2^n 2 (shift, multiply; 13 before the session after 2f4e2ca: a compare-and-blend clamp, the bias
# added after the shift).
# A logarithm (log_v: 16 operations with AVX-512, 17 otherwise) is counted at the same price (one per map,
# against 2C exponentials).
CPU_EXP_OPS = {"avx512": 8, "native": 8, "avx2": 11, "portable": 11}
LANES = {"avx512": 16, "native": 16, "avx2": 8, "portable": 4}


def _add_maps_by_product(crit) -> bool:
    """Whether an add map's softmax is made from its members' exponentials (csrc/layout.h, the same rule):
    softmax, and the stages' exponentials are made anyway (original maps) or are fewer than the add maps'."""
    n_add = sum(m.op == "add" for m in crit.maps)
    has_orig = any(m.op == "orig" for m in crit.maps)
    softmax = crit._opts.get("activation", "softmax") == "softmax"
    return softmax and n_add > 0 and (has_orig or n_add > crit.num_stages)


# dL/dz per class and pixel, beyond the softmax's normalized s (SPEC §5): g_j = s_j (K + q·gz_j s_j^(q−1)) +
# t_j (gi_j s_j − gce_j) with K = Σ_c t_c (gce_c − gi_c s_c) − Σ_c q·gz_c s_c^q. The sum K takes 2 operations
# per class for its t-part (y = gce − gi·s, then t·y accumulated) and 2 (q = 2: q·gz·s, then ·s accumulated)
# or 1 (q = 1) for its zsum part; g_j takes 4 (q·gz·s + K, gi·s − gce, t times that, s times the first
# minus it; q = 1: gz + K for the first). Four distinct products per term leave no FMA to spare.
DLDZ_OPS = {2: 8, 1: 7}


def work_per_pixel(crit):
    """(FP32 operations, exponentials) per output pixel of one fused forward + backward, counting an
    FMA as one operation: a lower-bound model of the work (what the fused algorithm must do).

    Per map and pass (forward, and the backward's recompute): the operator's build, the softmax's C
    exponentials and its max, shift, sum and normalize, the forward's three weighted sums (CE, intersection,
    prediction sum: 4C) and one logarithm, the backward's dL/dz (DLDZ_OPS per class) and the operator's
    adjoint. Exponentials are made once per stage and pass where original maps use them; an add map then
    multiplies its members' ((k−1)·C products) instead of exponentiating its own logits and builds no logits
    in either pass: an original or add map made so takes its CE's logit part from per-stage sums made once
    per tile (2C per stage: x − max and its weighted sum), its own part one FMA (3C for the three sums)."""
    C = crit.num_classes
    by_product = _add_maps_by_product(crit)
    dldz = DLDZ_OPS[2 if crit._opts.get("dice_squared", True) else 1] * C
    ops = exps = 0
    if by_product or any(m.op == "orig" for m in crit.maps):
        exps += 2 * C * crit.num_stages  # each stage's exponentials, forward and recompute
    if by_product:
        ops += 2 * C * crit.num_stages  # each stage's CE sums (forward)
    for m in crit.maps:
        k = len(m.members)
        build_fwd = build_bwd = adjoint = 0
        stats = 3 * C if by_product and m.op in ("orig", "add") else 4 * C
        if m.op in ("add", "mult"):
            build_fwd, adjoint = (k - 1) * C, (k - 1) * C * (2 if m.op == "mult" else 1)
            if m.op == "add" and by_product:
                build_fwd = 0
            build_bwd = build_fwd
        elif m.op == "cat":
            build_fwd, adjoint = k * C * C, 2 * k * C * C  # 1x1 conv; backward: input grads + weight grads
            build_bwd = build_fwd
        elif m.op == "awf":
            scores = k * C * (k if crit.awf_param == "paper" else 1)
            build_fwd, adjoint = scores + k * C, 2 * scores + 3 * k * C
            build_bwd = build_fwd
            exps += 2 * k  # the attention softmax, forward and recompute
        own_exps = not (m.op == "orig" or (m.op == "add" and by_product))
        products = (k - 1) * C if (m.op == "add" and by_product) else 0
        exps += (2 * C if own_exps else 0) + 1  # softmax exps forward and recompute; the forward's log
        # forward: build + softmax (max, shift, sum, normalize) + three weighted sums;
        # backward: recompute + dL/dz (the softmax's Jacobian-vector product, DLDZ_OPS) + adjoint
        ops += (build_fwd + products + 4 * C + stats) + (build_bwd + products + 4 * C + dldz + adjoint)
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
    compute = (ops + exps * CPU_EXP_OPS.get(variant, 11)) * pixels / peak
    memory = 2 ** 20 * (3 * logits_mb + 2 * target_mb) / cpu_copy_bandwidth()
    return {"floor_compute_s": compute, "floor_memory_s": memory, "floor_s": max(compute, memory)}
