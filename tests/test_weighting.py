"""Weightings of the total (SPEC §6, finish.map_weights): definitions, agreement of every backend with
the reference, float64 gradcheck, and the fixed points of the README's derivations on toy problems
(constant per-map losses) under SGD with momentum and AdamW."""
import pytest
import torch

import lomix_kernels as lk
from lomix_kernels import cpu
from lomix_kernels.finish import WEIGHTINGS, map_weights, weighted_total

from conftest import make_logits, make_target, randomize_params, triton_available
from fused_cases import compare_to_reference, random_case

LEARNED = [w for w in WEIGHTINGS if w != "fixed"]
FUSED = (["cpu"] if cpu.available() else []) + (["triton"] if triton_available() else [])


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_total_and_weights_follow_the_definitions(weighting):
    crit = randomize_params(lk.LoMixLoss(3, 3, weighting=weighting, backend="reference"))
    logits, target = make_logits(3, 3, 2, (6, 5), native=True), make_target(3, 2, (6, 5))
    loss = crit(logits, target)
    theta, ell, M = crit.theta.detach(), crit.last_terms["ell"], len(crit.map_names)
    expected_w = {"softplus": torch.nn.functional.softplus(theta), "fixed": theta,
                  "normalized": M * torch.nn.functional.softplus(theta) / torch.nn.functional.softplus(theta).sum(),
                  "uncertainty": torch.exp(-theta)}[weighting]
    expected = (expected_w * ell).sum() + (theta.sum() if weighting == "uncertainty" else 0)
    assert torch.allclose(crit.weights(), expected_w) and torch.allclose(crit.last_terms["weight"], expected_w)
    assert torch.allclose(loss.detach(), expected, rtol=1e-6)
    assert crit.learn_weights == (weighting != "fixed") and crit.theta.requires_grad == crit.learn_weights
    if weighting == "normalized":
        assert abs(float(crit.weights().detach().sum()) - M) < 1e-4


def test_weighting_and_learn_weights_agree():
    assert lk.LoMixLoss(3, 3).weighting == "softplus"
    assert lk.LoMixLoss(3, 3, scheme="deep_supervision").weighting == "fixed"
    assert lk.LoMixLoss(3, 3, learn_weights=False).weighting == "fixed"
    assert lk.LoMixLoss(3, 3, scheme="mutation", learn_weights=True).weighting == "softplus"
    ds = lk.LoMixLoss(3, 3, scheme="deep_supervision", weighting="uncertainty")
    assert isinstance(ds.theta, torch.nn.Parameter) and torch.equal(ds.weights(), torch.ones(3))
    assert torch.equal(lk.LoMixLoss(3, 3, weighting="normalized").weights(), torch.ones(19))
    with pytest.raises(ValueError, match="learn_weights=False contradicts weighting='normalized'"):
        lk.LoMixLoss(3, 3, learn_weights=False, weighting="normalized")
    with pytest.raises(ValueError, match="learn_weights=True contradicts weighting='fixed'"):
        lk.LoMixLoss(3, 3, learn_weights=True, weighting="fixed")
    with pytest.raises(ValueError, match="weighting must be one of"):
        lk.LoMixLoss(3, 3, weighting="softmax")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("weighting", LEARNED)
def test_fused_backends_match_reference(backend, weighting):
    """Loss, logits grads and every parameter grad (θ included) against the float64 reference."""
    errors = compare_to_reference(*random_case(backend, 3, 3, 2, (7, 6), native=True, weighting=weighting, seed=4))
    assert "theta" in errors


@pytest.mark.parametrize("weighting", LEARNED)
def test_functional_weighting_matches_module(weighting):
    crit = randomize_params(lk.LoMixLoss(3, 3, weighting=weighting, backend="reference"))
    logits, target = make_logits(3, 3, 1, (5, 5), requires_grad=False), make_target(3, 1, (5, 5))
    loss, terms = lk.lomix_loss(logits, target, crit.theta, list(crit.cat_weight), list(crit.cat_bias),
                                list(crit.awf_weight), list(crit.awf_bias), weighting=weighting,
                                backend="reference", return_terms=True)
    assert torch.equal(loss, crit(logits, target)) and torch.equal(terms["weight"], crit.weights())


@pytest.mark.parametrize("weighting", LEARNED)
def test_gradcheck_theta(weighting):
    """float64 gradcheck of the total through θ and the logits, per weighting."""
    crit = randomize_params(lk.LoMixLoss(3, 2, ops=("add", "mult"), weighting=weighting,
                                         backend="reference")).double()
    logits = make_logits(3, 2, 1, (4, 3), native=True, dtype=torch.float64)
    target = make_target(2, 1, (4, 3))

    def f(theta, *zs):
        return lk.lomix_loss(list(zs), target, theta, ops=("add", "mult"), weighting=weighting, backend="reference")

    inputs = [crit.theta.detach().clone().requires_grad_()] + [z.detach().requires_grad_() for z in logits]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------ toy fixed points (README derivations) --
ELL = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)  # constant per-map losses


def descend(weighting, optimizer, steps, ell=ELL, **opt_kwargs):
    """θ after ``steps`` optimizer steps on weighted_total(ell, θ) with constant ℓ, from θ = 0."""
    theta = torch.zeros_like(ell, requires_grad=True)
    opt = optimizer([theta], **opt_kwargs)
    for _ in range(steps):
        opt.zero_grad()
        weighted_total(ell, theta, weighting)[0].backward()
        opt.step()
    return theta.detach()


@pytest.mark.parametrize("optimizer,kwargs,steps", [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9), 1500),
    (torch.optim.AdamW, dict(lr=0.02, weight_decay=0.0), 3000),
])
def test_uncertainty_converges_to_inverse_loss(optimizer, kwargs, steps):
    """Fixed point of Σ exp(−s)ℓ + s: ∂/∂s = 1 − exp(−s)ℓ = 0, so w = exp(−s) = 1/ℓ (convex in s)."""
    w = map_weights(descend("uncertainty", optimizer, steps, **kwargs), "uncertainty")
    assert torch.allclose(w, 1 / ELL, rtol=1e-2), w


def test_softplus_collapses_like_one_over_t_under_sgd():
    """dθ/dt = −η'σ(θ)ℓ with η' = η/(1−μ); for θ ≪ 0, d(e^−θ)/dt ≈ η'ℓ, so w ≈ 1/(η'ℓt): every weight
    goes to 0, and the ratios tend to w_u/w_v = ℓ_v/ℓ_u (the larger loss loses its weight faster)."""
    lr, mom, steps = 0.01, 0.9, 5000
    w = map_weights(descend("softplus", torch.optim.SGD, steps, lr=lr, momentum=mom), "softplus")
    predicted = 1 / (lr / (1 - mom) * ELL * steps)
    assert torch.allclose(w, predicted, rtol=0.05), (w, predicted)
    assert abs(float(w[0] / w[2]) - float(ELL[2] / ELL[0])) < 0.1 * float(ELL[2] / ELL[0])


def test_softplus_falls_together_under_adamw():
    """Adam's step is invariant to the gradient's scale: every θ_u follows the same path whatever ℓ_u,
    falling by at most ~lr per step (the paper's weights shrink together)."""
    lr, steps = 1e-3, 3000
    theta = descend("softplus", torch.optim.AdamW, steps, lr=lr, weight_decay=0.0)
    assert float(theta.max() - theta.min()) < 1e-6
    assert -1.05 * lr * steps <= float(theta[0]) <= -0.25 * lr * steps, theta


@pytest.mark.parametrize("optimizer,kwargs", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
                                              (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.0))])
def test_normalized_drifts_to_the_lowest_loss_map(optimizer, kwargs):
    """∂L/∂θ_u = (M σ(θ_u)/Σ_v softplus(θ_v))·(ℓ_u − Σ_v w_v ℓ_v / M): maps above the weighted mean
    loss lose weight, below it gain; the only stable point puts all M of the weight on argmin ℓ."""
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    weighted_total(ELL, theta, "normalized")[0].backward()
    assert torch.equal(torch.sign(theta.grad), torch.sign(ELL - ELL.mean()))
    w = map_weights(descend("normalized", optimizer, 3000, **kwargs), "normalized")
    assert abs(float(w.sum()) - 3) < 1e-9 and float(w[0]) > 2.7 and float(w[1:].max()) < 0.2, w
