"""Shared pieces of the examples: synthetic organ-like phantoms, a small U-Net with L heads,
peak-memory reading and held-out Dice."""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn


def example_parser(doc: str, *, steps: int, size: int) -> argparse.ArgumentParser:
    """The options every example takes: --steps, --size, --classes, --lr, --out, --device."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--size", type=int, default=size)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--device", default="cpu", help="cpu (fused cpu backend) or cuda (fused triton backend)")
    return ap


def phantoms(n, size, num_classes, *, seed=0):
    """``n`` synthetic images (n, 1, *size) and labels (n, *size) with structures of very
    different sizes, like organs: class 1 a large blob, 2 a medium one, 3+ small ones.
    Intensities overlap and the noise is strong, so context matters."""
    g = torch.Generator().manual_seed(seed)
    dim = len(size)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij")
    images, labels = [], []
    radii = [0.55, 0.3] + [0.12] * max(0, num_classes - 3)
    for _ in range(n):
        label = torch.zeros(size, dtype=torch.int64)
        image = torch.zeros(size)
        for c, r in enumerate(radii[: num_classes - 1], start=1):
            center = (torch.rand(dim, generator=g) * 1.2 - 0.6)
            axes = r * (0.7 + 0.6 * torch.rand(dim, generator=g))
            inside = sum(((x - m) / a) ** 2 for x, m, a in zip(grids, center, axes)) <= 1
            label[inside] = c
            image[inside] = 0.4 + 0.6 * c / num_classes + 0.1 * torch.randn(1, generator=g).item()
        image = image + 0.35 * torch.randn(size, generator=g)
        images.append(image[None])
        labels.append(label)
    return torch.stack(images), torch.stack(labels)


class UNet(nn.Module):
    """A small U-Net (2D or 3D) returning ``len(widths)`` logit maps, coarse -> fine, each at
    its own decoder resolution (1/2^(L-1) .. 1/1), as EMCAD / LoMix networks do."""

    def __init__(self, dim=2, in_ch=1, num_classes=4, widths=(8, 16, 32, 64)):
        super().__init__()
        Conv = nn.Conv2d if dim == 2 else nn.Conv3d
        Norm = nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d
        self.pool = F.max_pool2d if dim == 2 else F.max_pool3d
        self.mode = "bilinear" if dim == 2 else "trilinear"

        def block(i, o):
            return nn.Sequential(Conv(i, o, 3, padding=1), Norm(o), nn.ReLU(inplace=True),
                                 Conv(o, o, 3, padding=1), Norm(o), nn.ReLU(inplace=True))

        self.enc = nn.ModuleList(block(i, o) for i, o in zip((in_ch, *widths[:-1]), widths))
        self.dec = nn.ModuleList(block(widths[k] + widths[k + 1], widths[k]) for k in range(len(widths) - 1))
        self.heads = nn.ModuleList(Conv(w, num_classes, 1) for w in widths)

    def forward(self, x):
        skips = []
        for k, enc in enumerate(self.enc):
            x = enc(x if k == 0 else self.pool(x, 2))
            skips.append(x)
        outs = [self.heads[-1](x)]  # deepest (coarsest) head first
        for k in range(len(self.dec) - 1, -1, -1):
            x = F.interpolate(x, size=skips[k].shape[2:], mode=self.mode, align_corners=False)
            x = self.dec[k](torch.cat([x, skips[k]], 1))
            outs.append(self.heads[k](x))
        return outs  # coarse -> fine, native resolutions


def return_freed_memory_to_os() -> None:
    """Make glibc give every freed block over 64 KB back to the OS, so that peak-RSS readings see
    each allocation instead of a warm heap (measurement only; costs some speed)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 0)      # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Give freed heap memory back to the OS, then restart the kernel's peak-RSS counter."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


@torch.no_grad()
def dice_per_class(model, images, labels, num_classes, batch=4):
    """Held-out Dice per foreground class of the final (finest) head."""
    model.eval()
    inter = torch.zeros(num_classes)
    total = torch.zeros(num_classes)
    for k in range(0, len(images), batch):
        pred = model(images[k:k + batch])[-1].argmax(1)
        y = labels[k:k + batch]
        for c in range(1, num_classes):
            inter[c] += ((pred == c) & (y == c)).sum()
            total[c] += (pred == c).sum() + (y == c).sum()
    model.train()
    return (2 * inter[1:] / total[1:].clamp_min(1)).tolist()
