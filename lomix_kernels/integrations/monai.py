"""LoMix for MONAI's ``DynUNet(deep_supervision=True)``, with ``DiceCELoss``-style option names.

    from monai.networks.nets import DynUNet
    from lomix_kernels.integrations.monai import LoMixDeepSupervisionLoss

    net = DynUNet(3, 1, C, kernels, strides, strides[1:], deep_supervision=True, deep_supr_num=3)
    loss_fn = LoMixDeepSupervisionLoss(num_classes=C, to_onehot_y=True, softmax=True, network=net)
    loss = loss_fn(net(x), y)          # y: (B, 1, *spatial) labels, as MONAI's transforms give them

In training, ``DynUNet`` returns its final output and its ``deep_supr_num`` supervision heads
*upsampled with nearest* to full resolution and stacked, (B, 1 + k, C, *spatial), fine -> coarse.
Given the ``network``, the loss reads the heads at their native resolutions instead (``net.heads``,
set by that forward: :func:`dynunet_heads`), so it mixes them by bilinear/trilinear interpolation as
LoMix does and never touches the nearest-upsampled copies; without it, it mixes the stacked
full-resolution slices. Either way the finest ``num_stages`` outputs are used (default: all of them,
up to 6). Also a drop-in ``loss_function`` for MONAI's ``SupervisedTrainer`` (``loss(y_pred, y)``).

Option names follow ``monai.losses.DiceCELoss`` where they map, with its defaults: ``to_onehot_y``,
``sigmoid``/``softmax``, ``include_background``, ``squared_pred``, ``batch``, ``smooth_nr``,
``smooth_dr``, ``lambda_dice``, ``lambda_ce``, ``weight`` (CE class weights), ``ignore_index``; every
other keyword goes to :class:`lomix_kernels.LoMixLoss` (``scheme``, ``weighting``, ``backend``, ...).
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..module import LoMixLoss

MAX_STAGES = 6


def dynunet_heads(network: nn.Module, output: Tensor) -> list[Tensor]:
    """The native-resolution outputs of the ``DynUNet`` forward that returned ``output``, coarse -> fine:
    its supervision heads (``network.heads``, finest first) reversed, then the final output
    (``output[:, 0]`` when stacked)."""
    heads = list(getattr(network, "heads", []))
    if not heads or any(h.dim() < 3 for h in heads):
        raise ValueError("network has no deep-supervision heads from its last forward: build DynUNet with "
                         "deep_supervision=True and call the loss on the output of a training-mode forward")
    final = output[:, 0] if output.dim() == heads[0].dim() + 1 else output
    return heads[::-1] + [final]


class LoMixDeepSupervisionLoss(nn.Module):
    """LoMix over ``DynUNet``'s deep-supervision outputs (module docstring for the options)."""

    def __init__(self, num_classes: int, num_stages: Optional[int] = None, *, network: Optional[nn.Module] = None,
                 to_onehot_y: bool = False, sigmoid: bool = False, softmax: bool = False,
                 include_background: bool = True, squared_pred: bool = False, batch: bool = False,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, lambda_dice: float = 1.0, lambda_ce: float = 1.0,
                 weight: Optional[Sequence[float] | Tensor] = None, ignore_index: Optional[int] = None, **lomix_kwargs):
        super().__init__()
        if sigmoid == softmax:
            raise ValueError("choose exactly one of sigmoid=True or softmax=True (LoMix needs the activation)")
        if network is not None and not hasattr(network, "deep_supr_num"):
            raise TypeError(f"network must be a MONAI DynUNet (it reads its .heads), got {type(network).__name__}")
        if num_stages is None:
            if network is None:
                raise ValueError("give num_stages (how many outputs to mix) or the network (all its outputs)")
            num_stages = min(1 + network.deep_supr_num, MAX_STAGES)
        self.to_onehot_y = to_onehot_y
        self._network = weakref.ref(network) if network is not None else None  # not a submodule: its
        # parameters belong to the model's optimizer, not the loss's
        self.lomix = LoMixLoss(num_stages, num_classes, activation="sigmoid" if sigmoid else "softmax",
                               ce_weight=lambda_ce, dice_weight=lambda_dice, dice_squared=squared_pred,
                               dice_batch=batch, include_background=include_background, smooth_nr=smooth_nr,
                               smooth_dr=smooth_dr, class_weight=weight, ignore_index=ignore_index, **lomix_kwargs)

    @property
    def num_stages(self) -> int:
        return self.lomix.num_stages

    def outputs(self, y_pred) -> list[Tensor]:
        """The mixed outputs, coarse -> fine: native heads (with a network) or stacked slices."""
        if isinstance(y_pred, (list, tuple)):
            outs = list(y_pred)  # already coarse -> fine
        elif self._network is not None:
            outs = dynunet_heads(self._network(), y_pred)
        elif y_pred.dim() in (5, 6):
            outs = list(y_pred.unbind(1))[::-1]  # stacked (B, 1 + k, C, *spatial), fine -> coarse
        else:
            raise ValueError(f"y_pred must be DynUNet's stacked (B, 1 + k, C, *spatial) output or a list of heads, "
                             f"got shape {tuple(y_pred.shape)}")
        k = self.lomix.num_stages
        if len(outs) < k:
            raise ValueError(f"got {len(outs)} outputs to mix, the loss was built for num_stages={k}")
        return outs[len(outs) - k:]

    def forward(self, y_pred, y: Tensor) -> Tensor:
        if self.to_onehot_y:
            if y.dim() >= 2 and y.shape[1] == 1:
                y = y[:, 0]
            target = y.long()
        else:
            target = y.float()  # one-hot / multi-label (B, C, *spatial)
        return self.lomix(self.outputs(y_pred), target)
