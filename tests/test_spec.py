"""Map enumeration (SPEC §3) and schemes: counts, names, order, parameter shapes."""
import itertools

import pytest

import lomix_kernels as lk
from lomix_kernels import spec


@pytest.mark.parametrize("L", [2, 3, 4, 5])
def test_subsets_order_and_count(L):
    subs = spec.subsets(L)
    assert len(subs) == 2 ** L - 1 - L
    expected = [s for k in range(2, L + 1) for s in itertools.combinations(range(L), k)]
    assert subs == expected


@pytest.mark.parametrize("L,M", [(2, 6), (3, 19), (4, 48), (5, 109)])
def test_lomix_counts(L, M):
    crit = lk.LoMixLoss(num_stages=L, num_classes=3)
    assert len(crit.map_names) == M == spec.num_maps(L)
    assert crit.theta.shape == (M,)
    assert len(crit.cat_weight) == 2 ** L - 1 - L


def test_names_l4():
    names = lk.LoMixLoss(num_stages=4, num_classes=9).map_names
    assert names[:4] == ["orig_0", "orig_1", "orig_2", "orig_3"]
    assert names[4] == "add_0_1" and names[14] == "add_0_1_2_3"
    assert names[15] == "mult_0_1" and names[26] == "awf_0_1"
    assert names[-1] == "cat_0_1_2_3" and names[37] == "cat_0_1"
    assert len(set(names)) == 48


@pytest.mark.parametrize("L", [2, 3, 4, 5])
def test_schemes(L):
    n_sub = 2 ** L - 1 - L
    ll = lk.LoMixLoss(L, 3, scheme="last_layer")
    assert ll.map_names == [f"orig_{L - 1}"] and not ll.learn_weights
    ds = lk.LoMixLoss(L, 3, scheme="deep_supervision")
    assert ds.map_names == [f"orig_{i}" for i in range(L)]
    mu = lk.LoMixLoss(L, 3, scheme="mutation")
    assert len(mu.map_names) == L + n_sub and all(n.startswith(("orig", "add")) for n in mu.map_names)
    assert float(mu.weights().sum()) == L + n_sub  # fixed weights 1
    lm = lk.LoMixLoss(L, 3, scheme="lomix")
    assert lm.learn_weights and lm.weights().allclose(lm.weights()[0].expand(len(lm.map_names)))
    assert abs(float(lm.weights()[0].detach()) - 0.6931471805599453) < 1e-6  # softplus(0) = ln 2


def test_overrides():
    crit = lk.LoMixLoss(4, 3, scheme="lomix", ops=("add", "awf"), learn_weights=False)
    assert len(crit.map_names) == 4 + 2 * 11 and crit.cat_weight is None and crit.awf_weight is not None
    assert [n.split("_")[0] for n in crit.map_names[4:]] == ["add"] * 11 + ["awf"] * 11
    assert "theta" not in dict(crit.named_parameters())


@pytest.mark.parametrize("awf_param", ["official", "paper"])
def test_param_shapes(awf_param):
    L, C = 4, 5
    crit = lk.LoMixLoss(L, C, awf_param=awf_param)
    for j, s in enumerate(spec.subsets(L)):
        assert crit.cat_weight[j].shape == (C, len(s) * C) and crit.cat_bias[j].shape == (C,)
    if awf_param == "official":
        assert [tuple(w.shape) for w in crit.awf_weight] == [(k, C) for k in range(2, L + 1)]
        assert [tuple(b.shape) for b in crit.awf_bias] == [(k,) for k in range(2, L + 1)]
    else:
        assert [tuple(w.shape) for w in crit.awf_weight] == [(len(s), len(s) * C) for s in spec.subsets(L)]
    # nn.Conv2d-style init: |w| <= 1/sqrt(fan_in)
    assert float(crit.cat_weight[0].abs().max()) <= 1 / (2 * C) ** 0.5


def test_parameters_reach_optimizer():
    crit = lk.LoMixLoss(3, 4)
    names = {n for n, _ in crit.named_parameters()}
    assert "theta" in names and "cat_weight.0" in names and "awf_bias.1" in names


@pytest.mark.parametrize("kwargs,exc", [
    (dict(scheme="nope"), ValueError), (dict(ops=("add", "sub")), ValueError), (dict(ops="add"), TypeError),
    (dict(backend="gpu"), ValueError), (dict(awf_param="x"), ValueError), (dict(num_stages=1), ValueError),
    (dict(num_classes=1), ValueError), (dict(combine="sum"), ValueError), (dict(activation="relu"), ValueError),
    (dict(class_weight=[1.0, 2.0]), ValueError), (dict(ops=("add", "add")), ValueError),
])
def test_bad_constructor_args(kwargs, exc):
    args = dict(num_stages=3, num_classes=3)
    args.update(kwargs)
    with pytest.raises(exc):
        lk.LoMixLoss(**args)
