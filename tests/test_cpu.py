"""Fused CPU backend (csrc/) against the float64 reference: loss, logits grads, parameter grads."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import lomix_kernels as lk
from lomix_kernels import cpu

from conftest import make_logits, make_target, randomize_params, rel_err, run, twin
from fused_cases import OP_SUBSETS, compare_to_reference, native_case, random_case, random_config_case

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels must be built: " + cpu.unavailable_reason())
# (skipif never triggers in CI: `make test` builds the kernels first and test_build_present fails otherwise)


def test_build_present():
    assert cpu.available(), cpu.unavailable_reason()
    forced = os.environ.get(cpu.ISA_ENV)
    assert cpu.variant() == (forced or max((v for v in cpu._built_variants() if v in cpu.LEVELS),
                                           key=lambda v: (cpu.LEVELS[v] <= _cpu_level(), cpu.LEVELS[v])))


@pytest.mark.parametrize("variant", [v for v in sorted(cpu._built_variants()) if v in ("avx512", "avx2")])
def test_next_tile_prefetch_is_compiled(variant):
    """The kernels ask for the next tile's logits while a tile computes (csrc/interpolate.h,
    prefetch_next_tile). gcc 12 deleted every call to it while it called __builtin_prefetch directly (a
    function whose only effect is a prefetch counts as pure), and no build had a prefetch instruction for
    many sessions; simd.h's prefetch_l2 keeps it. Each x86 variant's library must contain one."""
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils, installed with gcc) is needed to read the built kernels"
    code = subprocess.run([objdump, "-d", cpu._built_variants()[variant]], capture_output=True, text=True,
                          check=True).stdout
    assert re.search(r"\bprefetch(t[012]|nta)\b", code), f"no prefetch instruction in the {variant} kernels"


def _cpu_level() -> int:
    return cpu.cpu_level()


def test_select_variant_rules():
    built = {"avx512": "a", "avx2": "b", "native": "d"}
    assert cpu.select_variant(built, 4, None) == "avx512"
    assert cpu.select_variant(built, 3, None) == "avx2"
    assert cpu.select_variant({"portable": "p"}, 0, None) == "portable"
    assert cpu.select_variant(built, 3, "native") == "native"  # built for this machine: only when forced
    with pytest.raises(ValueError, match="need AVX2 and FMA"):
        cpu.select_variant(built, 1, None)  # a pre-AVX2 x86-64: no variant (auto uses the reference)
    with pytest.raises(ValueError, match=r"LOMIX_CPU_ISA='avx512' needs x86-64 level 4, this CPU runs level 3"):
        cpu.select_variant(built, 3, "avx512")
    with pytest.raises(ValueError, match=r"LOMIX_CPU_ISA='sse9', but the built variants are"):
        cpu.select_variant(built, 4, "sse9")
    with pytest.raises(ValueError, match="no built CPU variant runs here"):
        cpu.select_variant({"avx512": "a"}, 3, None)


ATEN_LEVEL = {"avx512": "avx512", "avx2": "avx2"}
RUNNABLE = [v for v in sorted(cpu._built_variants()) if v != "probe" and cpu.available()
            and cpu.LEVELS.get(v, 0) <= _cpu_level()]


@pytest.mark.skipif(bool(os.environ.get(cpu.ISA_ENV)), reason="already inside a forced-variant run")
@pytest.mark.parametrize("variant", RUNNABLE)
def test_every_isa_variant_matches_reference(variant):
    """Each variant this CPU runs, forced with LOMIX_CPU_ISA in a fresh process: this whole file against
    the float64 reference (test_build_present checks the variant loaded), with torch at the same
    level (ATEN_CPU_CAPABILITY), as on a CPU of that level."""
    env = dict(os.environ, **{cpu.ISA_ENV: variant})
    if variant in ATEN_LEVEL:
        env["ATEN_CPU_CAPABILITY"] = ATEN_LEVEL[variant]
    out = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", __file__],
                         capture_output=True, text=True, env=env, cwd=os.path.dirname(__file__), timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


SHAPES = [  # L, C, B, spatial, native heads
    (2, 2, 1, (7, 5), False),
    (3, 5, 2, (17, 9), True),
    (4, 9, 2, (24, 20), True),
    (5, 3, 1, (32, 33), True),
    (4, 16, 1, (13, 11), False),
    (3, 4, 3, (5, 7, 6), True),
    (4, 2, 2, (8, 9, 7), True),
    (2, 7, 1, (3, 5, 4), False),
    (3, 5, 2, (16, 24), False),  # whole 64-pixel tiles only: every gradient row streamed (simd.h)
]


@pytest.mark.parametrize("L,C,B,sp,native", SHAPES)
@pytest.mark.parametrize("awf_param", ["official", "paper"])
def test_shapes_all_ops(L, C, B, sp, native, awf_param):
    crit, logits, target = random_case("cpu", L, C, B, sp, native=native, awf_param=awf_param, seed=L + C)
    compare_to_reference(crit, logits, target)


@pytest.mark.parametrize("ops", OP_SUBSETS, ids=lambda o: "+".join(o))
def test_every_op_subset(ops):
    crit, logits, target = random_case("cpu", 4, 3, 2, (11, 10), native=True, ops=ops, seed=len(ops))
    compare_to_reference(crit, logits, target)


@pytest.mark.parametrize("B,sp", [(1, (6, 5)), (2, (9, 8))])
def test_add_and_mult_maps_of_every_subset_size(B, sp):
    """add and mult maps build and push back all their members in one pass (maps.h, adjoint.h), unrolled
    for k = 2..MEMBER_UNROLL (5), a loop for larger subsets — L = 7 has k = 2..7."""
    crit, logits, target = random_case("cpu", 7, 3, B, sp, native=False, ops=("add", "mult"), seed=7 + B)
    compare_to_reference(crit, logits, target)


@pytest.mark.parametrize("awf_param", ["official", "paper"])
def test_awf_maps_of_every_subset_size(awf_param):
    """An awf map's mix and its attention weights' gradients hold the k weights of a pixel group in
    registers, unrolled for k = 2..MEMBER_UNROLL (5), a loop for larger subsets — L = 7 has k = 2..7;
    the block-diagonal (official) adjoint keeps the score gradient in registers too."""
    crit, logits, target = random_case("cpu", 7, 3, 2, (9, 8), native=False, ops=("awf",), awf_param=awf_param,
                                       seed=11)
    compare_to_reference(crit, logits, target)


@pytest.mark.parametrize("C", range(2, 17))
def test_cat_row_blocks_every_class_count(C):
    """The cat loops split the C rows into register blocks (simd.h for_row_blocks: 4-row blocks, a
    1-row remainder joined to the last one, 2 or 3 rows on their own): every split, C = 2..16."""
    crit, logits, target = random_case("cpu", 3, C, 1, (9, 7), native=False, ops=("cat",), seed=C)
    compare_to_reference(crit, logits, target)


@pytest.mark.parametrize("scheme", ["last_layer", "deep_supervision", "mutation", "lomix"])
def test_schemes(scheme):
    crit, logits, target = random_case("cpu", 4, 4, 2, (12, 13), native=True, scheme=scheme)
    compare_to_reference(crit, logits, target)


OPTIONS = [
    dict(ignore_index=255),
    dict(ignore_index=-1, dice_squared=False),
    dict(dice_batch=False, include_background=False),
    dict(dice_squared=False, dice_batch=False, smooth_nr=0.0, smooth_dr=1e-3),
    dict(ce_weight=1.0, dice_weight=0.0),
    dict(ce_weight=0.0, dice_weight=1.0, learn_weights=False),
    dict(combine="multiplicative"),
    dict(class_weight=[0.5, 1.0, 2.0, 0.1]),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("sp", [(15, 14), (6, 5, 7)])
def test_loss_options(opts, sp):
    crit, logits, target = random_case("cpu", 3, 4, 2, sp, native=True, **opts)
    compare_to_reference(crit, logits, target)


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_target_dtypes(target_dtype):
    crit, logits, target = random_case("cpu", 3, 5, 2, (9, 10), target_dtype=target_dtype, ignore_index=100)
    compare_to_reference(crit, logits, target)
    target1 = target.unsqueeze(1)  # (B, 1, H, W) is accepted
    assert torch.equal(crit(logits, target1), crit(logits, target))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_budget(dtype):
    """fp16/bf16 logits: fused error vs float64 truth no worse than 2x the reference's own at that dtype."""
    L, C, B, sp = 4, 5, 2, (16, 16)
    crit = randomize_params(lk.LoMixLoss(L, C, backend="cpu"))
    logits = make_logits(L, C, B, sp, native=True, dtype=dtype, scale=1.0)
    target = make_target(C, B, sp)
    truth = twin(crit, "reference").double()
    ref_lp = twin(crit, "reference").to(dtype)
    t_loss, t_grads, t_p = run(truth, [z.detach().double().requires_grad_() for z in logits], target)
    f_loss, f_grads, f_p = run(crit, logits, target)
    r_loss, r_grads, r_p = run(ref_lp, [z.detach().clone().requires_grad_() for z in logits], target)
    assert f_loss.dtype == torch.float32 and all(g.dtype == dtype for g in f_grads)
    assert rel_err(f_loss, t_loss) <= max(2 * rel_err(r_loss, t_loss), 1e-5)
    for f, r, t in zip(f_grads, r_grads, t_grads):
        assert rel_err(f, t) <= max(2 * rel_err(r, t), 1e-5)
    for name in t_p:
        assert rel_err(f_p[name], t_p[name]) <= max(2 * rel_err(r_p[name], t_p[name]), 1e-4), name


def test_deterministic_and_thread_independent():
    crit, logits, target = random_case("cpu", 4, 6, 2, (40, 37), native=True)
    a = run(crit, logits, target)
    b = run(crit, logits, target)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = run(crit, logits, target)
    finally:
        torch.set_num_threads(threads)
    for other in (b, c):
        assert torch.equal(a[0], other[0])
        assert all(torch.equal(x, y) for x, y in zip(a[1], other[1]))
        assert all(torch.equal(a[2][k], other[2][k]) for k in a[2])


@pytest.mark.parametrize("scale", [1.0, -2.5, 0.0])
def test_any_grad_output(scale):
    crit, logits, target = random_case("cpu", 3, 3, 2, (8, 9))
    compare_to_reference(crit, logits, target, grad_scale=scale)


def test_only_some_inputs_require_grad():
    crit, logits, target = random_case("cpu", 3, 4, 2, (10, 9), native=True)
    logits[0].requires_grad_(False)
    for p in crit.cat_weight:
        p.requires_grad_(False)
    compare_to_reference(crit, logits, target)
    with torch.no_grad():  # nothing requires grad at all
        loss = crit([z.detach() for z in logits], target)
    assert torch.isfinite(loss)


def test_inputs_not_modified_and_non_contiguous():
    crit, logits, target = random_case("cpu", 3, 4, 2, (12, 10))
    base = [z.detach().clone() for z in logits]
    # channels-last and transposed views: handled, not rejected
    nc = [z.detach().permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).requires_grad_() for z in logits]
    t_nc = target.t() if target.dim() == 2 else target.transpose(1, 2).contiguous().transpose(1, 2)
    errs = compare_to_reference(crit, nc, t_nc)
    assert max(errs.values()) < 1e-5
    assert all(torch.equal(a, b.detach()) for a, b in zip(base, logits))


def test_kernel_checks_raise():
    crit, logits, target = random_case("cpu", 3, 4, 1, (6, 6))
    bad = target.clone()
    bad[0, 2, 3] = 4
    with pytest.raises(ValueError, match="class index 4"):
        crit(logits, bad)
    bad[0, 2, 3] = -3
    with pytest.raises(ValueError, match="class index -3"):
        crit(logits, bad)
    for value in (float("nan"), float("inf")):
        z = [x.detach().clone() for x in logits]
        z[1][0, 1, 0, 0] = value
        with pytest.raises(ValueError, match=r"logits\[1\] contains NaN or inf"):
            crit(z, target)
    pw = torch.ones(target.shape)
    pw[0, 0, 0] = -1
    with pytest.raises(ValueError, match="pixel_weight"):
        crit(logits, target, pixel_weight=pw)


def test_auto_picks_cpu_and_reference_for_float64():
    from lomix_kernels.functional import resolve_backend
    z = torch.randn(1, 2, 3, 3)
    assert resolve_backend("auto", z) == "cpu"
    assert resolve_backend("auto", z.double()) == "reference"
    with pytest.raises(TypeError, match="float64"):
        resolve_backend("cpu", z.double())


def test_large_image_multiple_items():
    """Enough pixels for many work items and a ragged last tile (synapse-like, small C)."""
    crit, logits, target = random_case("cpu", 4, 3, 2, (129, 67), native=True, ignore_index=255)
    compare_to_reference(crit, logits, target)


@pytest.mark.parametrize("case", ["one_ignored_pixel", "sparse_pixel_weights", "dense_pixel_weights"])
def test_tiles_with_and_without_unit_weights(case):
    """Tiles whose pixel weights are all 1 skip the statistics' and dL/dz's multiplications by w
    (Tile::unit_weights); a tile with a single ignored or reweighted pixel must not."""
    B, sp = 2, (32, 130)  # one 130-pixel row per work item: two full 64-pixel tiles, a ragged third
    crit, logits, target = random_case("cpu", 3, 5, B, sp, ignore_index=255 if case == "one_ignored_pixel" else None)
    pw = None
    if case == "one_ignored_pixel":
        target = make_target(5, B, sp, seed=3)
        target[1, 20, 7] = 255
    elif case == "sparse_pixel_weights":
        pw = torch.ones(B, *sp)
        pw[0, 3, 5], pw[1, 30, 100], pw[1, 0, 0] = 3.0, 0.0, 0.25  # each in a full tile
    else:
        pw = torch.rand(B, *sp, generator=torch.Generator().manual_seed(4)) * 2
    compare_to_reference(crit, logits, target, pixel_weight=pw)


@pytest.mark.parametrize("target_sp,head_sps", [
    ((23, 19), [(5, 4), (11, 9), (12, 19), (23, 19)]),                # odd, non-integer ratios
    ((224, 96), [(7, 3), (14, 6), (28, 12), (56, 24)]),               # 1/32 .. 1/4, EMCAD-like
    ((9, 10, 11), [(2, 3, 3), (5, 5, 6), (9, 10, 11), (4, 10, 11)]),  # 3D, mixed axes
    ((7, 70), [(3, 69), (7, 67), (4, 35), (7, 70)]),  # barely coarser along W: 17 columns per 16 pixels
])
def test_native_resolution_heads(target_sp, head_sps):
    """Upsampling fused into the kernel equals F.interpolate + loss; grads at native resolution."""
    compare_to_reference(*native_case("cpu", target_sp, head_sps, ignore_index=7))


def test_native_resolution_allocates_no_full_resolution_copy():
    """No upsampling node in the autograd graph: the kernel reads the native heads directly."""
    crit = lk.LoMixLoss(3, 3, backend="cpu")
    logits = make_logits(3, 3, 1, (16, 16), native=True)
    loss = crit(logits, make_target(3, 1, (16, 16)))
    seen, stack = set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    assert not any("Upsample" in type(fn).__name__ for fn in seen)


@pytest.mark.parametrize("seed", range(24))
def test_random_configurations(seed):
    """Randomly drawn (but fixed-seed) shapes, head sizes, op subsets and options."""
    compare_to_reference(*random_config_case("cpu", seed))


@pytest.mark.parametrize("gap", [30.0, 120.0])
def test_add_maps_from_member_exponentials_with_confident_disagreeing_stages(gap):
    """The add maps' softmax is built from their members' exponentials (Layout::add_by_product). Stages
    that are confident about different classes make those products tiny (gap 30: ~1e-26, denormal for
    3-4 members, flushed) or underflow entirely (gap 120: the kernel falls back to exp of the sum):
    both still match the float64 reference."""
    torch.manual_seed(0)
    crit = randomize_params(lk.LoMixLoss(4, 5, backend="cpu"))
    logits = make_logits(4, 5, 2, (12, 13))
    with torch.no_grad():
        for i, z in enumerate(logits):
            z[:, i % 5] += gap  # stage i is sure of class i; every add map mixes disagreeing stages
            z[:, :, :3] -= gap / 2  # and some pixels are unsure everywhere
    compare_to_reference(crit, logits, make_target(5, 2, (12, 13)))


@pytest.mark.skipif(bool(os.environ.get(cpu.ISA_ENV)), reason="build tooling, not a variant: run once, "
                    "outside the forced-variant runs")
def test_in_place_build_removes_stale_variant_libraries(tmp_path):
    """An in-place (editable) build leaves only the libraries it made: a variant built earlier (here a fake
    LOMIX_CPU_NATIVE=1 library) would otherwise stay for LOMIX_CPU_ISA to load, with older kernels."""
    import shutil
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "csrc", tmp_path / "csrc")
    for rel in ("setup.py", "pyproject.toml", "lomix_kernels/__init__.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, tmp_path / rel)
    stale = tmp_path / "lomix_kernels" / "_lomix_cpu_native.cpython-311-x86_64-linux-gnu.so"
    stale.write_bytes(b"an old build")
    started = time.time() - 1
    env = {k: v for k, v in os.environ.items() if k != "LOMIX_CPU_NATIVE"}
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                   capture_output=True, check=True)
    left = list((tmp_path / "lomix_kernels").glob("_lomix_cpu_*"))
    assert not stale.exists()
    assert any(p.name.startswith("_lomix_cpu_probe.") for p in left)
    assert all(p.stat().st_mtime >= started for p in left), [p.name for p in left]  # each made by this build


@pytest.mark.skipif(bool(os.environ.get(cpu.ISA_ENV)), reason="build tooling, not a variant: run once, "
                    "outside the forced-variant runs")
def test_library_override_loads_that_build(tmp_path):
    """LOMIX_CPU_LIBRARY loads one kernel library file (benchmarks/ab.py's other build); a bad path is
    reported, not a crash."""
    built = cpu._built_variants()
    name = "avx2" if "avx2" in built else sorted(k for k in built if k != "probe")[0]
    code = "import lomix_kernels as lk; print(lk.cpu.variant(), lk.cpu.available(), lk.cpu.unavailable_reason())"
    env = dict(os.environ, LOMIX_CPU_LIBRARY=built[name])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[:2] == [name, "True"], out
    env["LOMIX_CPU_LIBRARY"] = str(tmp_path / "_lomix_cpu_missing.so")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "False" in out and "LOMIX_CPU_LIBRARY" in out, out


@pytest.mark.skipif(bool(os.environ.get(cpu.ISA_ENV)), reason="build tooling, not a variant: run once, "
                    "outside the forced-variant runs")
def test_ab_script_compares_against_a_revision():
    """benchmarks/ab.py builds a git revision's kernels and times them against this tree's, interleaved."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "ab.py"), "HEAD", "--config", "smoke2d",
                        "--pairs", "2", "--repeats", "1", "--variant", cpu.variant()],
                       capture_output=True, text=True, timeout=600, cwd=root)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "2 interleaved pairs" in p.stdout and "current / HEAD = " in p.stdout
