"""The fused-vs-reference comparison shared by the cpu and triton backend tests."""
import itertools

import torch

import lomix_kernels as lk

from conftest import make_logits, make_target, randomize_params, rel_err, run, twin

OP_SUBSETS = [ops for k in range(1, 5) for ops in itertools.combinations(lk.spec.ALL_OPS, k)]


def compare_to_reference(crit, logits, target, pixel_weight=None, tol=1e-5, grad_scale=1.0):
    """Run ``crit`` (a fused backend) and the float64 reference on the same inputs and parameters;
    assert SPEC §8 relative errors for the loss, logits grads and every parameter grad."""
    ref = twin(crit, "reference").double()
    ref_logits = [z.detach().double().requires_grad_(z.requires_grad) for z in logits]
    ref_target = target.double() if target.is_floating_point() else target
    ref_pw = None if pixel_weight is None else pixel_weight.double()
    loss, grads, pgrads = run(crit, logits, target, pixel_weight, grad_scale)
    rloss, rgrads, rpgrads = run(ref, ref_logits, ref_target, ref_pw, grad_scale)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    errors = {"loss": rel_err(loss, rloss)}
    for i, (g, r) in enumerate(zip(grads, rgrads)):
        if r is None:  # a stage no map reads (last_layer): the reference leaves no grad
            assert g is None or not g.any()
            continue
        assert g.dtype == logits[i].dtype and g.shape == logits[i].shape
        errors[f"logits[{i}]"] = rel_err(g, r)
    assert set(pgrads) == set(rpgrads)
    for name in rpgrads:
        errors[name] = rel_err(pgrads[name], rpgrads[name])
    bad = {k: v for k, v in errors.items() if not v < tol}
    if bad:  # allowed only where float32 itself cannot do better (cancellation in a tiny gradient)
        budget = _float32_reference_errors(crit, logits, target, pixel_weight, grad_scale, rloss, rgrads, rpgrads)
        bad = {k: (v, budget[k]) for k, v in bad.items() if not v <= FLOAT32_BUDGET * budget[k]}
    assert not bad, f"relative errors above {tol} (and above {FLOAT32_BUDGET}x torch's own float32 error): {bad}"
    for k, v in crit.last_terms.items():
        assert rel_err(v, ref.last_terms[k]) < max(tol, 1e-5), k
    return errors


FLOAT32_BUDGET = 4.0


def _float32_reference_errors(crit, logits, target, pixel_weight, grad_scale, rloss, rgrads, rpgrads):
    """Relative errors of the float32 *reference* against the float64 one: the error budget of an
    ill-conditioned quantity (SPEC §8's 1e-5 cannot be met by any float32 summation there)."""
    ref32 = twin(crit, "reference")
    z32 = [z.detach().float().requires_grad_(z.requires_grad) for z in logits]
    loss, grads, pgrads = run(ref32, z32, target, pixel_weight, grad_scale)
    out = {"loss": rel_err(loss, rloss)}
    out.update({f"logits[{i}]": rel_err(g, r) for i, (g, r) in enumerate(zip(grads, rgrads)) if r is not None})
    out.update({k: rel_err(pgrads[k], rpgrads[k]) for k in rpgrads})
    return out


def random_case(backend, L, C, B, sp, *, native=False, ops=None, seed=0, dtype=torch.float32,
                target_dtype=torch.int64, **opts):
    crit = randomize_params(lk.LoMixLoss(L, C, ops=ops, backend=backend, **opts), seed=seed + 7)
    logits = make_logits(L, C, B, sp, native=native, seed=seed, dtype=dtype)
    target = make_target(C, B, sp, seed=seed + 1, ignore_index=opts.get("ignore_index"), dtype=target_dtype)
    return crit, logits, target


def native_case(backend, target_sp, head_sps, *, C=3, B=2, seed=5, **opts):
    """Random parameters, random heads at the given native sizes (coarse -> fine) and a random target."""
    crit = randomize_params(lk.LoMixLoss(len(head_sps), C, backend=backend, **opts))
    g = torch.Generator().manual_seed(seed)
    logits = [(torch.randn(B, C, *sp, generator=g) * 2).requires_grad_() for sp in head_sps]
    return crit, logits, make_target(C, B, target_sp, ignore_index=opts.get("ignore_index"))


def _random_config(seed):
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    L, C, B = pick([2, 3, 4, 5]), pick([2, 3, 5, 8, 16]), pick([1, 2, 3])
    sp = tuple(int(s) for s in torch.randint(3, 14, (pick([2, 3]),), generator=g))
    heads = [tuple(max(1, int(s * float(torch.rand(1, generator=g)) + 0.5)) for s in sp) for _ in range(L - 1)] + [sp]
    ops = pick(OP_SUBSETS)
    opts = dict(dice_squared=pick([True, False]), dice_batch=pick([True, False]),
                include_background=pick([True, False]), awf_param=pick(["official", "paper"]),
                combine=pick(["additive", "multiplicative"]), ignore_index=pick([None, 250]))
    return L, C, B, sp, heads, ops, opts, pick([torch.uint8, torch.int32, torch.int64])


def random_config_case(backend, seed):
    """A randomly drawn (fixed-seed) problem: shapes, head sizes, op subset, options, target dtype."""
    L, C, B, sp, heads, ops, opts, tdtype = _random_config(seed)
    crit = randomize_params(lk.LoMixLoss(L, C, ops=ops, backend=backend, **opts), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    logits = [(torch.randn(B, C, *h, generator=g) * 2).requires_grad_() for h in heads]
    target = make_target(C, B, sp, seed=seed, ignore_index=opts["ignore_index"], dtype=tdtype)
    return crit, logits, target
