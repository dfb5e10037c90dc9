"""Smoke test of an installed lomix_kernels wheel, run from outside the source tree (make test-wheel):
it imports, picks a CPU variant, matches the reference on one problem, and benchmarks one."""
import os
import subprocess
import sys

import torch

import lomix_kernels as lk

here = os.path.dirname(os.path.abspath(lk.__file__))
assert "site-packages" in here, f"imported from {here}, not from the installed wheel"
assert lk.cpu.available(), lk.cpu.unavailable_reason()
integrations = os.path.join(here, "integrations")  # shipped, though only importable with the frameworks
assert all(os.path.isfile(os.path.join(integrations, f)) for f in ("__init__.py", "nnunet.py", "monai.py")), \
    os.listdir(here)
torch.manual_seed(0)
crit = lk.LoMixLoss(3, 4, backend="cpu")
ref = lk.LoMixLoss(3, 4, backend="reference").double()
ref.load_state_dict(crit.state_dict())
logits = [torch.randn(2, 4, s, s, requires_grad=True) for s in (4, 8, 16)]
target = torch.randint(0, 4, (2, 16, 16))
loss = crit(logits, target)
expected = ref([z.detach().double() for z in logits], target)
loss.backward()
loss, expected = float(loss.detach()), float(expected)
assert abs(loss - expected) < 1e-5 * abs(expected), (loss, expected)
assert all(z.grad is not None and torch.isfinite(z.grad).all() for z in logits)
print(f"wheel ok: {here}, cpu variant {lk.cpu.variant()}, loss {loss:.6f} (reference {expected:.6f})")
subprocess.run([sys.executable, "-m", "lomix_kernels.bench", "--quick"], check=True)
