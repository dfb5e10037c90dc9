"""nnU-Net v2 with LoMix vs its default deep supervision, side by side on a tiny synthetic 3D dataset.

    python benchmarks/nnunet_step.py [--iters 6] [--out benchmarks/results/nnunet_step.json]

Writes the dataset in nnU-Net's raw format (spheres split in two labels, 48³, 6 cases), plans and
preprocesses it (3d_fullres), then for ``nnUNetTrainer`` and ``nnUNetTrainerLoMix`` — each in a fresh
process, on CPU, batches from the trainer's own data loader — times the data loading and
``train_step`` of each iteration (median after one warm-up) and reads the process's peak RSS.
Needs nnU-Net (README, "nnU-Net v2"). tests/test_integrations.py uses the dataset helpers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASET_ID, DATASET = 999, "Dataset999_LoMixTiny"
LABELS = {"background": 0, "left": 1, "right": 2}


def nnunet_env(root: Path, base=None) -> dict:
    """The environment nnU-Net reads its folders (and CPU-friendly settings) from."""
    env = dict(os.environ if base is None else base)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"), nnUNet_compile="f")
    return env


def sphere_case(rng, size: int):
    """(image, labels) (size³ float32, uint8): a noisy ball whose two halves are labels 1 and 2."""
    import numpy as np

    z, y, x = np.mgrid[:size, :size, :size]
    c = rng.uniform(0.3 * size, 0.7 * size, 3)
    r = rng.uniform(0.12 * size, 0.22 * size)
    lab = (((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < r * r).astype(np.uint8)
    lab[(lab == 1) & (x > c[2])] = 2
    return (lab + rng.normal(0, 0.3, lab.shape)).astype(np.float32), lab


def write_tiny_dataset(root: Path, cases: int = 6, size: int = 48, seed: int = 0, regions: bool = False) -> Path:
    """nnU-Net raw dataset (imagesTr, labelsTr, dataset.json) under root/raw; returns its folder. With
    ``regions``: a region-based plan (the whole ball, its right half) and an ignore label on a slab."""
    import numpy as np
    import SimpleITK as sitk

    ds = root / "raw" / DATASET
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(cases):
        img, lab = sphere_case(rng, size)
        if regions:
            lab[:, :, :4] = 3  # the ignore label
        sitk.WriteImage(sitk.GetImageFromArray(img), str(ds / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(ds / "labelsTr" / f"tiny_{i:03d}.nii.gz"))
    meta = {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": cases, "file_ending": ".nii.gz"}
    if regions:
        meta.update(labels={"background": 0, "whole": [1, 2], "right": 2, "ignore": 3}, regions_class_order=[1, 2])
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


def plan_and_preprocess(env: dict) -> None:
    subprocess.run([Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c",
                    "3d_fullres", "-np", "1", "-npfp", "1"], env=env, check=True, capture_output=True, text=True)


def worker(trainer_name: str, iters: int) -> dict:
    """One trainer in this process: (median data-loading ms, median train_step ms, peak RSS MB)."""
    import torch

    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, trainer_name, device=torch.device("cpu"))
    trainer.initialize()
    loader, _ = trainer.get_dataloaders()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load_ms, step_ms = [], []
    for _ in range(iters + 1):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        trainer.train_step(batch)
        t2 = time.perf_counter()
        load_ms.append((t1 - t0) * 1e3)
        step_ms.append((t2 - t1) * 1e3)
    med = lambda v: sorted(v[1:])[len(v[1:]) // 2]  # noqa: E731 - after one warm-up
    maps = len(trainer.loss.lomix.maps) if hasattr(trainer.loss, "lomix") else len(trainer.loss.weight_factors)
    return {"trainer": trainer_name, "maps": maps, "load_ms": med(load_ms), "step_ms": med(step_ms),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": base,
            "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--root", default="/tmp/lomix-nnunet-bench")
    ap.add_argument("--out", default=str(HERE / "results" / "nnunet_step.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.iters)))
        return
    root = Path(args.root)
    env = nnunet_env(root)
    env["nnUNet_n_proc_DA"] = "1"  # the planner needs >= 1
    if not (root / "preprocessed" / DATASET).exists():
        write_tiny_dataset(root)
        plan_and_preprocess(env)
    subprocess.run([sys.executable, "-m", "lomix_kernels.integrations.nnunet", "install"], check=True)
    env["nnUNet_n_proc_DA"] = "0"  # batches in this process: the timing is of this process alone
    rows = []
    for name in ("nnUNetTrainer", "nnUNetTrainerLoMix"):
        p = subprocess.run([sys.executable, __file__, "--worker", name, "--iters", str(args.iters)], env=env,
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{name:22s} maps {r['maps']:3d}  data {r['load_ms']:7.1f} ms  step {r['step_ms']:7.1f} ms  "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dataset": "48³ × 6 cases, 3 labels, 3d_fullres", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
