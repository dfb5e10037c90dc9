"""Triton backend against the float64 reference. On a CPU-only machine the kernels run through
Triton's interpreter (TRITON_INTERPRET=1, set in conftest) at small sizes; with a GPU set
LOMIX_TRITON_ON_GPU=1 to run the same tests on CUDA tensors."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lomix_kernels as lk

from conftest import make_logits, make_target, randomize_params, rel_err
from fused_cases import OP_SUBSETS, compare_to_reference, native_case, random_case, random_config_case
from test_variants import VARIANTS, pixel_weights, soft_target

triton_backend = pytest.importorskip("lomix_kernels.triton_backend")
pytestmark = pytest.mark.skipif(not triton_backend.is_available(), reason="triton is not installed")
ON_GPU = bool(os.environ.get("LOMIX_TRITON_ON_GPU")) and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def to_device(crit, logits, target):
    crit = crit.to(DEVICE)
    logits = [z.detach().to(DEVICE).requires_grad_() for z in logits]
    return crit, logits, target.to(DEVICE)


def check(crit, logits, target, pixel_weight=None):
    crit, logits, target = to_device(crit, logits, target)
    pw = None if pixel_weight is None else pixel_weight.to(DEVICE)
    return compare_to_reference(crit, logits, target, pixel_weight=pw)


@pytest.mark.parametrize("L,C,B,sp", [(2, 2, 1, (5, 7)), (3, 5, 2, (6, 5)), (4, 3, 1, (8, 7)), (5, 2, 1, (8, 8)),
                                      (6, 2, 1, (4, 5)), (3, 3, 2, (3, 4, 5)), (4, 2, 1, (4, 5, 4))])
@pytest.mark.parametrize("awf_param", ["official", "paper"])
def test_shapes_all_ops(L, C, B, sp, awf_param):
    check(*random_case("triton", L, C, B, sp, native=True, awf_param=awf_param, seed=L))


@pytest.mark.parametrize("ops", OP_SUBSETS[:4], ids=lambda o: "+".join(o))
def test_single_ops(ops):
    check(*random_case("triton", 3, 3, 2, (6, 6), native=True, ops=ops))


@pytest.mark.parametrize("name,opts,kind,pw", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variants(name, opts, kind, pw):
    opts = dict(opts)
    classes = opts.pop("C", 4)
    sp = (5, 6)
    crit = randomize_params(lk.LoMixLoss(3, classes, backend="triton", **opts))
    logits = make_logits(3, classes, 2, sp, native=True)
    if kind == "int":
        target = make_target(2 if classes == 1 else classes, 2, sp, ignore_index=opts.get("ignore_index"))
    elif kind == "soft":
        target = soft_target(classes, 2, sp)
    else:
        target = (torch.rand(2, classes, *sp, generator=torch.Generator().manual_seed(9)) > 0.5).float()
    check(crit, logits, target, pixel_weights(2, sp) if pw else None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    crit, logits, target = to_device(*random_case("triton", 3, 3, 1, (6, 6), dtype=dtype))
    loss = crit(logits, target)
    loss.backward()
    ref = lk.LoMixLoss(3, 3, backend="reference").to(DEVICE).double()
    ref.load_state_dict(crit.state_dict())
    expected = ref([z.detach().double() for z in logits], target)
    assert loss.dtype == torch.float32 and logits[0].grad.dtype == dtype
    assert abs(float(loss.detach()) - float(expected)) < 1e-5 * abs(float(expected))


def test_deterministic():
    """Bit-identical loss, native-resolution grads (slot reduction) and parameter grads run to run."""
    crit, logits, target = to_device(*random_case("triton", 3, 3, 1, (17, 9), native=True))
    params = list(crit.parameters())
    a = torch.autograd.grad(crit(logits, target), logits + params)
    b = torch.autograd.grad(crit(logits, target), logits + params)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_compiled_step_matches_eager():
    """torch.compile(fullgraph=True) of a step with the triton op: no graph break, same loss and grads
    (on CUDA in the device check, through the interpreter here)."""
    crit, logits, target = to_device(*random_case("triton", 3, 4, 2, (12, 10), native=True))
    params = list(crit.parameters())

    def step(heads, y):
        return crit(heads, y)

    eager = step(logits, target)
    g_eager = torch.autograd.grad(eager, logits + params)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(logits, target)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True)(logits, target)
    g_comp = torch.autograd.grad(out, logits + params)
    assert rel_err(out, eager) < 1e-6
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(g_comp, g_eager))


def test_pinned_config_is_checked(monkeypatch):
    crit, logits, target = to_device(*random_case("triton", 2, 2, 1, (6, 6)))
    monkeypatch.setenv("LOMIX_TRITON_CONFIG", "1,8,8")
    with pytest.raises(ValueError, match="LOMIX_TRITON_CONFIG must be 7 positive integers"):
        crit(logits, target)
    monkeypatch.setenv("LOMIX_TRITON_CONFIG", "2,4,4,1,1,1,4")
    with pytest.raises(ValueError, match="not a 2D config"):
        crit(logits, target)


@pytest.mark.skipif(ON_GPU, reason="the interpreter probe concerns CPU tensors only")
def test_interpreter_that_cannot_loop_says_why(monkeypatch):
    """Triton 3.6's interpreter with NumPy >= 2.4 cannot run range() over a kernel argument: a clear
    error naming the versions and the fix, not a TypeError from inside the interpreter."""
    class Broken:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(triton_backend, "_probe_kernel", Broken())
    triton_backend._interpreter_problem.cache_clear()
    crit, logits, target = random_case("triton", 2, 2, 1, (6, 6))
    try:
        with pytest.raises(RuntimeError, match="numpy<2.4 or a newer triton"):
            crit(logits, target)
    finally:
        triton_backend._interpreter_problem.cache_clear()


def test_too_many_stages_says_so():
    crit = lk.LoMixLoss(7, 2, scheme="deep_supervision", backend="triton").to(DEVICE)
    logits = [z.to(DEVICE) for z in make_logits(7, 2, 1, (4, 4))]
    with pytest.raises(ValueError, match="at most 6 stages"):
        crit(logits, make_target(2, 1, (4, 4)).to(DEVICE))


@pytest.mark.parametrize("target_sp,head_sps", [
    ((23, 19), [(5, 4), (12, 19), (23, 19)]),           # odd, non-integer ratios, 3 slots per axis
    ((26, 10), [(2, 1), (13, 5), (26, 10)]),            # 1/13, 1/10 .. 1/2
    ((6, 5, 7), [(2, 3, 3), (3, 5, 4), (6, 5, 7)]),     # 3D, odd, mixed axes
])
def test_native_resolution_heads(target_sp, head_sps):
    """Upsampling fused into the kernels equals F.interpolate + loss; grads at native resolution."""
    check(*native_case("triton", target_sp, head_sps, ignore_index=7))


# the GPU candidates, once per tiling (num_warps means nothing to the interpreter)
GPU_TILINGS = list({c[:6]: c for c in triton_backend.CONFIGS_2D[1:] + triton_backend.CONFIGS_3D[1:]}.values())


@pytest.mark.parametrize("cfg", GPU_TILINGS)
def test_every_tile_config(cfg, monkeypatch):
    """Each GPU autotuning candidate computes the same loss and gradients (autotune may pick any),
    on a grid of more than one super-tile per axis."""
    monkeypatch.setenv("LOMIX_TRITON_CONFIG", ",".join(map(str, cfg)))
    if cfg[0] == 1:
        case = native_case("triton", (40, 35), [(5, 4), (40, 35)], C=2, B=1)
    else:
        case = native_case("triton", (18, 5, 6), [(3, 2, 2), (18, 5, 6)], C=2, B=1)  # 2 super-tiles along D
    check(*case)


@pytest.mark.parametrize("seed", range(6))
def test_slot_assignment_is_race_free(seed):
    """Super-tiles sharing a slot (index mod _overlap) have disjoint native footprints, and one slot
    fewer would not do: brute force over random sizes, ratios and super-tile extents. (The
    interpreter runs programs one after another, so a race could not show in the kernel tests.)"""
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        n_out = int(torch.randint(2, 300, (1,), generator=g))
        n_in = int(torch.randint(1, n_out + 1, (1,), generator=g))
        extent = int(torch.randint(1, 40, (1,), generator=g))
        i0, i1, _ = triton_backend._axis_table(n_in, n_out)
        spans = [(int(i0[a]), int(i1[min(a + extent, n_out) - 1])) for a in range(0, n_out, extent)]
        k = triton_backend._overlap(n_in, n_out, extent)

        def clash(k):
            return any(spans[a][1] >= spans[b][0] for a in range(len(spans)) for b in range(a + k, len(spans), k))

        assert not clash(k), (n_in, n_out, extent, k)
        assert k == 1 or clash(k - 1), (n_in, n_out, extent, k)


def test_axis_tables_match_interpolate():
    """The kernels' interpolation tables rebuild float32 F.interpolate (odd and non-integer ratios) up to
    float32 rounding (a wrong index or weight would be off by O(1))."""
    x = torch.randn(2, 3, 5, 7, 4)
    out = (11, 9, 13)
    tables = [triton_backend._axis_table(n, m) for n, m in zip(x.shape[2:], out)]
    y = x.double()
    for axis, (i0, i1, l1) in enumerate(tables):  # separable: one axis at a time
        dim = 2 + axis
        a, b = y.index_select(dim, i0.long()), y.index_select(dim, i1.long())
        shape = [1] * y.dim()
        shape[dim] = -1
        l1 = l1.double().view(shape)
        y = a * (1 - l1) + b * l1
    ref = torch.nn.functional.interpolate(x, size=out, mode="trilinear", align_corners=False)
    assert torch.allclose(y, ref.double(), rtol=0, atol=2e-6)


def test_no_full_resolution_copy(monkeypatch):
    """Native heads go to the kernels as they are: no interpolation in torch, forward or backward."""
    def refuse(*args, **kwargs):
        raise AssertionError("F.interpolate called")

    crit, logits, target = to_device(*native_case("triton", (12, 10), [(3, 2), (6, 5), (12, 10)]))
    monkeypatch.setattr(torch.nn.functional, "interpolate", refuse)
    loss = crit(logits, target)
    loss.backward()
    assert all(z.grad is not None and z.grad.shape == z.shape for z in logits)


@pytest.mark.parametrize("seed", [0, 11])
def test_random_configurations(seed):
    """Some of test_cpu's fixed-seed random configurations (shapes, heads, op subsets, options)."""
    check(*random_config_case("triton", seed))


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_target_dtypes(target_dtype):
    """Integer targets are read in their own dtype (no upcast copy), ignore_index included."""
    check(*random_case("triton", 2, 3, 2, (9, 7), native=True, target_dtype=target_dtype, ignore_index=200))


def test_kernels_compile_for_h100():
    """Both kernels compile for sm_90 (H100/H200) through Triton's full pipeline and ptxas, no GPU
    needed: the interpreter alone would not catch code that only the compiler rejects."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_cuda_compile.py")
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled 4 kernels for sm_90" in out.stdout, out.stdout


def test_autotune_picks_fastest_once(monkeypatch):
    """With LOMIX_TRITON_AUTOTUNE=1 on CUDA, _choose times every candidate once per problem key and keeps
    the fastest; by default (and with 0) it takes the first candidate untimed. (Timing is faked: no GPU.)"""
    from types import SimpleNamespace

    candidates = triton_backend.CONFIGS_2D
    fake_ms = {c: 5.0 + i for i, c in enumerate(candidates)}
    fake_ms[candidates[2]] = 1.0
    timed = []

    def do_bench(fn, **kwargs):
        return fn()

    def launch(cfg):
        timed.append(cfg)
        return fake_ms[cfg]

    monkeypatch.setattr(triton_backend.triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(triton_backend, "_TUNED", {})
    monkeypatch.delenv("LOMIX_TRITON_AUTOTUNE", raising=False)  # the device check runs the tests with it off
    monkeypatch.delenv("LOMIX_TRITON_CONFIG", raising=False)
    pb = SimpleNamespace(device=torch.device("cuda"), is3d=False, sizes=((1, 4, 4),), out=(1, 8, 8), B=1, C=2,
                         plan=None, soft=False, w=None, t=1, logits=[torch.zeros(1)])
    assert triton_backend._choose("forward", pb, launch) == candidates[0] and not timed  # default: no timing
    monkeypatch.setenv("LOMIX_TRITON_AUTOTUNE", "1")
    assert triton_backend._choose("forward", pb, launch) == candidates[2]
    assert timed == list(candidates)
    assert triton_backend._choose("forward", pb, launch) == candidates[2] and len(timed) == len(candidates)
    monkeypatch.setenv("LOMIX_TRITON_AUTOTUNE", "0")
    assert triton_backend._choose("backward", pb, launch) == candidates[0]
    pb.device = torch.device("cpu")
    monkeypatch.setenv("LOMIX_TRITON_AUTOTUNE", "1")  # never on CPU tensors (the interpreter)
    assert triton_backend._choose("backward", pb, launch) == candidates[0] and len(timed) == len(candidates)
