"""Loss variants (issue 6): multiplicative and callable combine, sigmoid mode, soft targets,
pixel weights, class weights — reference vs hand-computed values, fused vs reference."""
import pytest
import torch
import torch.nn.functional as F

import lomix_kernels as lk
from lomix_kernels import cpu

from conftest import make_logits, make_target, randomize_params, run
from fused_cases import compare_to_reference

FUSED = ["cpu"] if cpu.available() else []
L, C, B = 3, 4, 2


def soft_target(C, B, sp, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, *sp, generator=g) * 2).softmax(1)


def pixel_weights(B, sp, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, *sp, generator=g) * (torch.rand(B, *sp, generator=g) > 0.3)


# ----------------------------------------------------------------- reference vs hand-computed --
def test_multiplicative_is_ce_times_dice():
    crit = lk.LoMixLoss(L, C, combine="multiplicative", backend="reference")
    logits, target = make_logits(L, C, B, (6, 7)), make_target(C, B, (6, 7))
    crit(logits, target)
    t = crit.last_terms
    assert torch.allclose(t["ell"], t["ce"] * t["dice"])


def test_callable_combine_gets_statistics():
    seen = {}

    def jaccard(terms):  # IoU loss from the same sums: I / (Z + T - I) with linear Z (dice_squared=False)
        seen.update(terms._asdict())
        iou = (terms.inter + 1e-5) / (terms.zsum + terms.tpow - terms.inter + 1e-5)
        return terms.ce + (1 - iou.mean(-1))

    sp = (6, 5)
    crit = lk.LoMixLoss(L, C, combine=jaccard, dice_squared=False, backend="reference", scheme="deep_supervision")
    logits, target = make_logits(L, C, B, sp), make_target(C, B, sp)
    crit(logits, target)
    assert seen["inter"].shape == (L, C) and seen["count"].shape == () and seen["prob"].shape == (L,)
    z = logits[2]
    s, t = z.softmax(1), F.one_hot(target, C).movedim(-1, 1).float()
    iou = ((s * t).sum((0, 2, 3)) + 1e-5) / (s.sum((0, 2, 3)) + t.sum((0, 2, 3)) - (s * t).sum((0, 2, 3)) + 1e-5)
    expected = F.cross_entropy(z, target) + 1 - iou.mean()
    assert torch.allclose(crit.last_terms["ell"][2], expected, atol=1e-6)
    # P_u: mean true-class probability
    assert torch.allclose(seen["prob"][2], (s * t).sum(1).mean(), atol=1e-6)


def test_callable_must_return_m():
    crit = lk.LoMixLoss(L, C, combine=lambda t: t.ce.sum(), backend="reference")
    with pytest.raises(ValueError, match="combine callable must return"):
        crit(make_logits(L, C, B, (4, 4)), make_target(C, B, (4, 4)))


def test_sigmoid_binary_matches_bce_and_dice():
    """C=1 sigmoid equals BCEWithLogits + Dice on sigmoid probs (MONAI DiceCELoss(sigmoid=True))."""
    sp = (7, 6)
    crit = lk.LoMixLoss(L, 1, scheme="deep_supervision", activation="sigmoid", dice_squared=False,
                        ce_weight=1.0, dice_weight=1.0, backend="reference")
    logits, target = make_logits(L, 1, B, sp), make_target(2, B, sp)
    crit(logits, target)
    for u, z in enumerate(logits):
        t = target.unsqueeze(1).float()
        bce = F.binary_cross_entropy_with_logits(z, t)
        p = z.sigmoid()
        dice = 1 - (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)  # MONAI batch=True
        assert torch.allclose(crit.last_terms["ce"][u], bce, atol=1e-6)
        assert torch.allclose(crit.last_terms["dice"][u], dice, atol=1e-6)


def test_sigmoid_multilabel_float_target():
    sp = (5, 6)
    crit = lk.LoMixLoss(L, C, scheme="deep_supervision", activation="sigmoid", dice_batch=False,
                        backend="reference")
    logits = make_logits(L, C, B, sp)
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(B, C, *sp, generator=g) > 0.6).float()
    crit(logits, target)
    z = logits[1]
    bce = F.binary_cross_entropy_with_logits(z, target)
    p = z.sigmoid()
    d = (2 * (p * target).sum((2, 3)) + 1e-5) / ((p * p).sum((2, 3)) + target.sum((2, 3)) + 1e-5)
    assert torch.allclose(crit.last_terms["ce"][1], bce, atol=1e-6)
    assert torch.allclose(crit.last_terms["dice"][1], 1 - d.mean(), atol=1e-6)


def test_soft_target_cross_entropy():
    sp = (6, 6)
    crit = lk.LoMixLoss(L, C, scheme="deep_supervision", backend="reference")
    logits, target = make_logits(L, C, B, sp), soft_target(C, B, sp)
    crit(logits, target)
    assert torch.allclose(crit.last_terms["ce"][0], F.cross_entropy(logits[0], target), atol=1e-6)


def test_pixel_weight_and_class_weight_cross_entropy():
    sp = (6, 5)
    cw = torch.tensor([0.2, 1.0, 3.0, 0.5])
    crit = lk.LoMixLoss(L, C, scheme="deep_supervision", class_weight=cw, backend="reference")
    logits, target = make_logits(L, C, B, sp), make_target(C, B, sp)
    crit(logits, target)
    assert torch.allclose(crit.last_terms["ce"][0], F.cross_entropy(logits[0], target, weight=cw), atol=1e-6)
    pw = pixel_weights(B, sp)
    crit2 = lk.LoMixLoss(L, C, scheme="deep_supervision", backend="reference")
    crit2(logits, target, pixel_weight=pw)
    ce = F.cross_entropy(logits[0], target, reduction="none")
    assert torch.allclose(crit2.last_terms["ce"][0], (ce * pw).sum() / pw.sum(), atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_all_zero_pixel_weight_is_finite_with_zero_grads(backend):
    sp = (5, 5)
    crit = randomize_params(lk.LoMixLoss(L, C, backend=backend))
    logits, target = make_logits(L, C, B, sp), make_target(C, B, sp)
    loss, grads, pgrads = run(crit, logits, target, pixel_weight=torch.zeros(B, *sp))
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() and not g.any() for g in grads)
    assert all(torch.isfinite(g).all() for g in pgrads.values())


def test_bad_variant_combinations():
    sp = (4, 4)
    logits = make_logits(L, C, B, sp)
    with pytest.raises(ValueError, match="ignore_index cannot be used"):
        lk.LoMixLoss(L, C, ignore_index=0)(logits, soft_target(C, B, sp))
    with pytest.raises(ValueError, match="pixel_weight must be finite and >= 0"):
        lk.LoMixLoss(L, C, backend="reference")(logits, make_target(C, B, sp), pixel_weight=-torch.ones(B, *sp))
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        lk.LoMixLoss(L, 1)
    with pytest.raises(ValueError, match="float target must have shape"):
        lk.LoMixLoss(L, C)(logits, soft_target(C + 1, B, sp))
    with pytest.raises(ValueError, match="finer than the target"):
        lk.LoMixLoss(L, C)(logits, soft_target(C, B, (3, 3)))
    with pytest.raises(ValueError, match="float target must hold"):
        lk.LoMixLoss(L, C, activation="sigmoid", backend="reference")(logits, soft_target(C, B, sp) * 3)
    with pytest.raises(ValueError, match="class index 2 outside"):  # binary sigmoid: labels 0/1
        lk.LoMixLoss(L, 1, activation="sigmoid", backend="reference")(make_logits(L, 1, B, sp),
                                                                      make_target(3, B, sp, seed=5))


# ------------------------------------------------------------------------ fused vs reference --
VARIANTS = [
    ("multiplicative", dict(combine="multiplicative"), "int", None),
    ("callable", dict(combine=lambda t: t.ce * (1 - t.prob) ** 2 + t.dice), "int", None),
    ("sigmoid-binary", dict(activation="sigmoid", C=1), "int", None),
    ("sigmoid-multilabel", dict(activation="sigmoid", dice_squared=False), "multilabel", None),
    ("soft", dict(), "soft", None),
    ("soft+pixel_weight", dict(dice_batch=False), "soft", "pw"),
    ("pixel_weight+ignore", dict(ignore_index=255), "int", "pw"),
    ("class_weight", dict(class_weight=[0.3, 1.0, 2.0, 0.7], include_background=False), "int", None),
    ("sigmoid+class_weight+pw", dict(activation="sigmoid", class_weight=[0.3, 1.0, 2.0, 0.7]), "multilabel", "pw"),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("name,opts,kind,pw", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("sp", [(13, 11), (5, 6, 7)])
def test_fused_variants_match_reference(backend, name, opts, kind, pw, sp):
    opts = dict(opts)
    classes = opts.pop("C", C)
    crit = randomize_params(lk.LoMixLoss(L, classes, backend=backend, **opts))
    logits = make_logits(L, classes, B, sp, native=True)
    if kind == "int":
        target = make_target(2 if classes == 1 else classes, B, sp, ignore_index=opts.get("ignore_index"))
    elif kind == "soft":
        target = soft_target(classes, B, sp)
    else:
        target = (torch.rand(B, classes, *sp, generator=torch.Generator().manual_seed(9)) > 0.5).float()
    compare_to_reference(crit, logits, target, pixel_weight=pixel_weights(B, sp) if pw else None)
