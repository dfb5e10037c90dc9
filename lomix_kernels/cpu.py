"""The fused CPU backend: ctypes bindings to csrc/lomix_cpu.cpp.

The library is a plain C ABI (no torch headers). :class:`CpuKernels` implements the two
entry points that :mod:`lomix_kernels.fused` registers as ``torch.library`` custom ops:
``forward`` (inputs -> MapStats) and ``backward`` (statistic gradients -> input gradients).
"""
from __future__ import annotations

import ctypes
import glob
import math
import os
from typing import Optional

import torch
from torch import Tensor

from .finish import MapStats
from .fused import grid_sizes

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_TARGET_KINDS = {torch.uint8: 0, torch.int16: 1, torch.int32: 2, torch.int64: 3}
_SOFT_TARGET = 4
_ERRORS = {
    1: "target holds class index {value} outside [0, {labels})",
    2: "logits[{value}] contains NaN or inf",
    3: "pixel_weight must be finite and >= 0",
    4: "a float target must hold finite values >= 0 (and <= 1 in sigmoid mode)",
}


class _Problem(ctypes.Structure):
    """Mirror of ``struct Problem`` in csrc/lomix_cpu.cpp."""

    _fields_ = [
        ("batch", ctypes.c_int64), ("classes", ctypes.c_int64), ("pixels", ctypes.c_int64),
        ("num_stages", ctypes.c_int32), ("num_maps", ctypes.c_int32), ("num_subsets", ctypes.c_int32),
        ("logit_dtype", ctypes.c_int32), ("target_kind", ctypes.c_int32), ("sigmoid", ctypes.c_int32),
        ("q", ctypes.c_int32), ("has_ignore", ctypes.c_int32), ("ignore_index", ctypes.c_int64),
        ("num_labels", ctypes.c_int32), ("num_threads", ctypes.c_int32),
        ("awf_block_diagonal", ctypes.c_int32), ("spatial_rank", ctypes.c_int32),
        ("out_size", ctypes.c_int64 * 3), ("stage_size", ctypes.c_void_p),
        ("logits", ctypes.POINTER(ctypes.c_void_p)), ("target", ctypes.c_void_p),
        ("pixel_weight", ctypes.c_void_p),
        ("map_op", ctypes.c_void_p), ("map_arg", ctypes.c_void_p),
        ("subset_size", ctypes.c_void_p), ("subset_members", ctypes.c_void_p),
        ("cat_w", ctypes.c_void_p), ("cat_b", ctypes.c_void_p),
        ("awf_v", ctypes.c_void_p), ("awf_c", ctypes.c_void_p),
    ]


LEVELS = {"avx512": 4, "avx2": 3, "portable": 0}  # the x86-64 level each variant needs (setup.py)
ISA_ENV = "LOMIX_CPU_ISA"  # force a variant: avx512 | avx2 | portable | native
LIBRARY_ENV = "LOMIX_CPU_LIBRARY"  # load this kernel library file instead (benchmarks/ab.py: another build)


def _variant_of(path: str) -> str:
    """The variant a kernel library's file name says: _lomix_cpu_<variant>*.so ("library" if none)."""
    name = os.path.basename(path)
    return name[len("_lomix_cpu_"):].split(".")[0] if name.startswith("_lomix_cpu_") else "library"


def _built_variants(folder: Optional[str] = None) -> dict:
    """{variant: path} of the compiled kernel libraries in ``folder`` (default: next to this file)."""
    here = folder or os.path.dirname(os.path.abspath(__file__))
    out = {}
    for path in sorted(glob.glob(os.path.join(here, "_lomix_cpu_*.so"))):
        out.setdefault(_variant_of(path), path)
    return out


def cpu_level() -> int:
    """This CPU's x86-64 level from cpuid (4: AVX-512, 3: AVX2+FMA, 1: older x86-64, 0: not x86), asked
    of the baseline-built probe library; -1 when it is missing."""
    path = _built_variants().get("probe")
    return int(ctypes.CDLL(path).lomix_cpu_x86_level()) if path else -1


def select_variant(built, cpu_level: int, forced: Optional[str]) -> str:
    """The variant to load: ``forced`` (checked against what was built and what the CPU runs), else the
    best built one the CPU runs. Raises ValueError saying why not."""
    if forced:
        if forced not in built:
            raise ValueError(f"{ISA_ENV}={forced!r}, but the built variants are {sorted(built)}")
        if LEVELS.get(forced, 0) > cpu_level:
            raise ValueError(f"{ISA_ENV}={forced!r} needs x86-64 level {LEVELS[forced]}, this CPU runs level "
                             f"{cpu_level} (choose one of {[v for v in built if LEVELS.get(v, 99) <= cpu_level]})")
        return forced
    usable = [v for v in built if v in LEVELS and LEVELS[v] <= cpu_level]
    if not usable:
        raise ValueError(f"no built CPU variant runs here (built: {sorted(built)}, x86-64 level {cpu_level}; "
                         "the fused CPU kernels need AVX2 and FMA on x86-64)")
    return max(usable, key=LEVELS.get)


def _open(path):
    lib = ctypes.CDLL(path)
    lib.lomix_cpu_forward.restype = ctypes.c_int
    lib.lomix_cpu_backward.restype = ctypes.c_int
    return lib


def _load():
    """Load the compiled kernels once, at import (keeps dynamo away from ctypes and os.path): ask the
    most portable build for this CPU's level (cpuid), then load the chosen variant."""
    library = os.environ.get(LIBRARY_ENV)
    if library:  # a kernel library built elsewhere with the same C ABI; its variant is in its file name
        try:
            return _open(library), _variant_of(library), ""
        except (OSError, AttributeError) as exc:
            return None, "", f"could not load {LIBRARY_ENV}={library!r}: {exc}"
    built = {k: v for k, v in _built_variants().items() if k != "probe"}
    if not built:
        return None, "", "the compiled CPU kernels were not found (build them: pip install --no-build-isolation -e .)"
    try:
        name = select_variant(built, cpu_level(), os.environ.get(ISA_ENV) or None)
        return _open(built[name]), name, ""
    except (OSError, AttributeError, ValueError) as exc:  # pragma: no cover - depends on the build
        return None, "", f"could not load the CPU kernels: {exc}"


_LIB, _VARIANT, _LOAD_ERROR = _load()


def variant() -> str:
    """The instruction-set variant of the loaded kernels ("" when none is loaded)."""
    return _VARIANT


def _library():
    return _LIB


def available() -> bool:
    """True when the compiled CPU kernels are loaded."""
    return _LIB is not None


def unavailable_reason() -> str:
    return _LOAD_ERROR


def vector_fma_rate(iters: int = 20_000_000) -> float:
    """Vector multiply-adds per second this thread sustains with the loaded kernels' vectors (measured
    by the library itself, ~0.1 s): the peak benchmarks/floor.py divides by."""
    if _LIB is None:
        raise RuntimeError(f"the CPU kernels are not loaded: {_LOAD_ERROR}")
    fn = _LIB.lomix_cpu_vector_fma_rate
    fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_int64]
    return float(fn(iters))


def _ptr(t: Optional[Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _int32(values) -> Tensor:
    return torch.tensor(values, dtype=torch.int32) if len(values) else torch.zeros(1, dtype=torch.int32)


class CpuKernels:
    """Fused forward/backward for CPU tensors (wrapped as custom ops by :mod:`lomix_kernels.fused`).
    Stages may be coarser than the target: the kernels interpolate them on the fly."""

    @staticmethod
    def _problem(plan, logits, target, pixel_weight, params):
        z0 = logits[0]
        out_size, stage_sizes = grid_sizes(logits, target)
        sizes = torch.tensor(stage_sizes, dtype=torch.int64)
        tables = [_int32(plan.map_op), _int32(plan.map_arg), _int32(plan.subset_size), _int32(plan.subset_members),
                  sizes]
        ptrs = (ctypes.c_void_p * len(logits))(*[z.data_ptr() for z in logits])
        pr = _Problem(
            batch=z0.shape[0], classes=z0.shape[1], pixels=math.prod(out_size),
            num_stages=len(logits), num_maps=plan.num_maps, num_subsets=len(plan.subset_size),
            logit_dtype=_DTYPES[z0.dtype],
            target_kind=_SOFT_TARGET if target.is_floating_point() else _TARGET_KINDS[target.dtype],
            sigmoid=plan.sigmoid, q=plan.q, has_ignore=plan.has_ignore, ignore_index=plan.ignore_index,
            num_labels=plan.num_labels, num_threads=torch.get_num_threads(),
            awf_block_diagonal=plan.block_diagonal, spatial_rank=z0.dim() - 2,
            out_size=(ctypes.c_int64 * 3)(*out_size), stage_size=_ptr(sizes),
            logits=ctypes.cast(ptrs, ctypes.POINTER(ctypes.c_void_p)),
            target=_ptr(target), pixel_weight=_ptr(pixel_weight),
            map_op=_ptr(tables[0]), map_arg=_ptr(tables[1]), subset_size=_ptr(tables[2]),
            subset_members=_ptr(tables[3]),
            cat_w=_ptr(params[0]), cat_b=_ptr(params[1]), awf_v=_ptr(params[2]), awf_c=_ptr(params[3]),
        )
        return pr, (ptrs, tables)  # keep the pointer array and tables alive during the call

    @classmethod
    def forward(cls, plan, logits, target, pixel_weight, params) -> MapStats:
        """logits: L contiguous (B, C, *sp_i), sp_i <= the target's size; params: 4 packed float32 tensors."""
        M, (B, C) = plan.num_maps, logits[0].shape[:2]
        pr, _keep = cls._problem(plan, logits, target, pixel_weight, params)
        f32 = dict(dtype=torch.float32)
        ce, inter, zsum = (torch.empty(M, B, C, **f32) for _ in range(3))
        tsum, tpow, count = torch.empty(B, C, **f32), torch.empty(B, C, **f32), torch.empty(B, **f32)
        err_value = ctypes.c_int64(0)
        code = _library().lomix_cpu_forward(
            ctypes.byref(pr), *(_ptr(t) for t in (ce, inter, zsum, tsum, tpow, count)), ctypes.byref(err_value))
        if code:
            msg = _ERRORS[code].format(value=err_value.value, labels=plan.num_labels)
            if code == 1 and plan.has_ignore:
                msg += f" that is not ignore_index={plan.ignore_index}"
            raise ValueError(msg)
        return MapStats(ce, inter, zsum, tsum, tpow, count)

    @classmethod
    def backward(cls, plan, logits, target, pixel_weight, params, gce, ginter, gzsum):
        """Statistic gradients (M, B, C) -> (list of L logits grads, packed float32 param grads)."""
        pr, _keep = cls._problem(plan, logits, target, pixel_weight, params)
        grads = [torch.empty_like(z) for z in logits]
        gptrs = (ctypes.c_void_p * len(grads))(*[g.data_ptr() for g in grads])
        dparams = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
        _library().lomix_cpu_backward(
            ctypes.byref(pr), _ptr(gce), _ptr(ginter), _ptr(gzsum),
            ctypes.cast(gptrs, ctypes.POINTER(ctypes.c_void_p)), _ptr(dparams))
        return grads, dparams
