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
    if hasattr(lib, "lomix_cpu_pool_tensor"):  # (a library built before the pool has none: ab.py's old revisions)
        lib.lomix_cpu_pool_tensor.restype = ctypes.c_void_p
        lib.lomix_cpu_pool_tensor.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.lomix_cpu_pool_reserve.argtypes = [ctypes.c_int64]
        lib.lomix_cpu_pool_cached_bytes.restype = ctypes.c_int64
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


GRAD_POOL_ENV = "LOMIX_CPU_GRAD_POOL"  # 0: plain torch.empty_like gradients (no recycled buffers)
_DLPACK_TYPES = {torch.float32: (2, 32), torch.float16: (2, 16), torch.bfloat16: (4, 16)}  # (kDLFloat | kDLBfloat, bits)
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype, _capsule_new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _grad_pool_enabled() -> bool:
    return _LIB is not None and hasattr(_LIB, "lomix_cpu_pool_tensor") and os.environ.get(GRAD_POOL_ENV, "1") != "0"


def gradients_like(logits) -> list:
    """Uninitialized contiguous tensors shaped like ``logits`` for the backward to write, over buffers the
    library recycles (csrc/grad_pool.h): when a gradient tensor dies its buffer goes back to a cache that
    holds at most one backward's gradients, so the next step writes into memory the process already has
    rather than fresh pages the OS must fault in and zero. ``LOMIX_CPU_GRAD_POOL=0`` turns it off;
    :func:`release_cached_gradients` frees the cache."""
    if not _grad_pool_enabled():
        return [torch.empty_like(z, memory_format=torch.contiguous_format) for z in logits]
    _LIB.lomix_cpu_pool_reserve(sum(z.numel() * z.element_size() for z in logits))
    out = []
    for z in logits:
        code, bits = _DLPACK_TYPES[z.dtype]
        shape = (ctypes.c_int64 * z.dim())(*z.shape)
        managed = _LIB.lomix_cpu_pool_tensor(z.dim(), shape, code, bits)
        if not managed:
            raise MemoryError(f"could not allocate a gradient of shape {tuple(z.shape)} ({z.dtype})")
        out.append(torch.from_dlpack(_capsule_new(managed, b"dltensor", None)))
    return out


def cached_gradient_bytes() -> int:
    """Bytes of gradient buffers the library holds for reuse (0 without the pool)."""
    return int(_LIB.lomix_cpu_pool_cached_bytes()) if _grad_pool_enabled() else 0


def release_cached_gradients() -> None:
    """Free the cached gradient buffers (tensors alive now keep theirs, and free them when they die)."""
    if _LIB is not None and hasattr(_LIB, "lomix_cpu_pool_release"):
        _LIB.lomix_cpu_pool_release()


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
        grads = gradients_like(logits)
        gptrs = (ctypes.c_void_p * len(grads))(*[g.data_ptr() for g in grads])
        dparams = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
        _library().lomix_cpu_backward(
            ctypes.byref(pr), _ptr(gce), _ptr(ginter), _ptr(gzsum),
            ctypes.cast(gptrs, ctypes.POINTER(ctypes.c_void_p)), _ptr(dparams))
        return grads, dparams
