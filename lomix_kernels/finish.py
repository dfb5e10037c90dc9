"""The differentiable "finish" shared by every backend (SPEC §4).

Backends reduce the M maps over pixels to a few sums per map, sample and class
(:class:`MapStats`); :func:`finish` turns those into per-map CE, Dice, ℓ_u and the weighted total
with plain torch on tensors of size M×B×C. Autograd of this function gives the statistic
gradients that the fused backward passes consume.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

COMBINES = ("additive", "multiplicative")
ACTIVATIONS = ("softmax", "sigmoid")
WEIGHTINGS = ("softplus", "fixed", "normalized", "uncertainty")


class MapStats(NamedTuple):
    """Per-map pixel sums. ω is the pixel weight, t the target, s the activation of map u.

    ce:    (M, B, C) Σ_p ω t_c (−log s_c)  (softmax)   or Σ_p ω BCE(z_c, t_c)  (sigmoid)
    inter: (M, B, C) Σ_p ω s_c t_c
    zsum:  (M, B, C) Σ_p ω s_c^q
    tsum:  (B, C)    Σ_p ω t_c
    tpow:  (B, C)    Σ_p ω t_c^q
    count: (B,)      Σ_p ω
    """

    ce: Tensor
    inter: Tensor
    zsum: Tensor
    tsum: Tensor
    tpow: Tensor
    count: Tensor


class LossTerms(NamedTuple):
    """What a ``combine`` callable receives (all differentiable).

    ce, dice, prob: (M,) cross-entropy, Dice loss and mean true-class probability P_u per map.
    inter, zsum:    (M, C) batch Dice sums, or (M, B, C) when ``dice_batch=False``.
    tpow:           (C,) or (B, C) target sums Σ ω t^q, matching ``inter``.
    count:          () the total pixel weight N.
    """

    ce: Tensor
    dice: Tensor
    prob: Tensor
    inter: Tensor
    zsum: Tensor
    tpow: Tensor
    count: Tensor


@dataclass(frozen=True)
class LossOptions:
    """The loss options of SPEC §6 that the finish (and the kernels) need."""

    ce_weight: float = 0.3
    dice_weight: float = 0.7
    dice_squared: bool = True
    dice_batch: bool = True
    include_background: bool = True
    smooth_nr: float = 1e-5
    smooth_dr: float = 1e-5
    ignore_index: Optional[int] = None
    combine: Union[str, Callable[[LossTerms], Tensor]] = "additive"
    activation: str = "softmax"
    class_weight: Optional[Tensor] = field(default=None, compare=False)

    @property
    def q(self) -> int:
        """Exponent of the Dice denominator terms: 2 (squared, TransUNet/LoMix) or 1 (MONAI)."""
        return 2 if self.dice_squared else 1

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not callable(self.combine) and self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES} or a callable, got {self.combine!r}")
        for name in ("smooth_nr", "smooth_dr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.class_weight is not None:
            cw = self.class_weight
            if not isinstance(cw, Tensor) or cw.dim() != 1 or not cw.is_floating_point():
                raise TypeError("class_weight must be a 1-D floating tensor of shape (C,)")
            if not torch.compiler.is_compiling() and bool((cw < 0).any()):  # data check: eager only
                raise ValueError("class_weight must be >= 0")


def map_weights(theta: Tensor, weighting: str) -> Tensor:
    """(M,) the effective map weights w_u from θ (M,):

    - ``softplus`` (the paper): w = softplus(θ);
    - ``fixed``: θ holds the weights themselves (1 unless set);
    - ``normalized``: w = M·softplus(θ) / Σ_v softplus(θ_v) (Σ w = M: the scale is fixed);
    - ``uncertainty`` (Kendall, Gal & Cipolla 2018): w = exp(−θ), θ_u the log-variance s_u.
    """
    if weighting == "softplus":
        return F.softplus(theta)
    if weighting == "fixed":
        return theta
    if weighting == "normalized":
        sp = F.softplus(theta)
        return sp * (theta.numel() / sp.sum())
    if weighting == "uncertainty":
        return torch.exp(-theta)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def weighted_total(ell: Tensor, theta: Tensor, weighting: str) -> tuple[Tensor, Tensor]:
    """() the total of per-map losses ``ell`` (M,): Σ_u w_u ℓ_u, plus Σ_u θ_u for ``uncertainty``
    (its regularizer; the minimum over θ_u is at w_u = 1/ℓ_u); and (M,) the weights w_u."""
    theta = theta.to(ell.dtype)
    weights = map_weights(theta, weighting)
    total = (weights * ell).sum()
    return (total + theta.sum() if weighting == "uncertainty" else total), weights


def finish(
    stats: MapStats,
    theta: Tensor,
    weighting: str,
    opts: LossOptions,
    soft_target: bool,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Turn per-map sums into the weighted total loss.

    Args:
        stats: :class:`MapStats` with M maps, B samples, C classes.
        theta: (M,) the weight parameters θ (see :func:`map_weights`).
        weighting: one of :data:`WEIGHTINGS`.
        opts: loss options.
        soft_target: the target was a float (B, C, ...) tensor (changes the CE normalizer,
            as ``nn.CrossEntropyLoss`` does for probability targets).
    Returns:
        total: () :func:`weighted_total`, and a dict of (M,) tensors ``ell``, ``ce``, ``dice`` and the
        effective ``weight``.
    """
    num_classes = stats.ce.shape[-1]
    dtype = stats.ce.dtype
    cw = opts.class_weight
    cw = torch.ones(num_classes, dtype=dtype, device=stats.ce.device) if cw is None else cw.to(stats.ce)
    count = stats.count.sum()

    # Cross-entropy, normalized like nn.CrossEntropyLoss / nn.BCEWithLogitsLoss 'mean'.
    ce_num = (stats.ce * cw).sum(dim=(1, 2))
    if opts.activation == "sigmoid":
        ce_den = count * num_classes
    elif soft_target:
        ce_den = count
    else:
        ce_den = (stats.tsum * cw).sum()
    ce = ce_num / _safe_den(ce_den)

    # Dice: batch sums (dice_batch) or per sample, then a (weighted) mean over classes.
    inter, zsum, tpow = stats.inter, stats.zsum, stats.tpow
    if opts.dice_batch:
        inter, zsum, tpow = inter.sum(1), zsum.sum(1), tpow.sum(0)
    coeff = (2 * inter + opts.smooth_nr) / (zsum + tpow + opts.smooth_dr)
    class_w = cw.clone()
    if not opts.include_background:
        class_w[0] = 0
    dice_per = 1 - (coeff * class_w).sum(-1) / _safe_den(class_w.sum())
    dice = dice_per if opts.dice_batch else dice_per.mean(-1)

    if opts.combine == "additive":
        ell = opts.ce_weight * ce + opts.dice_weight * dice
    elif opts.combine == "multiplicative":
        ell = ce * dice
    else:
        prob = stats.inter.sum(dim=(1, 2)) / _safe_den(count)
        terms = LossTerms(ce=ce, dice=dice, prob=prob, inter=inter, zsum=zsum, tpow=tpow, count=count)
        ell = opts.combine(terms)
        if not isinstance(ell, Tensor) or ell.shape != ce.shape:
            raise ValueError(f"combine callable must return a tensor of shape {tuple(ce.shape)}, "
                             f"got {getattr(ell, 'shape', type(ell))}")
    total, weights = weighted_total(ell, theta, weighting)
    return total, {"ell": ell, "ce": ce, "dice": dice, "weight": weights}


def _safe_den(den: Tensor) -> Tensor:
    """A denominator that is 1 where it is 0 (all pixels ignored): the numerator is 0 there too,
    so the term is 0 with zero gradient instead of NaN."""
    return torch.where(den > 0, den, torch.ones_like(den))
