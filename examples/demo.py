"""Print every LoMix map of the paper's Synapse setting (L=4, C=9, 224²) with its weight and loss."""
import time

import torch

import lomix_kernels as lk

torch.manual_seed(0)
B, C, L, H = 2, 9, 4, 224
crit = lk.LoMixLoss(num_stages=L, num_classes=C)  # scheme="lomix": 4 + 4·11 = 48 maps
# EMCAD-like heads at 1/32 .. 1/4 of the image, coarse -> fine; random (untrained) logits
logits = [torch.randn(B, C, H // 2 ** (5 - i), H // 2 ** (5 - i), requires_grad=True) for i in range(L)]
target = torch.randint(0, C, (B, H, H))

t0 = time.perf_counter()
loss = crit(logits, target)
loss.backward()
dt = time.perf_counter() - t0
terms = crit.last_terms
print(f"{len(crit.map_names)} maps (L={L}, C={C}, {H}x{H}, backend={crit.backend!r}); total loss {loss.item():.4f}, "
      f"forward+backward {dt * 1e3:.0f} ms")
print(f"{'map':<14}{'weight':>8}{'loss':>9}{'CE':>9}{'Dice':>8}")
for name, w, ell, ce, dice in zip(crit.map_names, terms["weight"], terms["ell"], terms["ce"], terms["dice"]):
    print(f"{name:<14}{w.item():>8.4f}{ell.item():>9.4f}{ce.item():>9.4f}{dice.item():>8.4f}")
