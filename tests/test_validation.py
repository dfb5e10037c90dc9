"""Every bad input raises a clear ValueError/TypeError naming the argument, on every backend that
runs on CPU tensors here (triton through the interpreter)."""
import pytest
import torch

import lomix_kernels as lk

from conftest import make_logits, make_target, triton_available

L, C, B, SP = 3, 4, 2, (8, 8)
BACKENDS = ["reference", "cpu"] + (["triton"] if triton_available() else [])


@pytest.fixture(params=BACKENDS)
def crit(request):
    return lk.LoMixLoss(L, C, backend=request.param)


def good():
    return make_logits(L, C, B, SP, native=True, requires_grad=False), make_target(C, B, SP)


def test_good_inputs_work(crit):
    logits, target = good()
    assert torch.isfinite(crit(logits, target))


def test_wrong_number_of_stages(crit):
    logits, target = good()
    with pytest.raises(ValueError, match="num_stages=3"):
        crit(logits[:2], target)


def test_logits_not_a_list(crit):
    logits, target = good()
    with pytest.raises(TypeError, match="list or tuple"):
        crit(logits[0], target)


def test_mismatched_batch_and_channels(crit):
    logits, target = good()
    with pytest.raises(ValueError, match="batch size"):
        crit([logits[0], logits[1][:1], logits[2]], target)
    with pytest.raises(ValueError, match="channels"):
        crit([logits[0], logits[1][:, :3], logits[2]], target)


def test_stage_finer_than_target(crit):
    logits, target = good()
    with pytest.raises(ValueError, match="finer than the target"):
        crit([logits[0], logits[1], torch.randn(B, C, 9, 8)], target)


def test_non_floating_logits(crit):
    logits, target = good()
    with pytest.raises(TypeError, match=r"logits\[2\] must be a floating tensor"):
        crit([logits[0], logits[1], torch.ones(B, C, *SP, dtype=torch.int64)], target)


def test_mixed_rank_and_dtype(crit):
    logits, target = good()
    with pytest.raises(ValueError, match="2D and 3D"):
        crit([logits[0], logits[1], torch.randn(B, C, 2, *SP)], target)
    with pytest.raises(TypeError, match="dtype"):
        crit([logits[0], logits[1], logits[2].double()], target)


def test_target_out_of_range(crit):
    logits, target = good()
    bad = target.clone()
    bad[1, 3, 3] = C
    with pytest.raises(ValueError, match=f"class index {C} outside"):
        crit(logits, bad)
    bad[1, 3, 3] = -1
    with pytest.raises(ValueError, match="class index -1 outside"):
        crit(logits, bad)


def test_ignore_index_is_allowed_out_of_range():
    logits, target = good()
    target = target.clone()
    target[0, :2] = 255
    for backend in BACKENDS:
        assert torch.isfinite(lk.LoMixLoss(L, C, backend=backend, ignore_index=255)(logits, target))


def test_target_wrong_rank_or_dtype(crit):
    logits, target = good()
    with pytest.raises(ValueError, match="integer target must have shape"):
        crit(logits, target[0])
    with pytest.raises(ValueError, match="integer target must have shape"):
        crit(logits, target[:1])
    with pytest.raises(TypeError, match="target must be"):
        crit(logits, target.bool())
    with pytest.raises(ValueError, match="float target must have shape"):
        crit(logits, torch.rand(B, C + 1, *SP))


def test_nan_logits(crit):
    logits, target = good()
    logits[2] = logits[2].clone()
    logits[2][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"logits\[2\] contains NaN or inf"):
        crit(logits, target)


def test_tensors_on_different_devices(crit):
    logits, target = good()
    with pytest.raises(ValueError, match="is on meta"):
        crit([logits[0], logits[1], logits[2].to("meta")], target)
    with pytest.raises(ValueError, match="target is on meta"):
        crit(logits, target.to("meta"))


def test_pixel_weight_shape_and_sign(crit):
    logits, target = good()
    with pytest.raises(ValueError, match="pixel_weight must have shape"):
        crit(logits, target, pixel_weight=torch.ones(B, 4, 4))
    with pytest.raises(TypeError, match="pixel_weight must be a floating tensor"):
        crit(logits, target, pixel_weight=torch.ones(B, *SP, dtype=torch.int64))
    with pytest.raises(ValueError, match="pixel_weight must be finite and >= 0"):
        crit(logits, target, pixel_weight=-torch.ones(B, *SP))


def test_soft_target_with_ignore_index():
    logits, _ = good()
    crit = lk.LoMixLoss(L, C, ignore_index=255)
    with pytest.raises(ValueError, match="ignore_index cannot be used"):
        crit(logits, torch.rand(B, C, *SP).softmax(1))


def test_functional_bad_params():
    logits, target = good()
    crit = lk.LoMixLoss(L, C)
    with pytest.raises(ValueError, match="cat_weight is required"):
        lk.lomix_loss(logits, target, crit.theta, None, None, list(crit.awf_weight), list(crit.awf_bias))
    with pytest.raises(ValueError, match=r"cat_weight\[0\] must have shape"):
        lk.lomix_loss(logits, target, crit.theta, [w.t() for w in crit.cat_weight], list(crit.cat_bias),
                      list(crit.awf_weight), list(crit.awf_bias))
    with pytest.raises(ValueError, match="theta must have shape"):
        lk.lomix_loss(logits, target, crit.theta[:-1], list(crit.cat_weight), list(crit.cat_bias),
                      list(crit.awf_weight), list(crit.awf_bias))
    with pytest.raises(ValueError, match="backend must be one of"):
        lk.lomix_loss(logits, target, crit.theta[:L], scheme="deep_supervision", backend="cuda")
    with pytest.raises(TypeError, match="at least 2"):
        lk.lomix_loss(logits[:1], target, crit.theta[:1], scheme="last_layer")


def test_triton_backend_without_gpu_says_why(monkeypatch):
    from lomix_kernels import triton_backend

    logits, target = good()
    if not triton_backend.is_available():
        with pytest.raises(RuntimeError, match="needs the triton package"):
            lk.LoMixLoss(L, C, backend="triton")(logits, target)
        return
    monkeypatch.setattr(triton_backend, "INTERPRET", False)
    with pytest.raises(ValueError, match="needs CUDA tensors .* TRITON_INTERPRET=1"):
        lk.LoMixLoss(L, C, backend="triton")(logits, target)
    monkeypatch.setattr(triton_backend, "INTERPRET", True)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        lk.LoMixLoss(L, C, backend="triton")([z.double() for z in logits], target)
