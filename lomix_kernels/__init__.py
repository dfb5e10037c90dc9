"""lomix_kernels: fused one-pass kernels for LoMix multi-scale logits-mixing supervision.

    import lomix_kernels as lk
    crit = lk.LoMixLoss(num_stages=4, num_classes=9)        # 48 maps, learned softplus weights
    loss = crit(logits, target)                              # logits: 4 tensors, coarse -> fine
"""
from . import report, spec
from .finish import WEIGHTINGS, LossOptions, LossTerms, MapStats, finish
from .functional import lomix_loss
from .module import LoMixLoss
from .spec import build_maps, num_maps, subsets

__all__ = ["LoMixLoss", "lomix_loss", "WEIGHTINGS", "spec", "report", "subsets", "num_maps", "build_maps", "finish", "MapStats",
           "LossTerms", "LossOptions"]
__version__ = "0.1.0"
