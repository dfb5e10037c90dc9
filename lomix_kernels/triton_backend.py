"""The Triton backend (SPEC §1, issue 4).

Not implemented yet: selecting it raises a clear error, and ``backend="auto"`` on CUDA tensors
falls back to the reference backend until it lands.
"""
from __future__ import annotations

from torch import Tensor


def is_implemented() -> bool:
    return False


def check_usable(logits: Tensor) -> None:
    """Raise a RuntimeError saying why backend='triton' cannot run these logits."""
    raise RuntimeError("backend='triton' is not implemented yet in this version of lomix_kernels; "
                       "use backend='reference' (CUDA or CPU) or backend='cpu' (CPU tensors)")
