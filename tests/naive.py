"""An independent, deliberately naive LoMix implementation (no MapStats, no shared finish).

Written from SPEC §3-§4 with torch's own losses: F.interpolate, F.conv, F.cross_entropy /
F.binary_cross_entropy_with_logits and a TransUNet-style per-class Dice loop.
"""
import itertools

import torch
import torch.nn.functional as F


def conv1x1(x, w, b):
    w = w.reshape(*w.shape, *([1] * (x.dim() - 2)))
    return (F.conv2d if x.dim() == 4 else F.conv3d)(x, w, b)


def mixed_maps(z, ops, cat_w, cat_b, awf_w, awf_b, awf_param, originals):
    L = len(z)
    maps = [z[i] for i in originals]
    subs = [s for k in range(2, L + 1) for s in itertools.combinations(range(L), k)]
    for op in ops:
        for j, s in enumerate(subs):
            members = [z[i] for i in s]
            if op == "add":
                m = sum(members)
            elif op == "mult":
                m = members[0]
                for t in members[1:]:
                    m = m * t
            elif op == "cat":
                m = conv1x1(torch.cat(members, 1), cat_w[j], cat_b[j])
            else:
                if awf_param == "official":
                    w, b = awf_w[len(s) - 2], awf_b[len(s) - 2]
                    scores = torch.cat([conv1x1(members[q], w[q:q + 1], b[q:q + 1]) for q in range(len(s))], 1)
                else:
                    scores = conv1x1(torch.cat(members, 1), awf_w[j], awf_b[j])
                a = scores.softmax(1)
                m = sum(a[:, q:q + 1] * members[q] for q in range(len(s)))
            maps.append(m)
    return maps


def dice_loss(probs, onehot, valid, squared, batch, include_background, nr, dr):
    """1 - mean_c (2 I + nr) / (Z + T + dr); TransUNet loop when squared and batch."""
    C = probs.shape[1]
    classes = range(C) if include_background else range(1, C)
    v = valid.unsqueeze(1).to(probs.dtype)
    p, t = probs * v, onehot * v
    red = tuple(range(2, p.dim())) if not batch else (0, *range(2, p.dim()))
    losses = []
    for c in classes:
        inter = (p[:, c:c + 1] * t[:, c:c + 1]).sum(red)
        zs = ((p[:, c:c + 1] ** 2) * v if squared else p[:, c:c + 1]).sum(red)
        ts = ((t[:, c:c + 1] ** 2) if squared else t[:, c:c + 1]).sum(red)
        losses.append(1 - (2 * inter + nr) / (zs + ts + dr))
    return torch.stack(losses).mean()


def naive_lomix(logits, target, weights, *, ops, originals, cat_w=None, cat_b=None, awf_w=None, awf_b=None,
                awf_param="official", ce_weight=0.3, dice_weight=0.7, dice_squared=True, dice_batch=True,
                include_background=True, nr=1e-5, dr=1e-5, ignore_index=None, activation="softmax"):
    """Σ_u w_u (β CE_u + γ Dice_u), each map's loss computed with torch's own functions."""
    spatial = target.shape[1:]
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    z = [zi if zi.shape[2:] == spatial else F.interpolate(zi, size=spatial, mode=mode, align_corners=False)
         for zi in logits]
    C = z[0].shape[1]
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target)).long()
    onehot = F.one_hot(y, C).movedim(-1, 1).to(z[0].dtype)
    total = 0
    for w, m in zip(weights, mixed_maps(z, ops, cat_w, cat_b, awf_w, awf_b, awf_param, originals)):
        if activation == "softmax":
            ce = F.cross_entropy(m, target.long(), ignore_index=-100 if ignore_index is None else ignore_index)
            probs = m.softmax(1)
        else:
            ce = F.binary_cross_entropy_with_logits(m, onehot)
            probs = m.sigmoid()
        dice = dice_loss(probs, onehot, valid, dice_squared, dice_batch, include_background, nr, dr)
        total = total + w * (ce_weight * ce + dice_weight * dice)
    return total
