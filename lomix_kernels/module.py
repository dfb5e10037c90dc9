"""``LoMixLoss``: the nn.Module form of the loss (SPEC §6), holding θ and the mixing parameters."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union


import torch
from torch import Tensor, nn

from . import spec
from .finish import LossOptions, map_weights
from .functional import compute_loss
from .params import make_awf_params, make_cat_params


class LoMixLoss(nn.Module):
    """Learnable weighted multi-scale logits mixing loss (LoMix) with fused backends.

    Call with ``logits`` (L tensors (B, C, *spatial_l), coarse -> fine) and ``target``
    ((B, *spatial) class indices or float (B, C, *spatial)); returns the scalar
    Σ_u w_u ℓ_u. See README for every option; the math is SPEC §3-§4.
    """

    def __init__(
        self,
        num_stages: int = 4,
        num_classes: int = 9,
        scheme: str = "lomix",
        ops: Optional[Sequence[str]] = None,
        learn_weights: Optional[bool] = None,
        weighting: Optional[str] = None,
        ce_weight: float = 0.3,
        dice_weight: float = 0.7,
        dice_squared: bool = True,
        dice_batch: bool = True,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        ignore_index: Optional[int] = None,
        combine: Union[str, Callable] = "additive",
        activation: str = "softmax",
        class_weight: Optional[Union[Tensor, Sequence[float]]] = None,
        awf_param: str = "official",
        sync_stats: bool = False,
        backend: str = "auto",
        validate: bool = True,
    ):
        super().__init__()
        self._init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if not isinstance(num_stages, int) or num_stages < 2:
            raise ValueError(f"num_stages must be an int >= 2, got {num_stages!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if activation == "softmax" and num_classes < 2:
            raise ValueError("num_classes must be >= 2 with activation='softmax' (use activation='sigmoid' for C=1)")
        if awf_param not in spec.AWF_PARAMS:
            raise ValueError(f"awf_param must be one of {spec.AWF_PARAMS}, got {awf_param!r}")
        if backend not in ("auto", "reference", "cpu", "triton"):
            raise ValueError(f"backend must be one of ('auto', 'reference', 'cpu', 'triton'), got {backend!r}")
        self.num_stages, self.num_classes = num_stages, num_classes
        self.scheme, self.awf_param, self.backend = scheme, awf_param, backend
        self.sync_stats, self.validate = sync_stats, validate
        cfg = spec.resolve_scheme(scheme, num_stages, ops, learn_weights, weighting)
        self.ops, self.weighting, self.learn_weights = cfg.ops, cfg.weighting, cfg.learn_weights
        self.maps = spec.build_maps(num_stages, cfg.originals, cfg.ops)
        if class_weight is not None:
            class_weight = torch.as_tensor(class_weight, dtype=torch.float32)
            if class_weight.shape != (num_classes,):
                raise ValueError(f"class_weight must have shape ({num_classes},), got {tuple(class_weight.shape)}")
            self.register_buffer("class_weight", class_weight)
        else:
            self.class_weight = None
        self._opts = dict(ce_weight=ce_weight, dice_weight=dice_weight, dice_squared=dice_squared,
                          dice_batch=dice_batch, include_background=include_background, smooth_nr=smooth_nr,
                          smooth_dr=smooth_dr, ignore_index=ignore_index, combine=combine, activation=activation)
        LossOptions(**self._opts).validate()

        M = len(self.maps)
        if self.learn_weights:  # θ = 0: w = ln 2 (softplus), 1 (normalized, uncertainty)
            self.theta = nn.Parameter(torch.zeros(M))
        else:
            self.register_buffer("theta", torch.ones(M))  # fixed weights w = 1
        if "cat" in self.ops:
            self.cat_weight, self.cat_bias = make_cat_params(num_stages, num_classes)
        else:
            self.cat_weight = self.cat_bias = None
        if "awf" in self.ops:
            self.awf_weight, self.awf_bias = make_awf_params(num_stages, num_classes, awf_param)
        else:
            self.awf_weight = self.awf_bias = None
        self.last_terms: Optional[dict[str, Tensor]] = None

    @property
    def map_names(self) -> list[str]:
        """Names of the M maps in map order, e.g. ``orig_3``, ``add_0_1``, ``cat_0_1_2_3``."""
        return [m.name for m in self.maps]

    def weights(self) -> Tensor:
        """(M,) the current effective map weights w_u (see :func:`lomix_kernels.finish.map_weights`)."""
        return map_weights(self.theta, self.weighting)

    def report(self) -> list[dict]:
        """One row per map (name, op, subset, weight, last ℓ/CE/Dice): see :mod:`lomix_kernels.report`."""
        from .report import map_table

        return map_table(self)

    def options(self) -> LossOptions:
        return LossOptions(**self._opts, class_weight=self.class_weight)

    def forward(self, logits: Sequence[Tensor], target: Tensor, pixel_weight: Optional[Tensor] = None) -> Tensor:
        total, terms = compute_loss(
            logits, target, pixel_weight, self.theta, self.weighting, self.maps, self.cat_weight, self.cat_bias,
            self.awf_weight, self.awf_bias, self.options(), self.awf_param, self.num_stages, self.num_classes,
            backend=self.backend, validate=self.validate, sync_stats=self.sync_stats)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return total

    def extra_repr(self) -> str:
        return (f"num_stages={self.num_stages}, num_classes={self.num_classes}, scheme={self.scheme!r}, "
                f"ops={self.ops}, maps={len(self.maps)}, weighting={self.weighting!r}, "
                f"awf_param={self.awf_param!r}, backend={self.backend!r}")
