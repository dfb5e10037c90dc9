"""LoMix inside nnU-Net v2: ``nnUNetv2_train DATASET CONFIG FOLD -tr nnUNetTrainerLoMix``.

Make the trainer visible to nnU-Net once (nnU-Net looks up ``-tr`` classes only inside its own
package; this writes one two-line module there, and ``uninstall`` removes it)::

    python -m lomix_kernels.integrations.nnunet install

What changes against ``nnUNetTrainer`` (everything else — data, augmentation, network, schedule,
inference — is nnU-Net's own):

- Loss: the decoder's deep-supervision outputs (nnU-Net gives them fine -> coarse, each at its
  native resolution) go to :class:`lomix_kernels.LoMixLoss` coarse -> fine; the finest
  ``lomix_num_heads`` of them (default 4, as in the paper) are mixed, against the full-resolution
  target only: nnU-Net's downsampled targets (one per head, built by the data augmentation every
  iteration) are not built at all. The per-map loss is nnU-Net's: CE + soft Dice with weights 1/1,
  its ``batch_dice``, background excluded (softmax) or included (regions), smooth 1e-5, with LoMix's
  map weights fixed at 1/M (``weighting="fixed"``: learned softplus weights collapse under SGD with
  momentum 0.99 — see the README's "Map weightings"), so the total has the scale of nnU-Net's
  normalized deep-supervision weights.
- Labels: nnU-Net's ignore label -> ``ignore_index``; region-based plans -> sigmoid mode with the
  regions as a float multi-label target and ``pixel_weight = 1 - ignore channel``.
- Optimizer: the loss's mixing parameters (1x1-conv "cat" weights, attention "awf" weights) join
  nnU-Net's SGD as their own parameter group with nnU-Net's learning rate (its poly schedule sets
  every group to one rate) and no weight decay (decay would pull the mixing weights towards 0,
  i.e. towards dropping the cat/awf maps, which is not a regularizer of the network).
- Checkpoints carry the loss's state (``lomix_loss_state``); resume and ``--val`` restore it.
- DDP: ``sync_stats=True`` (the Dice sums are global, so every rank's loss is the whole batch's),
  the loss is scaled by the world size before backward and the mixing parameters' gradients are
  all-reduced, so every parameter gets the single-process gradient; heads the loss leaves out get
  a zero-weight term (DDP would otherwise stop on unused parameters).
- AMP (CUDA autocast) and ``nnUNet_compile`` (the network is compiled, the loss is not) work
  unchanged; inference needs nothing from this library (the checkpoint's network is nnU-Net's).

Variants: ``nnUNetTrainerLoMix_5epochs`` (a quick run) and ``nnUNetTrainerLoMix_smoke`` (one epoch
of two iterations: checks a set-up end to end in a minute).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch import distributed as dist

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..module import LoMixLoss

MAX_STAGES = 6  # the fused backends' stage limit (and 109+ maps beyond 5 stages)


class NnUNetLoMixLoss(torch.nn.Module):
    """``loss(outputs, target)`` for nnU-Net's training loop.

    outputs: the network's deep-supervision list, fine -> coarse, (B, C, *spatial_i) at native
        resolutions (or one tensor when deep supervision is off: then plain CE + Dice on it).
    target: (B, 1, *spatial) integer labels, or (B, R[+1], *spatial) regions (bool/float; the last
        channel the ignore mask when ``has_ignore``); a one-element list of it is accepted too.
    """

    def __init__(self, lomix: LoMixLoss, regions: bool, has_ignore: bool, add_unused_heads: bool):
        super().__init__()
        self.lomix, self.regions, self.has_ignore = lomix, regions, has_ignore
        self.add_unused_heads = add_unused_heads

    def forward(self, outputs, target):
        if isinstance(target, (list, tuple)):
            target = target[0]
        heads = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        k = self.lomix.num_stages
        if len(heads) < k:
            raise ValueError(f"the network gave {len(heads)} deep-supervision outputs; the LoMix loss mixes {k} "
                             "(lomix_num_heads): lower it or enable deep supervision")
        used = heads[:k][::-1]  # the finest k, coarse -> fine
        if self.regions:
            if self.has_ignore:
                weight = 1.0 - target[:, -1].float()
                target = target[:, :-1]
            else:
                weight = None
            total = self.lomix(used, target.float(), weight)
        else:
            total = self.lomix(used, target[:, 0].long())
        if self.add_unused_heads and len(heads) > k:  # DDP: every parameter must receive a gradient
            total = total + sum(h.sum() for h in heads[k:]) * 0.0
        return total


class nnUNetTrainerLoMix(nnUNetTrainer):
    """nnU-Net's trainer with the LoMix loss (module docstring: what changes and why)."""

    lomix_num_heads = 4  # mix the finest K deep-supervision outputs; None: all (up to MAX_STAGES)
    lomix_scheme = "lomix"
    lomix_backend = "auto"  # triton on CUDA, the fused C++ kernels on CPU

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._lomix_loss = None

    # --- the loss -------------------------------------------------------------------------------
    def _num_heads_available(self) -> int:
        return len(self.configuration_manager.pool_op_kernel_sizes) - 1  # the decoder's outputs with DS

    def _num_heads(self) -> int:
        available = self._num_heads_available()
        want = available if self.lomix_num_heads is None else self.lomix_num_heads
        k = min(want, available, MAX_STAGES)
        if k < 2:
            raise ValueError(f"LoMix needs at least 2 deep-supervision outputs; this configuration has {available}")
        return k

    def _build_loss(self):
        if self._lomix_loss is None:  # configure_optimizers (which needs its parameters) runs first
            lm = self.label_manager
            regions = lm.has_regions
            lomix = LoMixLoss(
                self._num_heads(), lm.num_segmentation_heads, scheme=self.lomix_scheme, weighting="fixed",
                ce_weight=1.0, dice_weight=1.0, dice_squared=False, dice_batch=self.configuration_manager.batch_dice,
                include_background=regions, smooth_nr=1e-5, smooth_dr=1e-5,
                ignore_index=None if regions else lm.ignore_label, activation="sigmoid" if regions else "softmax",
                sync_stats=self.is_ddp, backend=self.lomix_backend, validate=False)
            with torch.no_grad():
                lomix.theta.fill_(1.0 / len(lomix.maps))  # Σ w = 1, like nnU-Net's normalized DS weights
            self._lomix_loss = NnUNetLoMixLoss(lomix, regions, lm.has_ignore_label, self.is_ddp).to(self.device)
            self.print_to_log_file(f"LoMix loss: the finest {lomix.num_stages} of {self._num_heads_available()} "
                                   f"deep-supervision outputs, {len(lomix.maps)} maps, backend {lomix.backend}")
        return self._lomix_loss

    def _get_deep_supervision_scales(self):
        return None  # no downsampled targets: the loss reads the full-resolution one only

    def configure_optimizers(self):
        optimizer, lr_scheduler = super().configure_optimizers()
        mixing = [p for p in self._build_loss().parameters() if p.requires_grad]
        if mixing:
            optimizer.add_param_group({"params": mixing, "weight_decay": 0.0})
        return optimizer, lr_scheduler

    # --- the steps ----------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        from torch import autocast
        from nnunetv2.utilities.helpers import dummy_context

        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = (target[0] if isinstance(target, list) else target).to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            loss = self.loss(output, target)
        world = dist.get_world_size() if self.is_ddp else 1
        scaled = loss * world  # DDP averages the network's gradients; the synced loss gives each rank its share
        if self.grad_scaler is not None:
            self.grad_scaler.scale(scaled).backward()
        else:
            scaled.backward()
        if self.is_ddp:
            for p in self._lomix_loss.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        target = batch["target"]
        return super().validation_step(dict(batch, target=target if isinstance(target, list) else [target]))

    # --- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing and os.path.isfile(filename):
            checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
            checkpoint["lomix_loss_state"] = self._build_loss().state_dict()
            torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, dict):  # nnU-Net's own loader takes a path only
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "checkpoint.pth")
                torch.save(filename_or_checkpoint, path)
                return self.load_checkpoint(path)
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        if "lomix_loss_state" in checkpoint:
            self._build_loss().load_state_dict(checkpoint["lomix_loss_state"])
        else:
            self.print_to_log_file("checkpoint has no LoMix loss state (not written by this trainer): "
                                   "the mixing parameters start from their initial values")


class nnUNetTrainerLoMix_5epochs(nnUNetTrainerLoMix):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class nnUNetTrainerLoMix_smoke(nnUNetTrainerLoMix):
    """One epoch of two training and one validation iterations, no mirroring (so the final validation
    runs one pass per window, not 8): a set-up check in about a minute on a CPU, not a model."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 2, 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


TRAINERS = ("nnUNetTrainerLoMix", "nnUNetTrainerLoMix_5epochs", "nnUNetTrainerLoMix_smoke")
SHIM = f"""# Written by `python -m lomix_kernels.integrations.nnunet install` so that nnU-Net's `-tr` lookup
# finds the LoMix trainers; `python -m lomix_kernels.integrations.nnunet uninstall` removes it.
from lomix_kernels.integrations.nnunet import {", ".join(TRAINERS)}  # noqa: F401
"""


def shim_path() -> Path:
    """Where ``install`` writes the trainer module: nnU-Net's own trainer folder (searched first)."""
    import nnunetv2.training.nnUNetTrainer as trainers

    return Path(trainers.__path__[0]) / "nnUNetTrainerLoMix.py"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lomix_kernels.integrations.nnunet",
                                 description="Make nnU-Net v2 find the LoMix trainers (-tr nnUNetTrainerLoMix).")
    ap.add_argument("action", choices=("install", "uninstall", "where"))
    args = ap.parse_args(argv)
    path = shim_path()
    if args.action == "where":
        print(path if path.exists() else f"not installed (would be {path})")
    elif args.action == "install":
        path.write_text(SHIM)
        print(f"wrote {path}: nnUNetv2_train ... -tr {' | '.join(TRAINERS)}")
    else:
        if path.exists():
            if "lomix_kernels.integrations.nnunet install" not in path.read_text():
                print(f"{path} was not written by this command: left in place", file=sys.stderr)
                return 1
            path.unlink()
            print(f"removed {path}")
        else:
            print(f"nothing to remove ({path} does not exist)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
