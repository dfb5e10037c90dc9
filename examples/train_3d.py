"""Memory-limited 3D LoMix: a small 3D U-Net with L=4 native-resolution heads (12³ .. 96³) trained
on synthetic organ-like phantoms at 96³ patches on the CPU with ``LoMixLoss(backend="cpu")``.

    python examples/train_3d.py [--steps 40] [--out examples/out] [--device cuda]

With ``--device cuda`` the same run uses the Triton backend and CUDA memory counters.
Prints per-step time and the loss's own peak memory, then what the eager reference would need
(measured on a half-size patch and extrapolated by voxel count, since at 96³ it may not fit), and
saves the learned-weight plot (one bar per map, grouped by operator) and the weights-over-steps
plot as PNGs.
"""
from __future__ import annotations

import gc
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lomix_kernels as lk  # noqa: E402
from common import (UNet, example_parser, peak_rss_mb, phantoms, reset_peak_rss,  # noqa: E402
                    return_freed_memory_to_os)


def loss_peak_mb(crit, logits, target):
    """Peak memory growth (RSS on CPU, allocated CUDA memory on a GPU) of one loss forward+backward
    on detached copies of the heads."""
    heads = [z.detach().clone().requires_grad_() for z in logits]
    gc.collect()
    if target.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        crit(heads, target).backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    reset_peak_rss()
    base = peak_rss_mb()
    crit(heads, target).backward()
    return peak_rss_mb() - base


def synchronized_clock(x):
    """perf_counter after the device's queued work (CUDA runs asynchronously)."""
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def main():
    ap = example_parser(__doc__, steps=40, size=96)
    ap.add_argument("--backend", default=None, help="default: cpu on the CPU, triton on CUDA "
                    "(triton on the CPU needs TRITON_INTERPRET=1 and is slow: a smoke test)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    size = (args.size,) * 3
    images, labels = (t.to(args.device) for t in phantoms(4, size, args.classes, seed=0))
    torch.manual_seed(0)
    model = UNet(3, 1, args.classes, widths=(4, 8, 16, 32)).to(args.device)
    backend = args.backend or ("cpu" if args.device == "cpu" else "triton")
    crit = lk.LoMixLoss(4, args.classes, backend=backend).to(args.device)
    opt = torch.optim.AdamW(list(model.parameters()) + list(crit.parameters()), lr=args.lr, weight_decay=1e-4)
    history = lk.report.WeightHistory()
    print(f"3D LoMix: {len(crit.map_names)} maps, patch {size}, heads "
          + ", ".join("x".join(map(str, z.shape[2:])) for z in model(images[:1])))
    losses = []
    bar = tqdm(range(args.steps), desc="train", disable=not sys.stderr.isatty())
    for step in bar:
        x, y = images[step % len(images)][None], labels[step % len(labels)][None]
        t0 = time.perf_counter()
        logits = model(x)
        t1 = synchronized_clock(x)
        loss = crit(logits, y)
        loss.backward()  # through the loss and the network
        t2 = synchronized_clock(x)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.update(crit, step)
        losses.append(loss.item())
        msg = f"step {step:3d} loss {loss.item():8.4f}  network fwd {t1 - t0:5.2f} s, loss fwd + all bwd {t2 - t1:5.2f} s"
        bar.set_postfix(loss=f"{loss.item():.3f}")
        print(msg, flush=True)

    return_freed_memory_to_os()
    logits = [z.detach() for z in model(images[:1])]
    target = labels[:1]
    fused_mb = loss_peak_mb(crit, logits, target)
    native_mb = sum(z.numel() * z.element_size() for z in logits) / 2 ** 20
    print(f"fused loss ({backend}): peak extra memory {fused_mb:.1f} MB for native heads of {native_mb:.1f} MB "
          f"(+ their grads) and a {target.numel() * 8 / 2 ** 20:.1f} MB int64 target")
    half = [torch.nn.functional.interpolate(z, scale_factor=0.5, mode="trilinear") for z in logits]
    ref = lk.LoMixLoss(4, args.classes, backend="reference").to(args.device)
    ref.load_state_dict(crit.state_dict())
    ref_half = loss_peak_mb(ref, half, target[:, ::2, ::2, ::2].contiguous())
    print(f"eager reference: {ref_half:.0f} MB at {size[0] // 2}³, so ~{ref_half * 8 / 1024:.1f} GB at {size[0]}³ "
          f"for this B=1, C={args.classes} patch ({ref_half * 8 / max(fused_mb, 1e-3):.0f}x the fused loss); "
          f"it grows with B·C·M: see the benchmark's ct3d rows (B=2, C=14)")
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({'decreased' if losses[-1] < losses[0] else 'did not decrease'})")
    lk.report.plot_weights(crit, os.path.join(args.out, "train_3d_weights.png"))
    history.plot(os.path.join(args.out, "train_3d_weights_over_steps.png"))
    print(f"wrote {args.out}/train_3d_weights.png and train_3d_weights_over_steps.png")


if __name__ == "__main__":
    main()
