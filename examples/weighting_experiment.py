"""Do the learned map weights collapse? The 2D example's U-Net (L=4 heads, 2D phantoms) trained under
SGD with momentum (nnU-Net: lr 1e-2, momentum 0.99, Nesterov) and AdamW (the paper: lr 1e-4, weight
decay 1e-4 on every parameter, θ included) with each weighting of LoMix and with plain deep
supervision; the same data, seed and initial network for every run.

    python examples/weighting_experiment.py [--steps 300] [--out examples/out]

Records per step the mean and largest effective map weight, the network's gradient norm and the loss, and the
held-out mean foreground Dice every --eval-every steps. Writes ``weighting.png`` (one row per
optimizer: mean weight, gradient norm, Dice over steps) and ``weighting.md`` (the final values).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lomix_kernels as lk  # noqa: E402
from common import UNet, dice_per_class, example_parser, phantoms  # noqa: E402

RUNS = [("lomix", w) for w in lk.WEIGHTINGS] + [("deep_supervision", "fixed")]
OPTIMIZERS = {
    "SGD (lr 1e-2, momentum 0.99)": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True),
    "AdamW (lr 1e-4, wd 1e-4)": lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4),
}


def label(scheme, weighting):
    return "deep supervision" if scheme == "deep_supervision" else f"lomix {weighting}"


def train(scheme, weighting, make_opt, data, args):
    images, labels = data["train"]
    torch.manual_seed(0)
    model = UNet(2, 1, args.classes, widths=(8, 16, 32, 64))
    crit = lk.LoMixLoss(4, args.classes, scheme=scheme, weighting=weighting)
    opt = make_opt(list(model.parameters()) + list(crit.parameters()))
    g = torch.Generator().manual_seed(1)
    hist = {"mean_weight": [], "max_weight": [], "grad_norm": [], "loss": [], "dice_steps": [], "dice": []}
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(images), (args.batch,), generator=g)
        loss = crit(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
        hist["grad_norm"].append(float(torch.stack(grads).norm()))
        opt.step()
        w = crit.weights().detach()
        hist["mean_weight"].append(float(w.mean()))
        hist["max_weight"].append(float(w.max()))
        hist["loss"].append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            dice = dice_per_class(model, *data["test"], args.classes)
            hist["dice_steps"].append(step)
            hist["dice"].append(sum(dice) / len(dice))
    return hist


def plot(results, steps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(OPTIMIZERS), 3, figsize=(14, 4 * len(OPTIMIZERS)), squeeze=False)
    for row, opt_name in enumerate(OPTIMIZERS):
        for (scheme, weighting), hist in results[opt_name].items():
            name = label(scheme, weighting)
            axes[row, 0].plot(range(1, steps + 1), hist["mean_weight"], label=name)
            axes[row, 1].plot(range(1, steps + 1), hist["grad_norm"], label=name)
            axes[row, 2].plot(hist["dice_steps"], hist["dice"], marker="o", label=name)
        for col, (title, log) in enumerate([("mean map weight", True), ("network gradient norm", True),
                                            ("held-out mean Dice", False)]):
            ax = axes[row, col]
            ax.set_title(f"{opt_name}: {title}", fontsize=9)
            ax.set_xlabel("step")
            if log:
                ax.set_yscale("log")
        axes[row, 2].set_ylim(0, 1)
        axes[row, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(results) -> str:
    lines = ["| optimizer | supervision | mean weight: step 1 → last | largest weight (last) | network grad norm: "
             "first 10 → last 10 steps | held-out mean Dice (last) |", "|---|---|---|---|---|---|"]
    for opt_name, runs in results.items():
        for (scheme, weighting), h in runs.items():
            first, last = h["grad_norm"][:10], h["grad_norm"][-10:]
            g0, g1 = sum(first) / len(first), sum(last) / len(last)
            lines.append(f"| {opt_name} | {label(scheme, weighting)} | {h['mean_weight'][0]:.3g} → "
                         f"{h['mean_weight'][-1]:.3g} | {h['max_weight'][-1]:.3g} | {g0:.3g} → {g1:.3g} | "
                         f"{h['dice'][-1]:.3f} |")
    return "\n".join(lines)


def main():
    ap = example_parser(__doc__, steps=300, size=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=50)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    size = (args.size, args.size)
    data = {"train": phantoms(64, size, args.classes, seed=0), "test": phantoms(32, size, args.classes, seed=1)}
    results = {}
    for opt_name, make_opt in OPTIMIZERS.items():
        results[opt_name] = {}
        for scheme, weighting in RUNS:
            t0 = time.perf_counter()
            h = results[opt_name][(scheme, weighting)] = train(scheme, weighting, make_opt, data, args)
            print(f"{opt_name:30s} {label(scheme, weighting):22s} mean weight {h['mean_weight'][-1]:9.3g}  "
                  f"grad norm {h['grad_norm'][-1]:9.3g}  Dice {h['dice'][-1]:.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    text = table(results)
    print("\n" + text)
    with open(os.path.join(args.out, "weighting.md"), "w") as f:
        f.write(f"`python examples/weighting_experiment.py --steps {args.steps}`\n\n{text}\n")
    with open(os.path.join(args.out, "weighting.json"), "w") as f:
        json.dump({o: {label(*k): h for k, h in runs.items()} for o, runs in results.items()}, f)
    plot(results, args.steps, os.path.join(args.out, "weighting.png"))
    print(f"wrote {args.out}/weighting.png, weighting.md, weighting.json")


if __name__ == "__main__":
    main()
