"""The Triton backend: the same two fused passes as the CPU kernels, for CUDA tensors.

With ``TRITON_INTERPRET=1`` (set before triton is imported) it also accepts CPU tensors and runs
the same kernels through Triton's interpreter: that is how CI and users without a GPU test it.

Layout. The L stages arrive at their native resolution (any size up to the target's, 2D or 3D)
as up to six (B, C, P_s) pointers, read in place. The target's grid is cut into tiles of
TD × TH × TW pixels (one register block) grouped in super-tiles of SD × SH × SW tiles; a program
takes one super-tile of one sample (grid = super-tiles × samples) and walks its tiles in order.
Per tile it interpolates every stage to the tile's pixels (bilinear / trilinear,
align_corners=False, with the index and weight tables F.interpolate uses), keeping them as one
(L, C, pixels) register block, and reads the target once.

- Forward: per tile, every map is built in registers (classes padded to a power of two and
  masked) and its per-class sums are added to the program's own partial row; torch reduces the
  rows in a fixed order.
- Backward: per tile, the program loops over all maps, accumulating the stage gradients in
  registers, then applies the interpolation's adjoint: a stage at the target's size is written
  in place; a coarser stage's tile footprint (the native cells the tile reads) is added into a
  *slot* buffer chosen by the super-tile's index modulo the footprint overlap, so no two
  programs ever touch the same cell, and torch sums the few slots. Parameter gradients are
  per-program partial rows summed in a fixed order.

Deterministic (no atomics), no host synchronization, int64 offsets. No full-resolution copy of a
coarse stage or of its gradient exists: a coarse stage's slots are K_d·K_h·K_w native-size
buffers (K = 2 per axis when a super-tile spans at least two native cells per axis).
"""
from __future__ import annotations

import math
import os
from functools import lru_cache

import torch
from torch import Tensor

from .finish import MapStats
from .fused import grid_sizes, packed_layout, register_ops

try:  # triton is optional
    import triton
    import triton.language as tl

    _IMPORT_ERROR = ""
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_STAGES = 6  # stage pointers are kernel arguments x0..x5
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_available() -> bool:
    return triton is not None


def is_implemented() -> bool:
    """Usable for CUDA tensors (auto picks it there)."""
    return triton is not None and torch.cuda.is_available()


def check_usable(logits: Tensor) -> None:
    """Raise a clear error saying why backend='triton' cannot run these logits."""
    if triton is None:
        raise RuntimeError(f"backend='triton' needs the triton package ({_IMPORT_ERROR}); pip install triton")
    if logits.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"backend='triton' needs CUDA tensors (got {logits.device}); set TRITON_INTERPRET=1 "
                         "before importing triton to run the kernels on CPU tensors through the interpreter")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"backend='triton' supports float32/float16/bfloat16 logits, got {logits.dtype}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"  # how triton was imported (it reads the same)
    if logits.device.type != "cuda" and interpreted and not torch.compiler.is_compiling() and _interpreter_problem():
        raise RuntimeError(_interpreter_problem())


@lru_cache(maxsize=1)
def _interpreter_problem() -> str:
    """Why Triton's interpreter cannot run our kernels here ("" when it can). Triton <= 3.6's
    interpreter turns a scalar kernel argument into a 1-element array and loops over range() of it
    with int(), which NumPy >= 2.4 refuses; a one-loop probe kernel finds out."""
    out = torch.zeros(1)
    try:
        _probe_kernel[(1,)](out, 2)
    except Exception as exc:  # noqa: BLE001 - any failure of the interpreter is reported as it is
        import numpy

        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} ({exc!r}); "
                "install numpy<2.4 or a newer triton for TRITON_INTERPRET=1")
    return "" if float(out) == 2.0 else f"Triton's interpreter computed a loop wrongly ({float(out)} != 2)"


if triton is not None:

    @triton.jit
    def _probe_kernel(out, n):
        acc = 0.0
        for _ in range(n):
            acc += 1.0
        tl.store(out, acc)

    @triton.jit
    def _select(s, p0, p1, p2, p3, p4, p5):
        """The s-th of six pointers (s may be a runtime value or a constexpr)."""
        p = p0
        if s == 1:
            p = p1
        elif s == 2:
            p = p2
        elif s == 3:
            p = p3
        elif s == 4:
            p = p4
        elif s == 5:
            p = p5
        return p

    @triton.jit
    def _super_tile(grp, nsh, nsw):
        """Indices (qd, qh, qw) of program grp's super-tile (SD × SH × SW tiles)."""
        return grp // (nsh * nsw), (grp // nsw) % nsh, grp % nsw

    @triton.jit
    def _tile(qd, qh, qw, i, D, H, W, TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, SD: tl.constexpr,
              SH: tl.constexpr, SW: tl.constexpr):
        """The i-th tile of super-tile (qd, qh, qw): its indices (td, th, tw), whether it meets the grid,
        and for its TD·TH·TW pixels (row-major) their coordinates (od, oh, ow), their offset in the
        target's grid (int64) and the in-bounds mask."""
        td = qd * SD + i // (SH * SW)
        th = qh * SH + (i // SW) % SH
        tw = qw * SW + i % SW
        live = (td * TD < D) & (th * TH < H) & (tw * TW < W)
        p = tl.arange(0, TD * TH * TW)
        od = td * TD + p // (TH * TW)
        oh = th * TH + (p // TW) % TH
        ow = tw * TW + p % TW
        pmask = (od < D) & (oh < H) & (ow < W)
        pix = (od.to(tl.int64) * H + oh) * W + ow
        return td, th, tw, live, od, oh, ow, pix, pmask

    @triton.jit
    def _axis(ax_i0, ax_i1, ax_l1, at, o, omask):
        """Source indices (i0, i1) and weights (l0, l1) of output coordinates o along one axis, read from
        the interpolation tables at offset ``at`` (the same indices and weights as F.interpolate)."""
        i0 = tl.load(ax_i0 + at + o, mask=omask, other=0)
        i1 = tl.load(ax_i1 + at + o, mask=omask, other=0)
        l1 = tl.load(ax_l1 + at + o, mask=omask, other=0.0)
        return i0, i1, 1.0 - l1, l1

    @triton.jit
    def _bilerp(x, base, plane, Ws, h0, h1, w0, w1, lh0, lh1, lw0, lw1, mask):
        """Bilinear interpolation in one native plane (rows ``plane + h``) for every class row."""
        r0 = (plane + h0) * Ws
        r1 = (plane + h1) * Ws
        v00 = tl.load(x + base + (r0 + w0)[None, :], mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(x + base + (r0 + w1)[None, :], mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(x + base + (r1 + w0)[None, :], mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(x + base + (r1 + w1)[None, :], mask=mask, other=0.0).to(tl.float32)
        return (lh0[None, :] * (lw0[None, :] * v00 + lw1[None, :] * v01)
                + lh1[None, :] * (lw0[None, :] * v10 + lw1[None, :] * v11))

    @triton.jit
    def _load_stage(x, s, b, C, cls, cmask, od, oh, ow, pix, pmask, st_ptr, ax_i0, ax_i1, ax_l1, D, H, W,
                    IS3D: tl.constexpr):
        """(BLOCK_C, BLOCK_P) float32 logits of stage s (a (B, C, Ds·Hs·Ws) tensor at x), sample b, at the
        tile's pixels: read in place at the target's size, else interpolated (align_corners=False)."""
        Ds = tl.load(st_ptr + 8 * s)
        Hs = tl.load(st_ptr + 8 * s + 1)
        Ws = tl.load(st_ptr + 8 * s + 2)
        base = (b * C + cls[:, None]).to(tl.int64) * (Ds * Hs * Ws)
        mask = cmask[:, None] & pmask[None, :]
        if tl.load(st_ptr + 8 * s + 6) != 0:  # same size as the target
            v = tl.load(x + base + pix[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            at = s * (D + H + W)
            h0, h1, lh0, lh1 = _axis(ax_i0, ax_i1, ax_l1, at + D, oh, pmask)
            w0, w1, lw0, lw1 = _axis(ax_i0, ax_i1, ax_l1, at + D + H, ow, pmask)
            if IS3D:
                d0, d1, ld0, ld1 = _axis(ax_i0, ax_i1, ax_l1, at, od, pmask)
                v = (ld0[None, :] * _bilerp(x, base, d0 * Hs, Ws, h0, h1, w0, w1, lh0, lh1, lw0, lw1, mask)
                     + ld1[None, :] * _bilerp(x, base, d1 * Hs, Ws, h0, h1, w0, w1, lh0, lh1, lw0, lw1, mask))
            else:
                v = _bilerp(x, base, 0, Ws, h0, h1, w0, w1, lh0, lh1, lw0, lw1, mask)
        return v

    @triton.jit
    def _load_stages(x0, x1, x2, x3, x4, x5, b, C, cls, cmask, od, oh, ow, pix, pmask, st_ptr, ax_i0, ax_i1,
                     ax_l1, D, H, W, L: tl.constexpr, L_PAD: tl.constexpr, IS3D: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """All L stages at the tile's pixels: (L_PAD, BLOCK_C, BLOCK_P) float32."""
        stage_ids = tl.arange(0, L_PAD)
        xall = tl.zeros((L_PAD, BLOCK_C, BLOCK_P), dtype=tl.float32)
        for s in tl.static_range(L):
            v = _load_stage(_select(s, x0, x1, x2, x3, x4, x5), s, b, C, cls, cmask, od, oh, ow, pix, pmask,
                            st_ptr, ax_i0, ax_i1, ax_l1, D, H, W, IS3D)
            xall += tl.where(stage_ids[:, None, None] == s, v[None, :, :], 0.0)
        return xall

    @triton.jit
    def _stage(xall, s, stage_ids):
        """Stage s (runtime or constexpr) of an (L_PAD, BLOCK_C, BLOCK_P) block."""
        return tl.sum(tl.where(stage_ids[:, None, None] == s, xall, 0.0), axis=0)

    @triton.jit
    def _add_stage(gx, s, val, stage_ids):
        return gx + tl.where(stage_ids[:, None, None] == s, val[None, :, :], 0.0)

    @triton.jit
    def _build_map(xall, stage_ids, C, cls, op, arg, sub_size_ptr, sub_start_ptr, members_ptr,
                   cat_w_ptr, cat_b_ptr, cat_off_ptr, awf_v_ptr, awf_c_ptr, awf_v_off_ptr, awf_c_off_ptr,
                   block_diag, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, K_PAD: tl.constexpr):
        """Map logits z (BLOCK_C, BLOCK_P) and, for awf, alpha (K_PAD, BLOCK_P)."""
        cmask = cls < C
        kk = tl.arange(0, K_PAD)
        alpha = tl.zeros((K_PAD, BLOCK_P), dtype=tl.float32)
        z = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        if op == 0:
            z = _stage(xall, arg, stage_ids)
        else:
            k = tl.load(sub_size_ptr + arg)
            start = tl.load(sub_start_ptr + arg)
            if op == 1:
                for j in range(k):
                    z += _stage(xall, tl.load(members_ptr + start + j), stage_ids)
            elif op == 2:
                z = _stage(xall, tl.load(members_ptr + start), stage_ids)
                for j in range(1, k):
                    z = z * _stage(xall, tl.load(members_ptr + start + j), stage_ids)
            elif op == 3:
                woff = tl.load(cat_off_ptr + arg)
                z = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32) + tl.load(
                    cat_b_ptr + arg * C + cls, mask=cmask, other=0.0)[:, None]
                for j in range(k):
                    s = tl.load(members_ptr + start + j)
                    xs = _stage(xall, s, stage_ids)
                    for c2 in range(C):
                        row = tl.sum(tl.where(cls[:, None] == c2, xs, 0.0), axis=0)
                        wcol = tl.load(cat_w_ptr + woff + cls * (k * C) + j * C + c2, mask=cmask, other=0.0)
                        z += wcol[:, None] * row[None, :]
            else:
                voff = tl.load(awf_v_off_ptr + arg)
                coff = tl.load(awf_c_off_ptr + arg)
                score = tl.load(awf_c_ptr + coff + kk, mask=kk < k, other=0.0)[:, None] + tl.zeros(
                    (K_PAD, BLOCK_P), dtype=tl.float32)
                for j in range(k):
                    s = tl.load(members_ptr + start + j)
                    xs = _stage(xall, s, stage_ids)
                    for r in range(k):
                        if (block_diag == 0) | (r == j):
                            v = tl.load(awf_v_ptr + voff + r * (k * C) + j * C + cls, mask=cmask, other=0.0)
                            contrib = tl.sum(v[:, None] * xs, axis=0)
                            score += tl.where(kk[:, None] == r, contrib[None, :], 0.0)
                score = tl.where(kk[:, None] < k, score, float("-inf"))
                mx = tl.max(score, axis=0)
                e = tl.exp(score - mx[None, :])
                e = tl.where(kk[:, None] < k, e, 0.0)
                alpha = e / tl.sum(e, axis=0)[None, :]
                for j in range(k):
                    s = tl.load(members_ptr + start + j)
                    aj = tl.sum(tl.where(kk[:, None] == j, alpha, 0.0), axis=0)
                    z += aj[None, :] * _stage(xall, s, stage_ids)
        return z, alpha

    @triton.jit
    def _target_block(t_ptr, w_ptr, b, C, P, cls, pix, pmask, SOFT: tl.constexpr, HAS_W: tl.constexpr,
                      has_ignore, ignore_index, num_labels, BLOCK_C: tl.constexpr):
        """Target t (BLOCK_C, BLOCK_P) and pixel weight w (BLOCK_P,) at the tile's pixels."""
        cmask = cls < C
        if SOFT:
            offs = (b * C + cls[:, None]).to(tl.int64) * P + pix[None, :]
            t = tl.load(t_ptr + offs, mask=cmask[:, None] & pmask[None, :], other=0.0).to(tl.float32)
            w = tl.where(pmask, 1.0, 0.0)
        else:
            y = tl.load(t_ptr + b.to(tl.int64) * P + pix, mask=pmask, other=0).to(tl.int64)
            valid = pmask
            if has_ignore:
                valid = valid & (y != ignore_index)
            w = tl.where(valid, 1.0, 0.0)
            if num_labels != C:  # binary sigmoid (C = 1): the label itself
                t = tl.where((cls[:, None] == 0) & (y[None, :] == 1) & valid[None, :], 1.0, 0.0)
            else:
                t = tl.where((cls[:, None] == y[None, :]) & valid[None, :], 1.0, 0.0)
        if HAS_W:
            w = w * tl.load(w_ptr + b.to(tl.int64) * P + pix, mask=pmask, other=0.0).to(tl.float32)
        return t, w

    @triton.jit
    def _activate(z, cmask, SIGMOID: tl.constexpr):
        """s = softmax over classes (or sigmoid), and lse (softmax) — masked classes excluded."""
        if SIGMOID:
            s = tl.sigmoid(z)
            lse = tl.zeros((z.shape[1],), dtype=tl.float32)
        else:
            zm = tl.where(cmask[:, None], z, float("-inf"))
            mx = tl.max(zm, axis=0)
            e = tl.where(cmask[:, None], tl.exp(zm - mx[None, :]), 0.0)
            ssum = tl.sum(e, axis=0)
            s = e / ssum[None, :]
            lse = mx + tl.log(ssum)
        return s, lse

    @triton.jit
    def _tile_data(x0, x1, x2, x3, x4, x5, st_ptr, ax_i0, ax_i1, ax_l1, t_ptr, w_ptr, b, C, D, H, W, cls, cmask, od,
                   oh, ow, pix, pmask, has_ignore, ignore_index, num_labels, L: tl.constexpr, L_PAD: tl.constexpr,
                   SOFT: tl.constexpr, HAS_W: tl.constexpr, IS3D: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_P: tl.constexpr):
        """What both passes read for one tile: the (class, pixel) mask, target t and pixel weight w
        (_target_block) and all stages interpolated to the tile (_load_stages)."""
        t, w = _target_block(t_ptr, w_ptr, b, C, D * H * W, cls, pix, pmask, SOFT, HAS_W, has_ignore, ignore_index,
                             num_labels, BLOCK_C)
        xall = _load_stages(x0, x1, x2, x3, x4, x5, b, C, cls, cmask, od, oh, ow, pix, pmask, st_ptr, ax_i0, ax_i1,
                            ax_l1, D, H, W, L, L_PAD, IS3D, BLOCK_C, BLOCK_P)
        return cmask[:, None] & pmask[None, :], t, w, xall

    @triton.jit
    def _forward_kernel(x0, x1, x2, x3, x4, x5, st_ptr, ax_i0, ax_i1, ax_l1, t_ptr, w_ptr, out_ptr, tout_ptr,
                        map_op_ptr, map_arg_ptr, sub_size_ptr, sub_start_ptr, members_ptr, cat_w_ptr, cat_b_ptr,
                        cat_off_ptr, awf_v_ptr, awf_c_ptr, awf_v_off_ptr, awf_c_off_ptr, B, C, D, H, W, nsh, nsw,
                        G, M, has_ignore, ignore_index, num_labels, block_diag, L: tl.constexpr,
                        L_PAD: tl.constexpr, Q: tl.constexpr, SIGMOID: tl.constexpr, SOFT: tl.constexpr,
                        HAS_W: tl.constexpr, IS3D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                        TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, SD: tl.constexpr,
                        SH: tl.constexpr, SW: tl.constexpr, K_PAD: tl.constexpr):
        """Program (grp, b): the tiles of super-tile grp of sample b; per tile the stages and the target are
        read once and all M maps are built from registers. Accumulates into its own zeroed partial row
        out[b, grp, M, 3, BLOCK_C] = Σω·ce, Σω·s·t, Σω·s^q per map, and writes tout[b, grp, 3, BLOCK_C] =
        Σω·t, Σω·t^q, Σω (class 0)."""
        grp = tl.program_id(0)
        b = tl.program_id(1)
        cls = tl.arange(0, BLOCK_C)
        cmask = cls < C
        stage_ids = tl.arange(0, L_PAD)
        row = out_ptr + (b * G + grp).to(tl.int64) * M * 3 * BLOCK_C
        acc_t1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_tq = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_w = tl.zeros((BLOCK_C,), dtype=tl.float32)
        qd, qh, qw = _super_tile(grp, nsh, nsw)
        for i in range(SD * SH * SW):
            td, th, tw, live, od, oh, ow, pix, pmask = _tile(qd, qh, qw, i, D, H, W, TD, TH, TW, SD, SH, SW)
            if live:  # a tile past the grid's edge (in a ragged super-tile) does nothing
                mask, t, w, xall = _tile_data(x0, x1, x2, x3, x4, x5, st_ptr, ax_i0, ax_i1, ax_l1, t_ptr, w_ptr, b,
                                              C, D, H, W, cls, cmask, od, oh, ow, pix, pmask, has_ignore,
                                              ignore_index, num_labels, L, L_PAD, SOFT, HAS_W, IS3D, BLOCK_C,
                                              BLOCK_P)
                wb = w[None, :]
                t1 = tl.where(mask, wb * t, 0.0)
                acc_t1 += tl.sum(t1, axis=1)
                if Q == 2:
                    acc_tq += tl.sum(tl.where(mask, wb * t * t, 0.0), axis=1)
                else:
                    acc_tq += tl.sum(t1, axis=1)
                acc_w += tl.where(cls == 0, tl.sum(w, axis=0), 0.0)
                for u in range(M):
                    op = tl.load(map_op_ptr + u)
                    arg = tl.load(map_arg_ptr + u)
                    z, alpha = _build_map(xall, stage_ids, C, cls, op, arg, sub_size_ptr, sub_start_ptr, members_ptr,
                                          cat_w_ptr, cat_b_ptr, cat_off_ptr, awf_v_ptr, awf_c_ptr, awf_v_off_ptr,
                                          awf_c_off_ptr, block_diag, BLOCK_C, BLOCK_P, K_PAD)
                    s, lse = _activate(z, cmask, SIGMOID)
                    if SIGMOID:
                        ce = tl.maximum(z, 0.0) - z * t + tl.log(1.0 + tl.exp(-tl.abs(z)))
                    else:
                        ce = t * (lse[None, :] - z)
                    if Q == 2:
                        zs = s * s
                    else:
                        zs = s
                    at = row + u * 3 * BLOCK_C + cls
                    tl.store(at, tl.load(at) + tl.sum(tl.where(mask, wb * ce, 0.0), axis=1))
                    tl.store(at + BLOCK_C, tl.load(at + BLOCK_C) + tl.sum(tl.where(mask, wb * s * t, 0.0), axis=1))
                    tl.store(at + 2 * BLOCK_C, tl.load(at + 2 * BLOCK_C) + tl.sum(tl.where(mask, wb * zs, 0.0), axis=1))
                    tl.debug_barrier()  # read-modify-write of the program's own row: order it across threads
        tb = (b * G + grp) * 3 * BLOCK_C
        tl.store(tout_ptr + tb + cls, acc_t1)
        tl.store(tout_ptr + tb + BLOCK_C + cls, acc_tq)
        tl.store(tout_ptr + tb + 2 * BLOCK_C + cls, acc_w)

    @triton.jit
    def _write_stage_grad(gs, s, gp, slot_ptr, slot_off_ptr, b, B, C, cls, cmask, qd, qh, qw, td, th, tw, od, oh,
                          ow, pix, pmask, st_ptr, ax_i0, ax_i1, ax_l1, D, H, W, IS3D: tl.constexpr, TD: tl.constexpr,
                          TH: tl.constexpr, TW: tl.constexpr):
        """Stage s's gradient gs (BLOCK_C, BLOCK_P) on one tile: stored in place when the stage has the
        target's size; else pushed through the interpolation's adjoint onto the tile's native footprint
        (from its first pixel's i0 to its last pixel's i1 on each axis) and added to the super-tile's slot
        (the program's own cells: no other program of the same slot touches them)."""
        Ds = tl.load(st_ptr + 8 * s)
        Hs = tl.load(st_ptr + 8 * s + 1)
        Ws = tl.load(st_ptr + 8 * s + 2)
        Ps = Ds * Hs * Ws
        if tl.load(st_ptr + 8 * s + 6) != 0:
            offs = (b * C + cls[:, None]).to(tl.int64) * Ps + pix[None, :]
            tl.store(gp + offs, gs.to(gp.dtype.element_ty), mask=cmask[:, None] & pmask[None, :])
        else:
            KD = tl.load(st_ptr + 8 * s + 3)
            KH = tl.load(st_ptr + 8 * s + 4)
            KW = tl.load(st_ptr + 8 * s + 5)
            at = s * (D + H + W)
            h0, h1, lh0, lh1 = _axis(ax_i0, ax_i1, ax_l1, at + D, oh, pmask)
            w0, w1, lw0, lw1 = _axis(ax_i0, ax_i1, ax_l1, at + D + H, ow, pmask)
            bh = tl.load(ax_i0 + at + D + th * TH)
            nh = tl.load(ax_i1 + at + D + tl.minimum(th * TH + TH, H) - 1) - bh + 1
            bw = tl.load(ax_i0 + at + D + H + tw * TW)
            nw = tl.load(ax_i1 + at + D + H + tl.minimum(tw * TW + TW, W) - 1) - bw + 1
            if IS3D:
                d0, d1, ld0, ld1 = _axis(ax_i0, ax_i1, ax_l1, at, od, pmask)
                bd = tl.load(ax_i0 + at + td * TD)
                nd = tl.load(ax_i1 + at + tl.minimum(td * TD + TD, D) - 1) - bd + 1
            else:
                bd = 0
                nd = 1
            slot = ((qd % KD) * KH + qh % KH) * KW + qw % KW
            base = tl.load(slot_off_ptr + s) + ((slot * B + b) * C + cls).to(tl.int64) * Ps
            live = tl.where(pmask, 1.0, 0.0)
            for fd in range(nd):
                if IS3D:
                    ad = live * (tl.where(d0 == bd + fd, ld0, 0.0) + tl.where(d1 == bd + fd, ld1, 0.0))
                else:
                    ad = live
                for fh in range(nh):
                    ah = ad * (tl.where(h0 == bh + fh, lh0, 0.0) + tl.where(h1 == bh + fh, lh1, 0.0))
                    for fw in range(nw):
                        a = ah * (tl.where(w0 == bw + fw, lw0, 0.0) + tl.where(w1 == bw + fw, lw1, 0.0))
                        cell = slot_ptr + base + ((bd + fd) * Hs + bh + fh) * Ws + bw + fw
                        tl.store(cell, tl.load(cell, mask=cmask, other=0.0) + tl.sum(gs * a[None, :], axis=1),
                                 mask=cmask)

    @triton.jit
    def _backward_kernel(x0, x1, x2, x3, x4, x5, st_ptr, ax_i0, ax_i1, ax_l1, t_ptr, w_ptr, g_ptr, g0, g1, g2, g3,
                         g4, g5, slot_ptr, slot_off_ptr, dp_ptr, map_op_ptr, map_arg_ptr, sub_size_ptr,
                         sub_start_ptr, members_ptr, cat_w_ptr, cat_b_ptr, cat_off_ptr, awf_v_ptr, awf_c_ptr,
                         awf_v_off_ptr, awf_c_off_ptr, B, C, D, H, W, nsh, nsw, G, M, n_params, cat_b_base,
                         awf_v_base, awf_c_base, has_ignore, ignore_index, num_labels, block_diag,
                         L: tl.constexpr, L_PAD: tl.constexpr, Q: tl.constexpr, SIGMOID: tl.constexpr,
                         SOFT: tl.constexpr, HAS_W: tl.constexpr, IS3D: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_P: tl.constexpr, TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                         SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, K_PAD: tl.constexpr):
        """Program (grp, b): the tiles of super-tile grp of sample b. Per tile, loops over the M maps with the
        statistic gradients g[u, b, 3, BLOCK_C] (gce, ginter, gzsum), accumulates dL/d(stage) in registers
        and writes it once per stage (_write_stage_grad); parameter gradients go to the program's own
        partial row dp[b·G + grp, n_params]."""
        grp = tl.program_id(0)
        b = tl.program_id(1)
        cls = tl.arange(0, BLOCK_C)
        cmask = cls < C
        kk = tl.arange(0, K_PAD)
        stage_ids = tl.arange(0, L_PAD)
        dp_base = (b * G + grp).to(tl.int64) * n_params
        qd, qh, qw = _super_tile(grp, nsh, nsw)
        for i in range(SD * SH * SW):
            td, th, tw, live, od, oh, ow, pix, pmask = _tile(qd, qh, qw, i, D, H, W, TD, TH, TW, SD, SH, SW)
            if live:  # a tile past the grid's edge (in a ragged super-tile) does nothing
                mask, t, w, xall = _tile_data(x0, x1, x2, x3, x4, x5, st_ptr, ax_i0, ax_i1, ax_l1, t_ptr, w_ptr, b,
                                              C, D, H, W, cls, cmask, od, oh, ow, pix, pmask, has_ignore,
                                              ignore_index, num_labels, L, L_PAD, SOFT, HAS_W, IS3D, BLOCK_C,
                                              BLOCK_P)
                gx = tl.zeros((L_PAD, BLOCK_C, BLOCK_P), dtype=tl.float32)
                for u in range(M):
                    op = tl.load(map_op_ptr + u)
                    arg = tl.load(map_arg_ptr + u)
                    z, alpha = _build_map(xall, stage_ids, C, cls, op, arg, sub_size_ptr, sub_start_ptr, members_ptr,
                                          cat_w_ptr, cat_b_ptr, cat_off_ptr, awf_v_ptr, awf_c_ptr, awf_v_off_ptr,
                                          awf_c_off_ptr, block_diag, BLOCK_C, BLOCK_P, K_PAD)
                    s, lse = _activate(z, cmask, SIGMOID)
                    go = ((u * B + b) * 3) * BLOCK_C
                    gce = tl.load(g_ptr + go + cls)[:, None]
                    gi = tl.load(g_ptr + go + BLOCK_C + cls)[:, None]
                    gz = tl.load(g_ptr + go + 2 * BLOCK_C + cls)[:, None]
                    wb = w[None, :]
                    if Q == 2:
                        gs = gi * t + 2.0 * gz * s
                    else:
                        gs = gi * t + gz
                    if SIGMOID:
                        g = wb * (gs * s * (1.0 - s) + gce * (s - t))
                    else:
                        dot = tl.sum(tl.where(mask, gs * s, 0.0), axis=0)
                        a = tl.sum(tl.where(mask, gce * t, 0.0), axis=0)
                        g = wb * (s * (gs - dot[None, :] + a[None, :]) - gce * t)
                    g = tl.where(mask, g, 0.0)  # dL/dz_u (BLOCK_C, BLOCK_P)
                    if op == 0:
                        gx = _add_stage(gx, arg, g, stage_ids)
                    else:
                        k = tl.load(sub_size_ptr + arg)
                        start = tl.load(sub_start_ptr + arg)
                        if op == 1:
                            for j in range(k):
                                gx = _add_stage(gx, tl.load(members_ptr + start + j), g, stage_ids)
                        elif op == 2:
                            for j in range(k):
                                prod = g
                                for i in range(k):
                                    if i != j:
                                        prod = prod * _stage(xall, tl.load(members_ptr + start + i), stage_ids)
                                gx = _add_stage(gx, tl.load(members_ptr + start + j), prod, stage_ids)
                        elif op == 3:
                            woff = tl.load(cat_off_ptr + arg)
                            bidx = dp_base + cat_b_base + arg * C + cls
                            tl.store(dp_ptr + bidx, tl.load(dp_ptr + bidx, mask=cmask, other=0.0) + tl.sum(g, axis=1),
                                     mask=cmask)
                            for j in range(k):
                                sj = tl.load(members_ptr + start + j)
                                xs = _stage(xall, sj, stage_ids)
                                for c2 in range(C):
                                    row = tl.sum(tl.where(cls[:, None] == c2, xs, 0.0), axis=0)
                                    widx = woff + cls * (k * C) + j * C + c2
                                    tl.store(dp_ptr + dp_base + widx, tl.load(dp_ptr + dp_base + widx, mask=cmask,
                                                                              other=0.0)
                                             + tl.sum(g * row[None, :], axis=1), mask=cmask)
                                    wcol = tl.load(cat_w_ptr + widx, mask=cmask, other=0.0)
                                    back = tl.sum(wcol[:, None] * g, axis=0)
                                    gx += tl.where((stage_ids[:, None, None] == sj) & (cls[None, :, None] == c2),
                                                   back[None, None, :], 0.0)
                        else:
                            voff = tl.load(awf_v_off_ptr + arg)
                            coff = tl.load(awf_c_off_ptr + arg)
                            dal = tl.zeros((K_PAD, BLOCK_P), dtype=tl.float32)
                            for j in range(k):
                                sj = tl.load(members_ptr + start + j)
                                xs = _stage(xall, sj, stage_ids)
                                aj = tl.sum(tl.where(kk[:, None] == j, alpha, 0.0), axis=0)
                                gx = _add_stage(gx, sj, aj[None, :] * g, stage_ids)
                                dal += tl.where(kk[:, None] == j, tl.sum(g * xs, axis=0)[None, :], 0.0)
                            dotal = tl.sum(alpha * dal, axis=0)
                            da = alpha * (dal - dotal[None, :])
                            cidx = dp_base + awf_c_base + coff + kk
                            tl.store(dp_ptr + cidx, tl.load(dp_ptr + cidx, mask=kk < k, other=0.0) + tl.sum(da, axis=1),
                                     mask=kk < k)
                            for j in range(k):
                                sj = tl.load(members_ptr + start + j)
                                xs = _stage(xall, sj, stage_ids)
                                for r in range(k):
                                    if (block_diag == 0) | (r == j):
                                        dar = tl.sum(tl.where(kk[:, None] == r, da, 0.0), axis=0)
                                        vidx = dp_base + awf_v_base + voff + r * (k * C) + j * C + cls
                                        tl.store(dp_ptr + vidx, tl.load(dp_ptr + vidx, mask=cmask, other=0.0)
                                                 + tl.sum(xs * dar[None, :], axis=1), mask=cmask)
                                        v = tl.load(awf_v_ptr + voff + r * (k * C) + j * C + cls, mask=cmask, other=0.0)
                                        gx = _add_stage(gx, sj, v[:, None] * dar[None, :], stage_ids)
                    tl.debug_barrier()  # read-modify-write of the program's own dp row: order it across threads
                for s in tl.static_range(L):  # s is a compile-time constant: the pointer choice folds away
                    _write_stage_grad(_stage(gx, s, stage_ids), s, _select(s, g0, g1, g2, g3, g4, g5), slot_ptr,
                                      slot_off_ptr, b, B, C, cls, cmask, qd, qh, qw, td, th, tw, od, oh, ow, pix,
                                      pmask, st_ptr, ax_i0, ax_i1, ax_l1, D, H, W, IS3D, TD, TH, TW)
                tl.debug_barrier()  # the next tile's read-modify-writes of shared footprint cells come after


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Configs (TD, TH, TW, SD, SH, SW, num_warps): tiles of TD·TH·TW pixels (one register block), a
# program takes a super-tile of SD × SH × SW tiles. Bigger super-tiles mean fewer programs but
# fewer slots per coarse stage (a super-tile spanning >= 2 native cells per axis needs 2 slots
# per axis). The first is the default and the interpreter's; on CUDA the fastest is picked once
# per problem shape (see _choose).
# With fewer than 32·num_warps pixels per tile Triton spreads warps over the class (and stage) axes,
# and every softmax / stage selection becomes a cross-warp reduction; configs with enough pixels
# keep those reductions inside a thread at the price of more registers: autotuning decides. The
# first 2D candidate has 4x the programs of the others (more programs in flight hide the latency of
# these register-heavy kernels) and 4x the partial rows. The first candidates are the ones the
# autotuner chose for every 2D / 3D problem of the GPU table on an H100 (README, GPU results).
CONFIGS_2D = ((1, 8, 8, 1, 2, 2, 2), (1, 8, 8, 1, 4, 4, 2), (1, 8, 8, 1, 4, 4, 4), (1, 8, 16, 1, 4, 2, 4),
              (1, 16, 16, 1, 2, 2, 8))
CONFIGS_3D = ((2, 8, 8, 8, 2, 2, 4), (4, 4, 4, 4, 4, 4, 2), (4, 4, 4, 4, 4, 4, 4), (4, 8, 8, 4, 2, 2, 8))
if INTERPRET:  # small super-tiles, so that the small test problems span several programs and slots
    CONFIGS_2D, CONFIGS_3D = ((1, 8, 8, 1, 2, 2, 4),) + CONFIGS_2D, ((2, 4, 4, 2, 1, 2, 4),) + CONFIGS_3D


@lru_cache(maxsize=1024)
def _axis_table(n_in: int, n_out: int):
    """(i0, i1, l1) for every output coordinate along one axis, as F.interpolate(align_corners=False)
    computes them in float32: src = max(scale·(o + 0.5) − 0.5, 0), i0 = ⌊src⌋, i1 = min(i0 + 1, n_in − 1)."""
    if n_in == n_out:
        i0 = torch.arange(n_out, dtype=torch.int32)
        return i0, i0.clone(), torch.zeros(n_out)
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    src = (scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5).clamp_min(0.0)
    i0 = src.to(torch.int32)
    l1 = (src - i0.float()).clamp(0.0, 1.0)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, l1


@lru_cache(maxsize=1024)
def _overlap(n_in: int, n_out: int, extent: int) -> int:
    """The most super-tiles of ``extent`` outputs whose footprints [i0(first), i1(last)] share one
    native cell. Super-tiles whose indices differ by a multiple of this never touch the same cell
    (footprints are intervals with non-decreasing ends), so slot = index mod overlap is race-free."""
    i0, i1, _ = _axis_table(n_in, n_out)
    lo = [int(i0[a]) for a in range(0, n_out, extent)]
    hi = [int(i1[min(a + extent, n_out) - 1]) for a in range(0, n_out, extent)]
    return max(sum(1 for a, b in zip(lo, hi) if a <= n <= b) for n in lo)


class _Geometry:
    """Kernel tables for L stages of sizes ``stage_sizes`` (each (D, H, W)) read at ``out_size``:

    st: (L·8,) int32 — Ds, Hs, Ws, slot counts KD, KH, KW, same-size flag, 0;
    ax_i0, ax_i1 (int32), ax_l1 (float32): the axis tables, stage-major, axes D, H, W;
    slot_off: (L,) int64 offsets of each coarse stage's (KD·KH·KW, B, C, Ds·Hs·Ws) slot block;
    slot_len: total slot elements (0 when every stage has the target's size).
    """

    def __init__(self, stage_sizes, out_size, extent, batch, classes, device):
        st, i0s, i1s, l1s, self.slot_blocks = [], [], [], [], []
        total = 0
        for size in stage_sizes:
            for n_in, n_out in zip(size, out_size):
                i0, i1, l1 = _axis_table(n_in, n_out)
                i0s.append(i0), i1s.append(i1), l1s.append(l1)
            same = tuple(size) == tuple(out_size)
            slots = [1, 1, 1] if same else [_overlap(a, b, e) for a, b, e in zip(size, out_size, extent)]
            st += [*size, *slots, int(same), 0]
            block = 0 if same else math.prod(slots) * batch * classes * math.prod(size)
            self.slot_blocks.append((total, math.prod(slots)) if not same else None)
            total += block
        self.st = torch.tensor(st, dtype=torch.int32, device=device)
        self.ax_i0 = torch.cat(i0s).to(device)
        self.ax_i1 = torch.cat(i1s).to(device)
        self.ax_l1 = torch.cat(l1s).to(device)
        self.slot_off = torch.tensor([b[0] if b else 0 for b in self.slot_blocks], dtype=torch.int64, device=device)
        self.slot_len = total


@lru_cache(maxsize=64)
def _geometry(stage_sizes, out_size, extent, batch, classes, device) -> _Geometry:
    return _Geometry(stage_sizes, out_size, extent, batch, classes, device)


class _Problem:
    """One call's tensors and sizes: stages as (B, C, P_s) views (+ unused pointer slots), target,
    pixel weight, the target's grid as (D, H, W) and the stage sizes as (D, H, W) triples."""

    def __init__(self, plan, logits, target, pixel_weight, params):
        if len(logits) > MAX_STAGES:
            raise ValueError(f"backend='triton' supports at most {MAX_STAGES} stages, got {len(logits)}")
        self.plan, self.params = plan, params
        self.logits = list(logits)
        self.L = len(logits)
        self.B, self.C = logits[0].shape[:2]
        self.is3d = logits[0].dim() == 5
        self.out, self.sizes = grid_sizes(logits, target)
        x = [z.reshape(self.B, self.C, -1) for z in logits]  # views, no copy
        self.x = x + [x[0]] * (MAX_STAGES - self.L)
        self.soft = target.is_floating_point()
        self.t = target.reshape(self.B, self.C, -1) if self.soft else target.reshape(self.B, -1)
        self.w = pixel_weight.reshape(self.B, -1) if pixel_weight is not None else self.t
        self.bc = _next_pow2(self.C)
        self.device = logits[0].device
        self.tables = _plan_tables(plan, self.C, self.device)

    @staticmethod
    def super_extent(cfg):
        """A super-tile's size in pixels per axis (D, H, W)."""
        return tuple(t * n for t, n in zip(cfg[:3], cfg[3:6]))

    def grid(self, cfg):
        """Super-tiles along H and W, and super-tiles (programs) per sample."""
        nsd, nsh, nsw = (triton.cdiv(n, e) for n, e in zip(self.out, self.super_extent(cfg)))
        return nsh, nsw, nsd * nsh * nsw

    def geometry(self, cfg) -> _Geometry:
        return _geometry(self.sizes, self.out, self.super_extent(cfg), self.B, self.C, self.device)

    def common_args(self, cfg):
        """Constexpr keyword arguments shared by both kernels."""
        p = self.plan
        TD, TH, TW, SD, SH, SW, num_warps = cfg
        return dict(L=self.L, L_PAD=_next_pow2(self.L), Q=p.q, SIGMOID=bool(p.sigmoid), SOFT=self.soft,
                    HAS_W=self.w is not self.t, IS3D=self.is3d, BLOCK_C=self.bc, BLOCK_P=TD * TH * TW,
                    TD=TD, TH=TH, TW=TW, SD=SD, SH=SH, SW=SW, K_PAD=self.tables["k_pad"], num_warps=num_warps)


@lru_cache(maxsize=64)
def _plan_tables(plan, C, device):
    """The plan's int tables on ``device`` (cached: no host-to-device copy per call): map op/arg,
    subset sizes/starts/members, packed parameter offsets."""
    sizes = list(plan.subset_size)
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    offsets, _ = packed_layout(sizes, C)

    def i32(x):
        return torch.tensor(x if x else [0], dtype=torch.int32, device=device)

    return dict(map_op=i32(plan.map_op), map_arg=i32(plan.map_arg), size=i32(sizes), start=i32(starts),
                members=i32(plan.subset_members), cat_off=i32(offsets["cat_w"]), v_off=i32(offsets["awf_v"]),
                c_off=i32(offsets["awf_c"]), k_pad=_next_pow2(max(sizes + [1])))


_TUNED: dict = {}
_LAST: dict = {}  # kind -> (config, compiled kernel) of the latest launch (for reports)


def pinned_config():
    """The config forced by LOMIX_TRITON_CONFIG ("TD,TH,TW,SD,SH,SW,num_warps"), or None."""
    text = os.environ.get("LOMIX_TRITON_CONFIG", "").strip()
    if not text:
        return None
    try:
        cfg = tuple(int(v) for v in text.split(","))
    except ValueError:
        cfg = ()
    if len(cfg) != 7 or min(cfg) < 1:
        raise ValueError(f"LOMIX_TRITON_CONFIG must be 7 positive integers TD,TH,TW,SD,SH,SW,num_warps, got {text!r}")
    return cfg


def last_launches() -> dict:
    """{"forward"/"backward": {"config", "n_regs", "n_spills"}} of the latest launches (registers and
    spills as the CUDA driver reports them; absent through the interpreter)."""
    out = {}
    for kind, (cfg, kernel) in _LAST.items():
        out[kind] = {"config": list(cfg), **{k: getattr(kernel, k) for k in ("n_regs", "n_spills")
                                             if isinstance(getattr(kernel, k, None), int)}}
    return out


def _choose(kind: str, pb: _Problem, launch):
    """The tile config for this problem: LOMIX_TRITON_CONFIG if set; else the default (the first
    candidate: the one an H100 autotuning run chose for every problem of the GPU table), or with
    LOMIX_TRITON_AUTOTUNE=1 on CUDA the fastest candidate, timed once per (kind, shapes, plan) key like
    triton.autotune — at the price of compiling every candidate on a problem's first step (~20 s each
    on the H100 machine's CPU). Results are deterministic for a given config, so the default is also
    identical across processes."""
    candidates = CONFIGS_3D if pb.is3d else CONFIGS_2D
    pinned = pinned_config()
    if pinned is not None:
        if pinned[0] > 1 and not pb.is3d:
            raise ValueError(f"LOMIX_TRITON_CONFIG {pinned} has TD > 1: not a 2D config")
        return pinned
    if pb.device.type != "cuda" or os.environ.get("LOMIX_TRITON_AUTOTUNE", "0") != "1":
        return candidates[0]
    key = (kind, pb.sizes, pb.out, pb.B, pb.C, pb.plan, pb.soft, pb.w is not pb.t, pb.logits[0].dtype)
    if key not in _TUNED:
        from triton.testing import do_bench

        times = [do_bench(lambda c=c: launch(c), warmup=3, rep=10) for c in candidates]
        _TUNED[key] = candidates[times.index(min(times))]
    return _TUNED[key]


class TritonKernels:
    """Forward/backward for the shared custom-op wrapper (:mod:`lomix_kernels.fused`). Stages may be
    coarser than the target: the kernels interpolate them on the fly."""

    @classmethod
    def forward(cls, plan, logits, target, pixel_weight, params) -> MapStats:
        pb = _Problem(plan, logits, target, pixel_weight, params)
        cfg = _choose("forward", pb, lambda c: cls._forward(pb, c))
        return cls._forward(pb, cfg)

    @classmethod
    def backward(cls, plan, logits, target, pixel_weight, params, gce, ginter, gzsum):
        pb = _Problem(plan, logits, target, pixel_weight, params)
        M, B, C, bc = plan.num_maps, pb.B, pb.C, pb.bc
        g = torch.zeros(M, B, 3, bc, dtype=torch.float32, device=pb.device)
        g[:, :, 0, :C], g[:, :, 1, :C], g[:, :, 2, :C] = gce, ginter, gzsum
        cfg = _choose("backward", pb, lambda c: cls._backward(pb, c, g))
        return cls._backward(pb, cfg, g)

    @staticmethod
    def forward_launch(pb: _Problem, cfg):
        """The forward kernel's grid, arguments and constexpr keywords, and its outputs (partial rows
        out (B, groups, M, 3, BLOCK_C) and tout (B, groups, 3, BLOCK_C))."""
        plan, tb, (cat_w, cat_b, awf_v, awf_c) = pb.plan, pb.tables, pb.params
        nsh, nsw, groups = pb.grid(cfg)
        geo = pb.geometry(cfg)
        M, B, C, bc = plan.num_maps, pb.B, pb.C, pb.bc
        out = torch.zeros(B, groups, M, 3, bc, dtype=torch.float32, device=pb.device)
        tout = torch.empty(B, groups, 3, bc, dtype=torch.float32, device=pb.device)
        args = (*pb.x, geo.st, geo.ax_i0, geo.ax_i1, geo.ax_l1, pb.t, pb.w, out, tout, tb["map_op"], tb["map_arg"],
                tb["size"], tb["start"], tb["members"], cat_w, cat_b, tb["cat_off"], awf_v, awf_c, tb["v_off"],
                tb["c_off"], B, C, *pb.out, nsh, nsw, groups, M, plan.has_ignore, plan.ignore_index,
                plan.num_labels, plan.block_diagonal)
        return (groups, B), args, pb.common_args(cfg), (out, tout)

    @classmethod
    def _forward(cls, pb: _Problem, cfg) -> MapStats:
        grid, args, constexprs, (out, tout) = cls.forward_launch(pb, cfg)
        _LAST["forward"] = (cfg, _forward_kernel[grid](*args, **constexprs))
        C = pb.C
        sums = out.sum(1).transpose(0, 1)[..., :C]  # (M, B, 3, C): fixed-order reduction over program groups
        tsums = tout.sum(1)
        parts = (sums[:, :, 0], sums[:, :, 1], sums[:, :, 2], tsums[:, 0, :C], tsums[:, 1, :C], tsums[:, 2, 0])
        # fresh contiguous tensors: the fake impl's strides, and no aliases between outputs (custom ops)
        return MapStats(*(p.clone(memory_format=torch.contiguous_format) for p in parts))

    @staticmethod
    def backward_launch(pb: _Problem, cfg, g):
        """The backward kernel's grid, arguments and constexpr keywords, and its outputs: the logits grads
        of full-size stages (None for coarse ones), the slot buffer, the parameter partial rows dp
        (B·groups, n_params) and the geometry (for the slot reduction)."""
        plan, tb, params = pb.plan, pb.tables, pb.params
        nsh, nsw, groups = pb.grid(cfg)
        geo = pb.geometry(cfg)
        B, C = pb.B, pb.C
        grads = [torch.empty_like(z) if blk is None else None for z, blk in zip(pb.logits, geo.slot_blocks)]
        direct = [gr.view(B, C, -1) if gr is not None else pb.x[0] for gr in grads]  # unused slots: never written
        direct = direct + [pb.x[0]] * (MAX_STAGES - pb.L)
        slots = torch.zeros(max(geo.slot_len, 1), dtype=torch.float32, device=pb.device)
        sizes = [p.numel() for p in params]
        n_params = max(sum(sizes), 1)
        dp = torch.zeros(B * groups, n_params, dtype=torch.float32, device=pb.device)
        args = (*pb.x, geo.st, geo.ax_i0, geo.ax_i1, geo.ax_l1, pb.t, pb.w, g, *direct, slots, geo.slot_off, dp,
                tb["map_op"], tb["map_arg"], tb["size"], tb["start"], tb["members"], params[0], params[1],
                tb["cat_off"], params[2], params[3], tb["v_off"], tb["c_off"], B, C, *pb.out, nsh, nsw, groups,
                plan.num_maps, n_params, sizes[0], sizes[0] + sizes[1], sizes[0] + sizes[1] + sizes[2],
                plan.has_ignore, plan.ignore_index, plan.num_labels, plan.block_diagonal)
        return (groups, B), args, pb.common_args(cfg), (grads, slots, dp, geo)

    @classmethod
    def _backward(cls, pb: _Problem, cfg, g):
        grid, args, constexprs, (grads, slots, dp, geo) = cls.backward_launch(pb, cfg, g)
        _LAST["backward"] = (cfg, _backward_kernel[grid](*args, **constexprs))
        for s, blk in enumerate(geo.slot_blocks):
            if blk is not None:  # coarse stage: sum its slots (fixed order) into the native-size gradient
                start, count = blk
                z = pb.logits[s]
                part = slots[start:start + count * z.numel()].view(count, z.numel())
                grads[s] = part.sum(0).view(z.shape).to(z.dtype)
        return grads, dp.sum(0)[:sum(p.numel() for p in pb.params)]


STATS_OP = register_ops("triton", TritonKernels)[0] if triton is not None else None
