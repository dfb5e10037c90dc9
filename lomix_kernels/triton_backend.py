"""The Triton backend: the same two fused passes as the CPU kernels, for CUDA tensors.

With ``TRITON_INTERPRET=1`` (set before triton is imported) it also accepts CPU tensors and runs
the same kernels through Triton's interpreter: that is how CI and users without a GPU test it.

Layout: the L stages are upsampled to the target's size (the CPU backend fuses that; Triton does
not yet) and passed as up to six (B, C, P) pointers, read in place. Each program of the forward
takes BLOCK_P pixels of one sample and one map (grid = pixel blocks × M), builds the map in
registers (classes padded to a power of two and masked) and writes its per-class partial sums;
partials are reduced in a fixed order by torch. The backward's programs take BLOCK_P pixels and
loop over all M maps, accumulating the stage gradients in registers (written once) and the
parameter gradients as per-program partials, reduced in a fixed order: deterministic, no
atomics, no host synchronization.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .finish import MapStats
from .fused import packed_layout, register_ops

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


if triton is not None:

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
    def _load_stage(x0, x1, x2, x3, x4, x5, s, b, B, C, P, cls, pix, mask):
        """(BLOCK_C, BLOCK_P) float32 logits of stage s (one of up to 6 (B, C, P) tensors), sample b."""
        x = _select(s, x0, x1, x2, x3, x4, x5)
        offs = (b * C + cls[:, None]).to(tl.int64) * P + pix[None, :]
        return tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _build_map(x0, x1, x2, x3, x4, x5, b, B, C, P, cls, pix, mask, op, arg, sub_size_ptr, sub_start_ptr, members_ptr,
                   cat_w_ptr, cat_b_ptr, cat_off_ptr, awf_v_ptr, awf_c_ptr, awf_v_off_ptr, awf_c_off_ptr,
                   block_diag, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, K_PAD: tl.constexpr):
        """Map logits z (BLOCK_C, BLOCK_P) and, for awf, alpha (K_PAD, BLOCK_P)."""
        cmask = cls < C
        kk = tl.arange(0, K_PAD)
        alpha = tl.zeros((K_PAD, BLOCK_P), dtype=tl.float32)
        z = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
        if op == 0:
            z = _load_stage(x0, x1, x2, x3, x4, x5, arg, b, B, C, P, cls, pix, mask)
        else:
            k = tl.load(sub_size_ptr + arg)
            start = tl.load(sub_start_ptr + arg)
            if op == 1:
                for j in range(k):
                    z += _load_stage(x0, x1, x2, x3, x4, x5, tl.load(members_ptr + start + j), b, B, C, P, cls, pix, mask)
            elif op == 2:
                z = _load_stage(x0, x1, x2, x3, x4, x5, tl.load(members_ptr + start), b, B, C, P, cls, pix, mask)
                for j in range(1, k):
                    z = z * _load_stage(x0, x1, x2, x3, x4, x5, tl.load(members_ptr + start + j), b, B, C, P, cls, pix, mask)
            elif op == 3:
                woff = tl.load(cat_off_ptr + arg)
                z = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32) + tl.load(
                    cat_b_ptr + arg * C + cls, mask=cmask, other=0.0)[:, None]
                for j in range(k):
                    s = tl.load(members_ptr + start + j)
                    xs = _load_stage(x0, x1, x2, x3, x4, x5, s, b, B, C, P, cls, pix, mask)
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
                    xs = _load_stage(x0, x1, x2, x3, x4, x5, s, b, B, C, P, cls, pix, mask)
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
                    z += aj[None, :] * _load_stage(x0, x1, x2, x3, x4, x5, s, b, B, C, P, cls, pix, mask)
        return z, alpha

    @triton.jit
    def _target_block(t_ptr, w_ptr, b, C, P, cls, pix, pmask, SOFT: tl.constexpr, HAS_W: tl.constexpr,
                      has_ignore, ignore_index, num_labels, BLOCK_C: tl.constexpr):
        """Target t (BLOCK_C, BLOCK_P) and pixel weight w (BLOCK_P,)."""
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
    def _block(pid, nblk, C, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Sample, pixel and class indices of program ``pid`` (BLOCK_P pixels of one sample) and masks."""
        b = pid // nblk
        pix = (pid % nblk) * BLOCK_P + tl.arange(0, BLOCK_P)
        cls = tl.arange(0, BLOCK_C)
        pmask = pix < P
        cmask = cls < C
        return b, pix, cls, pmask, cmask, cmask[:, None] & pmask[None, :]

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
    def _forward_kernel(x0, x1, x2, x3, x4, x5, t_ptr, w_ptr, out_ptr, tout_ptr, map_op_ptr, map_arg_ptr, sub_size_ptr,
                        sub_start_ptr, members_ptr, cat_w_ptr, cat_b_ptr, cat_off_ptr, awf_v_ptr, awf_c_ptr,
                        awf_v_off_ptr, awf_c_off_ptr, B, C, P, nblk, has_ignore, ignore_index, num_labels,
                        block_diag, Q: tl.constexpr, SIGMOID: tl.constexpr, SOFT: tl.constexpr,
                        HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, K_PAD: tl.constexpr):
        pid = tl.program_id(0)
        u = tl.program_id(1)
        b, pix, cls, pmask, cmask, mask = _block(pid, nblk, C, P, BLOCK_C, BLOCK_P)
        t, w = _target_block(t_ptr, w_ptr, b, C, P, cls, pix, pmask, SOFT, HAS_W, has_ignore, ignore_index,
                             num_labels, BLOCK_C)
        op = tl.load(map_op_ptr + u)
        arg = tl.load(map_arg_ptr + u)
        z, alpha = _build_map(x0, x1, x2, x3, x4, x5, b, B, C, P, cls, pix, mask, op, arg, sub_size_ptr, sub_start_ptr,
                              members_ptr, cat_w_ptr, cat_b_ptr, cat_off_ptr, awf_v_ptr, awf_c_ptr, awf_v_off_ptr,
                              awf_c_off_ptr, block_diag, BLOCK_C, BLOCK_P, K_PAD)
        s, lse = _activate(z, cmask, SIGMOID)
        if SIGMOID:
            ce = tl.maximum(z, 0.0) - z * t + tl.log(1.0 + tl.exp(-tl.abs(z)))
        else:
            ce = t * (lse[None, :] - z)
        wb = w[None, :]
        ce = tl.where(mask, wb * ce, 0.0)
        inter = tl.where(mask, wb * s * t, 0.0)
        if Q == 2:
            zs = tl.where(mask, wb * s * s, 0.0)
        else:
            zs = tl.where(mask, wb * s, 0.0)
        # partials: out[u, b, blk, 3, BLOCK_C]
        base = ((u * B + b) * nblk + pid % nblk) * 3 * BLOCK_C
        tl.store(out_ptr + base + cls, tl.sum(ce, axis=1))
        tl.store(out_ptr + base + BLOCK_C + cls, tl.sum(inter, axis=1))
        tl.store(out_ptr + base + 2 * BLOCK_C + cls, tl.sum(zs, axis=1))
        if u == 0:  # target sums: tout[b, blk, 3, BLOCK_C] = Σω t, Σω t^q, Σω
            tb = (b * nblk + pid % nblk) * 3 * BLOCK_C
            t1 = tl.where(mask, wb * t, 0.0)
            if Q == 2:
                tq = tl.where(mask, wb * t * t, 0.0)
            else:
                tq = t1
            tl.store(tout_ptr + tb + cls, tl.sum(t1, axis=1))
            tl.store(tout_ptr + tb + BLOCK_C + cls, tl.sum(tq, axis=1))
            tl.store(tout_ptr + tb + 2 * BLOCK_C + cls, tl.where(cls == 0, tl.sum(w, axis=0), 0.0))

    @triton.jit
    def _add_stage(gx, s, val, stage_ids):
        return gx + tl.where(stage_ids[:, None, None] == s, val[None, :, :], 0.0)

    @triton.jit
    def _backward_kernel(x0, x1, x2, x3, x4, x5, t_ptr, w_ptr, g_ptr, g0, g1, g2, g3, g4, g5, dp_ptr, map_op_ptr, map_arg_ptr, sub_size_ptr,
                         sub_start_ptr, members_ptr, cat_w_ptr, cat_b_ptr, cat_off_ptr, awf_v_ptr, awf_c_ptr,
                         awf_v_off_ptr, awf_c_off_ptr, B, C, P, M, nblk, n_params, cat_b_base, awf_v_base,
                         awf_c_base, has_ignore, ignore_index, num_labels, block_diag, L: tl.constexpr,
                         L_PAD: tl.constexpr, Q: tl.constexpr, SIGMOID: tl.constexpr, SOFT: tl.constexpr,
                         HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, K_PAD: tl.constexpr):
        pid = tl.program_id(0)
        b, pix, cls, pmask, cmask, mask = _block(pid, nblk, C, P, BLOCK_C, BLOCK_P)
        kk = tl.arange(0, K_PAD)
        stage_ids = tl.arange(0, L_PAD)
        t, w = _target_block(t_ptr, w_ptr, b, C, P, cls, pix, pmask, SOFT, HAS_W, has_ignore, ignore_index,
                             num_labels, BLOCK_C)
        gx = tl.zeros((L_PAD, BLOCK_C, BLOCK_P), dtype=tl.float32)
        dp_base = pid.to(tl.int64) * n_params
        for u in range(M):
            op = tl.load(map_op_ptr + u)
            arg = tl.load(map_arg_ptr + u)
            z, alpha = _build_map(x0, x1, x2, x3, x4, x5, b, B, C, P, cls, pix, mask, op, arg, sub_size_ptr, sub_start_ptr,
                                  members_ptr, cat_w_ptr, cat_b_ptr, cat_off_ptr, awf_v_ptr, awf_c_ptr,
                                  awf_v_off_ptr, awf_c_off_ptr, block_diag, BLOCK_C, BLOCK_P, K_PAD)
            s, lse = _activate(z, cmask, SIGMOID)
            go = ((u * B + b) * 3) * BLOCK_C  # g[u, b, 3, BLOCK_C]: gce, ginter, gzsum
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
            g = tl.where(mask, g, 0.0)
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
                                prod = prod * _load_stage(x0, x1, x2, x3, x4, x5, tl.load(members_ptr + start + i), b, B, C, P,
                                                          cls, pix, mask)
                        gx = _add_stage(gx, tl.load(members_ptr + start + j), prod, stage_ids)
                elif op == 3:
                    woff = tl.load(cat_off_ptr + arg)
                    tl.store(dp_ptr + dp_base + cat_b_base + arg * C + cls, tl.load(
                        dp_ptr + dp_base + cat_b_base + arg * C + cls, mask=cmask, other=0.0) + tl.sum(g, axis=1),
                        mask=cmask)
                    for j in range(k):
                        sj = tl.load(members_ptr + start + j)
                        xs = _load_stage(x0, x1, x2, x3, x4, x5, sj, b, B, C, P, cls, pix, mask)
                        for c2 in range(C):
                            row = tl.sum(tl.where(cls[:, None] == c2, xs, 0.0), axis=0)
                            widx = woff + cls * (k * C) + j * C + c2
                            dw = tl.sum(g * row[None, :], axis=1)
                            tl.store(dp_ptr + dp_base + widx, tl.load(dp_ptr + dp_base + widx, mask=cmask,
                                                                      other=0.0) + dw, mask=cmask)
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
                        xs = _load_stage(x0, x1, x2, x3, x4, x5, sj, b, B, C, P, cls, pix, mask)
                        aj = tl.sum(tl.where(kk[:, None] == j, alpha, 0.0), axis=0)
                        gx = _add_stage(gx, sj, aj[None, :] * g, stage_ids)
                        dal += tl.where(kk[:, None] == j, tl.sum(g * xs, axis=0)[None, :], 0.0)
                    dotal = tl.sum(alpha * dal, axis=0)
                    da = alpha * (dal - dotal[None, :])
                    cidx = awf_c_base + coff + kk
                    tl.store(dp_ptr + dp_base + cidx, tl.load(dp_ptr + dp_base + cidx, mask=kk < k, other=0.0)
                             + tl.sum(da, axis=1), mask=kk < k)
                    for j in range(k):
                        sj = tl.load(members_ptr + start + j)
                        xs = _load_stage(x0, x1, x2, x3, x4, x5, sj, b, B, C, P, cls, pix, mask)
                        for r in range(k):
                            if (block_diag == 0) | (r == j):
                                dar = tl.sum(tl.where(kk[:, None] == r, da, 0.0), axis=0)
                                vidx = awf_v_base + voff + r * (k * C) + j * C + cls
                                tl.store(dp_ptr + dp_base + vidx, tl.load(dp_ptr + dp_base + vidx, mask=cmask,
                                                                          other=0.0)
                                         + tl.sum(xs * dar[None, :], axis=1), mask=cmask)
                                v = tl.load(awf_v_ptr + voff + r * (k * C) + j * C + cls, mask=cmask, other=0.0)
                                gx = _add_stage(gx, sj, v[:, None] * dar[None, :], stage_ids)
        offs = (b * C + cls[:, None]).to(tl.int64) * P + pix[None, :]
        for s in tl.static_range(L):  # s is a compile-time constant: the branches fold away
            gs_ = tl.sum(tl.where(stage_ids[:, None, None] == s, gx, 0.0), axis=0)
            gp = _select(s, g0, g1, g2, g3, g4, g5)
            tl.store(gp + offs, gs_.to(gp.dtype.element_ty), mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


class TritonKernels:
    """Forward/backward for the shared custom-op wrapper (:mod:`lomix_kernels.fused`)."""

    fuses_upsampling = False
    BLOCK_P = 64

    @staticmethod
    def _tables(plan, C, device):
        sizes = list(plan.subset_size)
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        offsets, _ = packed_layout(sizes, C)
        cat_off, v_off, c_off = offsets["cat_w"], offsets["awf_v"], offsets["awf_c"]

        def i32(x):
            return torch.tensor(x if x else [0], dtype=torch.int32, device=device)

        return dict(map_op=i32(plan.map_op), map_arg=i32(plan.map_arg), size=i32(sizes), start=i32(starts),
                    members=i32(plan.subset_members), cat_off=i32(cat_off), v_off=i32(v_off), c_off=i32(c_off),
                    k_pad=_next_pow2(max(sizes + [1])))

    @classmethod
    def _common(cls, plan, logits, target, pixel_weight):
        if len(logits) > MAX_STAGES:
            raise ValueError(f"backend='triton' supports at most {MAX_STAGES} stages, got {len(logits)}")
        x = [z.reshape(z.shape[0], z.shape[1], -1) for z in logits]  # views (B, C, P), no copy
        x = x + [x[0]] * (MAX_STAGES - len(x))  # unused pointer slots
        L, (B, C, P) = len(logits), x[0].shape
        bc = _next_pow2(C)
        nblk = triton.cdiv(P, cls.BLOCK_P)
        soft = target.is_floating_point()
        t = target.reshape(B, C, P) if soft else target.reshape(B, P)
        w = pixel_weight.reshape(B, P) if pixel_weight is not None else t
        return x, t, w, (L, B, C, P, bc, nblk, soft)

    @classmethod
    def forward(cls, plan, logits, target, pixel_weight, params) -> MapStats:
        x, t, w, (L, B, C, P, bc, nblk, soft) = cls._common(plan, logits, target, pixel_weight)
        device = x[0].device
        tb = cls._tables(plan, C, device)
        M = plan.num_maps
        out = torch.empty(M, B, nblk, 3, bc, dtype=torch.float32, device=device)
        tout = torch.empty(B, nblk, 3, bc, dtype=torch.float32, device=device)
        _forward_kernel[(B * nblk, M)](
            *x, t, w, out, tout, tb["map_op"], tb["map_arg"], tb["size"], tb["start"], tb["members"],
            params[0], params[1], tb["cat_off"], params[2], params[3], tb["v_off"], tb["c_off"],
            B, C, P, nblk, plan.has_ignore, plan.ignore_index, plan.num_labels, plan.block_diagonal,
            Q=plan.q, SIGMOID=bool(plan.sigmoid), SOFT=soft, HAS_W=pixel_weight is not None,
            BLOCK_C=bc, BLOCK_P=cls.BLOCK_P, K_PAD=tb["k_pad"])
        sums = out.sum(2)[..., :C]  # fixed-order reduction over pixel blocks
        tsums = tout.sum(1)
        parts = (sums[:, :, 0], sums[:, :, 1], sums[:, :, 2], tsums[:, 0, :C], tsums[:, 1, :C], tsums[:, 2, 0])
        return MapStats(*(p.clone() for p in parts))  # custom ops may not return aliases of each other

    @classmethod
    def backward(cls, plan, logits, target, pixel_weight, params, gce, ginter, gzsum):
        x, t, w, (L, B, C, P, bc, nblk, soft) = cls._common(plan, logits, target, pixel_weight)
        device = x[0].device
        tb = cls._tables(plan, C, device)
        M = plan.num_maps
        g = torch.zeros(M, B, 3, bc, dtype=torch.float32, device=device)
        g[:, :, 0, :C], g[:, :, 1, :C], g[:, :, 2, :C] = gce, ginter, gzsum
        grads = [torch.empty_like(z) for z in logits]
        gflat = [gz.view(B, C, P) for gz in grads]
        gflat = gflat + [gflat[0]] * (MAX_STAGES - L)
        n_params = sum(p.numel() for p in params)
        dp = torch.zeros(B * nblk, max(n_params, 1), dtype=torch.float32, device=device)
        _backward_kernel[(B * nblk,)](
            *x, t, w, g, *gflat, dp, tb["map_op"], tb["map_arg"], tb["size"], tb["start"], tb["members"],
            params[0], params[1], tb["cat_off"], params[2], params[3], tb["v_off"], tb["c_off"],
            B, C, P, M, nblk, max(n_params, 1), params[0].numel(), params[0].numel() + params[1].numel(),
            params[0].numel() + params[1].numel() + params[2].numel(),
            plan.has_ignore, plan.ignore_index, plan.num_labels, plan.block_diagonal,
            L=L, L_PAD=_next_pow2(L), Q=plan.q, SIGMOID=bool(plan.sigmoid), SOFT=soft,
            HAS_W=pixel_weight is not None, BLOCK_C=bc, BLOCK_P=cls.BLOCK_P, K_PAD=tb["k_pad"])
        return grads, dp.sum(0)[:n_params]


STATS_OP = register_ops("triton", TritonKernels)[0] if triton is not None else None
