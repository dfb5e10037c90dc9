"""Shared helpers: random LoMix problems and loss/gradient runners."""
from __future__ import annotations

import os

# The Triton backend's tests run its kernels on CPU tensors through the interpreter; the variable
# must be set before triton is first imported (it changes nothing for CUDA-less code paths).
if not os.environ.get("LOMIX_TRITON_ON_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import lomix_kernels as lk

torch.set_num_threads(min(2, os.cpu_count() or 1))


def triton_available() -> bool:
    """Whether backend="triton" can run in this session (through the interpreter without a GPU)."""
    try:
        from lomix_kernels import triton_backend
    except ImportError:
        return False
    return triton_backend.is_available()


def make_logits(num_stages, num_classes, batch, spatial, *, native=False, dtype=torch.float32, seed=0,
                scale=2.0, requires_grad=True):
    """L random logit tensors (never zeros). ``native``: stage i at 1/2^(L-1-i) of ``spatial``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_stages):
        f = 2 ** (num_stages - 1 - i) if native else 1
        sp = [max(1, s // f) for s in spatial]
        z = (torch.randn(batch, num_classes, *sp, generator=g) * scale).to(dtype)
        out.append(z.requires_grad_(requires_grad))
    return out


def make_target(num_classes, batch, spatial, *, seed=1, dtype=torch.int64, ignore_index=None, frac_ignored=0.1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (batch, *spatial), generator=g)
    if ignore_index is not None:
        y[torch.rand(y.shape, generator=g) < frac_ignored] = ignore_index
    return y.to(dtype)


def randomize_params(crit: lk.LoMixLoss, seed=2):
    """Random θ and mixing parameters (so no test hides behind the default init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in crit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if not crit.learn_weights:
            crit.theta.copy_(torch.rand(crit.theta.shape, generator=g) + 0.5)
    return crit


def run(crit, logits, target, pixel_weight=None, grad_scale=1.0):
    """Loss, logits grads and parameter grads (name -> grad) of one forward/backward."""
    for z in logits:
        z.grad = None
    crit.zero_grad(set_to_none=True)
    loss = crit(logits, target, pixel_weight=pixel_weight)
    (loss * grad_scale).backward()
    grads = [None if z.grad is None else z.grad.detach().clone() for z in logits]
    pgrads = {n: p.grad.detach().clone() for n, p in crit.named_parameters() if p.grad is not None}
    return loss.detach(), grads, pgrads


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ in float64 (‖b‖ = 0 falls back to the absolute norm)."""
    a, b = a.detach().double(), b.detach().double()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def twin(crit: lk.LoMixLoss, backend: str) -> lk.LoMixLoss:
    """The same loss (same options and parameter values) on another backend."""
    other = type(crit)(**{**crit._init_kwargs, "backend": backend}).to(crit.theta.device)
    other.load_state_dict(crit.state_dict())
    for (_, p), (_, q) in zip(crit.named_parameters(), other.named_parameters()):
        q.requires_grad_(p.requires_grad)
    return other


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(config, items):
    """LOMIX_TEST_SHARD=i/n keeps every n-th collected test from the i-th on (parallel processes on a
    machine with many cores: benchmarks/device_check.py runs the CUDA tests that way)."""
    shard = os.environ.get("LOMIX_TEST_SHARD")
    if shard:
        i, n = (int(v) for v in shard.split("/"))
        keep = items[i::n]
        config.hook.pytest_deselected(items=[t for t in items if t not in keep])
        items[:] = keep


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
