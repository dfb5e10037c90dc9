"""The PyTorch reference backend: materializes every map and reduces it to :class:`MapStats`.

Plain, readable torch, autograd by torch. It is the oracle every fused backend is tested
against, and it is what a naive LoMix implementation costs: M full-resolution maps plus their
softmax and autograd buffers.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .finish import LossOptions, MapStats
from .inputs import Inputs, target_classes, upsample
from .spec import MapInfo


def target_tensors(inputs: Inputs, num_classes: int, opts: LossOptions, dtype: torch.dtype):
    """Dense target t (B, C, *sp) and pixel weight ω (B, *sp) in ``dtype``.

    Integer targets become one-hot (C=1 sigmoid: the 0/1 label itself); pixels equal to
    ``ignore_index`` get ω = 0. A user ``pixel_weight`` multiplies ω.
    """
    target = inputs.target
    if inputs.soft:
        t = target.to(dtype)
        omega = torch.ones((t.shape[0], *t.shape[2:]), dtype=dtype, device=t.device)
    else:
        valid = torch.ones_like(target, dtype=torch.bool)
        if opts.ignore_index is not None:
            valid = target != opts.ignore_index
        y = torch.where(valid, target, torch.zeros_like(target)).long()
        if target_classes(num_classes, opts.activation) != num_classes:  # binary sigmoid, C = 1
            t = y.unsqueeze(1).to(dtype)
        else:
            t = F.one_hot(y, num_classes).movedim(-1, 1).to(dtype)
        omega = valid.to(dtype)
    if inputs.pixel_weight is not None:
        omega = omega * inputs.pixel_weight.to(dtype)
    return t, omega


def mix(info: MapInfo, z: Sequence[Tensor], cat_w, cat_b, awf_w, awf_b, awf_param: str) -> Tensor:
    """The map ``info`` built from the upsampled stage logits z (each (B, C, *sp))."""
    members = [z[i] for i in info.members]
    if info.op in ("orig", "add"):
        return torch.stack(members).sum(0) if len(members) > 1 else members[0]
    if info.op == "mult":
        out = members[0]
        for m in members[1:]:
            out = out * m
        return out
    x = torch.cat(members, dim=1)  # (B, |S|C, *sp), the channel concatenation x_S
    if info.op == "cat":
        return _conv1x1(x, cat_w[info.subset_index], cat_b[info.subset_index])
    if info.op == "awf":
        k = len(members)
        if awf_param == "official":  # a_j = v_{k,j} · z_{s_j} + c_{k,j}
            w, b = awf_w[k - 2], awf_b[k - 2]
            scores = torch.stack([torch.einsum("c,bc...->b...", w[j], members[j]) + b[j] for j in range(k)], 1)
        else:  # paper Eq. 4: a = V_S x_S + c_S
            scores = _conv1x1(x, awf_w[info.subset_index], awf_b[info.subset_index])
        alpha = torch.softmax(scores, dim=1)  # (B, k, *sp)
        return sum(alpha[:, j:j + 1] * members[j] for j in range(k))
    raise ValueError(f"unknown op {info.op!r}")


def _conv1x1(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """1×1 convolution: (B, Cin, *sp) with weight (Cout, Cin) and bias (Cout,) -> (B, Cout, *sp)."""
    out = torch.einsum("oi,bi...->bo...", weight, x)
    return out + bias.view(1, -1, *([1] * (x.dim() - 2)))


def map_stats(z_u: Tensor, t: Tensor, omega: Tensor, opts: LossOptions):
    """Per-sample per-class sums (ce, inter, zsum), each (B, C), of one map z_u (B, C, *sp)."""
    sp = tuple(range(2, z_u.dim()))
    w = omega.unsqueeze(1)
    if opts.activation == "softmax":
        logp = torch.log_softmax(z_u, dim=1)
        s = logp.exp()
        ce = -(t * logp)
    else:
        s = torch.sigmoid(z_u)
        ce = F.binary_cross_entropy_with_logits(z_u, t, reduction="none")
    return (w * ce).sum(sp), (w * s * t).sum(sp), (w * s ** opts.q).sum(sp)


def reference_stats(
    inputs: Inputs,
    maps: Sequence[MapInfo],
    cat_w, cat_b, awf_w, awf_b,
    opts: LossOptions,
    awf_param: str,
) -> MapStats:
    """Materialize every map and reduce it to :class:`MapStats` (M, B, C sums), in the logits' dtype
    (float64 logits with float32 parameters compute in float64; the parameters' gradients come back
    in their own dtype through the cast)."""
    z = [upsample(zi, inputs.spatial) for zi in inputs.logits]
    num_classes = z[0].shape[1]
    dtype = z[0].dtype
    cat_w, cat_b, awf_w, awf_b = (None if ps is None else [p.to(dtype) for p in ps]
                                  for ps in (cat_w, cat_b, awf_w, awf_b))
    t, omega = target_tensors(inputs, num_classes, opts, dtype)
    per_map = [map_stats(mix(m, z, cat_w, cat_b, awf_w, awf_b, awf_param), t, omega, opts) for m in maps]
    ce, inter, zsum = (torch.stack(x) for x in zip(*per_map))
    sp = tuple(range(2, t.dim()))
    w = omega.unsqueeze(1)
    return MapStats(ce=ce, inter=inter, zsum=zsum, tsum=(w * t).sum(sp), tpow=(w * t ** opts.q).sum(sp),
                    count=omega.flatten(1).sum(1))
