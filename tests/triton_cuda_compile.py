"""Compile the Triton kernels for a CUDA GPU on a machine without one, and report ptxas's
register and spill counts.

    python tests/triton_cuda_compile.py [--arch 90] [--quick]

Triton ships ptxas, so the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) runs without a
device: a kernel that would not compile on the H100 fails here. The real host code builds every
launch (argument lists, constexprs, configs) on CPU tensors; only the launch is replaced by a
compile. tests/test_triton.py runs this in a subprocess (it must not see TRITON_INTERPRET).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import lomix_kernels as lk  # noqa: E402
from lomix_kernels import triton_backend as tb  # noqa: E402
from lomix_kernels.finish import MapStats  # noqa: E402

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32", torch.int16: "i16", torch.uint8: "u8"}
REPORT = []


def compile_launch(kernel, args, constexprs, arch):
    """Compile ``kernel`` for sm_<arch> with the argument types of a real launch; ptxas's resource line."""
    constexprs = dict(constexprs)
    num_warps = constexprs.pop("num_warps")
    signature = {}
    for name, value in zip(kernel.arg_names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
        else:
            signature[name] = "i32" if -2 ** 31 <= int(value) < 2 ** 31 else "i64"
    for name in kernel.arg_names[len(args):]:
        signature[name] = "constexpr"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([get_ptxas(arch).path, f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}",
                              "-v", ptx, "-o", cubin], capture_output=True, text=True)
        used = re.search(r"Used (\d+) registers", out.stderr)
        spill = re.search(r"(\d+) bytes spill stores", out.stderr)
        info = f"{used.group(1) if used else '?'} regs, {spill.group(1) if spill else '?'} B spill stores"
        if SASS and os.path.exists(cubin):
            info += "\n    " + sass_histogram(cubin)
    return info


SASS = False  # --sass: also the kernels' static instruction mix


def sass_histogram(cubin: str) -> str:
    """The static SASS instruction mix of a cubin by class (cuobjdump ships with triton): where a kernel's
    instructions go — reductions (shuffles, barriers, shared memory), FP32 math, SFU, memory, control."""
    tool = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    text = subprocess.run([tool, "-sass", cubin], capture_output=True, text=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text)
    classes = {"shuffle": ("SHFL",), "barrier": ("BAR", "WARPSYNC"), "shared": ("LDS", "STS"),
               "fp32": ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL"), "sfu": ("MUFU",),
               "global": ("LDG", "STG", "ATOM", "RED"), "local (spill)": ("LDL", "STL"),
               "int/select": ("IADD3", "IMAD", "ISETP", "SEL", "LOP3", "SHF", "LEA", "MOV", "IABS", "IMNMX"),
               "control": ("BRA", "BSYNC", "BSSY", "EXIT", "CALL", "RET")}
    counts = {k: sum(1 for op in ops if op.split(".")[0] in v) for k, v in classes.items()}
    counts["other"] = len(ops) - sum(counts.values())
    return f"{len(ops)} SASS instructions: " + ", ".join(f"{k} {v}" for k, v in counts.items())


def install_compile_hooks(arch):
    """Replace the two launches by compiles; return zero results of the right shapes."""

    def forward(cls, pb, cfg):
        grid, args, constexprs, _ = cls.forward_launch(pb, cfg)
        t0 = time.time()
        info = compile_launch(tb._forward_kernel, args, constexprs, arch)
        REPORT.append(f"forward  {pb.describe(cfg)}: {info} ({time.time() - t0:.1f} s)")
        M, B, C = pb.plan.num_maps, pb.B, pb.C
        return MapStats(*(torch.zeros(*s) for s in [(M, B, C)] * 3 + [(B, C)] * 2 + [(B,)]))

    def backward(cls, pb, cfg, g):
        grid, args, constexprs, (grads, slots, dp, geo) = cls.backward_launch(pb, cfg, g)
        t0 = time.time()
        info = compile_launch(tb._backward_kernel, args, constexprs, arch)
        REPORT.append(f"backward {pb.describe(cfg)}: {info} ({time.time() - t0:.1f} s)")
        return [torch.zeros_like(z) for z in pb.logits], torch.zeros(sum(p.numel() for p in pb.params))

    tb.INTERPRET = True  # let backend="triton" accept the CPU tensors that only describe the launch
    tb.TritonKernels._forward = classmethod(forward)
    tb.TritonKernels._backward = classmethod(backward)
    tb._Problem.describe = lambda pb, cfg: (f"L={pb.L} C={pb.C} {'3D' if pb.is3d else '2D'} "
                                            f"{pb.logits[0].dtype} cfg={cfg}")


def problems(quick):
    """(LoMixLoss kwargs, logits dtype, target kind, pixel weight, spatial, configs) to compile."""
    all2d, all3d = (tb.CONFIGS_2D[:1], tb.CONFIGS_3D[:1]) if quick else (tb.CONFIGS_2D, tb.CONFIGS_3D)
    yield dict(num_stages=4, num_classes=9), torch.float32, "int", False, (224, 224), all2d
    yield dict(num_stages=4, num_classes=14), torch.float32, "int", False, (24, 24, 24), all3d
    if quick:
        return
    yield dict(num_stages=5, num_classes=9), torch.bfloat16, "int", True, (64, 64), all2d[:1]
    yield dict(num_stages=2, num_classes=16, awf_param="paper"), torch.float16, "int", False, (32, 32), all2d[:1]
    yield dict(num_stages=3, num_classes=4, activation="sigmoid"), torch.float32, "soft", False, (32, 32), all2d[:1]
    yield dict(num_stages=6, num_classes=2, dice_squared=False, ignore_index=255), torch.float32, "u8", True, \
        (16, 16, 16), all3d[:1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    ap.add_argument("--quick", action="store_true", help="only the L=4 2D and 3D problems, default configs")
    ap.add_argument("--sass", action="store_true", help="also each kernel's static SASS instruction mix")
    args = ap.parse_args()
    global SASS
    SASS = args.sass
    install_compile_hooks(args.arch)
    for kwargs, dtype, kind, weighted, spatial, configs in problems(args.quick):
        L, C, B = kwargs["num_stages"], kwargs["num_classes"], 2
        heads = [tuple(max(1, s >> (L - 1 - i)) for s in spatial) for i in range(L)]  # native heads
        logits = [torch.randn(B, C, *h, dtype=dtype, requires_grad=True) for h in heads]
        if kind == "soft":
            target = torch.rand(B, C, *spatial)
        else:
            target = torch.randint(0, C, (B, *spatial), dtype=torch.uint8 if kind == "u8" else torch.int64)
        pw = torch.rand(B, *spatial) if weighted else None
        crit = lk.LoMixLoss(backend="triton", validate=False, **kwargs)
        for cfg in configs:
            os.environ["LOMIX_TRITON_CONFIG"] = ",".join(map(str, cfg))
            crit(logits, target, pixel_weight=pw).backward()
    print("\n".join(REPORT))
    print(f"compiled {len(REPORT)} kernels for sm_{args.arch}")


if __name__ == "__main__":
    sys.exit(main())
