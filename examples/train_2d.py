"""Train a small 2D U-Net with L=4 heads on synthetic phantoms under each supervision scheme
(last_layer, deep_supervision, mutation, lomix) for the same short budget on the CPU, and
compare held-out Dice per class.

    python examples/train_2d.py [--steps 300] [--out examples/out]

Writes ``train_2d_dice.png`` (Dice per class and scheme) and ``train_2d_weights.png`` (the
learned LoMix weights). Seeds are fixed: every scheme sees the same data and initial network.
"""
from __future__ import annotations

import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lomix_kernels as lk  # noqa: E402
from common import UNet, dice_per_class, example_parser, phantoms  # noqa: E402

SCHEMES = ("last_layer", "deep_supervision", "mutation", "lomix")


def train(scheme, data, args):
    images, labels = data["train"]
    torch.manual_seed(0)
    model = UNet(2, 1, args.classes, widths=(8, 16, 32, 64))
    crit = lk.LoMixLoss(4, args.classes, scheme=scheme)
    opt = torch.optim.AdamW(list(model.parameters()) + list(crit.parameters()), lr=args.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    losses, t0 = [], time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{scheme:>16}", leave=False, disable=not sys.stderr.isatty())
    for _ in bar:
        idx = torch.randint(0, len(images), (args.batch,), generator=g)
        loss = crit(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - t0
    dice = dice_per_class(model, *data["test"], args.classes)
    tail = losses[-10:]
    return {"dice": dice, "seconds": seconds, "first_loss": losses[0], "last_loss": sum(tail) / len(tail),
            "crit": crit}


def main():
    ap = example_parser(__doc__, steps=300, size=96)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    size = (args.size, args.size)
    data = {"train": phantoms(64, size, args.classes, seed=0), "test": phantoms(32, size, args.classes, seed=1)}
    results = {}
    for scheme in SCHEMES:
        results[scheme] = r = train(scheme, data, args)
        print(f"{scheme:>16}: loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, {r['seconds']:.0f} s, "
              f"held-out Dice per class " + " ".join(f"{d:.3f}" for d in r["dice"])
              + f" (mean {sum(r['dice']) / len(r['dice']):.3f})", flush=True)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(SCHEMES)
    ncls = args.classes - 1
    for k, scheme in enumerate(SCHEMES):
        ax.bar([c + k * width for c in range(ncls + 1)], results[scheme]["dice"] + [
            sum(results[scheme]["dice"]) / ncls], width, label=scheme)
    ax.set_xticks([c + 1.5 * width for c in range(ncls + 1)],
                  [f"class {c} ({s})" for c, s in zip(range(1, ncls + 1), ["large", "medium"] + ["small"] * ncls)]
                  + ["mean"])
    ax.set_ylabel("held-out Dice")
    ax.set_title(f"2D phantoms, {args.steps} steps per scheme, same seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "train_2d_dice.png"), dpi=110)
    lk.report.plot_weights(results["lomix"]["crit"], os.path.join(args.out, "train_2d_weights.png"))
    print(f"wrote {args.out}/train_2d_dice.png and train_2d_weights.png")


if __name__ == "__main__":
    main()
