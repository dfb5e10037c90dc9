"""The reference backend against hand-computed cases, an independent implementation, and gradcheck."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import lomix_kernels as lk
from lomix_kernels import spec
from lomix_kernels.finish import finish
from lomix_kernels.inputs import Inputs
from lomix_kernels.reference import mix, reference_stats

from conftest import make_logits, make_target, randomize_params, rel_err, run, twin
from naive import naive_lomix


def _info(name, L):
    return next(m for m in spec.build_maps(L, range(L), spec.ALL_OPS) if m.name == name)


def test_ops_hand_computed():
    # one pixel, C = 2, three stages with known values
    z = [torch.tensor([1.0, 2.0]).view(1, 2, 1, 1), torch.tensor([3.0, -1.0]).view(1, 2, 1, 1),
         torch.tensor([0.5, 4.0]).view(1, 2, 1, 1)]
    L = 3
    add = mix(_info("add_0_2", L), z, None, None, None, None, "official")
    assert add.flatten().tolist() == [1.5, 6.0]  # a sum, not a mean
    mult = mix(_info("mult_0_1_2", L), z, None, None, None, None, "official")
    assert mult.flatten().tolist() == [1.5, -8.0]  # raw logits, no activation
    j = spec.subsets(L).index((0, 1))
    cat_w = [torch.zeros(2, len(s) * 2) for s in spec.subsets(L)]
    cat_b = [torch.zeros(2) for _ in spec.subsets(L)]
    cat_w[j] = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, -1.0, 0.0, 1.0]])
    cat_b[j] = torch.tensor([0.5, 0.0])
    cat = mix(_info("cat_0_1", L), z, cat_w, cat_b, None, None, "official")
    assert cat.flatten().tolist() == [1.0 + 6.0 + 0.5, -2.0 - 1.0]
    # official awf, k = 2: a_j = v_j·z_{s_j} + c_j
    awf_w = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(3, 2)]
    awf_b = [torch.tensor([0.0, 0.5]), torch.zeros(3)]
    a0, a1 = 1.0, -1.0 + 0.5  # scores of z0 and z1
    al0 = math.exp(a0) / (math.exp(a0) + math.exp(a1))
    awf = mix(_info("awf_0_1", L), z, None, None, awf_w, awf_b, "official")
    expected = [al0 * 1.0 + (1 - al0) * 3.0, al0 * 2.0 + (1 - al0) * -1.0]
    assert torch.allclose(awf.flatten(), torch.tensor(expected), atol=1e-6)
    # paper awf with the same (block-diagonal) V_S gives the same map
    pw = [torch.zeros(len(s), 2 * len(s)) for s in spec.subsets(L)]
    pb = [torch.zeros(len(s)) for s in spec.subsets(L)]
    pw[j] = torch.block_diag(awf_w[0][0:1], awf_w[0][1:2])
    pb[j] = awf_b[0]
    assert torch.allclose(mix(_info("awf_0_1", L), z, None, None, pw, pb, "paper"), awf)


def _stats(crit, logits, target, pixel_weight=None):
    z = logits
    inp = Inputs(list(z), target, target.is_floating_point(), pixel_weight, tuple(target.shape[1:] if not target.is_floating_point() else target.shape[2:]))
    return reference_stats(inp, crit.maps, crit.cat_weight, crit.cat_bias, crit.awf_weight, crit.awf_bias,
                           crit.options(), crit.awf_param)


@pytest.mark.parametrize("ignore_index", [None, 255])
def test_finish_matches_torch_cross_entropy_and_hand_dice(ignore_index):
    L, C, B, sp = 2, 4, 2, (5, 6)
    crit = lk.LoMixLoss(L, C, scheme="deep_supervision", backend="reference", ignore_index=ignore_index)
    logits = make_logits(L, C, B, sp, requires_grad=False)
    target = make_target(C, B, sp, ignore_index=ignore_index)
    total, terms = finish(_stats(crit, logits, target), crit.theta, crit.weighting, crit.options(), soft_target=False)
    valid = target != (ignore_index if ignore_index is not None else -1)
    for u, z in enumerate(logits):
        ce = F.cross_entropy(z, target, ignore_index=-100 if ignore_index is None else ignore_index)
        assert torch.allclose(terms["ce"][u], ce, atol=1e-6)
        s = z.softmax(1) * valid.unsqueeze(1)
        t = F.one_hot(torch.where(valid, target, 0), C).movedim(-1, 1).float() * valid.unsqueeze(1)
        d = [(2 * (s[:, c] * t[:, c]).sum() + 1e-5) / ((s[:, c] ** 2).sum() + (t[:, c] ** 2).sum() + 1e-5)
             for c in range(C)]
        assert torch.allclose(terms["dice"][u], 1 - torch.stack(d).mean(), atol=1e-6)
    assert torch.allclose(total, (terms["ell"] * crit.weights()).sum())
    assert torch.allclose(terms["ell"], 0.3 * terms["ce"] + 0.7 * terms["dice"])


@pytest.mark.parametrize("dice_squared,dice_batch,include_background", list(itertools.product([True, False], repeat=3)))
def test_dice_options_hand_computed(dice_squared, dice_batch, include_background):
    L, C, B, sp = 2, 3, 2, (4, 3)
    crit = lk.LoMixLoss(L, C, scheme="deep_supervision", backend="reference", dice_squared=dice_squared,
                        dice_batch=dice_batch, include_background=include_background, smooth_nr=0.1, smooth_dr=0.2)
    logits = make_logits(L, C, B, sp, requires_grad=False)
    target = make_target(C, B, sp)
    _, terms = finish(_stats(crit, logits, target), crit.theta, crit.weighting, crit.options(), soft_target=False)
    q = 2 if dice_squared else 1
    for u, z in enumerate(logits):
        s, t = z.softmax(1), F.one_hot(target, C).movedim(-1, 1).float()
        dims = (0, 2, 3) if dice_batch else (2, 3)
        coeff = (2 * (s * t).sum(dims) + 0.1) / ((s ** q).sum(dims) + (t ** q).sum(dims) + 0.2)
        coeff = coeff if include_background else coeff[..., 1:]
        assert torch.allclose(terms["dice"][u], 1 - coeff.mean(), atol=1e-6)


OPTION_GRID = [
    dict(),
    dict(ignore_index=255),
    dict(dice_squared=False, dice_batch=False, include_background=False),
    dict(ce_weight=0.5, dice_weight=0.5, ignore_index=-1),
]


@pytest.mark.parametrize("L,C,B,sp,native", [(2, 2, 1, (7, 5), False), (3, 4, 2, (9, 8), True),
                                             (4, 3, 2, (16, 12), True), (5, 2, 1, (16, 16), True),
                                             (3, 3, 2, (4, 5, 6), True), (2, 5, 3, (3, 4, 5), False)])
@pytest.mark.parametrize("awf_param", ["official", "paper"])
@pytest.mark.parametrize("opt", range(len(OPTION_GRID)))
def test_reference_equals_independent_implementation(L, C, B, sp, native, awf_param, opt):
    kw = OPTION_GRID[opt]
    crit = randomize_params(lk.LoMixLoss(L, C, backend="reference", awf_param=awf_param, **kw))
    logits = make_logits(L, C, B, sp, native=native, dtype=torch.float64)
    target = make_target(C, B, sp, ignore_index=kw.get("ignore_index"))
    crit = crit.double()
    loss = crit(logits, target)
    naive = naive_lomix(
        logits, target, crit.weights(), ops=crit.ops, originals=range(L), cat_w=crit.cat_weight,
        cat_b=crit.cat_bias, awf_w=crit.awf_weight, awf_b=crit.awf_bias, awf_param=awf_param,
        ce_weight=kw.get("ce_weight", 0.3), dice_weight=kw.get("dice_weight", 0.7),
        dice_squared=kw.get("dice_squared", True), dice_batch=kw.get("dice_batch", True),
        include_background=kw.get("include_background", True), ignore_index=kw.get("ignore_index"))
    assert abs(float(loss.detach()) - float(naive.detach())) <= 1e-12 * max(1.0, abs(float(naive)))
    g1 = torch.autograd.grad(loss, logits + list(crit.parameters()))
    g2 = torch.autograd.grad(naive, logits + list(crit.parameters()))
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-10


def test_mutation_is_merit_sum():
    L, C, B, sp = 4, 3, 2, (8, 8)
    crit = lk.LoMixLoss(L, C, scheme="mutation", backend="reference")
    assert len(crit.map_names) == 15
    logits = make_logits(L, C, B, sp, dtype=torch.float64, requires_grad=False)
    target = make_target(C, B, sp)
    loss = crit.double()(logits, target)
    merit = 0
    for k in range(1, L + 1):
        for s in itertools.combinations(range(L), k):
            z = sum(logits[i] for i in s)
            ce = F.cross_entropy(z, target)
            p, t = z.softmax(1), F.one_hot(target, C).movedim(-1, 1).double()
            d = (2 * (p * t).sum((0, 2, 3)) + 1e-5) / ((p * p).sum((0, 2, 3)) + t.sum((0, 2, 3)) + 1e-5)
            merit = merit + 0.3 * ce + 0.7 * (1 - d.mean())
    assert abs(float(loss) - float(merit)) < 1e-10


@pytest.mark.parametrize("awf_param", ["official", "paper"])
@pytest.mark.parametrize("sp", [(3, 4), (2, 3, 3)])
def test_gradcheck_reference(awf_param, sp):
    """float64 gradcheck through the logits and every parameter (θ, cat W/b, awf V/c)."""
    L, C, B = 3, 3, 2
    crit = randomize_params(lk.LoMixLoss(L, C, backend="reference", awf_param=awf_param, ignore_index=9)).double()
    names = [n for n, _ in crit.named_parameters()]
    logits = make_logits(L, C, B, sp, native=True, dtype=torch.float64)
    target = make_target(C, B, sp, ignore_index=9, frac_ignored=0.2)

    def f(*args):
        zs, ps = list(args[:L]), dict(zip(names, args[L:]))
        group = lambda prefix: [v for n, v in ps.items() if n.startswith(prefix + ".")]
        return lk.lomix_loss(zs, target, ps["theta"], group("cat_weight"), group("cat_bias"), group("awf_weight"),
                             group("awf_bias"), awf_param=awf_param, ignore_index=9, backend="reference")

    inputs = [z.detach().requires_grad_() for z in logits] + [p.detach().clone().requires_grad_()
                                                            for p in crit.parameters()]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_functional_matches_module():
    L, C, B, sp = 3, 4, 2, (6, 6)
    crit = randomize_params(lk.LoMixLoss(L, C, backend="reference"))
    logits = make_logits(L, C, B, sp, requires_grad=False)
    target = make_target(C, B, sp)
    loss, terms = lk.lomix_loss(logits, target, crit.theta, list(crit.cat_weight), list(crit.cat_bias),
                                list(crit.awf_weight), list(crit.awf_bias), backend="reference", return_terms=True)
    assert torch.allclose(loss, crit(logits, target))
    assert torch.allclose(terms["ell"], crit.last_terms["ell"]) and terms["ell"].shape == (len(crit.map_names),)
    assert set(crit.last_terms) == {"ell", "ce", "dice", "weight"}
    assert not crit.last_terms["ell"].requires_grad


def test_no_host_sync_in_reference_loss(monkeypatch):
    """The loss itself must not call .item() (the official code's 432 syncs per step)."""
    L, C, B, sp = 3, 3, 1, (5, 5)
    crit = lk.LoMixLoss(L, C, backend="reference", validate=False)
    logits = make_logits(L, C, B, sp)
    target = make_target(C, B, sp)

    def boom(self):
        raise AssertionError(".item() called inside the loss")

    monkeypatch.setattr(torch.Tensor, "item", boom)
    crit(logits, target).backward()


def test_float64_logits_with_a_default_module():
    """A default (float32) LoMixLoss given float64 logits computes in float64 (auto -> reference): the
    same loss as a float64 module, and gradients back to the float32 parameters in their own dtype."""
    crit = randomize_params(lk.LoMixLoss(3, 3))
    crit64 = twin(crit, "reference").double()
    logits = make_logits(3, 3, 2, (7, 6), native=True, dtype=torch.float64)
    target = make_target(3, 2, (7, 6))
    loss, grads, pgrads = run(crit, logits, target)
    loss64, grads64, pgrads64 = run(crit64, logits, target)
    assert loss.dtype == torch.float64 and abs(float(loss - loss64)) < 1e-12 * abs(float(loss64))
    assert all(rel_err(g, r) < 1e-12 for g, r in zip(grads, grads64))
    for name, g in pgrads.items():
        assert g.dtype == torch.float32 and rel_err(g, pgrads64[name]) < 1e-6, name
