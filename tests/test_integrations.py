"""lomix_kernels.integrations end to end with the real frameworks (installed by `make setup` from
requirements-integrations.txt): nnU-Net v2 — plan, preprocess, train, validate, reload, predict — and
MONAI's DynUNet training with the LoMix deep-supervision loss."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

nnunetv2 = pytest.importorskip("nnunetv2", reason="nnU-Net v2 is not installed (pip install -r requirements-integrations.txt)")
monai = pytest.importorskip("monai", reason="MONAI is not installed (pip install -r requirements-integrations.txt)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import nnunet_step as tiny  # noqa: E402  (the tiny dataset: one place for it)

import lomix_kernels as lk  # noqa: E402
from lomix_kernels.integrations import nnunet as lk_nnunet  # noqa: E402
from lomix_kernels.integrations.monai import LoMixDeepSupervisionLoss, dynunet_heads  # noqa: E402

BIN = Path(sys.executable).parent
TRAINER = "nnUNetTrainerLoMix_smoke"


@pytest.fixture(scope="module")
def trainers_installed():
    """The LoMix trainers registered with nnU-Net (`... nnunet install`), removed afterwards unless they
    were there before."""
    had_shim = lk_nnunet.shim_path().exists()
    subprocess.run([sys.executable, "-m", "lomix_kernels.integrations.nnunet", "install"], check=True)
    yield
    if not had_shim:
        subprocess.run([sys.executable, "-m", "lomix_kernels.integrations.nnunet", "uninstall"], check=True)


@pytest.fixture(scope="module")
def nnunet_dataset(tmp_path_factory, trainers_installed):
    """A planned and preprocessed tiny 3D dataset."""
    root = tmp_path_factory.mktemp("nnunet")
    env = tiny.nnunet_env(root)
    env["nnUNet_n_proc_DA"] = "1"
    tiny.write_tiny_dataset(root)
    tiny.plan_and_preprocess(env)
    env["nnUNet_n_proc_DA"] = "0"
    return root, env


def _run(cmd, env, timeout=600):
    p = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _trainer(env, monkeypatch, name=TRAINER):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, env[key])
    import importlib

    import nnunetv2.paths

    importlib.reload(nnunetv2.paths)  # it reads the folders at import
    from nnunetv2.run import run_training

    monkeypatch.setattr(run_training, "nnUNet_preprocessed", env["nnUNet_preprocessed"])
    return run_training.get_trainer_from_args(str(tiny.DATASET_ID), "3d_fullres", 0, name, device=torch.device("cpu"))


def test_nnunet_train_validate_reload_predict(nnunet_dataset, tmp_path, monkeypatch):
    root, env = nnunet_dataset
    out = _run([BIN / "nnUNetv2_train", tiny.DATASET_ID, "3d_fullres", 0, "-tr", TRAINER, "-device", "cpu"], env)
    assert "Training done" in out
    fold = root / "results" / tiny.DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"} and 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "LoMix loss: the finest 3 of 3 deep-supervision outputs, 19 maps" in log

    # The checkpoint carries the loss's state, trained away from its initial values, and a new trainer
    # restores it (what resume and --val do).
    state = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["lomix_loss_state"]
    trainer = _trainer(env, monkeypatch)
    trainer.initialize()
    fresh = {k: v.clone() for k, v in trainer.loss.state_dict().items()}
    assert any(not torch.equal(fresh[k], state[k]) for k in state), "the mixing parameters did not train"
    trainer.load_checkpoint(str(fold / "checkpoint_final.pth"))
    for k, v in trainer.loss.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the loss's parameters are in the optimizer, in their own group without weight decay
    mixing = {id(p) for p in trainer.loss.parameters() if p.requires_grad}
    groups = [g for g in trainer.optimizer.param_groups if {id(p) for p in g["params"]} == mixing]
    assert mixing and len(groups) == 1 and groups[0]["weight_decay"] == 0.0

    # --val (validation only, from the final checkpoint) goes through the trainer's load_checkpoint
    _run([BIN / "nnUNetv2_train", tiny.DATASET_ID, "3d_fullres", 0, "-tr", TRAINER, "-device", "cpu", "--val"], env)

    # prediction of a new image needs nothing from the loss
    new = tmp_path / "new"
    new.mkdir()
    import SimpleITK as sitk

    img, lab = tiny.sphere_case(np.random.default_rng(7), 48)
    sitk.WriteImage(sitk.GetImageFromArray(img), str(new / "case_0000.nii.gz"))
    _run([BIN / "nnUNetv2_predict", "-i", new, "-o", tmp_path / "pred", "-d", tiny.DATASET_ID, "-c", "3d_fullres",
          "-f", 0, "-tr", TRAINER, "-chk", "checkpoint_final.pth", "-device", "cpu", "--disable_tta",
          "-npp", 1, "-nps", 1], env)
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pred" / "case.nii.gz")))
    assert pred.shape == lab.shape and set(np.unique(pred)) <= {0, 1, 2}


def test_nnunet_region_plan_with_ignore_label_trains(tmp_path, monkeypatch, trainers_installed):
    """A region-based plan (overlapping regions, sigmoid) with an ignore label, through nnU-Net's own data
    pipeline: the trainer's loss is LoMix in sigmoid mode with the ignore channel as pixel weight."""
    env = tiny.nnunet_env(tmp_path)
    env["nnUNet_n_proc_DA"] = "1"
    tiny.write_tiny_dataset(tmp_path, regions=True)
    tiny.plan_and_preprocess(env)
    env["nnUNet_n_proc_DA"] = "0"
    _run([BIN / "nnUNetv2_train", tiny.DATASET_ID, "3d_fullres", 0, "-tr", TRAINER, "-device", "cpu"], env)
    fold = tmp_path / "results" / tiny.DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert len(summary["mean"]) == 2  # the two regions
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "train_loss" in log and "nan" not in log.split("train_loss")[1].split("\n")[0]
    trainer = _trainer(env, monkeypatch)
    trainer.initialize()
    lomix = trainer.loss.lomix
    assert trainer.loss.regions and trainer.loss.has_ignore and lomix.options().activation == "sigmoid"
    assert lomix.num_classes == 2 and lomix.options().include_background


def test_nnunet_loss_ignore_label_and_regions():
    """The trainer's loss wrapper: heads fine -> coarse in, the finest k mixed coarse -> fine; an ignore
    label (softmax) or ignore channel (regions, sigmoid) removes those voxels from the loss."""
    torch.manual_seed(0)
    heads = [torch.randn(2, 3, 16, 16, requires_grad=True), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4),
             torch.randn(2, 3, 2, 2)]
    labels = lk.LoMixLoss(3, 3, weighting="fixed", ignore_index=3, backend="reference")
    wrapped = lk_nnunet.NnUNetLoMixLoss(labels, regions=False, has_ignore=True, add_unused_heads=True)
    y = torch.randint(0, 3, (2, 1, 16, 16))
    y[:, :, :4] = 3
    direct = labels([heads[2], heads[1], heads[0]], y[:, 0])
    assert torch.allclose(wrapped(heads, y), direct) and torch.allclose(wrapped(heads, [y]), direct)
    moved = [heads[0].detach().clone(), *heads[1:]]
    moved[0][:, :, :4] += 5.0  # logits of ignored voxels do not matter
    assert torch.allclose(wrapped(moved, y), direct)
    wrapped(heads, y).backward()  # the unused coarsest head is in the graph (zero weight): DDP-safe
    assert heads[0].grad[:, :, :4].abs().max() == 0

    regions = lk.LoMixLoss(2, 2, weighting="fixed", activation="sigmoid", include_background=True,
                           backend="reference")
    wrapped = lk_nnunet.NnUNetLoMixLoss(regions, regions=True, has_ignore=True, add_unused_heads=False)
    two = [h[:, :2] for h in heads[:2]]  # two region channels, fine -> coarse
    target = torch.rand(2, 3, 16, 16) > 0.5  # two regions + the ignore channel, as bool
    a = wrapped(two, target)
    assert torch.allclose(a, regions(two[::-1], target[:, :2].float(), 1.0 - target[:, 2].float()))
    flipped = target.clone()
    flipped[:, :2] ^= target[:, 2:3]  # change the regions where ignored only
    assert torch.allclose(wrapped(two, flipped), a)
    flipped[:, :2] = ~flipped[:, :2]  # ... and everywhere: the loss changes
    assert not torch.allclose(wrapped(two, flipped), a)
    with pytest.raises(ValueError, match="deep-supervision outputs"):
        wrapped(two[:1], target)


def test_nnunet_install_is_idempotent_and_reversible(tmp_path, monkeypatch):
    path = tmp_path / "nnUNetTrainerLoMix.py"
    monkeypatch.setattr(lk_nnunet, "shim_path", lambda: path)
    assert lk_nnunet.main(["install"]) == 0 and lk_nnunet.main(["install"]) == 0
    namespace = {}
    exec(path.read_text(), namespace)  # the module nnU-Net's lookup imports
    assert all(namespace[n].__name__ == n for n in lk_nnunet.TRAINERS)
    assert lk_nnunet.main(["uninstall"]) == 0 and not path.exists()
    path.write_text("# someone else's trainer\n")
    assert lk_nnunet.main(["uninstall"]) == 1 and path.exists()  # never removes what it did not write


def _dynunet():
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    return DynUNet(3, 1, 3, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2],
                   filters=[8, 16, 32, 64], deep_supervision=True, deep_supr_num=2)


def _blobs(n=2, size=24):
    rng = np.random.default_rng(1)
    cases = [tiny.sphere_case(rng, size) for _ in range(n)]
    x = torch.tensor(np.stack([c[0] for c in cases]))[:, None]
    y = torch.tensor(np.stack([c[1] for c in cases]).astype(np.int64))[:, None]
    return x, y


def test_monai_dynunet_native_heads_and_stacked_output():
    net = _dynunet()
    x, y = _blobs()
    out = net(x)
    heads = dynunet_heads(net, out)
    assert [tuple(h.shape[2:]) for h in heads] == [(6, 6, 6), (12, 12, 12), (24, 24, 24)]
    assert torch.equal(heads[-1], out[:, 0])
    native = LoMixDeepSupervisionLoss(3, network=net, to_onehot_y=True, softmax=True, backend="reference")
    assert native.num_stages == 3 and not list(native.lomix.parameters()) == list(net.parameters())
    assert all(id(p) not in {id(q) for q in native.parameters()} for p in net.parameters())
    direct = native.lomix(heads, y[:, 0])
    assert torch.allclose(native(out, y), direct)
    stacked = LoMixDeepSupervisionLoss(3, 3, to_onehot_y=True, softmax=True, backend="reference")
    stacked.load_state_dict(native.state_dict())
    slices = [out[:, 2], out[:, 1], out[:, 0]]  # nearest-upsampled copies, coarse -> fine
    assert torch.allclose(stacked(out, y), stacked.lomix(slices, y[:, 0]))
    onehot = torch.nn.functional.one_hot(y[:, 0], 3).movedim(-1, 1).float()
    soft = LoMixDeepSupervisionLoss(3, network=net, softmax=True, backend="reference")
    soft.load_state_dict(native.state_dict())
    assert torch.allclose(soft(out, onehot), direct, rtol=1e-5)
    with pytest.raises(ValueError, match="exactly one of sigmoid"):
        LoMixDeepSupervisionLoss(3, 3)
    with pytest.raises(TypeError, match="DynUNet"):
        LoMixDeepSupervisionLoss(3, network=torch.nn.Conv3d(1, 3, 1), softmax=True)
    with pytest.raises(ValueError, match="num_stages"):
        LoMixDeepSupervisionLoss(3, 4, softmax=True, to_onehot_y=True)(out, y)


def test_monai_supervised_trainer_loss_decreases():
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    net = _dynunet()
    x, y = _blobs()
    loss_fn = LoMixDeepSupervisionLoss(3, network=net, to_onehot_y=True, softmax=True, weighting="fixed")
    opt = torch.optim.Adam(list(net.parameters()) + list(loss_fn.parameters()), 3e-3)
    data = [{"image": x, "label": y}] * 12
    losses = []
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                                optimizer=opt, loss_function=loss_fn, decollate=False)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output["loss"].item()))
    trainer.run()
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


class _Heads(torch.nn.Module):
    """A tiny 3D net with nnU-Net's deep-supervision output: 4 heads, fine -> coarse."""

    def __init__(self, C=3):
        super().__init__()
        self.stem = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.heads = torch.nn.ModuleList(torch.nn.Conv3d(4, C, 1) for _ in range(4))

    def forward(self, x):
        f = torch.relu(self.stem(x))
        return [h(torch.nn.functional.avg_pool3d(f, 2 ** i) if i else f) for i, h in enumerate(self.heads)]


def _lomix_step(rank, world, batch):
    """nnUNetTrainerLoMix.train_step on a stand-in trainer (what the step reads of it); the gradients."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    net = _Heads()
    loss = lk_nnunet.NnUNetLoMixLoss(lk.LoMixLoss(3, 3, weighting="fixed", sync_stats=world > 1, backend="cpu"),
                                     regions=False, has_ignore=False, add_unused_heads=world > 1)
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net)  # CPU module: no device_ids
    opt = torch.optim.SGD([*net.parameters(), *loss.parameters()], lr=0.0)
    fake = SimpleNamespace(device=torch.device("cpu"), network=net, optimizer=opt, loss=loss, _lomix_loss=loss,
                           is_ddp=world > 1, grad_scaler=None)
    value = lk_nnunet.nnUNetTrainerLoMix.train_step(fake, batch)["loss"]
    module = net.module if world > 1 else net
    grads = lambda ps: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in ps]  # noqa: E731
    return float(value), grads(module.parameters()), grads(loss.parameters())


def _ddp_step_worker(rank, world, port, path):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        x, y = _blobs(4, 8)
        half = {"data": x[2 * rank:2 * rank + 2], "target": y[2 * rank:2 * rank + 2]}
        torch.save(_lomix_step(rank, world, half), f"{path}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # gloo threads can abort at interpreter teardown after the work is saved


def test_nnunet_train_step_under_ddp_equals_one_process(tmp_path):
    """Two gloo ranks with half the batch each: the synced loss, the network's gradients (DDP-averaged) and
    the mixing parameters' gradients (all-reduced by the trainer) equal one process on the whole batch —
    and DDP does not stop on the head the loss leaves out."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_step_worker, args=(2, port, str(tmp_path / "r")), nprocs=2, join=True)
    x, y = _blobs(4, 8)
    loss, net_grads, mix_grads = _lomix_step(0, 1, {"data": x, "target": y})
    for rank in range(2):
        r_loss, r_net, r_mix = torch.load(f"{tmp_path / 'r'}.{rank}")
        assert abs(r_loss - loss) < 1e-5 * abs(loss)
        assert len(r_mix) == len(mix_grads) > 0 and r_net[-1].abs().sum() == 0  # the unused head: zero
        for a, b in zip(r_net + r_mix, net_grads + mix_grads):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()
