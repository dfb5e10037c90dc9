"""Validation and normalization of the loss inputs (SPEC §2), shared by every backend.

Checks that need no data (shapes, dtypes, devices) always run. Data-dependent checks (class
range, NaN/inf, negative pixel weights) run here for the reference backend on CPU, or on CUDA
when ``validate=True``; the fused CPU kernel performs them itself while streaming.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

INT_TARGET_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Inputs(NamedTuple):
    """Validated inputs.

    logits: L tensors (B, C, *spatial_l), spatial_l ≤ spatial elementwise (not yet upsampled).
    target: (B, *spatial) integer class indices, or (B, C, *spatial) float (``soft``).
    pixel_weight: (B, *spatial) float, or None.
    spatial: the target's spatial size.
    """

    logits: list
    target: Tensor
    soft: bool
    pixel_weight: Optional[Tensor]
    spatial: tuple


def check_inputs(
    logits: Sequence[Tensor],
    target: Tensor,
    pixel_weight: Optional[Tensor],
    *,
    num_stages: int,
    num_classes: int,
    activation: str,
    ignore_index: Optional[int],
) -> Inputs:
    """Check everything that needs no look at the data; return normalized :class:`Inputs`."""
    if isinstance(logits, Tensor) or not isinstance(logits, (list, tuple)):
        raise TypeError("logits must be a list or tuple of L tensors (B, C, *spatial), coarse -> fine")
    if len(logits) != num_stages:
        raise ValueError(f"logits has {len(logits)} stages but the loss was built for num_stages={num_stages}")
    for i, z in enumerate(logits):
        if not isinstance(z, Tensor):
            raise TypeError(f"logits[{i}] must be a torch.Tensor, got {type(z).__name__}")
        if z.dtype not in LOGIT_DTYPES:
            raise TypeError(f"logits[{i}] must be a floating tensor (float16/bfloat16/float32/float64), got {z.dtype}")
        if z.dim() not in (4, 5):
            raise ValueError(f"logits[{i}] must have shape (B, C, H, W) or (B, C, D, H, W), got {tuple(z.shape)}")
    z0 = logits[0]
    for i, z in enumerate(logits):
        if z.dim() != z0.dim():
            raise ValueError(f"logits[{i}] has {z.dim()} dims but logits[0] has {z0.dim()}: mix of 2D and 3D")
        if z.shape[0] != z0.shape[0]:
            raise ValueError(f"logits[{i}] has batch size {z.shape[0]} but logits[0] has {z0.shape[0]}")
        if z.shape[1] != num_classes:
            raise ValueError(f"logits[{i}] has {z.shape[1]} channels but num_classes={num_classes}")
        if z.device != z0.device:
            raise ValueError(f"logits[{i}] is on {z.device} but logits[0] is on {z0.device}")
        if z.dtype != z0.dtype:
            raise TypeError(f"logits[{i}] has dtype {z.dtype} but logits[0] has {z0.dtype}: use one dtype")
    batch, nsp = z0.shape[0], z0.dim() - 2

    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != z0.device:
        raise ValueError(f"target is on {target.device} but logits are on {z0.device}")
    soft = target.is_floating_point()
    if soft:
        if ignore_index is not None:
            raise ValueError("ignore_index cannot be used with a float (soft / multi-label) target: "
                             "use pixel_weight to mask pixels instead")
        if target.dim() != nsp + 2 or target.shape[0] != batch or target.shape[1] != num_classes:
            raise ValueError(f"a float target must have shape (B, C, *spatial) = ({batch}, {num_classes}, ...) "
                             f"with {nsp} spatial dims, got {tuple(target.shape)}")
        spatial = tuple(target.shape[2:])
    else:
        if target.dtype not in INT_TARGET_DTYPES:
            raise TypeError(f"target must be uint8/int16/int32/int64 class indices or a float tensor, got {target.dtype}")
        if target.dim() == nsp + 2 and target.shape[1] == 1:
            target = target.squeeze(1)
        if target.dim() != nsp + 1 or target.shape[0] != batch:
            raise ValueError(f"an integer target must have shape (B, *spatial) or (B, 1, *spatial) with B={batch} "
                             f"and {nsp} spatial dims, got {tuple(target.shape)}")
        spatial = tuple(target.shape[1:])
    for i, z in enumerate(logits):
        if any(a > b for a, b in zip(z.shape[2:], spatial)):
            raise ValueError(f"logits[{i}] spatial size {tuple(z.shape[2:])} is finer than the target's {spatial}")

    if pixel_weight is not None:
        if not isinstance(pixel_weight, Tensor) or not pixel_weight.is_floating_point():
            raise TypeError("pixel_weight must be a floating tensor of shape (B, *spatial)")
        if tuple(pixel_weight.shape) != (batch, *spatial):
            raise ValueError(f"pixel_weight must have shape {(batch, *spatial)}, got {tuple(pixel_weight.shape)}")
        if pixel_weight.device != z0.device:
            raise ValueError(f"pixel_weight is on {pixel_weight.device} but logits are on {z0.device}")
    if activation == "softmax" and num_classes < 2:
        raise ValueError("num_classes must be >= 2 with activation='softmax' (use activation='sigmoid' for C=1)")
    return Inputs(list(logits), target, soft, pixel_weight, spatial)


def target_classes(num_classes: int, activation: str) -> int:
    """Number of valid integer labels: C, or 2 for a binary (C=1) sigmoid target."""
    return 2 if (activation == "sigmoid" and num_classes == 1) else num_classes


def check_values(inputs: Inputs, num_classes: int, activation: str, ignore_index: Optional[int]) -> None:
    """Data-dependent checks (host sync on CUDA): class range, NaN/inf logits, negative weights."""
    for i, z in enumerate(inputs.logits):
        if not bool(torch.isfinite(z).all()):
            raise ValueError(f"logits[{i}] contains NaN or inf")
    t = inputs.target
    if inputs.soft:
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or (activation == "sigmoid" and bool((t > 1).any())):
            raise ValueError("a float target must hold finite values >= 0 (and <= 1 in sigmoid mode)")
    else:
        n = target_classes(num_classes, activation)
        bad = (t < 0) | (t >= n)
        if ignore_index is not None:
            bad &= t != ignore_index
        if bool(bad.any()):
            value = int(t[bad].flatten()[0])
            raise ValueError(f"target holds class index {value} outside [0, {n})"
                             + ("" if ignore_index is None else f" that is not ignore_index={ignore_index}"))
    w = inputs.pixel_weight
    if w is not None and (not bool(torch.isfinite(w).all()) or bool((w < 0).any())):
        raise ValueError("pixel_weight must be finite and >= 0")


def upsample(z: Tensor, spatial: tuple) -> Tensor:
    """Bilinear (2D) / trilinear (3D) upsampling with align_corners=False, as the official code."""
    if tuple(z.shape[2:]) == tuple(spatial):
        return z
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    return F.interpolate(z, size=spatial, mode=mode, align_corners=False)
