"""pytest-benchmark microbenchmarks of the fused CPU kernels alone (no finish, no autograd).

    .venv/bin/python -m pytest benchmarks/test_kernels_bench.py   # not part of `make test`
"""
import pytest
import torch

import lomix_kernels as lk
from lomix_kernels import cpu
from ab import raw_kernel_args

pytestmark = pytest.mark.skipif(not cpu.available(), reason=cpu.unavailable_reason())

CASES = {  # name: (B, C, spatial, L, native)
    "synapse2d": (6, 9, (224, 224), 4, False),
    "synapse2d-native": (6, 9, (224, 224), 4, True),
    "small3d-native": (1, 14, (64, 64, 64), 4, True),
}


def _setup(name):
    B, C, spatial, L, native = CASES[name]
    torch.manual_seed(0)
    crit = lk.LoMixLoss(L, C, backend="cpu")
    logits = [torch.randn(B, C, *[s // (2 ** (L + 1 - i) if native else 1) for s in spatial]) for i in range(L)]
    target = torch.randint(0, C, (B, *spatial))
    plan, params = raw_kernel_args(crit)
    grads = [torch.randn(len(crit.maps), B, C) * 1e-3 for _ in range(3)]
    return plan, logits, target, params, grads


@pytest.mark.parametrize("name", list(CASES))
def test_forward_kernel(benchmark, name):
    plan, logits, target, params, _ = _setup(name)
    stats = benchmark(cpu.CpuKernels.forward, plan, logits, target, None, params)
    assert torch.isfinite(stats.ce).all()


@pytest.mark.parametrize("name", list(CASES))
def test_backward_kernel(benchmark, name):
    plan, logits, target, params, g = _setup(name)
    grads, dparams = benchmark(cpu.CpuKernels.backward, plan, logits, target, None, params, *g)
    assert all(torch.isfinite(x).all() for x in grads) and torch.isfinite(dparams).all()
