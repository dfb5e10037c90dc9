"""Triton backend against the float64 reference. On a CPU-only machine the kernels run through
Triton's interpreter (TRITON_INTERPRET=1, set in conftest) at small sizes; with a GPU set
LOMIX_TRITON_ON_GPU=1 to run the same tests on CUDA tensors."""
import os

import pytest
import torch

import lomix_kernels as lk

from conftest import make_logits, make_target, randomize_params
from fused_cases import OP_SUBSETS, compare_to_reference, random_case
from test_variants import VARIANTS, pixel_weights, soft_target

triton_backend = pytest.importorskip("lomix_kernels.triton_backend")
pytestmark = pytest.mark.skipif(not triton_backend.is_available(), reason="triton is not installed")
ON_GPU = bool(os.environ.get("LOMIX_TRITON_ON_GPU")) and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def to_device(crit, logits, target):
    crit = crit.to(DEVICE)
    logits = [z.detach().to(DEVICE).requires_grad_() for z in logits]
    return crit, logits, target.to(DEVICE)


def check(crit, logits, target, pixel_weight=None):
    crit, logits, target = to_device(crit, logits, target)
    pw = None if pixel_weight is None else pixel_weight.to(DEVICE)
    return compare_to_reference(crit, logits, target, pixel_weight=pw)


@pytest.mark.parametrize("L,C,B,sp", [(2, 2, 1, (5, 7)), (3, 5, 2, (6, 5)), (4, 3, 1, (8, 7)), (5, 2, 1, (8, 8)),
                                      (3, 3, 2, (3, 4, 5)), (4, 2, 1, (8, 5, 6))])
@pytest.mark.parametrize("awf_param", ["official", "paper"])
def test_shapes_all_ops(L, C, B, sp, awf_param):
    check(*random_case("triton", L, C, B, sp, native=True, awf_param=awf_param, seed=L))


@pytest.mark.parametrize("ops", OP_SUBSETS[:4], ids=lambda o: "+".join(o))
def test_single_ops(ops):
    check(*random_case("triton", 3, 3, 2, (6, 6), native=True, ops=ops))


@pytest.mark.parametrize("name,opts,kind,pw", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variants(name, opts, kind, pw):
    opts = dict(opts)
    classes = opts.pop("C", 4)
    sp = (5, 6)
    crit = randomize_params(lk.LoMixLoss(3, classes, backend="triton", **opts))
    logits = make_logits(3, classes, 2, sp, native=True)
    if kind == "int":
        target = make_target(2 if classes == 1 else classes, 2, sp, ignore_index=opts.get("ignore_index"))
    elif kind == "soft":
        target = soft_target(classes, 2, sp)
    else:
        target = (torch.rand(2, classes, *sp, generator=torch.Generator().manual_seed(9)) > 0.5).float()
    check(crit, logits, target, pixel_weights(2, sp) if pw else None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    crit, logits, target = to_device(*random_case("triton", 3, 3, 1, (6, 6), dtype=dtype))
    loss = crit(logits, target)
    loss.backward()
    ref = lk.LoMixLoss(3, 3, backend="reference").to(DEVICE).double()
    ref.load_state_dict(crit.state_dict())
    expected = ref([z.detach().double() for z in logits], target)
    assert loss.dtype == torch.float32 and logits[0].grad.dtype == dtype
    assert abs(float(loss.detach()) - float(expected)) < 1e-5 * abs(float(expected))


def test_deterministic():
    crit, logits, target = to_device(*random_case("triton", 3, 3, 2, (6, 7)))
    a = torch.autograd.grad(crit(logits, target), logits)
    b = torch.autograd.grad(crit(logits, target), logits)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_too_many_stages_says_so():
    crit = lk.LoMixLoss(7, 2, scheme="deep_supervision", backend="triton").to(DEVICE)
    logits = [z.to(DEVICE) for z in make_logits(7, 2, 1, (4, 4))]
    with pytest.raises(ValueError, match="at most 6 stages"):
        crit(logits, make_target(2, 1, (4, 4)).to(DEVICE))
