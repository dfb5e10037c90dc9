"""The autograd and ``torch.library`` wiring shared by every fused backend (cpu, triton).

A backend supplies a ``kernels`` object with ``forward`` and ``backward`` (see
:class:`lomix_kernels.cpu.CpuKernels`). :func:`register_ops` wraps them as two
``torch.library`` custom ops with fake (meta) implementations, so ``torch.compile`` traces
the loss without a graph break:

- ``lomix_kernels::<name>_stats(logits, target, pixel_weight, params…, tables, meta)`` ->
  the six :class:`MapStats` tensors;
- ``lomix_kernels::<name>_stats_backward(…, gce, ginter, gzsum, …)`` -> L logits grads + the
  packed parameter grads.

Autograd of the first op calls the second with the statistic gradients. Only the inputs and
the small sums are saved: nothing of size M × pixels ever exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import spec
from .finish import LossOptions, MapStats
from .inputs import Inputs, target_classes
from .params import dense_awf


@dataclass(frozen=True)
class Plan:
    """What the kernels need to know besides the tensors, as plain ints (custom-op friendly).

    map_op/map_arg: per map, the op code and its stage (orig) or subset index;
    subset_size/subset_members: the subsets of size >= 2 in map order.
    """

    map_op: Tuple[int, ...]
    map_arg: Tuple[int, ...]
    subset_size: Tuple[int, ...]
    subset_members: Tuple[int, ...]
    sigmoid: int
    q: int
    has_ignore: int
    ignore_index: int
    num_labels: int
    block_diagonal: int

    @property
    def num_maps(self) -> int:
        return len(self.map_op)

    @staticmethod
    def build(maps, num_stages: int, num_classes: int, opts: LossOptions, awf_param: str) -> "Plan":
        subs = spec.subsets(num_stages)
        return Plan(
            map_op=tuple(spec.OP_CODES[m.op] for m in maps),
            map_arg=tuple(m.members[0] if m.op == "orig" else m.subset_index for m in maps),
            subset_size=tuple(len(s) for s in subs),
            subset_members=tuple(i for s in subs for i in s),
            sigmoid=int(opts.activation == "sigmoid"), q=opts.q,
            has_ignore=int(opts.ignore_index is not None),
            ignore_index=0 if opts.ignore_index is None else int(opts.ignore_index),
            num_labels=target_classes(num_classes, opts.activation),
            block_diagonal=int(awf_param == "official"))

    def to_lists(self) -> Tuple[List[int], List[int]]:
        tables = [*self.map_op, *self.map_arg, *self.subset_size, *self.subset_members]
        meta = [self.num_maps, len(self.subset_size), self.sigmoid, self.q, self.has_ignore, self.ignore_index,
                self.num_labels, self.block_diagonal]
        return tables, meta

    @staticmethod
    def from_lists(tables: Sequence[int], meta: Sequence[int]) -> "Plan":
        M, S = meta[0], meta[1]
        return Plan(tuple(tables[:M]), tuple(tables[M:2 * M]), tuple(tables[2 * M:2 * M + S]),
                    tuple(tables[2 * M + S:]), *meta[2:])


def register_ops(name: str, kernels):
    """Define ``lomix_kernels::<name>_stats`` (+ backward) custom ops around ``kernels``."""
    qual = f"lomix_kernels::{name}_stats"

    @torch.library.custom_op(qual, mutates_args=())
    def stats_op(logits: List[Tensor], target: Tensor, pixel_weight: Optional[Tensor], cat_w: Tensor,
                 cat_b: Tensor, awf_v: Tensor, awf_c: Tensor, tables: List[int], meta: List[int]
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        plan = Plan.from_lists(tables, meta)
        return tuple(kernels.forward(plan, logits, target, pixel_weight, (cat_w, cat_b, awf_v, awf_c)))

    @stats_op.register_fake
    def _(logits, target, pixel_weight, cat_w, cat_b, awf_v, awf_c, tables, meta):
        M, (B, C) = meta[0], logits[0].shape[:2]

        def f(*shape):
            return logits[0].new_empty(shape, dtype=torch.float32)

        return f(M, B, C), f(M, B, C), f(M, B, C), f(B, C), f(B, C), f(B)

    @torch.library.custom_op(qual + "_backward", mutates_args=())
    def backward_op(logits: List[Tensor], target: Tensor, pixel_weight: Optional[Tensor], cat_w: Tensor,
                    cat_b: Tensor, awf_v: Tensor, awf_c: Tensor, gce: Tensor, ginter: Tensor, gzsum: Tensor,
                    tables: List[int], meta: List[int]) -> List[Tensor]:
        plan = Plan.from_lists(tables, meta)
        grads, dparams = kernels.backward(plan, logits, target, pixel_weight, (cat_w, cat_b, awf_v, awf_c),
                                          gce, ginter, gzsum)
        return [*grads, dparams]

    @backward_op.register_fake
    def _(logits, target, pixel_weight, cat_w, cat_b, awf_v, awf_c, gce, ginter, gzsum, tables, meta):
        n = cat_w.numel() + cat_b.numel() + awf_v.numel() + awf_c.numel()
        return [torch.empty_like(z) for z in logits] + [cat_w.new_empty(n, dtype=torch.float32)]

    def setup_context(ctx, inputs, output):
        logits, target, pixel_weight, cat_w, cat_b, awf_v, awf_c, tables, meta = inputs
        ctx.save_for_backward(target, pixel_weight, cat_w, cat_b, awf_v, awf_c, *logits)
        ctx.tables, ctx.meta = tables, meta
        ctx.mark_non_differentiable(*output[3:])

    def backward(ctx, gce, ginter, gzsum, *_):
        target, pixel_weight, *rest = ctx.saved_tensors
        params, logits = rest[:4], list(rest[4:])
        shape = (ctx.meta[0], *logits[0].shape[:2])

        def ready(g):
            return logits[0].new_zeros(shape, dtype=torch.float32) if g is None else g.float().contiguous()

        out = backward_op(logits, target, pixel_weight, *params, ready(gce), ready(ginter), ready(gzsum),
                          ctx.tables, ctx.meta)
        grads, dparams = out[:-1], out[-1]
        dparts = torch.split(dparams, [p.numel() for p in params])
        return (list(grads), None, None, *dparts, None, None)

    stats_op.register_autograd(backward, setup_context=setup_context)
    return stats_op, backward_op


def grid_sizes(logits: Sequence[Tensor], target: Tensor):
    """The kernels' size convention: the target's spatial size and each stage's, as (D, H, W)
    triples (D = 1 in 2D). Returns ``(out_size, stage_sizes)``."""
    nsp = logits[0].dim() - 2
    pad = (1,) * (3 - nsp)
    return pad + tuple(target.shape[-nsp:]), tuple(pad + tuple(z.shape[2:]) for z in logits)


def packed_layout(subset_sizes: Sequence[int], num_classes: int):
    """Offsets of each subset's block in the four packed parameter tensors, and their lengths.

    Layout (shared with csrc/ and the Triton kernels): cat_w blocks (C, |S|C), cat_b blocks (C,),
    awf_v blocks (|S|, |S|C), awf_c blocks (|S|,), in subset order.
    Returns ``(offsets, totals)``: offsets maps "cat_w", "cat_b", "awf_v", "awf_c" to per-subset lists.
    """
    C = num_classes
    block = {"cat_w": lambda k: C * k * C, "cat_b": lambda k: C, "awf_v": lambda k: k * k * C, "awf_c": lambda k: k}
    offsets = {name: [] for name in block}
    totals = []
    for name, size in block.items():
        at = 0
        for k in subset_sizes:
            offsets[name].append(at)
            at += size(k)
        totals.append(at)
    return offsets, tuple(totals)


def packed_params(maps, num_stages: int, num_classes: int, cat_w, cat_b, awf_w, awf_b, awf_param: str,
                  device: torch.device):
    """The four flat float32 parameter tensors in the kernels' layout (zeros for absent ops), on ``device``."""
    _, totals = packed_layout([len(s) for s in spec.subsets(num_stages)], num_classes)
    used = {m.op for m in maps}

    def flat(tensors):
        return torch.cat([t.reshape(-1) for t in tensors]).float()

    out = [torch.zeros(n, dtype=torch.float32, device=device) for n in totals]
    if "cat" in used:
        out[0], out[1] = flat(cat_w), flat(cat_b)
    if "awf" in used:
        vs, cs = dense_awf(awf_w, awf_b, awf_param, num_stages)
        out[2], out[3] = flat(vs), flat(cs)
    return out


def fused_stats(stats_op, inputs: Inputs, maps: Sequence[spec.MapInfo], cat_w, cat_b, awf_w, awf_b,
                opts: LossOptions, awf_param: str) -> MapStats:
    """MapStats of all ``maps`` computed by a fused backend's custom op, differentiable by autograd.

    The native-resolution logits go to the kernels, which interpolate on the fly and return
    native-resolution gradients: no full-resolution copy exists.
    """
    num_stages, num_classes = len(inputs.logits), inputs.logits[0].shape[1]
    logits = [z.contiguous() for z in inputs.logits]
    target = inputs.target.contiguous()
    if inputs.soft:
        target = target.float()
    pixel_weight = None if inputs.pixel_weight is None else inputs.pixel_weight.float().contiguous()
    params = packed_params(maps, num_stages, num_classes, cat_w, cat_b, awf_w, awf_b, awf_param, logits[0].device)
    tables, meta = Plan.build(maps, num_stages, num_classes, opts, awf_param).to_lists()
    return MapStats(*stats_op(logits, target, pixel_weight, *params, tables, meta))
