"""The mixing parameters of ``cat`` and ``awf``: creation, checks, and the dense per-subset form.

Kernels see ``awf`` only through dense per-subset (V_S, c_S) with V_S ∈ R^{|S|×|S|C}; the
``official`` parameterization (one (k, C) weight shared by all subsets of size k) is the
block-diagonal special case, built here differentiably so autograd returns its gradients.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import spec


def conv_init_(weight: Tensor, bias: Tensor, fan_in: int, generator: Optional[torch.Generator] = None) -> None:
    """Initialize like ``nn.Conv2d(fan_in, ·, 1)``: U(−1/√fan_in, 1/√fan_in) for weight and bias
    (kaiming_uniform with a=√5 reduces to this bound)."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        weight.uniform_(-bound, bound, generator=generator)
        bias.uniform_(-bound, bound, generator=generator)


def make_cat_params(num_stages: int, num_classes: int):
    """ParameterLists (weights, biases): one 1×1 conv per subset, (C, |S|·C) and (C,)."""
    ws, bs = nn.ParameterList(), nn.ParameterList()
    for wshape, bshape in spec.cat_param_shapes(num_stages, num_classes):
        w, b = nn.Parameter(torch.empty(wshape)), nn.Parameter(torch.empty(bshape))
        conv_init_(w, b, fan_in=wshape[1])
        ws.append(w)
        bs.append(b)
    return ws, bs


def make_awf_params(num_stages: int, num_classes: int, awf_param: str):
    """ParameterLists (weights, biases) of ``awf`` (see :func:`spec.awf_param_shapes`)."""
    ws, bs = nn.ParameterList(), nn.ParameterList()
    for wshape, bshape in spec.awf_param_shapes(num_stages, num_classes, awf_param):
        w, b = nn.Parameter(torch.empty(wshape)), nn.Parameter(torch.empty(bshape))
        # official: one 1×1 conv C -> 1 per member position; paper: one conv |S|C -> |S|.
        conv_init_(w, b, fan_in=wshape[1])
        ws.append(w)
        bs.append(b)
    return ws, bs


def check_params(name: str, tensors: Optional[Sequence[Tensor]], shapes: Sequence[tuple], like: Tensor) -> None:
    """Raise a clear error unless ``tensors`` has the expected count, shapes, dtype class, device."""
    if tensors is None:
        raise ValueError(f"{name} is required by the selected ops but was None")
    if len(tensors) != len(shapes):
        raise ValueError(f"{name} must hold {len(shapes)} tensors, got {len(tensors)}")
    for j, (t, shape) in enumerate(zip(tensors, shapes)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}[{j}] must be a floating tensor")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}[{j}] must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name}[{j}] is on {t.device} but logits are on {like.device}")


def dense_awf(awf_weight: Sequence[Tensor], awf_bias: Sequence[Tensor], awf_param: str, num_stages: int):
    """Per-subset dense awf parameters: lists of V_S (|S|, |S|·C) and c_S (|S|,), in subset order.

    Official: subsets of one size share one block-diagonal V, made once per size (not once per subset:
    fewer small ops and autograd nodes per step)."""
    vs, cs = [], []
    block_diagonal = {}
    for j, s in enumerate(spec.subsets(num_stages)):
        if awf_param == "official":
            k = len(s)
            if k not in block_diagonal:
                w = awf_weight[k - 2]
                block_diagonal[k] = torch.block_diag(*[w[m:m + 1] for m in range(k)])
            vs.append(block_diagonal[k])
            cs.append(awf_bias[k - 2])
        else:
            vs.append(awf_weight[j])
            cs.append(awf_bias[j])
    return vs, cs
