"""Glue for the frameworks users train with. Optional: never imported by the core package, each
module imports its framework at import time.

- :mod:`lomix_kernels.integrations.nnunet`: ``nnUNetTrainerLoMix`` for nnU-Net v2
  (``python -m lomix_kernels.integrations.nnunet install`` makes ``-tr nnUNetTrainerLoMix`` work);
- :mod:`lomix_kernels.integrations.monai`: ``LoMixDeepSupervisionLoss`` for MONAI's
  ``DynUNet(deep_supervision=True)``.
"""
