"""The autograd wiring shared by every fused backend (cpu, triton).

A backend supplies a ``kernels`` object with ``plan``, ``forward`` and ``backward`` (see
:class:`lomix_kernels.cpu.CpuKernels`). The forward returns only :class:`MapStats`; the
backward receives the statistic gradients (from autograd of the finish) and returns the
gradients of the logits and of the packed mixing parameters. Only the inputs and the small sums
are saved: nothing of size M × pixels ever exists.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import spec
from .finish import LossOptions, MapStats
from .inputs import Inputs, target_classes, upsample
from .params import dense_awf


class FusedStats(torch.autograd.Function):
    """(target, pixel_weight, packed params, *logits) -> MapStats fields, via fused kernels."""

    @staticmethod
    def forward(ctx, kernels, plan, target, pixel_weight, cat_w, cat_b, awf_v, awf_c, *logits):
        params = (cat_w, cat_b, awf_v, awf_c)
        stats = kernels.forward(plan, logits, target, pixel_weight, params)
        ctx.kernels, ctx.plan = kernels, plan
        ctx.save_for_backward(target, pixel_weight, *params, *logits)
        ctx.mark_non_differentiable(stats.tsum, stats.tpow, stats.count)
        return tuple(stats)

    @staticmethod
    def backward(ctx, gce, ginter, gzsum, _gtsum, _gtpow, _gcount):
        target, pixel_weight, *rest = ctx.saved_tensors
        params, logits = tuple(rest[:4]), tuple(rest[4:])
        if not any(ctx.needs_input_grad[4:]):
            return (None,) * (8 + len(logits))
        stat_shape = (ctx.plan["num_maps"], *logits[0].shape[:2])

        def ready(g):
            return torch.zeros(stat_shape, dtype=torch.float32) if g is None else g.float().contiguous()

        grads, dparams = ctx.kernels.backward(ctx.plan, logits, target, pixel_weight, params,
                                              ready(gce), ready(ginter), ready(gzsum))
        dparam_parts = list(torch.split(dparams, [p.numel() for p in params]))
        dparam_parts = [d if need else None for d, need in zip(dparam_parts, ctx.needs_input_grad[4:8])]
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[8:])]
        return (None, None, None, None, *dparam_parts, *grads)


def packed_params(maps, num_stages: int, num_classes: int, cat_w, cat_b, awf_w, awf_b, awf_param: str):
    """The four flat float32 parameter tensors in the kernels' layout (zeros for absent ops)."""
    subs = spec.subsets(num_stages)
    C = num_classes
    sizes = (sum(C * len(s) * C for s in subs), len(subs) * C,
             sum(len(s) * len(s) * C for s in subs), sum(len(s) for s in subs))
    used = {m.op for m in maps}

    def flat(tensors):
        return torch.cat([t.reshape(-1) for t in tensors]).float()

    out = [torch.zeros(n, dtype=torch.float32) for n in sizes]
    if "cat" in used:
        out[0], out[1] = flat(cat_w), flat(cat_b)
    if "awf" in used:
        vs, cs = dense_awf(awf_w, awf_b, awf_param, num_stages)
        out[2], out[3] = flat(vs), flat(cs)
    return out


def fused_stats(kernels, inputs: Inputs, maps: Sequence[spec.MapInfo], cat_w, cat_b, awf_w, awf_b,
                opts: LossOptions, awf_param: str) -> MapStats:
    """MapStats of all ``maps`` computed by the fused ``kernels``, differentiable by autograd."""
    num_stages, num_classes = len(inputs.logits), inputs.logits[0].shape[1]
    logits = [upsample(z, inputs.spatial).contiguous() for z in inputs.logits]
    target = inputs.target.contiguous()
    if inputs.soft:
        target = target.float()
    pixel_weight = None if inputs.pixel_weight is None else inputs.pixel_weight.float().contiguous()
    params = packed_params(maps, num_stages, num_classes, cat_w, cat_b, awf_w, awf_b, awf_param)
    plan = kernels.plan(maps, num_stages, num_classes, opts, target_classes(num_classes, opts.activation), awf_param)
    out = FusedStats.apply(kernels, plan, target, pixel_weight, *params, *logits)
    return MapStats(*out)
