"""The single place that enumerates LoMix subsets and maps (SPEC §3) and resolves schemes.

Every backend, the module, the benchmarks and the tests take the map order from here.

Map order u = 0..M-1: the supervised originals first, then op-major in the order of ``ops``,
each op over all subsets of size >= 2 in ``itertools.combinations`` order.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .finish import WEIGHTINGS

ALL_OPS = ("add", "mult", "awf", "cat")
DEFAULT_OPS = ALL_OPS  # the official order: add, mul, wf, concat
SCHEMES = ("last_layer", "deep_supervision", "mutation", "lomix")
AWF_PARAMS = ("official", "paper")

# Operator codes shared with the C++ kernels (csrc/lomix_cpu.cpp) — keep in sync.
OP_CODES = {"orig": 0, "add": 1, "mult": 2, "cat": 3, "awf": 4}


def subsets(num_stages: int) -> list[Tuple[int, ...]]:
    """All subsets of ``range(num_stages)`` with at least two members, in map order."""
    return [s for k in range(2, num_stages + 1) for s in itertools.combinations(range(num_stages), k)]


def num_maps(num_stages: int, num_ops: int = len(ALL_OPS)) -> int:
    """M = L + |ops|·(2^L − 1 − L) for the LoMix / mutation schemes."""
    return num_stages + num_ops * (2 ** num_stages - 1 - num_stages)


@dataclass(frozen=True)
class MapInfo:
    """One supervised map: ``op`` in {"orig"} ∪ ALL_OPS, ``members`` the stage indices it mixes,
    ``subset_index`` its index in :func:`subsets` (-1 for originals)."""

    name: str
    op: str
    members: Tuple[int, ...]
    subset_index: int


@dataclass(frozen=True)
class SchemeConfig:
    """What a scheme resolves to: which originals, which ops, and the weighting of the maps."""

    originals: Tuple[int, ...]
    ops: Tuple[str, ...]
    weighting: str

    @property
    def learn_weights(self) -> bool:
        return self.weighting != "fixed"


def resolve_scheme(
    scheme: str,
    num_stages: int,
    ops: Optional[Sequence[str]] = None,
    learn_weights: Optional[bool] = None,
    weighting: Optional[str] = None,
) -> SchemeConfig:
    """Resolve a preset name plus optional overrides into a :class:`SchemeConfig`. The weighting is
    ``weighting`` if given, else "softplus" when weights are learned (``learn_weights``, or the
    lomix preset) and "fixed" when not; ``learn_weights`` must agree with an explicit weighting."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    presets = {
        "last_layer": ((num_stages - 1,), (), False),
        "deep_supervision": (tuple(range(num_stages)), (), False),
        "mutation": (tuple(range(num_stages)), ("add",), False),
        "lomix": (tuple(range(num_stages)), DEFAULT_OPS, True),
    }
    originals, preset_ops, preset_learn = presets[scheme]
    if ops is not None:
        if isinstance(ops, str):
            raise TypeError(f"ops must be a sequence of op names, got the string {ops!r}")
        ops = tuple(ops)
        for op in ops:
            if op not in ALL_OPS:
                raise ValueError(f"unknown op {op!r} in ops; expected a subset of {ALL_OPS}")
        if len(set(ops)) != len(ops):
            raise ValueError(f"ops must not repeat an op, got {ops}")
        preset_ops = ops
    if weighting is None:
        learn = preset_learn if learn_weights is None else bool(learn_weights)
        weighting = "softplus" if learn else "fixed"
    elif weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    elif learn_weights is not None and bool(learn_weights) != (weighting != "fixed"):
        raise ValueError(f"learn_weights={learn_weights} contradicts weighting={weighting!r} "
                         "(only 'fixed' weights are not learned); give one of the two")
    return SchemeConfig(originals=originals, ops=tuple(preset_ops), weighting=weighting)


def build_maps(num_stages: int, originals: Sequence[int], ops: Sequence[str]) -> list[MapInfo]:
    """Enumerate the maps in order: originals, then op-major over :func:`subsets`."""
    if num_stages < 2:
        raise ValueError(f"num_stages must be >= 2, got {num_stages}")
    maps = [MapInfo(f"orig_{i}", "orig", (i,), -1) for i in originals]
    subs = subsets(num_stages)
    for op in ops:
        for j, s in enumerate(subs):
            maps.append(MapInfo(op + "_" + "_".join(map(str, s)), op, s, j))
    return maps


def cat_param_shapes(num_stages: int, num_classes: int) -> list[Tuple[Tuple[int, int], Tuple[int]]]:
    """(weight, bias) shapes of the per-subset 1×1 conv of ``cat``: (C, |S|·C) and (C,)."""
    return [((num_classes, len(s) * num_classes), (num_classes,)) for s in subsets(num_stages)]


def awf_param_shapes(num_stages: int, num_classes: int, awf_param: str):
    """(weight, bias) shapes of ``awf``.

    official: one pair per subset size k = 2..L, (k, C) and (k,), shared by all subsets of size k.
    paper:    one pair per subset, (|S|, |S|·C) and (|S|,).
    """
    if awf_param == "official":
        return [((k, num_classes), (k,)) for k in range(2, num_stages + 1)]
    if awf_param == "paper":
        return [((len(s), len(s) * num_classes), (len(s),)) for s in subsets(num_stages)]
    raise ValueError(f"awf_param must be one of {AWF_PARAMS}, got {awf_param!r}")
