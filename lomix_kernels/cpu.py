"""The fused CPU backend: ctypes bindings to csrc/lomix_cpu.cpp.

The library is a plain C ABI (no torch headers). :class:`CpuKernels` implements the two
entry points the shared autograd wrapper (:mod:`lomix_kernels.fused`) needs:
``forward`` (inputs -> MapStats) and ``backward`` (statistic gradients -> input gradients).
"""
from __future__ import annotations

import ctypes
import glob
import os
from typing import Optional

import torch
from torch import Tensor

from . import spec
from .finish import LossOptions, MapStats

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
        ("awf_block_diagonal", ctypes.c_int32),
        ("logits", ctypes.POINTER(ctypes.c_void_p)), ("target", ctypes.c_void_p),
        ("pixel_weight", ctypes.c_void_p),
        ("map_op", ctypes.c_void_p), ("map_arg", ctypes.c_void_p),
        ("subset_size", ctypes.c_void_p), ("subset_members", ctypes.c_void_p),
        ("cat_w", ctypes.c_void_p), ("cat_b", ctypes.c_void_p),
        ("awf_v", ctypes.c_void_p), ("awf_c", ctypes.c_void_p),
    ]


def _find_library() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_lomix_cpu*.so")))
    return found[0] if found else None


_LIB = None
_LOAD_ERROR = None


def _library():
    global _LIB, _LOAD_ERROR
    if _LIB is None and _LOAD_ERROR is None:
        path = _find_library()
        if path is None:
            _LOAD_ERROR = "the compiled CPU kernels were not found (build them: pip install --no-build-isolation -e .)"
        else:
            try:
                lib = ctypes.CDLL(path)
                lib.lomix_cpu_forward.restype = ctypes.c_int
                lib.lomix_cpu_backward.restype = ctypes.c_int
                _LIB = lib
            except OSError as exc:  # pragma: no cover - depends on the build
                _LOAD_ERROR = f"could not load {path}: {exc}"
    return _LIB


def available() -> bool:
    """True when the compiled CPU kernels can be loaded."""
    return _library() is not None


def unavailable_reason() -> str:
    _library()
    return _LOAD_ERROR or ""


def _ptr(t: Optional[Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class CpuKernels:
    """Fused forward/backward for CPU tensors. ``plan`` is built once per call by :meth:`plan`."""

    name = "cpu"

    @staticmethod
    def plan(maps, num_stages: int, num_classes: int, opts: LossOptions, activation_labels: int, awf_param: str):
        """Small int32 tables describing the maps and subsets (kept alive by the caller)."""
        subs = spec.subsets(num_stages)
        op = torch.tensor([spec.OP_CODES[m.op] for m in maps], dtype=torch.int32)
        arg = torch.tensor([m.members[0] if m.op == "orig" else m.subset_index for m in maps], dtype=torch.int32)
        size = torch.tensor([len(s) for s in subs], dtype=torch.int32)
        members = torch.tensor([i for s in subs for i in s], dtype=torch.int32)
        return {"map_op": op, "map_arg": arg, "subset_size": size, "subset_members": members,
                "num_stages": num_stages, "num_classes": num_classes, "num_maps": len(maps),
                "num_subsets": len(subs), "opts": opts, "num_labels": activation_labels, "awf_param": awf_param}

    @staticmethod
    def _problem(plan, logits, target, pixel_weight, params):
        opts: LossOptions = plan["opts"]
        z0 = logits[0]
        ptrs = (ctypes.c_void_p * len(logits))(*[z.data_ptr() for z in logits])
        pr = _Problem(
            batch=z0.shape[0], classes=z0.shape[1], pixels=z0[0, 0].numel(),
            num_stages=plan["num_stages"], num_maps=plan["num_maps"], num_subsets=plan["num_subsets"],
            logit_dtype=_DTYPES[z0.dtype],
            target_kind=_SOFT_TARGET if target.is_floating_point() else _TARGET_KINDS[target.dtype],
            sigmoid=int(opts.activation == "sigmoid"), q=opts.q,
            has_ignore=int(opts.ignore_index is not None),
            ignore_index=0 if opts.ignore_index is None else int(opts.ignore_index),
            num_labels=plan["num_labels"], num_threads=torch.get_num_threads(),
            awf_block_diagonal=int(plan["awf_param"] == "official"),
            logits=ctypes.cast(ptrs, ctypes.POINTER(ctypes.c_void_p)),
            target=_ptr(target), pixel_weight=_ptr(pixel_weight),
            map_op=_ptr(plan["map_op"]), map_arg=_ptr(plan["map_arg"]),
            subset_size=_ptr(plan["subset_size"]), subset_members=_ptr(plan["subset_members"]),
            cat_w=_ptr(params[0]), cat_b=_ptr(params[1]), awf_v=_ptr(params[2]), awf_c=_ptr(params[3]),
        )
        return pr, ptrs

    @classmethod
    def forward(cls, plan, logits, target, pixel_weight, params) -> MapStats:
        """logits: L contiguous (B, C, *sp) at the target's size; params: 4 packed float32 tensors."""
        M, (B, C) = plan["num_maps"], logits[0].shape[:2]
        pr, _keep = cls._problem(plan, logits, target, pixel_weight, params)
        f32 = dict(dtype=torch.float32)
        ce, inter, zsum = (torch.empty(M, B, C, **f32) for _ in range(3))
        tsum, tpow, count = torch.empty(B, C, **f32), torch.empty(B, C, **f32), torch.empty(B, **f32)
        err_value = ctypes.c_int64(0)
        code = _library().lomix_cpu_forward(
            ctypes.byref(pr), *(_ptr(t) for t in (ce, inter, zsum, tsum, tpow, count)), ctypes.byref(err_value))
        if code:
            raise ValueError(_ERRORS[code].format(value=err_value.value, labels=plan["num_labels"])
                             + (f" that is not ignore_index={plan['opts'].ignore_index}"
                                if code == 1 and plan["opts"].ignore_index is not None else ""))
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
