"""One optimizer step of a U-Net with realistic widths: the share of the step that the loss takes,
and the peak memory of the whole step, for the eager reference LoMix, the fused LoMix and plain
deep supervision (the L heads alone, reference backend).

    python benchmarks/train_step.py [--dims 2,3] [--out results/train_step.json]
    python benchmarks/train_step.py --smoke          # tiny CPU problem (Triton through the interpreter)

2D: B=6, C=9, 224², widths 32..256, L=4 heads at native resolution (1/8 .. 1/1).
3D: B=2, C=14, 96³, widths 32..256, L=4 heads at native resolution (1/8 .. 1/1).
SGD with momentum 0.99 (nnU-Net's optimizer) over the network's and the loss's parameters.
On CUDA, times are CUDA-event medians over the timed steps; memory is torch.cuda.max_memory_allocated
during one step minus what was allocated before it (network, optimizer state, batch). "loss" is one
forward+backward of the loss alone on detached copies of the heads, timed the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))
import lomix_kernels as lk  # noqa: E402
from common import UNet  # noqa: E402  (the examples' U-Net: one place for the network)
from lomix_kernels.bench import peak_extra_mb, timed  # noqa: E402

PROBLEMS = {  # dim: (B, C, spatial, widths)
    2: (6, 9, (224, 224), (32, 64, 128, 256)),
    3: (2, 14, (96, 96, 96), (32, 64, 128, 256)),
}
SMOKE = {2: (1, 3, (16, 16), (4, 8, 16)), 3: (1, 2, (8, 8, 8), (4, 8))}
LOSSES = {  # name: (scheme, backend) — "fused" is the backend auto picks (triton on CUDA, cpu on CPU)
    "lomix-fused": ("lomix", "fused"),
    "lomix-reference": ("lomix", "reference"),
    "deep_supervision": ("deep_supervision", "reference"),
}


def measure(dim: int, loss_name: str, *, smoke: bool, steps: int, device: str, fused_backend: str) -> dict:
    B, C, spatial, widths = (SMOKE if smoke else PROBLEMS)[dim]
    scheme, backend = LOSSES[loss_name]
    backend = fused_backend if backend == "fused" else backend
    torch.manual_seed(0)
    net = UNet(dim=dim, in_ch=1, num_classes=C, widths=widths).to(device)
    crit = lk.LoMixLoss(len(widths), C, scheme=scheme, backend=backend, validate=False).to(device)
    opt = torch.optim.SGD(list(net.parameters()) + list(crit.parameters()), lr=1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(B, 1, *spatial, device=device)
    y = torch.randint(0, C, (B, *spatial), device=device)
    cuda = device == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        crit(net(x), y).backward()
        opt.step()

    heads = [h.detach().requires_grad_() for h in net(x)]

    def loss_only():
        for h in heads:
            h.grad = None
        crit(heads, y).backward()

    step()  # warm-up: cudnn choices, Triton autotune, allocator
    loss_only()
    step_s = sorted(timed(step, cuda) for _ in range(steps))[steps // 2]
    loss_s = sorted(timed(loss_only, cuda) for _ in range(steps))[steps // 2]
    row = {"dim": dim, "loss": loss_name, "backend": backend, "B": B, "C": C, "spatial": spatial,
           "widths": widths, "maps": len(crit.map_names), "step_ms": step_s * 1e3, "loss_ms": loss_s * 1e3,
           "loss_share": loss_s / step_s}
    if cuda:
        del heads
        opt.zero_grad(set_to_none=True)
        row["step_peak_mb"] = peak_extra_mb(step, cuda)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="2,3")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU problem, Triton through the interpreter")
    ap.add_argument("--out", default=str(HERE / "results" / "train_step.json"))
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when lomix_kernels first imports triton
    fused = "triton" if cuda or args.smoke else "cpu"
    rows = []
    for dim in (int(d) for d in args.dims.split(",")):
        for name in args.losses.split(","):
            try:
                row = measure(dim, name, smoke=args.smoke, steps=args.steps, device=device, fused_backend=fused)
            except torch.cuda.OutOfMemoryError as exc:
                row = {"dim": dim, "loss": name, "error": f"out of memory: {str(exc)[:160]}"}
            if cuda:
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # after every row: a cut-short run keeps them
            Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu",
                                                  "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
