"""Functional API: ``lomix_loss`` and the backend dispatch shared with :class:`LoMixLoss`."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import cpu, spec
from .finish import LossOptions, MapStats, finish
from .fused import fused_stats, register_ops
from .inputs import check_inputs, check_values
from .params import check_params
from .reference import reference_stats

BACKENDS = ("auto", "reference", "cpu", "triton")
_warned_fallback = False
CPU_STATS_OP, _ = register_ops("cpu", cpu.CpuKernels)


def _triton_module():
    from . import triton_backend  # imported lazily: triton is optional

    return triton_backend


def resolve_backend(backend: str, logits: Tensor) -> str:
    """The concrete backend for ``logits`` (SPEC §1): auto -> triton (CUDA), cpu (CPU), reference (float64)."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if logits.dtype == torch.float64:
            return "reference"
        if logits.is_cuda and _triton_module().is_implemented():
            return "triton"
        if not logits.is_cuda and cpu.available():
            return "cpu"
        if not _warned_fallback:
            reason = "triton is not installed" if logits.is_cuda else cpu.unavailable_reason()
            warnings.warn(f"lomix_kernels: {reason}; falling back to the reference backend")
            _warned_fallback = True
        return "reference"
    if backend == "cpu":
        if not cpu.available():
            raise RuntimeError(f"backend='cpu' is unavailable: {cpu.unavailable_reason()}")
        if logits.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got logits on {logits.device}")
        if logits.dtype == torch.float64:
            raise TypeError("backend='cpu' accumulates in float32; use backend='reference' for float64 logits")
    if backend == "triton":
        _triton_module().check_usable(logits)
    return backend


def _eager_checks_allowed(device: torch.device) -> bool:
    """Data-dependent checks need a host sync: only in eager mode, never while torch.compile traces
    or a CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def compute_loss(
    logits: Sequence[Tensor],
    target: Tensor,
    pixel_weight: Optional[Tensor],
    theta: Tensor,
    weighting: str,
    maps: Sequence[spec.MapInfo],
    cat_weight, cat_bias, awf_weight, awf_bias,
    opts: LossOptions,
    awf_param: str,
    num_stages: int,
    num_classes: int,
    backend: str = "auto",
    validate: bool = True,
    sync_stats: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Validate, compute the per-map statistics with the chosen backend, and finish.

    Returns the scalar total (:func:`lomix_kernels.finish.weighted_total`) and (M,) tensors ``ell``, ``ce``,
    ``dice``, ``weight`` (differentiable).
    """
    opts.validate()
    inputs = check_inputs(logits, target, pixel_weight, num_stages=num_stages, num_classes=num_classes,
                          activation=opts.activation, ignore_index=opts.ignore_index)
    z0 = inputs.logits[0]
    ops = {m.op for m in maps}
    if "cat" in ops:
        check_params("cat_weight", cat_weight, [w for w, _ in spec.cat_param_shapes(num_stages, num_classes)], z0)
        check_params("cat_bias", cat_bias, [b for _, b in spec.cat_param_shapes(num_stages, num_classes)], z0)
    if "awf" in ops:
        shapes = spec.awf_param_shapes(num_stages, num_classes, awf_param)
        check_params("awf_weight", awf_weight, [w for w, _ in shapes], z0)
        check_params("awf_bias", awf_bias, [b for _, b in shapes], z0)
    if opts.class_weight is not None and opts.class_weight.shape != (num_classes,):
        raise ValueError(f"class_weight must have shape ({num_classes},), got {tuple(opts.class_weight.shape)}")
    if not isinstance(theta, Tensor) or tuple(theta.shape) != (len(maps),):
        got = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
        raise ValueError(f"theta must have shape ({len(maps)},) for the {len(maps)} maps, got {got}")

    name = resolve_backend(backend, z0)
    if name == "reference":
        if validate and _eager_checks_allowed(z0.device):
            check_values(inputs, num_classes, opts.activation, opts.ignore_index)
        stats = reference_stats(inputs, maps, cat_weight, cat_bias, awf_weight, awf_bias, opts, awf_param)
    elif name == "cpu":  # the kernel validates the data while it streams it
        stats = fused_stats(CPU_STATS_OP, inputs, maps, cat_weight, cat_bias, awf_weight, awf_bias,
                            opts, awf_param)
    else:
        triton_backend = _triton_module()
        if validate and _eager_checks_allowed(z0.device):
            check_values(inputs, num_classes, opts.activation, opts.ignore_index)
        stats = fused_stats(triton_backend.STATS_OP, inputs, maps, cat_weight, cat_bias, awf_weight,
                            awf_bias, opts, awf_param)
    if sync_stats:
        stats = _all_reduce_stats(stats)
        theta = _share_of_gradient(theta)
    if stats.ce.dtype != torch.float64:  # fused backends accumulate in float32; reference may be half
        stats = MapStats(*(s.float() for s in stats))
    return finish(stats, theta, weighting, opts, soft_target=inputs.soft)


def _share_of_gradient(weights: Tensor) -> Tensor:
    """Same value; gradient divided by the world size.

    With synced statistics every rank finishes the same global loss, so θ would get the full
    gradient on each rank. Scaling it makes every gradient a per-rank share whose sum over ranks
    is the single-process gradient (the logits' and the mixing parameters' already are).
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    return weights / world + (weights - weights / world).detach()


def _all_reduce_stats(stats: MapStats) -> MapStats:
    """Sum the statistics over the default process group (differentiable: identity backward)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sync_stats=True needs an initialized torch.distributed default process group")
    return MapStats(*(_AllReduceSum.apply(s) for s in stats))


class _AllReduceSum(torch.autograd.Function):
    """All-reduce (sum) in forward; identity in backward.

    Every rank finishes the same global statistics, so ∂L/∂(local stats) = ∂L/∂(global stats)
    on every rank, with no communication in backward.
    """

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g):
        return g


def lomix_loss(
    logits: Sequence[Tensor],
    target: Tensor,
    theta: Tensor,
    cat_weight: Optional[Sequence[Tensor]] = None,
    cat_bias: Optional[Sequence[Tensor]] = None,
    awf_weight: Optional[Sequence[Tensor]] = None,
    awf_bias: Optional[Sequence[Tensor]] = None,
    *,
    pixel_weight: Optional[Tensor] = None,
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
    combine="additive",
    activation: str = "softmax",
    class_weight: Optional[Tensor] = None,
    awf_param: str = "official",
    sync_stats: bool = False,
    backend: str = "auto",
    validate: bool = True,
    return_terms: bool = False,
):
    """LoMix loss without a module (SPEC §6).

    Args:
        logits: L tensors (B, C, *spatial_l), coarse -> fine; upsampled to the target's size.
        target: (B, *spatial) class indices, (B, 1, *spatial), or float (B, C, *spatial).
        theta: (M,) the weight parameters: softplus pre-activations (``weighting="softplus"``, the lomix
            default, or "normalized"), log-variances ("uncertainty"), or the fixed weights themselves.
        cat_weight/cat_bias: per subset (C, |S|C) / (C,), needed when "cat" is in the ops.
        awf_weight/awf_bias: see :func:`lomix_kernels.spec.awf_param_shapes`, needed for "awf".
        return_terms: also return a dict of (M,) tensors ``ell``, ``ce``, ``dice``, ``weight``.
    Returns:
        The scalar loss (float32 for half inputs), or ``(loss, terms)``.
    """
    if isinstance(logits, Tensor) or not isinstance(logits, (list, tuple)) or len(logits) < 2:
        raise TypeError("logits must be a list or tuple of at least 2 tensors (B, C, *spatial), coarse -> fine")
    if not isinstance(logits[0], Tensor) or logits[0].dim() < 2:
        raise TypeError("logits[0] must be a tensor (B, C, *spatial)")
    num_stages, num_classes = len(logits), logits[0].shape[1]
    cfg = spec.resolve_scheme(scheme, num_stages, ops, learn_weights, weighting)
    maps = spec.build_maps(num_stages, cfg.originals, cfg.ops)
    opts = LossOptions(ce_weight, dice_weight, dice_squared, dice_batch, include_background, smooth_nr,
                       smooth_dr, ignore_index, combine, activation, class_weight)
    if not isinstance(theta, Tensor):
        raise TypeError("theta must be a tensor of shape (M,)")
    total, terms = compute_loss(logits, target, pixel_weight, theta, cfg.weighting, maps, cat_weight, cat_bias,
                                awf_weight, awf_bias, opts, awf_param, num_stages, num_classes, backend, validate,
                                sync_stats)
    return (total, terms) if return_terms else total
