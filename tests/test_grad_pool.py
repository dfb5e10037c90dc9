"""The CPU backward's recycled gradient buffers (csrc/grad_pool.h, lomix_kernels.cpu.gradients_like)."""
import gc

import pytest
import torch

import lomix_kernels as lk
from lomix_kernels import cpu

from conftest import make_logits, make_target, randomize_params, run

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels must be built: " + cpu.unavailable_reason())


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch):
    monkeypatch.delenv(cpu.GRAD_POOL_ENV, raising=False)
    gc.collect()
    cpu.release_cached_gradients()
    yield
    gc.collect()
    cpu.release_cached_gradients()


def _problem(native=False, dtype=torch.float32):
    logits = make_logits(3, 4, 2, (9, 11), native=native, dtype=dtype)
    target = make_target(4, 2, (9, 11))
    crit = lk.LoMixLoss(3, 4, backend="cpu")
    randomize_params(crit)
    return crit, logits, target


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradients_like_shapes_dtypes_and_layout(dtype):
    logits = make_logits(3, 5, 2, (7, 6, 5), native=True, dtype=dtype)
    grads = cpu.gradients_like(logits)
    for z, g in zip(logits, grads):
        assert g.shape == z.shape and g.dtype == z.dtype and g.device == z.device
        assert g.is_contiguous() and not g.requires_grad
        assert g.data_ptr() % 64 == 0
        g.copy_(z.detach())  # writable, and its own memory
        assert torch.equal(g, z.detach())
    assert len({g.data_ptr() for g in grads}) == len(grads)


def test_backward_reuses_the_last_steps_buffers_and_matches_plain_allocation(monkeypatch):
    crit, logits, target = _problem(native=True)
    loss0, grads0, params0 = run(crit, logits, target)
    grads0 = [g.clone() for g in grads0]
    ptrs = sorted(z.grad.data_ptr() for z in logits)
    for z in logits:
        z.grad = None  # the step's gradients die: their buffers go back to the cache
    assert cpu.cached_gradient_bytes() == _nbytes(logits)
    loss1, grads1, params1 = run(crit, logits, target)
    assert sorted(z.grad.data_ptr() for z in logits) == ptrs  # the same memory, written again
    assert cpu.cached_gradient_bytes() == 0
    monkeypatch.setenv(cpu.GRAD_POOL_ENV, "0")
    loss2, grads2, params2 = run(crit, logits, target)
    for a, b, c in zip(grads0, grads1, grads2):
        assert torch.equal(a, b) and torch.equal(a, c)  # bit-identical with and without the pool
    assert loss0 == loss1 == loss2
    for k in params0:
        assert torch.equal(params0[k], params1[k]) and torch.equal(params0[k], params2[k])


def test_cache_holds_at_most_one_backwards_gradients():
    crit, logits, target = _problem()
    held = []
    for _ in range(3):  # three steps' gradients alive at once, then all dropped
        run(crit, logits, target)
        held += [z.grad for z in logits]
    del held
    for z in logits:
        z.grad = None
    gc.collect()
    assert cpu.cached_gradient_bytes() == _nbytes(logits)


def test_release_frees_the_cache_and_live_gradients_stay_valid():
    crit, logits, target = _problem()
    run(crit, logits, target)
    kept = [z.grad.clone() for z in logits]
    alive = [z.grad for z in logits]
    run(crit, logits, target)  # the first step's gradients stay alive in `alive`
    cpu.release_cached_gradients()
    assert cpu.cached_gradient_bytes() == 0
    for a, b in zip(alive, kept):
        assert torch.equal(a, b)
    del alive
    gc.collect()
    assert cpu.cached_gradient_bytes() == 0  # released: buffers coming back later are freed, not cached


def test_pool_off_uses_torch_memory(monkeypatch):
    monkeypatch.setenv(cpu.GRAD_POOL_ENV, "0")
    crit, logits, target = _problem()
    run(crit, logits, target)
    for z in logits:
        z.grad = None
    assert cpu.cached_gradient_bytes() == 0
